"""The fast data path for small images: decode every image once into a uint8 tensor (in memory, optionally
cached on disk), then serve whole batches of it, transformed on the device by batch_augment.py: no PIL
work and no worker processes in the training loop. File listing and class mapping stay in data.py; the
order of samples and their seeds come from sampling.EpochSampler, so resume and DDP sharding work as there.

What differs from the regular path (data.py's PIL decode, transforms.py's v2 transforms, per image):
- The cache holds each image with its shorter side resized to `size` and center-cropped to a square;
  the random training crop is taken inside that square. Strips of non-square images outside it are
  never seen, and a small crop is upsampled from cached pixels: sources much larger than `size` lose
  the detail v2 would take from the original (cache at a larger `size` then).
- Crop boxes have sub-pixel corners (v2: whole pixels) and are resampled by roi_align: bilinear,
  averaging ceil(box / output) samples per output pixel when shrinking (v2: an antialiased resize in the
  chosen interpolation, rounded to uint8). Bicubic/nearest apply to decoding only.
- Colour jitter applies brightness, contrast, saturation in that fixed order (v2 shuffles the order).
- One generator per batch, seeded by the sampler's seed for the batch's first position: a sample's
  augmentation depends on its batch (v2 seeds each sample alone). Both are pure functions of (seed,
  epoch, position), so a resumed epoch sees the same batches, augmented the same.
- Evaluation is exact: cache the val split with `crop=image_size` (the eval resize and crop) and
  BatchEval converts and normalizes as transforms.eval_transform does.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from classifier import distributed
from classifier.batch_augment import BatchAugment, BatchEval, to_device
from classifier.config import DataConfig
from classifier.data import Sample, Splits
from classifier.files import atomic_write
from classifier.images import load_image
from classifier.sampling import EpochSampler
from classifier.transforms import to_square, train_square_side, video_degradations

CACHE_FORMAT = "classifier-fastdata/1"
# A small PNG decodes in well under a millisecond: past ~8 processes, starting them costs more than they save.
DEFAULT_DECODE_WORKERS = min(8, os.cpu_count() or 1)


class _ResizedImages(Dataset):
    """Image i of `paths`, decoded by images.load_image (EXIF, colour modes), resized and center-cropped
    ('crop' mode), or made a `crop` square by transforms.to_square ('pad', 'stretch')."""

    def __init__(self, paths: list[str], size: int, crop: int, interpolation: str, mode: str, fill):
        self.paths, self.size, self.crop, self.mode, self.fill = paths, size, crop, mode, fill
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        # The same functions and arguments as transforms.eval_resize_crop, so a val cache built with
        # crop=image_size is bit for bit what eval_transform computes before normalizing.
        image = load_image(self.paths[index])
        if self.mode != "crop":
            return to_square(
                image, self.crop, mode=self.mode, fill=self.fill, interpolation=self.interpolation
            )
        interpolation = InterpolationMode(self.interpolation)
        image = F.resize(image, self.size, interpolation=interpolation, antialias=True)
        return F.center_crop(image, [self.crop, self.crop])


def decode_split(
    samples: Sequence[Sample],
    size: int,
    interpolation: str,
    *,
    crop: int | None = None,
    mode: str = "crop",
    fill: Sequence[int] | None = None,
    num_workers: int = DEFAULT_DECODE_WORKERS,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once: uint8 images (N, 3, crop, crop) and int64 labels (N,), row i = samples[i].

    Each image's shorter side is resized to `size`, then it is center-cropped to a `crop` square (default
    `size`: the largest square). That square is what the cache keeps; the training crop happens inside it.
    In 'pad' and 'stretch' modes (--data.resize-mode) the whole image becomes the `crop` square instead.
    """
    crop = crop or size
    images = torch.empty((len(samples), 3, crop, crop), dtype=torch.uint8)  # filled in place: no 2x peak
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    dataset = _ResizedImages([path for path, _ in samples], size, crop, interpolation, mode, fill)
    # In order (no sampler): row i is samples[i]. Its own generator: every DataLoader iterator draws a
    # seed, and drawing it from the global RNG would make model init depend on whether a cache existed.
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, generator=torch.Generator())
    bar = tqdm(
        total=len(samples), desc="decoding images", unit="img", disable=not progress or len(samples) < 2000
    )
    done = 0
    for batch in loader:
        images[done : done + len(batch)] = batch
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    return images, labels


# --- the optional on-disk cache ---------------------------------------------------------------------


def cache_identity(
    samples: Sequence[Sample], size: int, crop: int | None, interpolation: str, mode: str = "crop", fill=None
) -> tuple[str, str]:
    """(file name, contents key) of a split's cache. The name follows which files, labels and geometry;
    the key adds each file's byte size and mtime, so a cache whose images were rewritten is stale.
    Samples are hashed in their given order (not sorted): row i of the cache must be samples[i]."""
    geometry = f"{size}\t{crop or size}\t{interpolation}" + (f"\t{mode}\t{fill}" if mode != "crop" else "")
    what = hashlib.sha256(f"{CACHE_FORMAT}\n{geometry}\n".encode())
    for path, label in samples:
        what.update(f"{path}\t{label}\n".encode())
    contents = what.copy()
    for path, _ in samples:
        stat = os.stat(path)
        contents.update(f"{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return f"images-{len(samples)}x{crop or size}px-{what.hexdigest()[:16]}.pt", contents.hexdigest()


def _cache_problem(cached, key: str, shape: tuple[int, ...]) -> str | None:
    """Why a loaded cache cannot be used, or None when it can."""
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
        return f"not a {CACHE_FORMAT} cache"
    if cached.get("key") != key:
        return "stale: image files changed since it was written"
    images = cached.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        return f"corrupt: expected uint8 images of shape {shape}"
    return None


def load_or_build_cache(
    samples: Sequence[Sample],
    size: int,
    interpolation: str,
    cache_dir: Path | None,
    *,
    crop: int | None = None,
    mode: str = "crop",
    fill: Sequence[int] | None = None,
    num_workers: int = DEFAULT_DECODE_WORKERS,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_split's result, read from `cache_dir` when a current cache of these files is there; else
    decoded, and saved there for the next run. A stale or unreadable cache is rebuilt, with a warning
    naming the file. With cache_dir None nothing touches the disk."""
    decode = functools.partial(
        decode_split,
        samples,
        size,
        interpolation,
        crop=crop,
        mode=mode,
        fill=fill,
        num_workers=num_workers,
        progress=progress,
    )
    if cache_dir is None:
        return decode()
    name, key = cache_identity(samples, size, crop, interpolation, mode, fill)
    path = Path(cache_dir) / name
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors; no code runs
            problem = _cache_problem(cached, key, (len(samples), 3, crop or size, crop or size))
        except Exception as err:  # truncated zip, pickle errors, ...: all mean "rebuild it"
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is None:
            return cached["images"], labels
        warnings.warn(f"rebuilding the image cache {path}: {problem}", stacklevel=2)
    images, labels = decode()
    # Atomic: DDP ranks building the same cache at once, or a crash mid-write, never leave half a file.
    atomic_write(path, lambda tmp: torch.save({"format": CACHE_FORMAT, "key": key, "images": images}, tmp))
    return images, labels


# --- the loader -------------------------------------------------------------------------------------


def cache_device(nbytes: int, device: torch.device) -> torch.device:
    """Where the decoded images live: on the GPU when they take under a quarter of its free memory
    (indexing a batch is then free), else in CPU memory, batches copied over one at a time."""
    if device.type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] / 4:
        return device
    return torch.device("cpu")


class TensorLoader:
    """One epoch of (images, labels) batches from decoded uint8 images, like a DataLoader over the same
    EpochSampler: the same keys in the same order, so batch b holds the same samples on either path.

    Images come out transformed, float and on `device`; labels stay on the CPU (pinned under CUDA), as a
    DataLoader's do, so the loop's `.to(device, non_blocking=True)` and per-class counting work unchanged.
    `len()` and iteration follow `sampler.set_epoch(epoch, start)`, which is how resume skips batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        sampler: EpochSampler,
        *,
        batch_size: int,
        drop_last: bool,
        transform: BatchAugment | BatchEval,
        device: torch.device,
    ):
        if len(images) != len(labels) or len(images) != sampler.num_samples:
            raise ValueError(
                f"{len(images)} images, {len(labels)} labels and a sampler over {sampler.num_samples} "
                "disagree"
            )
        self.images = images.to(cache_device(images.nbytes, device))
        self.labels, self.sampler = labels, sampler
        self.batch_size, self.drop_last, self.device = batch_size, drop_last, device
        self.transform = transform.to(device)

    def __len__(self) -> int:
        keys = len(self.sampler)
        return keys // self.batch_size if self.drop_last else math.ceil(keys / self.batch_size)

    def __iter__(self):
        # This rank's keys from `start` on: (index, seed) rows when training, bare indices when evaluating.
        keys = torch.tensor(list(self.sampler), dtype=torch.long)
        keys = keys.unsqueeze(1) if keys.ndim == 1 else keys
        indices = keys[:, 0].to(self.images.device)  # one copy per epoch, not one per batch
        for b in range(len(self)):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            generator = None
            if keys.shape[1] == 2:  # the batch's randomness: a pure function of (seed, epoch, position)
                generator = torch.Generator().manual_seed(int(keys[rows.start, 1]))
            images = to_device(self.images[indices[rows]], self.device)
            labels = self.labels[keys[rows, 0]]
            if self.device.type == "cuda":
                labels = labels.pin_memory()  # lets the loop's non_blocking copy skip the sync
            yield self.transform(images, generator), labels


def make_tensor_loaders(
    splits: Splits,
    train_sampler: EpochSampler,
    val_sampler: EpochSampler,
    data: DataConfig,
    preprocessing: dict,
    *,
    device: torch.device,
    channels_last: bool,
    workers: int,
    progress: bool,
) -> tuple[TensorLoader, TensorLoader]:
    """The fast path's train and val loaders. Train images are cached as squares of the eval resize (the
    random crop happens inside them); val images with the eval crop already applied, so evaluation is
    exact. With a cache_dir under DDP, rank 0 decodes and writes the cache while the others wait for it."""
    side = train_square_side(data.image_size, data.resize_size)
    geometry = dict(mode=data.resize_mode, fill=preprocessing.get("pad_fill"))
    if data.cache_dir is not None and not distributed.is_main():
        distributed.barrier()
    train_images, train_labels = load_or_build_cache(
        splits.train,
        side,
        data.interpolation,
        data.cache_dir,
        **geometry,
        num_workers=workers,
        progress=progress,
    )
    val_images, val_labels = load_or_build_cache(
        splits.val,
        side,
        data.interpolation,
        data.cache_dir,
        crop=data.image_size,
        **geometry,
        num_workers=workers,
        progress=progress,
    )
    if data.cache_dir is not None and distributed.is_main():
        distributed.barrier()
    augment = BatchAugment(
        data.image_size,
        crop_scale=data.crop_scale,
        crop_ratio=data.crop_ratio,
        hflip=data.hflip,
        color_jitter=data.color_jitter,
        mean=data.mean,
        std=data.std,
        channels_last=channels_last,
        auto_augment=data.auto_augment,
        randaugment_num_ops=data.randaugment_num_ops,
        randaugment_magnitude=data.randaugment_magnitude,
        interpolation=data.interpolation,
        random_erasing=data.random_erasing,
        video=video_degradations(data),
    )
    evaluate = BatchEval(data.image_size, mean=data.mean, std=data.std, channels_last=channels_last)
    train_loader = TensorLoader(
        train_images,
        train_labels,
        train_sampler,
        batch_size=data.batch_size,
        drop_last=True,
        transform=augment,
        device=device,
    )
    val_loader = TensorLoader(
        val_images,
        val_labels,
        val_sampler,
        batch_size=data.batch_size,
        drop_last=False,
        transform=evaluate,
        device=device,
    )
    return train_loader, val_loader
