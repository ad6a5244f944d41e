"""Synthetic video tracks for the tests, from real Fashion-MNIST images: a track is one training image
seen in a few consecutive frames, as a player tracker cuts crops (each frame shifted by up to a pixel,
with a little noise and brightness x0.9-1.1). `write_tracks` writes them as an ImageFolder split named
`<split>/<class>/trk0007_f03.png`, so the group regex is `(trk\\d+)_`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier import audit, fashion_mnist

MAX_SHIFT_PX = 1  # each frame is the base image moved by -1, 0 or +1 pixel in x and in y
NOISE_SIGMA = 3.0  # Gaussian noise, in grey levels
BRIGHTNESS = (0.9, 1.1)  # each frame's pixels are multiplied by a factor drawn from this range
# The audit's ground truth must be the tracks: every frame a near twin of every other frame of its track,
# and of no frame of another track. Fashion-MNIST has near-duplicate images of its own, and its items
# are so alike that a few tracks of distinct images still come within the threshold (audit.py measures
# how often), so a candidate base image is skipped unless the frames it gives are within WITHIN_TRACK of
# each other and farther than BETWEEN_TRACKS from every frame kept so far, by the audit's own hash. The
# one-bit margins keep a coefficient that rounds differently in another batch from moving a pair across.
WITHIN_TRACK = audit.DEFAULT_THRESHOLD - 1
BETWEEN_TRACKS = audit.DEFAULT_THRESHOLD + 1


@functools.cache
def fashion_mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 training images (uint8, N x 28 x 28) and labels; skips the test without the files."""
    source = fashion_mnist.local_source()
    if source is None:
        pytest.skip(f"Fashion-MNIST IDX files not found; {fashion_mnist.HOW_TO_GET}")
    found = []
    for name in fashion_mnist.FILES["train"]:
        path = next(p for p in (source / name, source / f"{name}.gz") if p.is_file())
        found.append(fashion_mnist.read_idx(path))
    return found[0], found[1]


def make_frames(base: np.ndarray, frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`frames` copies of the uint8 image `base`, each shifted (the uncovered edge black, as Fashion-MNIST's
    background), brightened or darkened and noised independently."""
    height, width = base.shape
    pad = MAX_SHIFT_PX
    padded = np.pad(base.astype(np.float64), pad)
    copies = []
    for _ in range(frames):
        dy, dx = rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2)
        shifted = padded[pad - dy : pad - dy + height, pad - dx : pad - dx + width]
        pixels = shifted * rng.uniform(*BRIGHTNESS) + rng.normal(0.0, NOISE_SIGMA, shifted.shape)
        copies.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return copies


def write_tracks(
    root: Path,
    *,
    tracks_per_class: int,
    frames: int,
    seed: int = 0,
    split: str = "train",
    classes: int = 10,
    first_track: int = 0,
) -> dict[str, list[str]]:
    """Write `tracks_per_class` tracks of `frames` frames for each of the first `classes` Fashion-MNIST
    classes to root/<split>/<class name>/trk{NNNN}_f{FF}.png (8-bit grayscale, 28 x 28) and return
    {track id: [file paths]}. Track n (from `first_track` on) shows class n % classes.

    Deterministic for a seed. The tracks form one sequence per (seed, classes, frames): a call with
    first_track=30 writes tracks 30, 31, ... of the same sequence that first_track=0 starts, so calls
    whose track ranges do not overlap (e.g. train then val/) never share an image or a near twin."""
    images, labels = fashion_mnist_train()
    if not 1 <= classes <= len(fashion_mnist.CLASSES):
        raise ValueError(f"write_tracks: classes must be 1-{len(fashion_mnist.CLASSES)}, got {classes}")
    rng = np.random.default_rng(seed)
    candidates = {label: iter(rng.permutation(np.flatnonzero(labels == label))) for label in range(classes)}
    kept = np.zeros(0, np.uint64)  # the hashes of every frame of the tracks so far
    written = {}
    for number in range(first_track + tracks_per_class * classes):
        label = number % classes
        while True:  # candidates of a class run out only if the hash could tell almost nothing apart
            track_frames = make_frames(images[next(candidates[label])], frames, rng)
            hashes = audit.phash(np.stack([audit.thumbnail(Image.fromarray(f)) for f in track_frames]))
            if (
                hamming(hashes, hashes).max() <= WITHIN_TRACK
                and hamming(hashes, kept).min(initial=64) > BETWEEN_TRACKS
            ):
                break
        kept = np.concatenate([kept, hashes])
        if number < first_track:
            continue  # an earlier call's track: drawn only to keep the sequence
        folder = Path(root) / split / fashion_mnist.CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        track = f"trk{number:04d}"
        written[track] = []
        for index, frame in enumerate(track_frames):
            path = folder / f"{track}_f{index:02d}.png"
            Image.fromarray(frame).save(path)
            written[track].append(str(path))
    return written


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All Hamming distances between two arrays of uint64 hashes, (len(a), len(b))."""
    return np.bitwise_count(np.bitwise_xor(a[:, None], b[None, :]))
