"""How far a consumer's resize, rounding and alpha guesses move a trained model's logits on real images.

    python bench/resize_sensitivity.py                # 16 minutes on a busy 2-core AMD EPYC
    python bench/resize_sensitivity.py --test-per-class 50 --epochs 1

labels_mapping.json states every preprocessing rule (transforms.preprocessing_spec); this measures what
each one is worth. Real Fashion-MNIST garments, upsampled (PIL bicubic) to a square 80% as wide as a
black canvas of random size (56-100 pixels wide, 1.1-1.6 times as tall) and centered in it, so the
model's resize (shorter side to 32, a centered 28x28 crop, which keeps a strip of canvas left and right)
downscales 1.75-3x and the long side and the crop offset land on every fraction. A small_resnet is
trained here on train-split canvases prepared exactly as evaluation prepares them (transforms.
eval_transform); then each test canvas goes through our pipeline and through each variant:
- PIL bilinear: Pillow's Image.resize(BILINEAR) (antialiased, as ours), then our crop.
- torch float32 path: torchvision's resize on float32, rounded half to even to uint8: what a CPU without
  AVX2/AVX-512 runs (the sidecar's resize_kernel.uint8).
- no antialias: torch.nn.functional.interpolate(bilinear, antialias=False): what OpenCV's INTER_LINEAR and
  most GPU resizes do, sampling 2x2 pixels however far the image shrinks.
- long side rounded: round() instead of floor for the computed side.
- offset floored: the crop offset floored instead of rounded half to even.
- alpha on white: the images saved as RGBA with the canvas transparent (stored black), composited on
  white instead of dropped (the sidecar's "alpha": "dropped").
Printed per variant: predictions that differ from ours out of N, the max and median over images of the
largest |logit difference|, and top-1 accuracy. The CPU is named on the first line.

Measured on an AMD EPYC (AVX2, no AVX-512, no avx512_bf16/AMX), torch 2.14.1, 2 threads, beside other
jobs (load average 6; training took 950 s); 1,000 test canvases, our pipeline's top-1 0.8610:

| variant | predictions changed | max abs logit diff | median abs logit diff | top-1 |
|---|---:|---:|---:|---:|
| PIL bilinear (antialiased) | 0 of 1000 | 0.0104 | 0.0006 | 0.8610 |
| torch float32 path (no AVX2) | 0 of 1000 | 0.0423 | 0.0085 | 0.8610 |
| no antialias (OpenCV-like) | 27 of 1000 | 2.0675 | 0.5206 | 0.8640 |
| long side rounded | 11 of 1000 | 1.3652 | 0.0000 | 0.8600 |
| crop offset floored | 9 of 1000 | 1.6485 | 0.0000 | 0.8610 |
| alpha composited on white | 146 of 1000 | 3.5343 | 1.9284 | 0.7890 |
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from PIL import Image
from torch.nn import functional as nnf
from torchvision.transforms.v2 import functional as F

from classifier import fashion_mnist, hardware
from classifier.models import build_model
from classifier.transforms import eval_transform, preprocessing_spec

SPEC = preprocessing_spec(
    image_size=28,
    resize_size=32,
    mean=(0.2860, 0.2860, 0.2860),
    std=(0.3530, 0.3530, 0.3530),
    interpolation="bilinear",
)


@dataclass(frozen=True)
class Args:
    train_per_class: int = 600
    """Training images per class (from the IDX train split)."""
    test_per_class: int = 100
    """Held-out images per class (from the IDX test split) the variants are compared on."""
    epochs: int = 3
    """Training epochs (AdamW, batch 64)."""
    seed: int = 0
    """Picks the images, their canvas sizes and the model's initial weights."""


# --- the images -----------------------------------------------------------------------------------------


def garment_box(height: int, width: int) -> tuple[int, int, int]:
    """(top, left, side) of the garment's square in a canvas: 80% of the width, centered."""
    side = round(0.8 * width)
    return (height - side) // 2, (width - side) // 2, side


def tall_canvas(garment: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 garment upsampled and centered in a taller black canvas of random size (H x W uint8)."""
    width = int(rng.integers(56, 101))
    height = int(width * rng.uniform(1.1, 1.6))
    canvas = np.zeros((height, width), np.uint8)
    top, left, side = garment_box(height, width)
    scaled = Image.fromarray(garment).resize((side, side), Image.Resampling.BICUBIC)
    canvas[top : top + side, left : left + side] = np.array(scaled)
    return canvas


def pick(split: str, per_class: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """`per_class` garments of each class from the IDX `split`, each on its own tall canvas."""
    folder = fashion_mnist.local_source()
    if folder is None:
        raise SystemExit(f"error: Fashion-MNIST IDX files not found; {fashion_mnist.HOW_TO_GET}")
    image_file, label_file = fashion_mnist.FILES[split]
    images = fashion_mnist.read_idx(fashion_mnist._idx_path(folder, image_file))
    labels = fashion_mnist.read_idx(fashion_mnist._idx_path(folder, label_file))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
    return [tall_canvas(images[i], rng) for i in chosen], labels[chosen].tolist()


def as_rgb(canvas: np.ndarray) -> torch.Tensor:
    """H x W grey -> uint8 (3, H, W), as load_image turns a grey file into RGB."""
    return torch.from_numpy(np.array(canvas)).expand(3, *canvas.shape).contiguous()


# --- the variants: each a function from uint8 (3, H, W) to the normalized model input ------------------


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255 - torch.tensor(SPEC["mean"]).view(3, 1, 1)) / torch.tensor(SPEC["std"]).view(
        3, 1, 1
    )


def resized_size(height: int, width: int, rounding) -> tuple[int, int]:
    shorter = SPEC["resize_shorter_side"]
    if width <= height:
        return rounding(shorter * height / width), shorter
    return shorter, rounding(shorter * width / height)


def crop(pixels: torch.Tensor, offset) -> torch.Tensor:
    side = SPEC["center_crop"]
    top, left = offset((pixels.shape[1] - side) / 2), offset((pixels.shape[2] - side) / 2)
    return pixels[:, top : top + side, left : left + side]


def ours(image: torch.Tensor) -> torch.Tensor:
    return eval_transform(SPEC)(image)


def pil_bilinear(image: torch.Tensor) -> torch.Tensor:
    height, width = resized_size(*image.shape[1:], int)
    pil = Image.fromarray(image[0].numpy()).resize((width, height), Image.Resampling.BILINEAR)
    return normalize(crop(as_rgb(np.asarray(pil)), round))


def torch_float_path(image: torch.Tensor) -> torch.Tensor:
    size = list(resized_size(*image.shape[1:], int))
    resized = F.resize(image.float(), size, antialias=True).round().clamp(0, 255).to(torch.uint8)
    return normalize(crop(resized, round))


def no_antialias(image: torch.Tensor) -> torch.Tensor:
    size = resized_size(*image.shape[1:], int)
    resized = nnf.interpolate(image.float()[None], size=size, mode="bilinear", antialias=False)[0]
    return normalize(crop(resized.round().clamp(0, 255).to(torch.uint8), round))


def long_side_rounded(image: torch.Tensor) -> torch.Tensor:
    size = list(resized_size(*image.shape[1:], round))
    return normalize(crop(F.resize(image, size, antialias=True), round))


def offset_floored(image: torch.Tensor) -> torch.Tensor:
    size = list(resized_size(*image.shape[1:], int))
    return normalize(crop(F.resize(image, size, antialias=True), int))


def alpha_on_white(image: torch.Tensor) -> torch.Tensor:
    """The canvas outside the garment's square transparent; composited on white, then our pipeline."""
    top, left, side = garment_box(*image.shape[1:])
    alpha = torch.zeros(1, *image.shape[1:])
    alpha[:, top : top + side, left : left + side] = 1.0
    composited = image.float() * alpha + 255.0 * (1 - alpha)
    return ours(composited.round().to(torch.uint8))


VARIANTS = {
    "PIL bilinear (antialiased)": pil_bilinear,
    "torch float32 path (no AVX2)": torch_float_path,
    "no antialias (OpenCV-like)": no_antialias,
    "long side rounded": long_side_rounded,
    "crop offset floored": offset_floored,
    "alpha composited on white": alpha_on_white,
}


# --- training and measuring -----------------------------------------------------------------------------


def train(inputs: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("small_resnet", 10, log=lambda *_: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(inputs) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs) - 63, 64):
            batch = order[start : start + 64]
            flip = torch.rand(len(batch)) < 0.5  # the only augmentation: horizontal flips
            images = torch.where(flip.view(-1, 1, 1, 1), inputs[batch].flip(-1), inputs[batch])
            loss = nnf.cross_entropy(model(images), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(torch.stack(inputs[i : i + 256])) for i in range(0, len(inputs), 256)])


def main(args: Args) -> None:
    flags = hardware.cpu_flags()
    bf16 = "yes" if {"avx512_bf16", "amx_bf16"} & flags else "no"
    print(
        f"CPU: {hardware.cpu_model()} | torch {torch.__version__}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads | "
        f"avx512_bf16/amx: {bf16}"
    )
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    train_images, train_labels = pick("train", args.train_per_class, rng)
    test_images, test_labels = pick("test", args.test_per_class, rng)
    train_inputs = torch.stack([ours(as_rgb(image)) for image in train_images])
    model = train(train_inputs, torch.tensor(train_labels), args.epochs, args.seed)
    print(
        f"trained small_resnet on {len(train_images)} tall canvases, {args.epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s"
    )

    labels = torch.tensor(test_labels)
    tests = [as_rgb(image) for image in test_images]
    reference = logits_of(model, [ours(image) for image in tests])
    n = len(tests)
    print(f"\n{n} held-out images | our pipeline: top-1 {(reference.argmax(1) == labels).float().mean():.4f}")
    print("| variant | predictions changed | max abs logit diff | median abs logit diff | top-1 |")
    print("|---|---:|---:|---:|---:|")
    for name, variant in VARIANTS.items():
        logits = logits_of(model, [variant(image) for image in tests])
        changed = int((logits.argmax(1) != reference.argmax(1)).sum())
        per_image = (logits - reference).abs().amax(dim=1).tolist()
        top1 = float((logits.argmax(1) == labels).float().mean())
        print(
            f"| {name} | {changed} of {n} | {max(per_image):.4f} | {statistics.median(per_image):.4f} | "
            f"{top1:.4f} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
