"""The leakage audit (classifier/audit.py, audit_report.py) on synthetic video tracks of Fashion-MNIST
images (tests/tracks.py), where the tracks are the ground truth of which images are near twins."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import exit_status, run_script
from tracks import write_tracks

from classifier import audit
from classifier.data import build_splits
from classifier.fashion_mnist import CLASSES

GROUPS = r"(trk\d+)_"


def read_rows(out: Path) -> list[dict]:
    with open(out / "twins.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(splits, out: Path) -> tuple[dict, list[str]]:
    lines = []
    summary = audit.run_audit(splits, out, threshold=audit.DEFAULT_THRESHOLD, workers=1, log=lines.append)
    return summary, lines


def test_a_split_by_image_leaks_exactly_the_tracks_on_both_sides(tmp_path):
    written = write_tracks(tmp_path / "data", tracks_per_class=3, frames=8)
    track_of = {path: track for track, paths in written.items() for path in paths}
    splits = build_splits(tmp_path / "data", 0.25, seed=0)  # no val/, no groups: stratified by image
    train_tracks = {track_of[path] for path, _ in splits.train}
    leaked = {path for path, _ in splits.val if track_of[path] in train_tracks}
    assert leaked  # a by-image split puts frames of most tracks on both sides

    summary, lines = run(splits, tmp_path / "audit")

    found = summary["comparisons"]["val_in_train"]
    assert (found["with_twin"], found["images"]) == (len(leaked), len(splits.val))
    assert found["label_conflicts"] == 0 and found["other_group"] is None  # groups unknown here
    rows = read_rows(tmp_path / "audit")
    val_rows = [row for row in rows if row["split"] == "val"]
    assert {row["path"] for row in val_rows} == leaked
    assert all(track_of[row["twin_path"]] == track_of[row["path"]] for row in rows)
    # Within train: every image whose track has another train frame, and no other.
    train_counts = {track: sum(track_of[p] == track for p, _ in splits.train) for track in written}
    expected = sum(1 for path, _ in splits.train if train_counts[track_of[path]] > 1)
    assert summary["comparisons"]["train_in_train"]["with_twin"] == expected
    distances = [int(row["distance"]) for row in val_rows]
    assert distances == sorted(distances) and rows[: len(val_rows)] == val_rows  # cross-split rows first
    assert f"{len(leaked)} of {len(splits.val)} val images" in lines[0]
    assert (tmp_path / "audit" / "twins.png").stat().st_size > 0


def test_b_whole_tracks_in_val_and_test_leave_no_cross_split_twin(tmp_path):
    write_tracks(tmp_path, tracks_per_class=3, frames=6)
    write_tracks(tmp_path, tracks_per_class=1, frames=6, split="val", first_track=30)
    write_tracks(tmp_path, tracks_per_class=1, frames=6, split="test", first_track=40)
    splits = build_splits(tmp_path, 0.1, seed=0, group_pattern=GROUPS)

    summary, lines = run(splits, tmp_path / "audit")

    comparisons = summary["comparisons"]
    for name in ("val_in_train", "test_in_train", "test_in_val"):
        assert comparisons[name]["with_twin"] == 0, name
        assert min(map(int, comparisons[name]["nearest_distances"])) > audit.DEFAULT_THRESHOLD
    within = comparisons["train_in_train"]  # every train frame has its track's other frames
    assert within["with_twin"] == within["images"] == 3 * 10 * 6
    assert within["other_group"] == within["label_conflicts"] == 0
    assert {row["split"] for row in read_rows(tmp_path / "audit")} == {"train"}
    assert len(lines) == 3 and "0 of 60 test images" in lines[1] and "0 (0.0%) in val" in lines[1]


def test_c_a_copy_under_another_class_is_a_twin_with_another_label(tmp_path):
    written = write_tracks(tmp_path, tracks_per_class=2, frames=6)
    write_tracks(tmp_path, tracks_per_class=1, frames=6, split="val", first_track=20)
    original = written["trk0003"][2]  # a Dress (class 3 of the Fashion-MNIST order)
    copy = tmp_path / "val" / "Sneaker" / "trk0999_f00.png"  # its own group: the annotation missed it
    shutil.copyfile(original, copy)
    splits = build_splits(tmp_path, 0.1, seed=0, group_pattern=GROUPS)

    summary, _ = run(splits, tmp_path / "audit")

    found = summary["comparisons"]["val_in_train"]
    assert (found["with_twin"], found["label_conflicts"], found["other_group"]) == (1, 1, 1)
    first = read_rows(tmp_path / "audit")[0]
    assert (first["split"], first["path"], first["label"], first["group"]) == (
        "val",
        str(copy),
        "Sneaker",
        "trk0999",
    )
    # Another frame of the track may hash the same as the copied one: the twin is one of the track's.
    assert first["twin_path"] in written["trk0003"] and first["distance"] == "0"
    assert (first["twin_label"], first["twin_group"]) == (CLASSES[3], "trk0003")


def test_d_the_command_writes_the_table_the_picture_and_the_summary(tmp_path):
    write_tracks(tmp_path / "data", tracks_per_class=2, frames=6)
    proc = run_script(["-m", "classifier.audit", tmp_path / "data", "--val-fraction", "0.2"], cwd=tmp_path)
    assert proc.returncode == 0
    out = tmp_path / "data" / "audit"
    summary = json.loads((out / "summary.json").read_text())
    leaked = summary["comparisons"]["val_in_train"]["with_twin"]
    assert leaked > 0 and f"{leaked} of" in proc.stdout
    assert len(read_rows(out)) == leaked + summary["comparisons"]["train_in_train"]["with_twin"]
    assert (out / "twins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e_a_missing_data_path_is_named(tmp_path):
    missing = tmp_path / "no-such-data"
    with pytest.raises(SystemExit) as stop:
        audit.main(audit.AuditArgs(data=missing))
    assert exit_status(stop.value) != 0 and str(missing) in str(stop.value.code)
    assert "does not exist" in str(stop.value.code)


def test_hashing_in_processes_and_the_tiled_search_match_the_plain_computation(tmp_path, monkeypatch):
    written = write_tracks(tmp_path, tracks_per_class=1, frames=6, classes=5)
    paths = [path for track in written.values() for path in track]
    monkeypatch.setattr(audit, "FILES_PER_TASK", 7)  # several tasks for two processes
    assert np.array_equal(audit.hash_files(paths, workers=2), audit.hash_files(paths, workers=1))

    monkeypatch.setattr(audit, "QUERY_ROWS", 8)  # small tiles: the search crosses many tile edges
    monkeypatch.setattr(audit, "POOL_COLUMNS", 64)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    queries = np.concatenate([pool[:40], rng.integers(0, 2**63, size=30, dtype=np.uint64)])
    full = np.bitwise_count(queries[:, None] ^ pool[None, :])
    index, distance = audit.nearest(queries, pool, workers=2)
    assert np.array_equal(index, full.argmin(axis=1)) and np.array_equal(distance, full.min(axis=1))
    index, distance = audit.nearest(pool, pool, workers=2, same=True)
    full = np.bitwise_count(pool[:, None] ^ pool[None, :])
    np.fill_diagonal(full, 255)  # an image is not its own twin
    assert np.array_equal(index, full.argmin(axis=1)) and np.array_equal(distance, full.min(axis=1))
