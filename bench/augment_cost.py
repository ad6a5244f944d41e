"""What the fast path's per-image options cost: batch_augment.BatchAugment on a uint8 batch, options off/on.

    python bench/augment_cost.py                  # 32 px crops from 37 px squares, batch 128, CPU
    python bench/augment_cost.py --device cuda --batch-size 256

The settings take turns within every repeat (a burst of load from other processes hits all of them);
the table shows the median images/s over repeats and the median of each repeat's ratio to "off". Compare
the images/s with the model step's (bench/throughput.py): augmentation runs once per step, in series.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier.batch_augment import BatchAugment  # noqa: E402
from classifier.config import DataConfig  # noqa: E402
from classifier.distributed import pick_device  # noqa: E402

SETTINGS = {  # name -> BatchAugment options on top of the trainer's defaults
    "off": {},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "random erasing 0.25": {"random_erasing": 0.25},
}


@dataclass(frozen=True)
class BenchArgs:
    batch_size: int = 128
    """Images per batch."""
    image_size: int = 32
    """Side of the training crop; the cached squares are image_size * 256 / 224 (the eval resize)."""
    batches: int = 20
    """Timed batches per setting per repeat."""
    repeats: int = 5
    """Rounds over all settings; the table shows medians."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'auto'."""
    threads: int | None = None
    """torch.set_num_threads (default: torch's). On a machine busy with other work, 1 gives steadier numbers:
    intra-op threads waiting for a core to come free can make a small batch many times slower."""


def images_per_s(augment: BatchAugment, images: torch.Tensor, batches: int, device: torch.device) -> float:
    augment(images, torch.Generator().manual_seed(0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for b in range(batches):
        augment(images, torch.Generator().manual_seed(b))  # a new generator per batch, as TensorLoader does
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * len(images) / (time.perf_counter() - start)


def main(args: BenchArgs) -> dict[str, float]:
    device = pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d = DataConfig()
    side = round(args.image_size * 256 / 224)
    # Real-looking content matters a little (equalize/autocontrast do per-image histograms): smooth blobs.
    blobs = torch.rand(args.batch_size, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 255
    images = torch.nn.functional.interpolate(blobs, size=side, mode="bilinear").byte().to(device)
    transforms = {
        name: BatchAugment(
            args.image_size,
            crop_scale=d.crop_scale,
            crop_ratio=d.crop_ratio,
            hflip=d.hflip,
            color_jitter=0.2,
            mean=d.mean,
            std=d.std,
            **options,
        ).to(device)
        for name, options in SETTINGS.items()
    }
    print(
        f"batch {args.batch_size} | {side} px squares -> {args.image_size} px crops | {device} | "
        f"{torch.get_num_threads()} threads | colour jitter 0.2 in every setting"
    )
    rates: dict[str, list[float]] = {name: [] for name in transforms}
    for r in range(args.repeats):
        names = list(transforms)[r % len(transforms) :] + list(transforms)[: r % len(transforms)]
        for name in names:
            rates[name].append(images_per_s(transforms[name], images, args.batches, device))
    print("\n| setting | images/s | ratio to off | ms per batch |\n|---|---:|---:|---:|")
    result = {}
    for name in transforms:
        ratio = statistics.median(rate / off for rate, off in zip(rates[name], rates["off"], strict=True))
        result[name] = statistics.median(rates[name])
        print(f"| {name} | {result[name]:.0f} | {ratio:.2f} | {1000 * args.batch_size / result[name]:.1f} |")
    return result


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
