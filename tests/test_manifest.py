"""Manifests (CSV, JSONL): the same files give the same splits, run and numbers as their ImageFolder, and a
faulty row is named by its line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN

import evaluate
import export
import train
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.data import build_splits


def folder_rows(root: Path, splits=("train", "test")) -> list[dict]:
    """One manifest row per image of `root`'s ImageFolder, shuffled out of folder order (the manifest's
    row order must not matter), paths relative to `root`."""
    rows = [
        {"path": path.relative_to(root).as_posix(), "label": path.parent.name, "split": split}
        for split in splits
        for path in sorted((root / split).rglob("*.png"))
    ]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return [rows[i] for i in order]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_csv_and_jsonl_give_the_image_folders_splits(fmnist_small_root):
    rows = folder_rows(fmnist_small_root)
    folder = build_splits(fmnist_small_root, 0.25, seed=3)
    for manifest in (
        write_csv(fmnist_small_root / "manifest.csv", rows),
        write_jsonl(fmnist_small_root / "manifest.jsonl", rows),
    ):
        listed = build_splits(manifest, 0.25, seed=3)
        assert listed == folder  # classes, and every split in the same order


def test_numeric_labels_sort_as_numbers(tmp_path, fmnist_small_root):
    image = next((fmnist_small_root / "train").rglob("*.png")).read_bytes()
    rows = []
    for label in ("10", "2", "7"):
        (tmp_path / f"{label}.png").write_bytes(image)
        rows.append({"path": f"{label}.png", "label": label})
    splits = build_splits(write_csv(tmp_path / "m.csv", rows), 0.0, seed=0)
    assert splits.classes == ["2", "7", "10"]  # as text, "10" would come first


# `row`: the row at fault; {line} its file line (the CSV's header is line 1, JSONL has none)
@pytest.mark.parametrize(
    ("row", "edit", "message"),
    [
        (
            3,
            lambda rows: rows[3].update(split="val", label="sandals"),
            "line {line}: label 'sandals' is not a class",
        ),
        (1, lambda rows: rows[1].update(path="/nowhere/gone.png"), "1 files of the manifest do not exist"),
        (
            2,
            lambda rows: rows[2].update(split="valid"),
            "line {line}: split 'valid' is not one of train, val, test",
        ),
        (4, lambda rows: rows[4].update(label=" "), "line {line}: empty label"),
        (
            6,
            lambda rows: rows[6].update(path=rows[0]["path"]),
            "line {line}: .* is listed already, at .* line {first}",
        ),
        (0, lambda rows: [row.update(spilt=row.pop("split")) for row in rows], r"unknown \['spilt'\]"),
    ],
    ids=["unknown-class", "missing-file", "bad-split", "empty-cell", "duplicate", "unknown-column"],
)
def test_a_faulty_row_is_named(row, edit, message, fmnist_small_root, tmp_path):
    rows = [
        {**r, "path": str(fmnist_small_root / r["path"])}  # absolute paths, as a manifest may give
        for r in folder_rows(fmnist_small_root, splits=("train",))
    ]
    edit(rows)
    for manifest, header in (
        (write_csv(tmp_path / "m.csv", rows), 1),
        (write_jsonl(tmp_path / "m.jsonl", rows), 0),
    ):
        expected = message.format(line=row + 1 + header, first=1 + header)
        with pytest.raises(ValueError, match=expected):
            build_splits(manifest, 0.1, seed=0)


def test_manifest_groups_and_a_pattern_together_are_refused(fmnist_small_root, tmp_path):
    rows = [{**row, "group": row["path"].split("/")[1]} for row in folder_rows(fmnist_small_root)]
    manifest = write_csv(fmnist_small_root / "grouped.csv", rows)
    splits = build_splits(manifest, 0.1, seed=0)  # the group column: a class folder is a group here
    assert set(splits.groups.values()) == set(splits.classes)
    with pytest.raises(ValueError, match="has a group column and --data.group-pattern is given"):
        build_splits(manifest, 0.1, seed=0, group_pattern=r"(\w+)/")


def test_a_manifest_run_is_the_image_folder_run(fmnist_small_root, tmp_path):
    """Same class map, same fingerprint, bit-identical weights and the same evaluation; then the run
    resumes on its manifest, and a changed manifest is refused as changed data."""
    manifest = write_csv(fmnist_small_root / "run.csv", folder_rows(fmnist_small_root))
    common = [*TINY_RUN, "--out-dir", str(tmp_path), "--data.batch-size", "16"]
    runs = {}
    for name, root in (("folder", fmnist_small_root), ("manifest", manifest)):
        train.main(parse_cli([*common, "--data.root", str(root), "--name", name]))
        runs[name] = load_checkpoint(tmp_path / name / "checkpoints" / "best.pt")
    folder, listed = runs["folder"], runs["manifest"]
    assert listed["classes"] == folder["classes"] and listed["dataset"] == folder["dataset"]
    different = [k for k in folder["model"] if not torch.equal(folder["model"][k], listed["model"][k])]
    assert not different, different[:5]

    reports = {
        name: evaluate.main(
            evaluate.EvalArgs(tmp_path / name / "checkpoints" / "best.pt", split="test", device="cpu")
        )
        for name in runs
    }
    for key in ("top1", "macro_f1", "confusion", "ece"):
        assert reports["manifest"][key] == reports["folder"][key]
    assert reports["manifest"]["data_root"] == str(manifest)

    images, note = export.verification_images(manifest, folder["classes"], 0.1, 0, 8, 28, root_given=True)
    assert len(images) == 8 and note.startswith(f"verifying on 8 real images from {manifest}")

    resume = ["--resume", str(tmp_path / "manifest"), "--epochs", "2", "--accept-config-changes"]
    assert train.main(parse_cli(resume))["step"] > listed["step"]
    rows = folder_rows(fmnist_small_root)
    rows[0]["label"] = next(r["label"] for r in rows if r["label"] != rows[0]["label"])
    write_csv(manifest, rows)
    with pytest.raises(SystemExit, match=f"the files under {manifest} changed"):
        train.main(parse_cli(resume[:2]))
