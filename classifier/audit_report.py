"""What the leakage audit reports: twins.csv (one row per image with a near twin), twins.png (the closest
cross-split pairs side by side), summary.json, and the log lines. audit.py hashes the images and finds
each image's nearest neighbour; this module decides what counts as a twin (distance <= threshold) and
counts twins in another group (a duplicate the group annotation missed) and with another label.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from classifier import files, plots
from classifier.data import Splits
from classifier.images import load_image

SPLITS = ("train", "val", "test")
FILE_CSV = "twins.csv"
FILE_PNG = "twins.png"
FILE_JSON = "summary.json"
GALLERY_PAIRS = 12  # cross-split pairs twins.png shows, closest first
PAIRS_PER_ROW = 3
HASH_DESCRIPTION = (
    "pHash: 64 bits, DCT frequencies 2-9 x 2-9 of a 32x32 grayscale centred on its intensity centroid"
)


class TwinRow(NamedTuple):
    """One image and its nearest image in `twin_split`, at Hamming `distance` <= the threshold: a row of
    twins.csv, whose header is the field names."""

    split: str
    path: str
    label: str
    group: str  # "" when groups are not known
    twin_split: str
    twin_path: str
    twin_label: str
    twin_group: str
    distance: int


def twin_rows(splits: Splits, nearest: list, threshold: int) -> list[TwinRow]:
    """Every image whose nearest image in a compared split (audit.Nearest) lies within `threshold`,
    cross-split rows first, then those within one split; closest first within each."""
    rows = []
    for found in nearest:
        queries, pool = getattr(splits, found.split), getattr(splits, found.twin_split)
        for i in (found.distance <= threshold).nonzero()[0].tolist():
            (path, label), (twin_path, twin_label) = queries[i], pool[int(found.index[i])]
            rows.append(
                TwinRow(
                    found.split,
                    path,
                    splits.classes[label],
                    splits.groups.get(path, ""),
                    found.twin_split,
                    twin_path,
                    splits.classes[twin_label],
                    splits.groups.get(twin_path, ""),
                    int(found.distance[i]),
                )
            )
    order = {split: i for i, split in enumerate(SPLITS)}
    return sorted(
        rows,
        key=lambda r: (r.split == r.twin_split, r.distance, order[r.split], order[r.twin_split], r.path),
    )


def summarize(splits: Splits, nearest: list, rows: list[TwinRow], threshold: int) -> dict:
    """Per comparison ("val_in_train", "test_in_train", "test_in_val", "train_in_train"): the images
    searched, how many have a twin (count and share), how many of those twins carry another label, how
    many lie in another group (None when groups are not known), and how many images have their nearest
    image at each distance ({"0": 40, "3": 12, ...}: where the twins stand out, to choose a threshold)."""
    comparisons = {}
    for found in nearest:
        twins = [r for r in rows if (r.split, r.twin_split) == (found.split, found.twin_split)]
        images = len(found.distance)
        comparisons[f"{found.split}_in_{found.twin_split}"] = {
            "images": images,
            "with_twin": len(twins),
            "share": len(twins) / images,
            "label_conflicts": sum(r.label != r.twin_label for r in twins),
            "other_group": sum(r.group != r.twin_group for r in twins) if splits.groups else None,
            "nearest_distances": {str(d): int(n) for d, n in enumerate(np.bincount(found.distance)) if n},
        }
    return {
        "hash": HASH_DESCRIPTION,
        "threshold": threshold,
        "images": {split: len(getattr(splits, split)) for split in SPLITS},
        "groups_known": bool(splits.groups),
        "comparisons": comparisons,
    }


def write_report(splits: Splits, nearest: list, out_dir: Path, *, threshold: int, seconds: dict) -> dict:
    """Write out_dir/twins.csv, twins.png and summary.json; return the summary, with the files' paths and
    `seconds` (the time taken to hash and to search)."""
    rows = twin_rows(splits, nearest, threshold)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TwinRow._fields)
    writer.writerows(rows)
    files.write_text(out_dir / FILE_CSV, buffer.getvalue())
    cross = [row for row in rows if row.split != row.twin_split][:GALLERY_PAIRS]
    plots.save_figure(twins_figure(cross, threshold), out_dir / FILE_PNG)
    summary = summarize(splits, nearest, rows, threshold)
    summary["csv"], summary["png"] = str(out_dir / FILE_CSV), str(out_dir / FILE_PNG)
    summary["seconds"] = seconds
    files.write_text(out_dir / FILE_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def summary_lines(summary: dict) -> list[str]:
    """1-3 lines for the log: val and test against train (and test against val), then within train."""
    comparisons, threshold = summary["comparisons"], summary["threshold"]
    lines = []
    for split in ("val", "test"):
        found = comparisons.get(f"{split}_in_train")
        if found is None:
            continue
        line = (
            f"audit: {found['with_twin']:,} of {found['images']:,} {split} images ({found['share']:.1%}) "
            f"have a near twin in train (pHash distance <= {threshold}){details(found)}"
        )
        if f"{split}_in_val" in comparisons:
            in_val = comparisons[f"{split}_in_val"]
            line += f"; {in_val['with_twin']:,} ({in_val['share']:.1%}) in val{details(in_val)}"
        lines.append(line)
    within = comparisons.get("train_in_train")
    if within is not None:
        lines.append(
            f"audit: within train, {within['with_twin']:,} of {within['images']:,} images "
            f"({within['share']:.1%}) have a near twin{details(within)}; pairs in {summary['csv']}"
        )
    return lines


def details(found: dict) -> str:
    """ ", 3 with another label, 400 in another group" for the twins that have any."""
    if not found["with_twin"]:
        return ""
    other_group = "" if found["other_group"] is None else f", {found['other_group']:,} in another group"
    return f": {found['label_conflicts']:,} with another label{other_group}"


def twins_figure(rows: list[TwinRow], threshold: int) -> Figure:
    """The closest cross-split twins, each image beside its twin; a pair with two labels titled in red."""
    images, titles, colors = [], [], []
    for row in rows:
        images += [load_image(row.path), load_image(row.twin_path)]
        titles += [
            f"{row.split}: {plots.shorten(row.label, 14)}\n{plots.shorten(row.group, 14)}",
            f"{row.twin_split}: {plots.shorten(row.twin_label, 14)}\ndistance {row.distance}",
        ]
        colors += ["darkred" if row.label != row.twin_label else "black"] * 2
    heading = (
        f"Closest cross-split twins ({len(rows)} shown, pHash distance <= {threshold}; red: labels differ)"
        if rows
        else f"no cross-split twins within pHash distance {threshold}"
    )
    return plots.tiles_figure(images, titles, heading, cols=2 * PAIRS_PER_ROW, colors=colors)
    grid_rows = math.ceil(len(rows) / PAIRS_PER_ROW)
    columns = 2 * min(PAIRS_PER_ROW, len(rows))
    fig = Figure(figsize=(columns * 1.7, grid_rows * 2.2 + 0.5), layout="constrained")
    axes = fig.subplots(grid_rows, columns, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for i, row in enumerate(rows):
        color = "darkred" if row.label != row.twin_label else "black"
        sides = [
            (row.path, f"{row.split}: {plots.shorten(row.label, 14)}\n{plots.shorten(row.group, 14)}"),
            (
                row.twin_path,
                f"{row.twin_split}: {plots.shorten(row.twin_label, 14)}\ndistance {row.distance}",
            ),
        ]
        for ax, (path, title) in zip(axes[2 * i : 2 * i + 2], sides, strict=True):
            ax.imshow(load_image(path).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=7, color=color)
    fig.suptitle(
        f"Closest cross-split twins ({len(rows)} shown, pHash distance <= {threshold}; red: labels differ)",
        fontsize=10,
    )
    return fig
