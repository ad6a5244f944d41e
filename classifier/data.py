"""ImageFolder data: the class mapping, the splits, unreadable files, per-class counts and the data
fingerprint, the dataset and its DataLoader.

The class mapping is built once from `train/` for every split. Each split is its own dataset with the
transform it is given (built by transforms.py: train augments, val/test do not); the fast path
(fastdata.py) reuses the splits but not the dataset. Order and augmentation seeds come from
sampling.EpochSampler, so resume is exact and independent of the number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from classifier import manifest
from classifier.faults import ignore_signals_in_worker
from classifier.groups import group_split, groups_from_pattern
from classifier.images import IMAGE_EXTENSIONS, load_image
from classifier.sampling import EpochSampler
from classifier.transforms import Pipeline

Sample = tuple[str, int]  # (file path, class index)


# --- classes and splits ------------------------------------------------------------------------------


def class_sort_key(name: str) -> tuple:
    """Numeric names sort as numbers ("2" before "10"), before any non-numeric names, which sort as text.
    Plain sorted() would put "10" before "2": a classic silent label scramble for jersey numbers."""
    return (0, int(name), name) if name.isdigit() else (1, name)


def find_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data split folder not found: {split_dir}")
    names = [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not names:
        raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image files>")
    return sorted(names, key=class_sort_key)


def list_images(split_dir: Path, class_to_idx: dict[str, int]) -> list[Sample]:
    """All image files of one split, labelled with the shared mapping. A class folder the mapping does
    not know is an error naming it; a known class missing from this split is a warning."""
    present = find_classes(split_dir)
    unknown = [name for name in present if name not in class_to_idx]
    if unknown:
        raise ValueError(f"{split_dir} has class folders not in train/: {unknown}")
    missing = [name for name in class_to_idx if name not in present]
    if missing:
        warnings.warn(f"{split_dir} has no folder for classes {missing}", stacklevel=2)
    samples = []
    for name in present:
        for path in sorted((split_dir / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                samples.append((str(path), class_to_idx[name]))
    return samples


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of every class (at least one image when the class has two or more)."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = torch.randperm(len(items), generator=generator).tolist()
        n_val = min(len(items) - 1, max(1, round(fraction * len(items)))) if len(items) > 1 else 0
        val += [items[i] for i in order[:n_val]]
        train += [items[i] for i in order[n_val:]]
    return train, val


@dataclass
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    groups: dict[str, str] = field(default_factory=dict)  # path -> group (track, clip); {}: not known

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def build_splits(
    root: Path,
    val_fraction: float,
    seed: int,
    classes: list[str] | None = None,
    group_pattern: str | None = None,
) -> Splits:
    """Read an ImageFolder root (train/, optionally val/ and test/) or a manifest file (manifest.py).

    The classes are those of the training images (numeric names in numeric order); pass `classes` (from a
    checkpoint) to insist on a known mapping instead. Groups come from `group_pattern` or a manifest's
    group column. Without a val split, val is held out of train: whole groups when groups are known
    (groups.group_split), else images, stratified by class (stratified_split)."""
    root = Path(root)
    if manifest.is_manifest(root):
        rows = manifest.read_manifest(root)
        found = sorted({row.label for row in rows if row.split in (None, "train")}, key=class_sort_key)
        folder, source = root.parent, root
    elif root.is_dir():
        rows = None
        found = find_classes(root / "train")
        folder, source = root, root / "train"
    else:
        raise FileNotFoundError(f"--data.root {root} is neither a folder nor a manifest (.csv or .jsonl)")
    if classes is not None and found != list(classes):
        raise ValueError(describe_class_mismatch(list(classes), found, source))
    classes = found
    class_to_idx = {name: i for i, name in enumerate(classes)}
    if rows is not None:
        listed, groups = manifest.samples_by_split(rows, class_to_idx)
        train, val, test = listed["train"], listed["val"] or None, listed["test"]
    else:
        train = list_images(root / "train", class_to_idx)
        val = list_images(root / "val", class_to_idx) if (root / "val").is_dir() else None
        test = list_images(root / "test", class_to_idx) if (root / "test").is_dir() else []
        groups = {}
    if not train:
        raise ValueError(f"no image files under {source} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if group_pattern is not None:
        if groups:
            raise ValueError(f"{root} has a group column and --data.group-pattern is given: use one of them")
        groups = groups_from_pattern([path for path, _ in train + (val or []) + test], group_pattern, folder)
    if val is None and groups:
        train, val, one_group = group_split(train, groups, val_fraction, seed)
        if one_group:
            warnings.warn(
                f"classes whose images all lie in one group stay in train, with no val image: "
                f"{[classes[c] for c in one_group]}",
                stacklevel=2,
            )
    elif val is None:
        train, val = stratified_split(train, val_fraction, seed)
    empty_train = classes_without_images(train, classes)
    if empty_train:
        raise ValueError(f"classes with no training images in {source}: {empty_train}")
    empty_val = classes_without_images(val, classes)
    if empty_val:
        warnings.warn(f"classes with no validation images: {empty_val}", stacklevel=2)
    return Splits(classes, train, val, test, groups)


def classes_without_images(samples: Sequence[Sample], classes: list[str]) -> list[str]:
    return [classes[c] for c in (class_counts(samples, len(classes)) == 0).nonzero().flatten().tolist()]


def describe_class_mismatch(expected: list[str], found: list[str], where: Path) -> str:
    only_expected = [c for c in expected if c not in found]
    only_found = [c for c in found if c not in expected]
    lines = [f"the classes in {where} disagree with the checkpoint's class mapping:"]
    if only_expected:
        lines.append(f"  missing from the data: {only_expected}")
    if only_found:
        lines.append(f"  not in the checkpoint: {only_found}")
    if not only_expected and not only_found:
        lines.append(f"  same names, different order: checkpoint {expected} vs data {found}")
    return "\n".join(lines)


def class_counts(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    return torch.bincount(
        torch.tensor([label for _, label in samples], dtype=torch.long), minlength=num_classes
    )


def fingerprint(splits: Splits) -> dict:
    """Class counts per split and a hash of the sorted (path, label) list: tells whether two runs saw the
    same data without storing the file list."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        for path, label in sorted(getattr(splits, split)):
            digest.update(f"{split}\t{path}\t{label}\n".encode())
    k = len(splits.classes)
    return {
        "classes": splits.classes,
        "counts": {s: class_counts(getattr(splits, s), k).tolist() for s in ("train", "val", "test")},
        "files_sha256": digest.hexdigest(),
    }


# --- loading ------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """(path, label) pairs -> (image tensor, label). A key is an index, or (index, seed) from
    EpochSampler: the transform then draws its randomness from `seed`, not from worker state. Given a
    transforms.Pipeline, an item is its per-image stage's output (uint8) and `collate` runs its batch
    stage on the stacked batch; make_loader collates with it. Any other callable runs whole, per image."""

    def __init__(self, samples: Sequence[Sample], transform: Pipeline | Callable):
        self.samples = list(samples)
        if isinstance(transform, Pipeline):
            self.transform, self.batch_transform = transform.per_image, transform.per_batch
        else:
            self.transform, self.batch_transform = transform, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_image(path)
        if seed is None:
            return self.transform(image), label
        # v2 transforms of a CPU image draw only from torch's CPU generator, so seeding that one alone
        # gives the same pixels as torch.manual_seed, which also queues a seed for every CUDA device
        # (about 0.2 ms a call on a CUDA build of torch: as much as decoding a small PNG).
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.default_generator.manual_seed(seed)
            return self.transform(image), label

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items -> (images, labels) batch, with the batch stage of the transform applied."""
        images, labels = default_collate(items)
        if self.batch_transform is not None:
            images = self.batch_transform(images)
        return images, labels


def make_loader(
    dataset: ImageDataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,  # page-locked host memory lets the .to(device, non_blocking=True) overlap
        persistent_workers=num_workers > 0,  # keep workers (and their imports) alive across epochs
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating an iterator draws the workers' base seed, and drawing it from the
        # global RNG would make the model's RNG stream (dropout) depend on when the loader was iterated.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_signals_in_worker,
    )


def peek_batch(loader, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` (images, labels) of the batch `loader` yields first, without touching any RNG or
    iterator state: for a DataLoader over an EpochSampler, from the dataset directly with the sampler's
    keys, collated as the loader collates (ImageDataset seeds each key's transform under fork_rng; no
    worker is started); for the fast path's TensorLoader (pure by design: it seeds a generator per
    batch), its first batch."""
    if isinstance(loader, DataLoader):
        keys = itertools.islice(loader.sampler, min(count, loader.batch_size))
        return loader.collate_fn([loader.dataset[key] for key in keys])
    images, labels = next(iter(loader))
    return images[:count], labels[:count]
