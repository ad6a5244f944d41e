"""Training throughput of the data paths against the bare-loop limit, in one process, on the same data.

    python -m classifier.fashion_mnist data/fashion-mnist          # once: Fashion-MNIST as an ImageFolder
    python bench/throughput.py                                       # ResNet18, 32 px, bf16, 5120 images
    python bench/throughput.py --device cuda --channels-last --compile --batch-size 256

Three ways to feed the same model step (forward, backward, AdamW step) at the same batch size and precision:
  bare     batches already on the device as float tensors: the limit, no data work at all
  regular  classifier.data, .transforms: PNG decode + v2 uint8 transforms per image in DataLoader
           workers, ToDtype + Normalize once per batch in the loader's collate
  fast     classifier.fastdata, .batch_augment: decoded once into uint8 tensors, augmented a batch at a time
and, with --peers (the default), the peers' per-image pipelines on the same step, DataLoader settings and
augmentation parameters, each file read as both peers read it (PIL open, convert to RGB):
  torchvision  references/classification/presets.py's training preset with its defaults (PIL backend):
               RandomResizedCrop and RandomHorizontalFlip on the PIL image, PILToTensor, ConvertImageDtype,
               Normalize; written out here because the reference scripts are not in the pip package
  timm         timm.data.create_transform(is_training=True): its PIL crop and flip, ToTensor, Normalize;
               only when timm is installed (`pip install timm`: not a dependency of this project)
The paths take turns within every repeat, so a burst of load from other processes hits all of them;
the table shows the median images/s and the median of each repeat's ratio to the bare loop.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as v1
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier.batch_augment import BatchAugment  # noqa: E402
from classifier.config import DataConfig, OptimConfig  # noqa: E402
from classifier.data import ImageDataset, find_classes, list_images, make_loader  # noqa: E402
from classifier.distributed import pick_device  # noqa: E402
from classifier.fastdata import TensorLoader, decode_split  # noqa: E402
from classifier.models import build_model  # noqa: E402
from classifier.optim import build_optimizer, default_lr  # noqa: E402
from classifier.sampling import EpochSampler  # noqa: E402
from classifier.transforms import preprocessing_spec, train_transform  # noqa: E402


@dataclass(frozen=True)
class BenchArgs:
    root: Path = Path("data/fashion-mnist")
    """ImageFolder root; its train/ split is read (`python -m classifier.fashion_mnist DIR` makes one)."""
    images: int = 5120
    """Images drawn (seeded) from train/ for all three paths."""
    batch_size: int = 128
    """Images per step."""
    image_size: int = 32
    """Side of the training crop."""
    workers: tuple[int, ...] = (min(4, os.cpu_count() or 1),)
    """DataLoader workers of the regular path; several (`--workers 2 1`) give one regular row each, all
    taking turns with the other paths."""
    repeats: int = 3
    """Rounds of (bare, regular, fast); the table shows medians over rounds."""
    batches: int = 20
    """Timed steps per path per round."""
    warmup: int = 3
    """Untimed steps before each timing (allocator, oneDNN caches, the DataLoader's pipeline filling up)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype, as train.py's --precision."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    channels_last: bool = False
    """channels_last model and images."""
    compile: bool = False
    """torch.compile the model (one compile, shared by the three paths; slow to start)."""
    small_input_stem: bool = False
    """ResNet18 with the 3x3 stride-1 stem and no max-pool (more compute per 32 px image)."""
    seed: int = 0
    """Seeds the subset, the model and the data order."""
    peers: bool = True
    """Also time torchvision's and (when installed) timm's per-image pipelines (the first --workers count)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA work is queued: stop the clock only when it is done


def images_per_s(
    batches: Iterator, step: Callable, *, warmup: int, count: int, device: torch.device
) -> float:
    for _ in range(warmup):
        step(*next(batches))
    synchronize(device)
    start, seen = time.perf_counter(), 0
    for _ in range(count):
        images, labels = next(batches)
        step(images, labels)
        seen += len(labels)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def endless(loader, sampler: EpochSampler, first_epoch: int) -> Iterator:
    """Batches of epoch after epoch, as train.py draws them (set_epoch, then iterate the loader)."""
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)
        yield from loader


class PilImages(Dataset):
    """(path, label) -> (transform(image), label), each file read as torchvision's ImageFolder and timm's
    ImageDataset read it: PIL.Image.open, then convert('RGB')."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with open(path, "rb") as file:
            image = Image.open(file).convert("RGB")
        return self.transform(image), label


def torchvision_reference_transform(image_size: int, d: DataConfig) -> Callable:
    """ClassificationPresetTrain(crop_size=image_size) of references/classification with its default PIL
    backend, given this project's crop scale, ratio, flip, interpolation, mean and std."""
    crop = v1.RandomResizedCrop(
        image_size,
        scale=d.crop_scale,
        ratio=d.crop_ratio,
        interpolation=InterpolationMode(d.interpolation),
        antialias=True,
    )
    flip = [v1.RandomHorizontalFlip(0.5)] if d.hflip else []  # the preset adds it for hflip_prob > 0
    to_float = [v1.PILToTensor(), v1.ConvertImageDtype(torch.float), v1.Normalize(d.mean, d.std)]
    return v1.Compose([crop, *flip, *to_float])


def timm_transform(image_size: int, d: DataConfig) -> Callable | None:
    """timm's training transform with the same parameters; None when timm is not installed."""
    try:
        from timm.data import create_transform
    except ImportError:
        return None
    return create_transform(
        image_size,
        is_training=True,
        scale=d.crop_scale,
        ratio=d.crop_ratio,
        hflip=0.5 if d.hflip else 0.0,
        color_jitter=d.color_jitter or None,  # None: no jitter step at all, as ours has none when it is 0
        interpolation=d.interpolation,
        mean=d.mean,
        std=d.std,
    )


def peer_loader(
    dataset: Dataset, *, batch_size: int, workers: int, pin_memory: bool, seed: int
) -> DataLoader:
    """The DataLoader settings of data.make_loader, with a shuffling sampler instead of EpochSampler."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def describe_machine(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = (
        " | load average " + " ".join(f"{n:.2f}" for n in os.getloadavg())
        if hasattr(os, "getloadavg")
        else ""
    )
    return (
        f"machine: {cores} usable cores (of {os.cpu_count()}) | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | device {device} ({name}){load}"
    )


def main(args: BenchArgs) -> dict[str, float]:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    print(describe_machine(device))

    # --- the same data for every path -------------------------------------------------------------------
    classes = find_classes(args.root / "train")
    every = list_images(args.root / "train", {name: i for i, name in enumerate(classes)})
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(args.seed))
    samples = [every[i] for i in order[: args.images].tolist()]
    if len(samples) < args.batch_size:
        raise SystemExit(f"error: {len(samples)} images cannot fill one batch of {args.batch_size}")
    d = DataConfig()  # the trainer's default augmentation, for both paths
    spec = preprocessing_spec(
        image_size=args.image_size, resize_size=None, mean=d.mean, std=d.std, interpolation=d.interpolation
    )
    print(
        f"data: {len(samples)} images from {args.root / 'train'} ({len(classes)} classes) "
        f"| batch {args.batch_size} | {args.image_size} px crops | {args.precision} "
        f"| channels_last {args.channels_last} | compile {args.compile}"
    )

    regular_set = ImageDataset(
        samples,
        train_transform(
            image_size=args.image_size,
            crop_scale=d.crop_scale,
            crop_ratio=d.crop_ratio,
            hflip=d.hflip,
            color_jitter=d.color_jitter,
            mean=d.mean,
            std=d.std,
            interpolation=d.interpolation,
        ),
    )
    regular = {}  # worker count -> (loader, sampler)
    for workers in args.workers:
        sampler = EpochSampler(len(samples), shuffle=True, seed=args.seed)
        loader = make_loader(
            regular_set,
            sampler,
            batch_size=args.batch_size,
            num_workers=workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        regular[workers] = (loader, sampler)

    peers = {}  # name -> loader
    if args.peers:
        transforms = {"torchvision": torchvision_reference_transform(args.image_size, d)}
        timm = timm_transform(args.image_size, d)
        if timm is None:
            print("timm is not installed: no timm row (pip install timm to add it)")
        else:
            transforms["timm"] = timm
        for name, transform in transforms.items():
            peers[name] = peer_loader(
                PilImages(samples, transform),
                batch_size=args.batch_size,
                workers=args.workers[0],
                pin_memory=device.type == "cuda",
                seed=args.seed,
            )

    start = time.perf_counter()
    images, labels = decode_split(samples, spec["resize_shorter_side"], d.interpolation)
    print(
        f"fast path: decoded {len(samples)} images to {tuple(images.shape[1:])} uint8 "
        f"in {time.perf_counter() - start:.1f} s (once per run)"
    )
    fast_sampler = EpochSampler(len(samples), shuffle=True, seed=args.seed)
    augment = BatchAugment(
        args.image_size,
        crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        mean=d.mean,
        std=d.std,
        channels_last=args.channels_last,
    )
    fast_loader = TensorLoader(
        images,
        labels,
        fast_sampler,
        batch_size=args.batch_size,
        drop_last=True,
        transform=augment,
        device=device,
    )

    # The bare loop's batches: real augmented images, made before the clock starts and cycled.
    fast_sampler.set_epoch(10**6)
    ready = [(x.clone(), y.to(device)) for x, y in itertools.islice(fast_loader, min(args.batches, 4))]

    # --- one model and one step for every path ----------------------------------------------------------
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model("resnet18", len(classes), small_input_stem=args.small_input_stem).to(
        device, memory_format=memory_format
    )
    o = OptimConfig()  # the trainer's defaults: AdamW, weight decay, label smoothing
    lr = default_lr("adamw", pretrained=False)
    optimizer = build_optimizer(
        model, "adamw", lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas
    )
    net = torch.compile(model) if args.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=args.precision != "fp32")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        # As in train.py: both copies are no-ops when the batch is already on the device (bare, fast).
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            loss = criterion(net(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    images_per_s(itertools.cycle(ready), step, warmup=args.warmup, count=0, device=device)
    print(
        f"first steps (model warm-up{', compile' if args.compile else ''}): "
        f"{time.perf_counter() - start:.1f} s"
    )

    # --- interleaved timing -----------------------------------------------------------------------------
    paths = {"bare": lambda r: itertools.cycle(ready)}
    labels_of = {"bare": "bare loop (tensors on the device)"}
    for workers, (loader, sampler) in regular.items():
        name = f"regular-{workers}"
        paths[name] = lambda r, loader=loader, sampler=sampler: endless(loader, sampler, first_epoch=r * 1000)
        labels_of[name] = f"regular path ({workers} worker{'s' if workers != 1 else ''})"
    paths["fast"] = lambda r: endless(fast_loader, fast_sampler, first_epoch=r * 1000)
    labels_of["fast"] = "fast path (uint8 cache, batch augment)"
    for name, loader in peers.items():
        paths[name] = lambda r, loader=loader: forever(loader)
        labels_of[name] = f"{name}'s per-image pipeline ({args.workers[0]} workers)"
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.repeats):
        names = list(paths)[r % len(paths) :] + list(paths)[: r % len(paths)]  # no path always runs first
        for name in names:
            # A fresh iterator per round: the regular path starts with an empty prefetch queue instead
            # of one its workers filled while the other paths ran.
            batches = paths[name](r)
            rates[name].append(
                images_per_s(batches, step, warmup=args.warmup, count=args.batches, device=device)
            )
        print(
            f"round {r + 1}/{args.repeats}: "
            + " | ".join(f"{name} {rates[name][-1]:.0f} img/s" for name in paths)
        )

    print("\n| path | images/s | ratio to bare |\n|---|---:|---:|")
    result = {}
    for name in paths:
        ratio = statistics.median(rate / bare for rate, bare in zip(rates[name], rates["bare"], strict=True))
        result[name] = statistics.median(rates[name])
        print(f"| {labels_of[name]} | {result[name]:.0f} | {ratio:.2f} |")
    return result


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
