"""Groups (tracks, clips): the split by group keeps each group on one side, given splits that share a group
are reported or refused, and a bad --data.group-pattern is named."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import TINY_RUN

import train
from classifier.card import ModelCard
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.data import Splits, build_splits
from classifier.groups import group_split, overlap

PATTERN = r"(trk\d+)_"


def tracked_copy(source: Path, dest: Path, frames: int) -> Path:
    """`source`'s ImageFolder with every class's images renamed into tracks of `frames` files:
    train/<class>/trk0007_f02.png. Track numbers are unique across classes."""
    track = 0
    for split_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            (dest / split_dir.name / class_dir.name).mkdir(parents=True)
            for i, image in enumerate(sorted(class_dir.iterdir())):
                if i % frames == 0:
                    track += 1
                shutil.copy(
                    image, dest / split_dir.name / class_dir.name / f"trk{track:04d}_f{i % frames:02d}.png"
                )
    return dest


def group_of(path: str) -> str:
    return Path(path).name.split("_")[0]


def test_by_image_split_leaks_tracks_and_the_group_split_leaks_none(fmnist_root, tmp_path):
    root = tracked_copy(fmnist_root, tmp_path / "tracks", frames=6)  # 60 images per class: 10 tracks
    by_image = build_splits(root, 0.2, seed=0)
    leaked = {group_of(p) for p, _ in by_image.val} & {group_of(p) for p, _ in by_image.train}
    assert len(leaked) > 50  # of 100 tracks: a random 20% of frames touches most of them

    splits = build_splits(root, 0.2, seed=0, group_pattern=PATTERN)
    assert splits.groups and all(splits.groups[p] == group_of(p) for p, _ in splits.train + splits.val)
    assert not {group_of(p) for p, _ in splits.val} & {group_of(p) for p, _ in splits.train}
    assert overlap(splits.train, splits.val, splits.groups)["groups"] == 0
    # every class: 2 of its 10 tracks (20%), and every image kept exactly once
    assert Counter(label for _, label in splits.val) == {label: 12 for label in range(10)}
    assert sorted(splits.train + splits.val) == sorted(by_image.train + by_image.val)


def test_group_split_is_seeded_and_keeps_the_file_order():
    samples = [(f"/d/trk{t:03d}_f{f}.png", t % 3) for t in range(60) for f in range(4)]
    groups = {path: group_of(path) for path, _ in samples}
    first = group_split(samples, groups, 0.25, seed=1)
    assert group_split(samples, groups, 0.25, seed=1) == first
    assert group_split(samples, groups, 0.25, seed=2)[1] != first[1]
    train, val, no_val = first
    assert train == [s for s in samples if s not in val] and val == sorted(val, key=samples.index)
    assert Counter(label for _, label in val) == {0: 20, 1: 20, 2: 20} and no_val == []


def test_a_class_in_one_group_stays_in_train_and_is_named():
    samples = [("/d/trkA_0.png", 0), ("/d/trkA_1.png", 0)]  # class 0: one track
    samples += [(f"/d/trk{t}_{f}.png", 1) for t in range(4) for f in range(3)]  # class 1: four tracks
    groups = {path: Path(path).name.split("_")[0] for path, _ in samples}
    train, val, no_val = group_split(samples, groups, 0.1, seed=0)
    assert no_val == [0] and all(label == 1 for _, label in val)
    # class 1: 10% of 12 is 1.2 images, less than a track: it still gets one track, not none
    assert len(val) == 3 and {groups[p] for p, _ in val}.isdisjoint({groups[p] for p, _ in train})


def test_a_group_in_train_and_val_is_reported_or_refused(fmnist_small_root, tmp_path):
    root = tracked_copy(fmnist_small_root, tmp_path / "tracks", frames=4)
    shutil.copytree(root / "train", root / "val")  # every val track is a train track
    splits = build_splits(root, 0.1, seed=0, group_pattern=PATTERN)
    lines = []
    train.check_group_overlap(splits, strict=False, log=lines.append)
    # 12 train images per class in tracks of 4: 30 tracks, all 120 val images in a train track
    assert "30 of 30 val groups also have train images: 120 of 120 val images (100.0%)" in "\n".join(lines)
    with pytest.raises(SystemExit, match=r"30 of 30 val groups .* \(--data.strict-groups\)"):
        train.check_group_overlap(splits, strict=True, log=lines.append)

    clean = Splits(splits.classes, splits.train, [], [], splits.groups)
    lines.clear()
    train.check_group_overlap(clean, strict=True, log=lines.append)
    assert lines == ["groups: 30 (train, val and test together)"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"trk\d+_", "has 0 capture groups; it needs exactly one"),
        (r"(trk)(\d+)_", "has 2 capture groups"),
        (r"(trk[", "is not a valid regex"),
        (r"(game\d+)_", "finds no group in 160 of 160 paths"),
    ],
)
def test_a_bad_group_pattern_is_named(pattern, message, fmnist_small_root, tmp_path):
    root = tracked_copy(fmnist_small_root, tmp_path / "tracks", frames=4)
    with pytest.raises(ValueError, match="--data.group-pattern") as refused:
        build_splits(root, 0.1, seed=0, group_pattern=pattern)
    assert message in str(refused.value)


def test_train_py_splits_by_group_and_evaluate_rebuilds_that_split(fmnist_small_root, tmp_path):
    """The pattern travels in the run's card: the val split the run validated on is the one rebuilt."""
    root = tracked_copy(fmnist_small_root, tmp_path / "tracks", frames=4)
    args = [
        *TINY_RUN,
        "--data.root",
        str(root),
        "--data.group-pattern",
        PATTERN,
        "--data.val-fraction",
        "0.3",
        "--out-dir",
        str(tmp_path / "runs"),
        "--name",
        "grouped",
    ]
    result = train.main(parse_cli(args))
    state = load_checkpoint(Path(result["run_dir"]) / "checkpoints" / "best.pt")
    card = ModelCard.from_checkpoint(state, "raw")
    assert card.data.group_pattern == PATTERN
    rebuilt = build_splits(
        Path(card.data.root),
        card.data.val_fraction,
        card.data.seed,
        classes=list(card.classes),
        group_pattern=card.data.group_pattern,
    )
    assert len(rebuilt.val) == sum(state["dataset"]["counts"]["val"]) == 40  # one track of 4 images per class
    assert not {group_of(p) for p, _ in rebuilt.val} & {group_of(p) for p, _ in rebuilt.train}
    # the end of training: the label-issue queue over the training images, each with its group
    with (Path(result["run_dir"]) / "label_issues" / "label_issues.csv").open() as file:
        queue = list(csv.DictReader(file))
    assert sorted(row["path"] for row in queue) == sorted(path for path, _ in rebuilt.train)
    assert all(row["group"] == group_of(row["path"]) and row["held_out"] == "0" for row in queue)
    assert [float(row["p_given"]) for row in queue] == sorted(float(row["p_given"]) for row in queue)
