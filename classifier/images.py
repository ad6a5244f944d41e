"""Reading image files, and finding the unreadable ones before training starts.

Scraped datasets hold junk: truncated downloads, zero-byte files, HTML saved as .jpg, 16-bit PNGs, CMYK
JPEGs. `load_image` turns every readable file into the same uint8 RGB tensor; `scan_images` tries every
file once up front, so a bad one is named at start rather than crashing a worker in epoch 3.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from classifier.files import write_text

# What torchvision's ImageFolder accepts, lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit grayscale is rescaled to 8 bits first: PIL's own convert() clips
    it, which turns a typical 16-bit PNG into a white image."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str) -> torch.Tensor:
    """Any image file -> uint8 RGB CHW tensor. EXIF orientation is applied (phone photos); grayscale,
    16-bit, palette, CMYK and alpha images become plain RGB."""
    try:
        with Image.open(path) as image:
            return F.pil_to_tensor(to_rgb(ImageOps.exif_transpose(image)))
    except Exception as err:  # PIL raises many types; all mean the same to the user
        raise RuntimeError(f"cannot read image {path}: {err}") from err


def check_image(path: str) -> str | None:
    """None when `path` decodes fully, else the reason it does not."""
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    try:
        image = load_image(path)
    except RuntimeError as err:
        return str(err.__cause__ or err)
    if image.shape[1] < 1 or image.shape[2] < 1:
        return f"no pixels ({image.shape[2]}x{image.shape[1]})"
    return None


def scan_images(paths: list[str], workers: int) -> dict[str, str]:
    """Decode every file once; return {path: reason} for the ones that fail. Uses `workers` processes."""
    if workers <= 1 or len(paths) < 256:
        results = map(check_image, paths)
        return {p: r for p, r in zip(paths, results, strict=True) if r is not None}
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(check_image, paths, chunksize=256)
        return {p: r for p, r in zip(paths, results, strict=True) if r is not None}


def write_report(bad: dict[str, str], path: Path) -> None:
    write_text(path, "".join(f"{p}\t{reason}\n" for p, reason in sorted(bad.items())))
