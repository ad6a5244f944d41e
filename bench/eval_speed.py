"""Evaluation speed: this project's validation pass against torchvision's reference recipe, same model,
same images, same DataLoader settings, in one process.

    python -m classifier.fashion_mnist data/fashion-mnist          # once: Fashion-MNIST as an ImageFolder
    python bench/eval_speed.py                                       # ResNet18, 32 px crops, fp32

Three passes over the same images, taking turns within every repeat:
  bare         the model alone on batches already in memory: the limit
  ours         classifier.data.ImageDataset + transforms.eval_transform (decode to a uint8 tensor, v2 resize
               and center crop per image, ToDtype and Normalize per batch) in DataLoader workers, then
               validation.validate with its metrics (top-1/5, per-class accuracy, macro F1, AUROC, confusion
               matrix, loss)
  torchvision  the reference scripts' evaluation (references/classification: ImageFolder read with PIL,
               Resize, CenterCrop, PILToTensor, ConvertImageDtype, Normalize; cross-entropy and top-1/top-5
               per batch), written out here because the reference scripts are not in the pip package
The table shows the median images/s and the median of each repeat's ratio to the bare pass.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
import tyro
from torch import nn
from torchvision import transforms as v1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier.config import DataConfig  # noqa: E402
from classifier.data import ImageDataset, find_classes, list_images, make_loader  # noqa: E402
from classifier.models import build_model  # noqa: E402
from classifier.sampling import EpochSampler  # noqa: E402
from classifier.transforms import eval_transform, preprocessing_spec  # noqa: E402
from classifier.validation import build_val_metrics, validate  # noqa: E402

TOP1_TOLERANCE = 0.01  # how far the two pipelines' top-1 may differ and still be the same work


@dataclass(frozen=True)
class EvalSpeedArgs:
    root: Path = Path("data/fashion-mnist")
    """ImageFolder root; the images come from its test/ split."""
    images: int = 2560
    """Images drawn (seeded) from test/ for every pass."""
    batch_size: int = 256
    """Images per batch."""
    image_size: int = 32
    """Side of the center crop the model sees."""
    workers: int = min(4, os.cpu_count() or 1)
    """DataLoader workers of both pipelines."""
    repeats: int = 5
    """Rounds of (bare, ours, torchvision); the table shows medians over rounds."""
    channels_last: bool = True
    """channels_last model and images (what `auto` picks on a CPU)."""
    seed: int = 0
    """Seeds the subset and the model."""


def torchvision_reference_pass(model: nn.Module, loader, channels_last: bool) -> dict:
    """references/classification/train.py's evaluate(): inference mode, loss and top-1/top-5 per batch."""
    criterion = nn.CrossEntropyLoss()
    model.eval()
    loss_sum, correct1, correct5, seen = 0.0, 0, 0, 0
    with torch.inference_mode():
        for images, labels in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            loss_sum += criterion(logits, labels).item() * len(labels)
            top5 = logits.topk(5, dim=1).indices
            correct1 += (top5[:, 0] == labels).sum().item()
            correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
            seen += len(labels)
    return {"loss": loss_sum / seen, "top1": correct1 / seen, "top5": correct5 / seen}


def bare_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.eval()
    with torch.inference_mode():
        for images in batches:
            model(images)


def images_per_s(run: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def main(args: EvalSpeedArgs) -> dict[str, float]:
    torch.manual_seed(args.seed)
    load = " ".join(f"{n:.2f}" for n in os.getloadavg())
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads | {os.cpu_count()} cores | load average {load}")

    classes = find_classes(args.root / "train")
    every = list_images(args.root / "test", {name: i for i, name in enumerate(classes)})
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(args.seed))
    samples = [every[i] for i in order[: args.images].tolist()]
    d = DataConfig()
    spec = preprocessing_spec(
        image_size=args.image_size, resize_size=None, mean=d.mean, std=d.std, interpolation=d.interpolation
    )
    print(
        f"{len(samples)} images from {args.root / 'test'} | batch {args.batch_size} | resize "
        f"{spec['resize_shorter_side']}, crop {args.image_size} | {args.workers} workers | fp32"
    )

    ours = make_loader(
        ImageDataset(samples, eval_transform(spec)),
        EpochSampler(len(samples), shuffle=False),
        batch_size=args.batch_size,
        num_workers=args.workers,
        drop_last=False,
        pin_memory=False,
    )
    reference_set = torchvision.datasets.ImageFolder(
        str(args.root / "test"),
        transform=v1.Compose(
            [
                v1.Resize(spec["resize_shorter_side"], antialias=True),
                v1.CenterCrop(args.image_size),
                v1.PILToTensor(),
                v1.ConvertImageDtype(torch.float),
                v1.Normalize(d.mean, d.std),
            ]
        ),
    )
    index_of = {path: i for i, (path, _) in enumerate(reference_set.samples)}
    reference = torch.utils.data.DataLoader(
        torch.utils.data.Subset(reference_set, [index_of[path] for path, _ in samples]),
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model("resnet18", len(classes)).to(memory_format=memory_format)
    ready = [images.contiguous(memory_format=memory_format) for images, _ in ours]
    metrics = build_val_metrics(len(classes))

    def ours_pass() -> dict:
        return validate(
            model,
            ours,
            metrics,
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext(),
            channels_last=args.channels_last,
        )

    passes = {
        "bare": lambda: bare_pass(model, ready),
        "ours": ours_pass,
        "torchvision": lambda: torchvision_reference_pass(model, reference, args.channels_last),
    }
    # The same numbers from both pipelines, or the comparison is not of the same work. Their resizes are
    # not the same code (torchvision's on uint8 tensors against PIL's), so a few predictions may differ.
    ours_result, reference_result = ours_pass(), passes["torchvision"]()
    print(
        f"top-1 ours {ours_result['top1']:.4f}, torchvision {reference_result['top1']:.4f} | "
        f"loss ours {ours_result['loss']:.4f}, torchvision {reference_result['loss']:.4f}"
    )
    if abs(ours_result["top1"] - reference_result["top1"]) > TOP1_TOLERANCE:
        raise SystemExit(
            f"error: the two pipelines' top-1 differ by more than {TOP1_TOLERANCE}: they do not feed the "
            "model the same images, so their speeds are not comparable"
        )
    rates: dict[str, list[float]] = {name: [] for name in passes}
    for r in range(args.repeats):
        names = list(passes)[r % 3 :] + list(passes)[: r % 3]  # no pass always runs first
        for name in names:
            rates[name].append(images_per_s(passes[name], len(samples)))
        print(f"round {r + 1}/{args.repeats}: " + " | ".join(f"{n} {rates[n][-1]:.0f} img/s" for n in passes))

    print("\n| pass | images/s | ratio to bare |\n|---|---:|---:|")
    result = {}
    for name in passes:
        ratio = statistics.median(rate / bare for rate, bare in zip(rates[name], rates["bare"], strict=True))
        result[name] = statistics.median(rates[name])
        print(f"| {name} | {result[name]:.0f} | {ratio:.2f} |")
    ratio = statistics.median(o / t for o, t in zip(rates["ours"], rates["torchvision"], strict=True))
    print(f"\nours / torchvision, median of the rounds' ratios: {ratio:.2f}")
    return result


if __name__ == "__main__":
    main(tyro.cli(EvalSpeedArgs))
