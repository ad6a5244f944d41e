"""How long the leakage audit (classifier/audit.py) takes on N jersey-like crops, and what it finds there.

    python bench/audit_speed.py                                # 100,000 crops, 2 workers, 3 repeats
    python bench/audit_speed.py --images 20000 --work /tmp/crops   # keep the crops for another run

The crops are 24 x 40 RGB PNGs in tracks of --frames frames: a Fashion-MNIST item as the "number" in
a random colour on a shirt of another (at least 64 grey levels apart), each frame shifted by up to 2
pixels (the edge repeated), with noise sigma 3 and brightness x0.9-1.1. They are written once (in
--workers processes) and split 10% to val by image, so nearly every val crop's track also has train
crops. audit.run_audit runs --repeats times; the table gives the median seconds of hashing (decode,
thumbnail, pHash in --workers processes), of the twin search (brute force in --workers threads) and of
the whole call (with twins.csv, twins.png and summary.json). Last, the share of val crops that have a
train crop within each threshold: split by image (found twins) and split by track, 10% of the tracks
to val, where none has its track in train (false twins).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier import audit, fashion_mnist  # noqa: E402
from classifier.data import Splits  # noqa: E402
from classifier.hardware import cpu_model  # noqa: E402

CROP_WIDTH, CROP_HEIGHT = 24, 40
NUMBER_PX = 18  # the Fashion-MNIST item is resized to this square in the middle of the shirt
MAX_SHIFT_PX = 2
LUMA = np.array([0.299, 0.587, 0.114])  # grey = LUMA @ RGB, as PIL's convert("L")
MIN_CONTRAST = 64  # grey levels between shirt and number: the hash misses most twins below ~20 (see below)
THRESHOLDS = (4, 6, 8, 10)


@dataclass(frozen=True)
class Args:
    images: int = 100_000
    """Crops to write and audit."""
    frames: int = 20
    """Crops per track (a player followed for 20 frames)."""
    workers: int = 2
    """Processes that write and hash the crops, threads that search (audit.run_audit's `workers`)."""
    repeats: int = 3
    """Runs of the audit; the table shows the median."""
    threshold: int = audit.DEFAULT_THRESHOLD
    """Hamming distance at which two crops are twins."""
    work: Path | None = None
    """Folder for the crops, reused when it already holds this many. Default: a temporary folder,
    removed at the end."""


def track_frames(base: np.ndarray, frames: int, seed: int) -> list[np.ndarray]:
    """`frames` jittered crops of one shirt showing the 28 x 28 uint8 `base` as its number."""
    rng = np.random.default_rng(seed)
    shirt, number = rng.integers(0, 256, size=(2, 3)).astype(np.float64)
    while abs((shirt - number) @ LUMA) < MIN_CONTRAST:  # numbers are printed to be read
        number = rng.integers(0, 256, size=3).astype(np.float64)
    item = Image.fromarray(base).resize((NUMBER_PX, NUMBER_PX), Image.Resampling.BILINEAR)
    alpha = np.zeros((CROP_HEIGHT, CROP_WIDTH, 1))
    top, left = (CROP_HEIGHT - NUMBER_PX) // 2, (CROP_WIDTH - NUMBER_PX) // 2
    alpha[top : top + NUMBER_PX, left : left + NUMBER_PX, 0] = np.asarray(item) / 255.0
    crop = shirt * (1 - alpha) + number * alpha
    padded = np.pad(crop, ((MAX_SHIFT_PX,) * 2, (MAX_SHIFT_PX,) * 2, (0, 0)), mode="edge")
    copies = []
    for _ in range(frames):
        dy, dx = rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2) + MAX_SHIFT_PX
        pixels = padded[dy : dy + CROP_HEIGHT, dx : dx + CROP_WIDTH] * rng.uniform(0.9, 1.1)
        pixels = pixels + rng.normal(0.0, 3.0, pixels.shape)
        copies.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return copies


def write_track(job: tuple[Path, int, np.ndarray, int]) -> list[str]:
    folder, number, base, frames = job
    paths = []
    for index, frame in enumerate(track_frames(base, frames, seed=number)):
        path = folder / f"trk{number:06d}_f{index:02d}.png"
        Image.fromarray(frame).save(path)
        paths.append(str(path))
    return paths


def write_crops(work: Path, images: int, frames: int, workers: int) -> dict:
    """Write the crops under work/<class>/ once; return {"paths", "labels", "tracks"} (also saved as
    work/crops.json, which a later run with the same --images and --frames reuses)."""
    record = work / "crops.json"
    if record.is_file():
        crops = json.loads(record.read_text())
        if len(crops["paths"]) == images and crops["frames"] == frames:
            return crops
    source = fashion_mnist.local_source()
    if source is None:
        raise SystemExit(f"Fashion-MNIST IDX files not found; {fashion_mnist.HOW_TO_GET}")
    names = fashion_mnist.FILES["train"]
    pixels, labels = (fashion_mnist.read_idx(next(source.glob(f"{name}*"))) for name in names)
    tracks = -(-images // frames)
    bases = np.random.default_rng(0).choice(len(pixels), tracks, replace=len(pixels) < tracks)
    for name in fashion_mnist.CLASSES:
        (work / name).mkdir(parents=True, exist_ok=True)
    jobs = [
        (work / fashion_mnist.CLASSES[labels[base]], number, pixels[base], frames)
        for number, base in enumerate(bases)
    ]
    with ProcessPoolExecutor(workers) as pool:
        written = list(pool.map(write_track, jobs, chunksize=64))
    crops = {"frames": frames, "paths": [], "labels": [], "tracks": []}
    for number, (paths, base) in enumerate(zip(written, bases, strict=True)):
        kept = paths[: max(0, images - len(crops["paths"]))]  # the last track may be cut short
        crops["paths"] += kept
        crops["labels"] += [int(labels[base])] * len(kept)
        crops["tracks"] += [f"trk{number:06d}"] * len(kept)
    record.write_text(json.dumps(crops))
    return crops


def split_crops(crops: dict, val_mask: np.ndarray) -> Splits:
    samples = list(zip(crops["paths"], crops["labels"], strict=True))
    train = [s for s, in_val in zip(samples, val_mask, strict=True) if not in_val]
    val = [s for s, in_val in zip(samples, val_mask, strict=True) if in_val]
    groups = dict(zip(crops["paths"], crops["tracks"], strict=True))
    return Splits(list(fashion_mnist.CLASSES), train, val, [], groups)


def print_separation(crops: dict, by_image: Splits, workers: int) -> None:
    """Val crops with a train crop within each threshold, split by image and split by track (10% of the
    tracks, seeded): found twins against false ones."""
    hashes = audit.hash_files(crops["paths"], workers)
    tracks = np.array(crops["tracks"])
    names = np.unique(tracks)
    by_track = np.isin(tracks, np.random.default_rng(0).permutation(names)[: len(names) // 10])
    by_image_val = np.isin(crops["paths"], [path for path, _ in by_image.val])
    shares = {}
    for name, val in (("found (by image)", by_image_val), ("false (by track)", by_track)):
        _, distance = audit.nearest(hashes[val], hashes[~val], workers=workers)
        shares[name] = [f"{(distance <= t).mean():.1%}" for t in THRESHOLDS]
    print("| val crops with a train crop within | " + " | ".join(f"t={t}" for t in THRESHOLDS) + " |")
    print("|---|" + "---:|" * len(THRESHOLDS))
    for name, row in shares.items():
        print(f"| {name} | " + " | ".join(row) + " |")


def main(args: Args) -> None:
    work = args.work or Path(tempfile.mkdtemp(prefix="audit-speed-"))
    try:
        started = time.perf_counter()
        crops = write_crops(work, args.images, args.frames, args.workers)
        print(
            f"{len(crops['paths']):,} crops of {CROP_WIDTH}x{CROP_HEIGHT} in {work} "
            f"({time.perf_counter() - started:.0f} s to write or find)"
        )
        rng = np.random.default_rng(0)
        by_image = split_crops(crops, rng.random(len(crops["paths"])) < 0.1)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            summary = audit.run_audit(
                by_image,
                work / "audit",
                threshold=args.threshold,
                workers=args.workers,
                log=lambda line: None,
            )
            runs.append({**summary["seconds"], "total": time.perf_counter() - start})
        hash_s, search_s, total_s = (
            statistics.median(run[key] for run in runs) for key in ("hash", "search", "total")
        )
        print(f"CPU: {cpu_model()}, --workers {args.workers}, median of {args.repeats} runs")
        print("| images | hash s | search s | total s | images/s |")
        print("|---:|---:|---:|---:|---:|")
        print(
            f"| {len(crops['paths']):,} | {hash_s:.1f} | {search_s:.1f} | {total_s:.1f} | "
            f"{len(crops['paths']) / total_s:,.0f} |"
        )

        found = summary["comparisons"]["val_in_train"]
        train_tracks = {by_image.groups[path] for path, _ in by_image.train}
        leaked = sum(by_image.groups[path] in train_tracks for path, _ in by_image.val)
        print(
            f"split by image: {found['with_twin']:,} of {found['images']:,} val crops ({found['share']:.1%}) "
            f"have a train twin within {args.threshold}; {leaked:,} have their track in train"
        )
        print_separation(crops, by_image, args.workers)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
