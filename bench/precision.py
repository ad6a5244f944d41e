"""Training images/s of a preset in fp32 and bf16, measured in one run, and what `--precision auto` picks.

    python bench/precision.py                          # the fashion-mnist preset on this machine
    python bench/precision.py --preset jersey --images 1024

The step is train.py's (forward under autocast, backward, AdamW step, EMA update) on the preset's model,
image size, batch size and channels_last choice, fed by the preset's fast-path augmentation from a uint8
cache of real training images (the fast path does no per-image work, so the figure is the model's). The
two precisions take turns within every round, so a burst of load from other processes hits both; the
table shows the median images/s and, for 'auto', the median per-round ratio of its pick to the faster of
the two. A CPU without native bf16 (no avx512_bf16/AMX) emulates it: about 2x slower than fp32 with
AVX-512, 12x with AVX2 only (keep --batches small there).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from throughput import describe_machine, images_per_s  # noqa: E402  (bench/ is the script's folder)

from classifier import hardware  # noqa: E402
from classifier.batch_augment import BatchAugment  # noqa: E402
from classifier.data import find_classes, list_images  # noqa: E402
from classifier.distributed import pick_device  # noqa: E402
from classifier.ema import build_ema  # noqa: E402
from classifier.fastdata import decode_split  # noqa: E402
from classifier.losses import build_criterion  # noqa: E402
from classifier.models import build_model  # noqa: E402
from classifier.optim import build_optimizer, default_lr  # noqa: E402
from classifier.transforms import preprocessing_spec  # noqa: E402
from configs import get_preset  # noqa: E402

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchArgs:
    preset: str = "fashion-mnist"
    """Preset from configs/ whose model, image size, batch size and augmentation are measured."""
    root: Path | None = None
    """ImageFolder root whose train/ split is read (default: the preset's --data.root)."""
    images: int = 2048
    """Training images decoded (seeded draw) into the uint8 cache that feeds every step."""
    repeats: int = 5
    """Rounds of (fp32, bf16); the table shows medians over rounds."""
    batches: int = 8
    """Timed steps per precision per round."""
    warmup: int = 2
    """Untimed steps before each timing (allocator, oneDNN's kernel caches for this dtype)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    seed: int = 0
    """Seeds the image draw, the model and the augmentation."""


def main(args: BenchArgs) -> dict[str, float]:
    cfg = get_preset(args.preset)
    d = cfg.data
    root = args.root or d.root
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    auto = hardware.resolve_precision("auto", device)
    channels_last = hardware.resolve_channels_last(cfg.channels_last, device, auto.value).value
    print(describe_machine(device))
    print(
        f"cpu: {hardware.cpu_model()} | "
        f"native bf16 flags: {hardware.describe()['cpu_native_bf16_flags'] or 'none'}"
    )
    print(f"--precision auto picks {auto.value} here ({auto.reason})")
    if auto.value not in PRECISIONS:
        raise SystemExit(f"error: auto picked {auto.value}; this benchmark compares {PRECISIONS} only")

    # --- a uint8 cache of real images, and the preset's own batch augmentation ----------------------
    classes = find_classes(root / "train")
    every = list_images(root / "train", {name: i for i, name in enumerate(classes)})
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(args.seed))
    samples = [every[i] for i in order[: args.images].tolist()]
    if len(samples) < d.batch_size:
        raise SystemExit(
            f"error: {len(samples)} images under {root / 'train'} cannot fill a batch of {d.batch_size}"
        )
    spec = preprocessing_spec(
        image_size=d.image_size,
        resize_size=d.resize_size,
        mean=d.mean,
        std=d.std,
        interpolation=d.interpolation,
    )
    cache, labels = decode_split(samples, spec["resize_shorter_side"], d.interpolation)
    augment = BatchAugment(
        d.image_size,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        mean=d.mean,
        std=d.std,
        channels_last=channels_last,
    ).to(device)
    cache = cache.to(device)

    def batches():
        """Endless augmented batches: a fresh random draw of the cache per batch, as an epoch would give."""
        generator = torch.Generator().manual_seed(args.seed)
        while True:
            rows = torch.randint(0, len(cache), (d.batch_size,), generator=generator)
            yield augment(cache[rows.to(device)], generator), labels[rows].to(device)

    # --- the preset's model and train.py's step, one copy per precision -----------------------------
    print(
        f"{args.preset}: {cfg.model} at {d.image_size} px | batch {d.batch_size} | channels_last "
        f"{channels_last} | {len(samples)} images from {root / 'train'}"
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    steps = {}
    for precision in PRECISIONS:
        torch.manual_seed(args.seed)  # the same initial weights for both
        steps[precision] = make_step(cfg, len(classes), precision, device, memory_format)

    rates: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    stream = batches()
    for r in range(args.repeats):
        for precision in PRECISIONS[r % 2 :] + PRECISIONS[: r % 2]:  # alternate which one runs first
            rate = images_per_s(
                stream, steps[precision], warmup=args.warmup, count=args.batches, device=device
            )
            rates[precision].append(rate)
        print(
            f"round {r + 1}/{args.repeats}: "
            + " | ".join(f"{p} {rates[p][-1]:.0f} img/s" for p in PRECISIONS)
        )

    best_per_round = [max(rates[p][r] for p in PRECISIONS) for r in range(args.repeats)]
    auto_ratio = statistics.median(
        rate / best for rate, best in zip(rates[auto.value], best_per_round, strict=True)
    )
    result = {p: statistics.median(rates[p]) for p in PRECISIONS}
    print("\n| precision | training images/s (median) |\n|---|---:|")
    for precision in PRECISIONS:
        print(f"| {precision} | {result[precision]:.0f} |")
    print(f"| auto = {auto.value} | {auto_ratio:.2f} of the faster of the two (median per-round ratio) |")
    result["auto_ratio"] = auto_ratio
    return result


def make_step(
    cfg, num_classes: int, precision: str, device: torch.device, memory_format: torch.memory_format
):
    """train.py's optimizer step for `precision`, on its own model, optimizer and EMA."""
    model = build_model(
        cfg.model, num_classes, small_input_stem=cfg.small_input_stem, stem_stride=cfg.stem_stride
    )
    model = model.to(device, memory_format=memory_format).train()
    o = cfg.optim
    optimizer = build_optimizer(
        model,
        o.optimizer,
        lr=o.lr or default_lr(o.optimizer, pretrained=False),
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        betas=o.betas,
    )
    ema = build_ema(model, cfg.ema_half_life_epochs, steps_per_epoch=100, epochs=cfg.epochs)
    criterion = build_criterion(label_smoothing=o.label_smoothing)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast:
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)

    return step


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
