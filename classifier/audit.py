"""Leakage audit: near-twin images across the splits, found by a perceptual hash before training.

    python -m classifier.audit DATA [--val-fraction 0.1] [--seed 0] [--group-pattern REGEX]
        [--threshold 6] [--workers 2] [--out DIR]

A track's frames on both sides of a split make val accuracy measure memory. This module hashes every
image (64-bit pHash) and finds each val/test image's nearest train image (each test image's nearest val
image, each train image's nearest other one); audit_report.py writes and counts the twins among them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro
from PIL import Image, ImageOps

from classifier import audit_report
from classifier.data import Splits, build_splits
from classifier.images import to_rgb
from classifier.manifest import is_manifest

# --- the hash -------------------------------------------------------------------------------------------
# Chosen by measurement on synthetic tracks: 600 Fashion-MNIST training images (60 a class, at random),
# 8 frames each (tests/tracks.py's make_frames: shifted by up to 1 pixel, noise sigma 3, brightness
# x0.9-1.1), split 10% to val by image (every val frame's track also has train frames) or by track (none
# has). Hamming distances of 64-bit hashes. "found": the val frames with a train frame within t, split by
# image; "false": the same, split by track, where each such twin is another Fashion-MNIST image:
#                                frame pairs of     t=4          t=6          t=8          t=10
#                                one track          found false  found false  found false  found false
#                                median  p99
#   dHash (9x8, pixel > left)      10     25         54%   36%    68%   52%    81%   70%    91%   83%
#   pHash (frequencies 0-7)        16     34         61%   11%    75%   28%    86%   45%    95%   65%
#   pHash 0-7, centred              4     14         93%    5%    99%   12%   100%   31%   100%   56%
#   pHash 2-9, centred (this one)   4     14         94%    0%    99%    1%   100%    7%   100%   22%
# With shifts of up to 2 pixels this one finds 79/91/96/99% (false 0/2/7/26%). On bench/audit_speed.py's
# jersey-like crops (24x40, 2-pixel shifts) it finds 65/85/95/99%, and the false share grows with the
# data: 13/25/43/66% among 10,000 crops, 24/47/72/90% among 100,000 (Fashion-MNIST items as the numbers:
# many distinct crops look alike at this resolution). Those crops' numbers differ from the shirt by 64+
# grey levels; in 400 tracks of any contrast, it found 2% of the twins under 20 levels, 26% at 20-64 and
# 67% above (10 frames a track, t=6): a grey hash barely sees a number of the shirt's brightness.
# Why centred: a one-pixel shift moves a plain pHash by a median of 10 bits. Fashion-MNIST items (and
# jersey crops) are centred, nearly symmetric objects, so their odd (antisymmetric) frequencies sit near
# zero, near the median, and a shift flips their sign. Moving the thumbnail so that its intensity centroid
# lies at the centre undoes most of a tracker box's jitter before the DCT.
# Why 2-9 and not the usual 0-7: the lowest frequencies hold the coarse silhouette, which distinct items
# of one kind share (different sneakers hash within 2 bits of each other at 0-7); 2-9 keeps the detail.
# Why not dHash: it compares neighbouring pixels, which on a flat background are equal until noise flips
# the bit. summary.json's histogram of nearest distances shows where the twins of new data lie.
# A second check of each candidate's pixels was measured and not adopted: on the 100,000 crops no cut of
# the thumbnails' correlation (nor of frequencies 3-15 only) halved the false share while losing at most
# 3 points of found (frequencies 3-15 at 0.90: found 80% instead of 85%, false 22% instead of 47%).
THUMBNAIL_PX = 32
FREQUENCIES = range(2, 10)  # 8 x 8 DCT frequencies give the 64 bits: 2-9 in each direction
DEFAULT_THRESHOLD = 6
IN_PROCESS_BELOW = 2048  # fewer files hash faster in this process than processes start (~0.5 s)
FILES_PER_TASK = 512  # files a hashing process reads per task: few tasks, and an even spread of the work


def dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II as a matrix: `D @ x` transforms the columns of x (scipy's dct, norm="ortho")."""
    frequency = np.arange(size)[:, None]
    position = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * position + 1) * frequency / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


BAND_DCT = dct_matrix(THUMBNAIL_PX)[FREQUENCIES]  # (8, 32): only the frequencies hashed are computed


def thumbnail(image: Image.Image) -> np.ndarray:
    """The 32x32 grayscale (float64) the hash is computed from, moved by a subpixel shift so that its
    intensity centroid lies at the centre. The weights are each pixel's distance from the background,
    the median of the border pixels, so a dark object on a light ground is centred as well."""
    gray = to_rgb(ImageOps.exif_transpose(image)).convert("L")  # what load_image reads, in gray
    gray = gray.resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR).convert("F")
    pixels = np.asarray(gray, np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = float(np.median(border))
    weights = np.abs(pixels - background)
    total = weights.sum()
    if total == 0:  # a flat image has no centroid
        return pixels
    positions = np.arange(THUMBNAIL_PX) - (THUMBNAIL_PX - 1) / 2
    dy = weights.sum(axis=1) @ positions / total
    dx = weights.sum(axis=0) @ positions / total
    # AFFINE maps each output pixel (x, y) to the input pixel (x + dx, y + dy); uncovered pixels get the
    # background.
    moved = gray.transform(
        gray.size,
        Image.Transform.AFFINE,
        (1, 0, dx, 0, 1, dy),
        Image.Resampling.BILINEAR,
        fillcolor=background,
    )
    return np.asarray(moved, np.float64)


def phash(thumbnails: np.ndarray) -> np.ndarray:
    """(N, 32, 32) thumbnails -> (N,) uint64: one bit per DCT frequency of FREQUENCIES x FREQUENCIES, set
    when the coefficient is above the median of the 64 (row-major, the first frequency in the top bit)."""
    band = (BAND_DCT @ thumbnails @ BAND_DCT.T).reshape(len(thumbnails), len(FREQUENCIES) ** 2)
    bits = band > np.median(band, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def read_thumbnail(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return thumbnail(image)
    except Exception as err:  # PIL raises many types; all mean the same to the user, as in load_image
        raise RuntimeError(f"cannot read image {path}: {err}") from None


def hash_paths(paths: list[str]) -> np.ndarray:
    return phash(np.stack([read_thumbnail(path) for path in paths]))


def hash_files(paths: list[str], workers: int) -> np.ndarray:
    """The uint64 pHash of every file, in order, read in `workers` processes."""
    tasks = [paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
    if not tasks:
        return np.zeros(0, np.uint64)
    if workers <= 1 or len(paths) < IN_PROCESS_BELOW:
        return np.concatenate([hash_paths(task) for task in tasks])
    with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
        return np.concatenate(list(pool.map(hash_paths, tasks)))


# --- the search -----------------------------------------------------------------------------------------
# Brute force: every query against every pool hash, XOR then popcount, in tiles of 32 x 4096 (1 MiB of
# uint64, which stays in cache). numpy releases the GIL in these loops, so threads share the work.
QUERY_ROWS, POOL_COLUMNS = 32, 4096
NO_TWIN = 255  # the distance given when the pool is empty: larger than any Hamming distance of 64 bits


def nearest(
    queries: np.ndarray, pool: np.ndarray, *, workers: int, same: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the index of its nearest pool hash (the first on ties; -1 if none) and their
    Hamming distance (uint8; NO_TWIN if none). `same`: the queries are the pool, and an image is not its
    own twin."""
    index = np.full(len(queries), -1, np.int64)
    distance = np.full(len(queries), NO_TWIN, np.uint8)

    def search(start: int) -> None:
        rows = queries[start : start + QUERY_ROWS]
        xor = np.empty((len(rows), POOL_COLUMNS), np.uint64)
        bits = np.empty((len(rows), POOL_COLUMNS), np.uint8)
        row_ids = np.arange(len(rows))
        for column in range(0, len(pool), POOL_COLUMNS):
            block = pool[column : column + POOL_COLUMNS]
            tile = np.bitwise_count(
                np.bitwise_xor(rows[:, None], block[None, :], out=xor[:, : len(block)]),
                out=bits[:, : len(block)],
            )
            if same:  # the diagonal: each query against itself
                own = start + row_ids - column
                inside = (own >= 0) & (own < len(block))
                tile[row_ids[inside], own[inside]] = NO_TWIN
            best = tile.argmin(axis=1)
            best_distance = tile[row_ids, best]
            closer = best_distance < distance[start : start + len(rows)]  # strict: earlier index wins ties
            distance[start : start + len(rows)][closer] = best_distance[closer]
            index[start : start + len(rows)][closer] = column + best[closer]

    # Each task writes its own rows of `index` and `distance`: no two threads touch the same element.
    with ThreadPoolExecutor(max(1, workers)) as threads:
        list(threads.map(search, range(0, len(queries), QUERY_ROWS)))
    index[distance == NO_TWIN] = -1
    return index, distance


# Which split is searched for twins in which: val and test against train, test against val, and train
# against itself (near-duplicates inside the training set).
COMPARISONS = (("val", "train"), ("test", "train"), ("test", "val"), ("train", "train"))


@dataclass(frozen=True)
class Nearest:
    split: str  # the queries' split
    twin_split: str  # the split searched
    index: np.ndarray  # int64 (N,): the nearest image of twin_split, -1 when twin_split is empty
    distance: np.ndarray  # uint8 (N,): its Hamming distance


def find_twins(hashes: dict[str, np.ndarray], *, workers: int) -> list[Nearest]:
    """The nearest image of every comparison in COMPARISONS whose two splits both have images."""
    found = []
    for split, twin_split in COMPARISONS:
        if len(hashes[split]) and len(hashes[twin_split]):
            index, distance = nearest(
                hashes[split], hashes[twin_split], workers=workers, same=split == twin_split
            )
            found.append(Nearest(split, twin_split, index, distance))
    return found


# --- the entry the trainer calls ------------------------------------------------------------------------


def run_audit(
    splits: Splits, out_dir: Path, *, threshold: int, workers: int, log: Callable[[str], None]
) -> dict:
    """Hash every image of `splits`, find the near twins, write out_dir/twins.csv, twins.png and
    summary.json, log what was found in 1-3 lines, and return the summary (audit_report.summarize, with
    the files' paths and the seconds spent hashing and searching; JSON-ready)."""
    if not 0 <= threshold <= 64:
        raise ValueError(
            f"audit threshold must be a Hamming distance of 64-bit hashes (0-64), got {threshold}"
        )
    paths = {split: [path for path, _ in getattr(splits, split)] for split in audit_report.SPLITS}
    started = time.perf_counter()
    # One pool for all the files: starting it costs more than hashing a small val split.
    every_hash = hash_files(paths["train"] + paths["val"] + paths["test"], workers)
    sizes = np.cumsum([len(paths["train"]), len(paths["val"])])
    hashes = dict(zip(audit_report.SPLITS, np.split(every_hash, sizes), strict=True))
    hashed = time.perf_counter()
    twins = find_twins(hashes, workers=workers)
    searched = time.perf_counter()
    seconds = {"hash": round(hashed - started, 2), "search": round(searched - hashed, 2)}
    summary = audit_report.write_report(splits, twins, out_dir, threshold=threshold, seconds=seconds)
    for line in audit_report.summary_lines(summary):
        log(line)
    return summary


# --- the command ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditArgs:
    data: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="DATA")]]
    """An ImageFolder root (train/, optional val/ and test/) or a manifest (.csv or .jsonl)."""
    val_fraction: float = 0.1
    """When the data has no val split: the fraction held out of train, as train.py's
    --data.val-fraction (use the run's value to audit the split it trained on)."""
    seed: int = 0
    """The seed of that held-out split, as train.py's --seed."""
    group_pattern: str | None = None
    """Regex with one capture group naming each image's group (track, clip) in its path relative to the
    data root, as train.py's --data.group-pattern; then val is held out by group, and twins in another
    group are counted."""
    threshold: int = DEFAULT_THRESHOLD
    """Largest Hamming distance (of 64 bits) at which two images count as near twins."""
    workers: int = 2
    """Processes that read and hash the images (and threads that search)."""
    out: Path | None = None
    """Folder for twins.csv, twins.png and summary.json. Default: DATA/audit for a folder,
    <manifest name>-audit/ next to a manifest."""


def main(args: AuditArgs) -> dict:
    if not args.data.exists():
        raise SystemExit(
            f"error: DATA {args.data} does not exist (an ImageFolder root or a .csv/.jsonl manifest)"
        )
    if not 0 <= args.threshold <= 64:
        raise SystemExit(
            f"error: --threshold must be a Hamming distance of 64 bits (0-64), got {args.threshold}"
        )
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be at least 1, got {args.workers}")
    out = args.out or (
        args.data.parent / f"{args.data.stem}-audit" if is_manifest(args.data) else args.data / "audit"
    )
    try:
        splits = build_splits(args.data, args.val_fraction, args.seed, group_pattern=args.group_pattern)
        summary = run_audit(splits, out, threshold=args.threshold, workers=args.workers, log=print)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise SystemExit(f"error: cannot audit {args.data}: {err}") from None
    return summary


if __name__ == "__main__":
    main(tyro.cli(AuditArgs, prog="python -m classifier.audit", description=__doc__))
