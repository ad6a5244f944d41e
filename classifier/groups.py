"""Groups of images that must not straddle a split: the crops of one track, the frames of one clip.

A group comes from a regex over each image's path (`--data.group-pattern`) or from a manifest's `group`
column. With groups, the automatic validation split holds out whole groups (`group_split`), and given
train and val splits are checked for a group in both (`overlap`). Frames of one track are near-twins:
a track on both sides makes val accuracy measure memory, not reading.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

Sample = tuple[str, int]  # (file path, class index), as in data.py
SHOWN = 5  # how many paths an error lists


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--data.group-pattern {pattern!r} is not a valid regex: {err}") from None
    if compiled.groups != 1:
        raise ValueError(
            f"--data.group-pattern {pattern!r} has {compiled.groups} capture groups; it needs exactly one, "
            r"the part of the path that names the group, e.g. '(game\d+_track\d+)_'"
        )
    return compiled


def groups_from_pattern(paths: list[str], pattern: str, folder: Path) -> dict[str, str]:
    """{path: group}: the capture of re.search(pattern) in each path relative to `folder` (the data root,
    or the manifest's folder), in POSIX form, so the groups do not depend on where the data lies. A path
    the pattern does not match is an error, not a group of its own."""
    compiled = compile_pattern(pattern)
    groups, unmatched = {}, []
    for path in paths:
        relative = Path(path).relative_to(folder) if Path(path).is_relative_to(folder) else Path(path)
        found = compiled.search(relative.as_posix())
        if found is None or not found.group(1):
            unmatched.append(relative.as_posix())
        else:
            groups[path] = found.group(1)
    if unmatched:
        listing = "\n  ".join(unmatched[:SHOWN])
        more = f"\n  and {len(unmatched) - SHOWN} more" if len(unmatched) > SHOWN else ""
        raise ValueError(
            f"--data.group-pattern {pattern!r} finds no group in {len(unmatched)} of {len(paths)} paths "
            f"(relative to {folder}):\n  {listing}{more}"
        )
    return groups


def group_split(
    samples: list[Sample], groups: dict[str, str], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[int]]:
    """Hold out whole groups, about `fraction` of every class: (train, val, classes with no val image).

    The algorithm, greedy and seeded:
    1. Visit the groups in a random order drawn from `seed`. Move a group to val when that brings every
       class's val count, summed, closer to its target (fraction x the class's images), and leaves every
       class at least one training image.
    2. A class that has no val image yet but two or more groups gets its smallest group that can move
       (the first in the seeded order among equals), as the by-image split gives such a class one image.
    A class whose images all lie in one group cannot be on both sides: it stays in train, with no val
    image, and is returned in the third list. The order of `samples` is kept in both lists."""
    members: dict[str, list[Sample]] = {}
    for sample in samples:
        members.setdefault(groups[sample[0]], []).append(sample)
    names = sorted(members)
    order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
    counts = {name: Counter(label for _, label in members[name]) for name in names}
    train_count = Counter(label for _, label in samples)
    target = {label: fraction * count for label, count in train_count.items()}
    val_count: Counter = Counter()
    held_out: set[str] = set()

    def can_move(name: str) -> bool:
        return name not in held_out and all(train_count[c] > n for c, n in counts[name].items())

    def move(name: str) -> None:
        held_out.add(name)
        train_count.subtract(counts[name])
        val_count.update(counts[name])

    for name in order:
        gain = sum(
            abs(val_count[c] + n - target[c]) - abs(val_count[c] - target[c]) for c, n in counts[name].items()
        )
        if gain < 0 and can_move(name):
            move(name)
    groups_per_class = Counter(label for name in names for label in counts[name])
    for label in sorted(train_count):
        if val_count[label] == 0 and groups_per_class[label] >= 2:
            movable = [name for name in order if label in counts[name] and can_move(name)]
            if movable:
                move(min(movable, key=lambda name: len(members[name])))
    train = [s for s in samples if groups[s[0]] not in held_out]
    val = [s for s in samples if groups[s[0]] in held_out]
    no_val = sorted(label for label in train_count if val_count[label] == 0)
    return train, val, no_val


def overlap(train: list[Sample], other: list[Sample], groups: dict[str, str]) -> dict:
    """How much of `other` (val or test) shares a group with train: the groups in both, and the images of
    `other` in them (count and share)."""
    train_groups = {groups[path] for path, _ in train}
    other_groups = {groups[path] for path, _ in other}
    shared = train_groups & other_groups
    images = sum(1 for path, _ in other if groups[path] in shared)
    return {
        "groups": len(shared),
        "of_groups": len(other_groups),
        "images": images,
        "of_images": len(other),
        "share": images / len(other) if other else 0.0,
        "examples": sorted(shared)[:SHOWN],
    }


def overlap_line(split: str, found: dict) -> str:
    return (
        f"{found['groups']} of {found['of_groups']} {split} groups also have train images: "
        f"{found['images']} of {found['of_images']} {split} images ({found['share']:.1%}), "
        f"e.g. {', '.join(found['examples'])}"
    )
