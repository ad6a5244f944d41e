"""Manifest files: a CSV or JSONL list of images, the other way to give data besides ImageFolder folders.

Each row names an image and its label, and optionally its split (train, val, test) and its group (track,
clip, game). Paths are relative to the manifest's folder (absolute ones are taken as they are). This
module reads and checks the rows; data.build_splits turns them into the same Splits an ImageFolder gives.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIXES = (".csv", ".jsonl")
REQUIRED = ("path", "label")
OPTIONAL = ("split", "group")
SPLITS = ("train", "val", "test")
SHOWN = 10  # how many faulty rows an error lists


@dataclass(frozen=True)
class Row:
    where: str  # "FILE line N", for error messages
    written: str  # the path as the manifest writes it
    path: str  # that path joined to the manifest's folder: what the loaders open
    label: str
    split: str | None  # None when the manifest has no split column
    group: str | None  # None when the manifest has no group column


def is_manifest(root: Path) -> bool:
    return Path(root).suffix.lower() in MANIFEST_SUFFIXES


def read_manifest(manifest: Path) -> list[Row]:
    """Every row of `manifest`, checked: known columns only (a misspelt `split` column would otherwise be
    ignored and every image trained on), no empty cell, splits named train/val/test, no path twice, every
    file present. Each fault is a ValueError naming the manifest's line."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    if manifest.suffix.lower() == ".csv":
        records = read_csv_records(manifest)
    else:
        records = read_jsonl_records(manifest)
    if not records:
        raise ValueError(f"{manifest} lists no images")
    columns = set(records[0][1])
    rows = []
    for line, record in records:
        where = f"{manifest} line {line}"
        if set(record) != columns:
            raise ValueError(f"{where}: has the fields {sorted(record)}, the first row {sorted(columns)}")
        rows.append(make_row(record, where, manifest.parent))
    check_unique(rows)
    check_present(rows)
    return rows


def read_csv_records(manifest: Path) -> list[tuple[int, dict[str, str]]]:
    with manifest.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        check_columns(reader.fieldnames or [], manifest)
        # reader.line_num after a row is the file line it ended on: a quoted cell may span lines.
        return [(reader.line_num, row) for row in reader]


def read_jsonl_records(manifest: Path) -> list[tuple[int, dict[str, str]]]:
    records = []
    with manifest.open(encoding="utf-8") as file:
        for line, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{manifest} line {line}: not JSON: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{manifest} line {line}: expected a JSON object, got {text.strip()[:80]}")
            check_columns(list(record), manifest, line)
            # JSON may give a label as a number (7): the class name is its text, as a folder name would be.
            records.append((line, {key: str(value) for key, value in record.items()}))
    return records


def check_columns(columns: list[str], manifest: Path, line: int = 1) -> None:
    missing = [name for name in REQUIRED if name not in columns]
    unknown = [name for name in columns if name not in REQUIRED + OPTIONAL]
    if missing or unknown:
        raise ValueError(
            f"{manifest} line {line}: the columns are {columns}; a manifest has {list(REQUIRED)} and "
            f"optionally {list(OPTIONAL)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {unknown})" if unknown else "")
        )


def make_row(record: dict[str, str], where: str, folder: Path) -> Row:
    empty = [name for name, value in record.items() if value is None or not value.strip()]
    if empty:
        raise ValueError(f"{where}: empty {', '.join(empty)}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    written = record["path"]
    return Row(
        where=where,
        written=written,
        path=str(folder / written),
        label=record["label"],
        split=split,
        group=record.get("group"),
    )


def check_unique(rows: list[Row]) -> None:
    first_seen: dict[str, Row] = {}
    for row in rows:
        if row.path in first_seen:
            raise ValueError(f"{row.where}: {row.written} is listed already, at {first_seen[row.path].where}")
        first_seen[row.path] = row


def check_present(rows: list[Row]) -> None:
    missing = [row for row in rows if not Path(row.path).is_file()]
    if missing:
        listing = "\n  ".join(f"{row.where}: {row.path}" for row in missing[:SHOWN])
        more = f"\n  and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise ValueError(f"{len(missing)} files of the manifest do not exist:\n  {listing}{more}")


def samples_by_split(
    rows: list[Row], class_to_idx: dict[str, int]
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """({split: [(path, class index)]}, {path: group}) from checked rows; rows without a split are train.
    A val or test row whose label is not a class of the train rows is an error naming the row. Each
    split is in class order, then path order, as an ImageFolder lists its files, so the same files give
    the same order (and the same seeded split) either way."""
    by_split: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    for row in rows:
        if row.label not in class_to_idx:
            raise ValueError(
                f"{row.where}: label {row.label!r} is not a class of the train rows "
                f"({len(class_to_idx)} classes)"
            )
        by_split[row.split or "train"].append((row.path, class_to_idx[row.label]))
    for samples in by_split.values():
        samples.sort(key=lambda sample: (sample[1], Path(sample[0])))
    groups = {row.path: row.group for row in rows if row.group is not None}
    return by_split, groups
