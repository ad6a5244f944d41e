"""What the fast path's per-image options cost: batch_augment.BatchAugment on a uint8 batch, options off/on.

    python bench/augment_cost.py                  # 32 px crops from 37 px squares, batch 128, CPU
    python bench/augment_cost.py --device cuda --batch-size 256

The settings take turns within every repeat (a burst of load from other processes hits all of them);
the table shows the median images/s over repeats and the median of each repeat's ratio to "off". Compare
the images/s with the model step's (bench/throughput.py): augmentation runs once per step, in series.
The video degradations (video_augment.degrade_batch, on the squares before the crop) get a second table:
the regular path's cost, video_augment.VideoDegrade on one square at a time, as a DataLoader worker runs it.
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
from classifier.video_augment import VideoDegrade  # noqa: E402

SETTINGS = {  # name -> BatchAugment options on top of the trainer's defaults
    "off": {},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "random erasing 0.25": {"random_erasing": 0.25},
}
VIDEO_OFF = {"motion_blur": 0.0, "low_resolution": 0.0, "jpeg": 0.0, "occlusion": 0.0}
VIDEO_SETTINGS = {  # name -> video degradation probabilities
    "motion blur 1": {**VIDEO_OFF, "motion_blur": 1.0},
    "low resolution 1": {**VIDEO_OFF, "low_resolution": 1.0},
    "jpeg 1": {**VIDEO_OFF, "jpeg": 1.0},
    "occlusion 1": {**VIDEO_OFF, "occlusion": 1.0},
    "video all four 0.5": dict.fromkeys(VIDEO_OFF, 0.5),
}
SETTINGS |= {name: {"video": probabilities} for name, probabilities in VIDEO_SETTINGS.items()}


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


def per_image_rates(images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median images/s of VideoDegrade over repeats, one image at a time on the CPU, settings taking turns."""
    images = images.cpu()
    transforms = {name: VideoDegrade(**probabilities) for name, probabilities in VIDEO_SETTINGS.items()}
    rates: dict[str, list[float]] = {name: [] for name in transforms}
    for r in range(repeats):
        torch.manual_seed(r)
        for name, transform in transforms.items():
            transform(images[0])  # warm-up
            start = time.perf_counter()
            for image in images:
                transform(image)
            rates[name].append(len(images) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


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
    threads = torch.get_num_threads()
    print(f"\nregular path: VideoDegrade, one {side} px square at a time, CPU, {threads} threads")
    print("\n| setting | images/s | us per image |\n|---|---:|---:|")
    for name, rate in per_image_rates(images, args.repeats).items():
        result[f"{name} (per image)"] = rate
        print(f"| {name} | {rate:.0f} | {1e6 / rate:.0f} |")
    return result


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
