"""Where the regular data path spends its time, per image, in one process (no DataLoader workers).

    python bench/data_cost.py                          # Fashion-MNIST, 32 px crops, the default recipe
    python bench/data_cost.py --image-size 224 --root DIR

Each stage of `ImageDataset.__getitem__` and of `ImageDataset.collate` is timed alone over the same
images, in milliseconds of one core per image (median over repeats): decode (classifier.images.load_image),
the per-image stage of the training and eval transforms (uint8 crops), and the collation of a batch with
the batch stage (ToDtype, Normalize). The last rows time the whole training and eval items, as a
DataLoader worker runs them, batch stage included: with a training step that needs every core, every
millisecond here is taken from the step. Last, the start-up scan (train.py's --data.scan-images: every
file of the split decoded once, in `--scan-workers` processes) is timed over the whole train/ split, in
wall-clock seconds.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier.config import DataConfig  # noqa: E402
from classifier.data import ImageDataset, find_classes, list_images  # noqa: E402
from classifier.images import load_image, scan_images  # noqa: E402
from classifier.transforms import eval_transform, preprocessing_spec, train_transform  # noqa: E402


@dataclass(frozen=True)
class BenchArgs:
    root: Path = Path("data/fashion-mnist")
    """ImageFolder root; its train/ split is read (`python -m classifier.fashion_mnist DIR` makes one)."""
    images: int = 1024
    """Images drawn (seeded) from train/."""
    image_size: int = 32
    """Side of the training crop (and of the eval center crop)."""
    batch_size: int = 128
    """Images per collated batch."""
    repeats: int = 5
    """Passes over the images per stage; the table shows the median pass."""
    scan_workers: int = 2
    """Processes of the start-up scan (train.py uses its resolved --data.num-workers)."""


def ms_per_item(run: Callable[[int], object], count: int, repeats: int) -> float:
    """Median over `repeats` passes of the time of run(0..count-1), in ms per item."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            run(i)
        passes.append((time.perf_counter() - start) / count * 1000)
    return statistics.median(passes)


def main(args: BenchArgs) -> dict[str, float]:
    torch.set_num_threads(1)  # as in a DataLoader worker
    classes = find_classes(args.root / "train")
    every = list_images(args.root / "train", {name: i for i, name in enumerate(classes)})
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))
    samples = [every[i] for i in order[: args.images].tolist()]
    d = DataConfig()
    spec = preprocessing_spec(
        image_size=args.image_size, resize_size=None, mean=d.mean, std=d.std, interpolation=d.interpolation
    )
    augment = train_transform(
        image_size=args.image_size,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        mean=d.mean,
        std=d.std,
        interpolation=d.interpolation,
    )
    train_set = ImageDataset(samples, augment)
    eval_set = ImageDataset(samples, eval_transform(spec))
    decoded = [load_image(path) for path, _ in samples]  # also warms the file cache for the decode row
    batch = args.batch_size
    items = [train_set[(i, i)] for i in range(batch)]
    eval_items = [eval_set[i] for i in range(batch)]

    n, r = len(samples), args.repeats
    train_collate = ms_per_item(lambda i: train_set.collate(items), 8, r) / batch
    eval_collate = ms_per_item(lambda i: eval_set.collate(eval_items), 8, r) / batch
    train_item = ms_per_item(lambda i: train_set[(i, i)], n, r)
    eval_item = ms_per_item(lambda i: eval_set[i], n, r)
    rows = {
        "decode (load_image: open, EXIF, to RGB, to tensor)": ms_per_item(
            lambda i: load_image(samples[i][0]), n, r
        ),
        "train per-image stage (crop, flip)": ms_per_item(lambda i: train_set.transform(decoded[i]), n, r),
        "eval per-image stage (resize, center crop)": ms_per_item(
            lambda i: eval_set.transform(decoded[i]), n, r
        ),
        f"collate a batch of {batch}, stack only (per image)": ms_per_item(
            lambda i: default_collate(items), 8, r
        )
        / batch,
        f"collate a batch of {batch}, stack + batch stage: ToDtype, Normalize (per image)": train_collate,
        "whole training item (ImageDataset[(index, seed)] + share of collate)": train_item + train_collate,
        "whole eval item (ImageDataset[index] + share of collate)": eval_item + eval_collate,
    }
    print(
        f"{n} images from {args.root / 'train'} | {args.image_size} px | torch {torch.__version__}, 1 thread"
    )
    print("\n| stage | ms per image (one core) |\n|---|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.3f} |")

    paths = [path for path, _ in every]
    start = time.perf_counter()
    bad = scan_images(paths, workers=args.scan_workers)
    seconds = time.perf_counter() - start
    print(
        f"\nstart-up scan of all {len(paths)} train images, {args.scan_workers} processes: {seconds:.1f} s "
        f"({len(bad)} unreadable)"
    )
    rows["scan_seconds"] = seconds
    return rows


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
