"""Unreadable image files, found before training: the run stops with their names, or with
--data.skip-bad-images leaves them out, as long as every class keeps a training image.

Every file of every split is decoded once (images.scan_images); under DDP each rank decodes its share.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from classifier import distributed
from classifier.data import Splits, classes_without_images
from classifier.images import scan_images, write_report


def without(splits: Splits, bad: set[str]) -> Splits:
    """The same splits with the files in `bad` left out."""
    keep = lambda samples: [s for s in samples if s[0] not in bad]  # noqa: E731
    return Splits(splits.classes, keep(splits.train), keep(splits.val), keep(splits.test), splits.groups)


def drop_unreadable(
    splits: Splits,
    root: Path,
    *,
    skip: bool,
    workers: int,
    rank: int,
    world_size: int,
    report: Path | None,
    log,
) -> Splits:
    """Decode every file of every split once (under DDP each rank its share, then merged). Unreadable
    files stop the run with their names, or with `skip` are left out and listed in `report`. A class
    that has no training image left then is an error, as in build_splits; a class with no validation
    image left is a warning, as there (it drops out of balanced accuracy and AUROC)."""
    paths = sorted({p for p, _ in splits.train + splits.val + splits.test})
    bad = distributed.merge_dicts(scan_images(paths[rank::world_size], workers=workers))
    if not bad:
        return splits
    if not skip:
        listing = "\n  ".join(f"{p}: {reason}" for p, reason in sorted(bad.items())[:20])
        raise SystemExit(
            f"error: {len(bad)} unreadable image files under {root}:\n  {listing}\n"
            "fix or remove them, or pass --data.skip-bad-images to leave them out"
        )
    if report is not None:
        write_report(bad, report)
    log(f"left out {len(bad)} unreadable images, listed in {report}")
    kept = without(splits, set(bad))
    # `bad` holds every rank's findings, so every rank judges the whole list and all of them stop together.
    # Unchecked, a class whose training files were all unreadable would train with loss weight 0, unseen.
    emptied = classes_without_images(kept.train, kept.classes)
    if emptied:
        lines = []
        for name in emptied:
            files = [p for p, label in splits.train if splits.classes[label] == name]
            more = f" and {len(files) - 5} more" if len(files) > 5 else ""
            lines.append(f"{name}: {', '.join(files[:5])}{more}")
        listed = f" (all listed in {report})" if report is not None else ""
        raise SystemExit(
            f"error: with the unreadable images left out, these classes under {root} have no "
            f"training images{listed}:\n  " + "\n  ".join(lines) + "\nfix or replace those "
            "files: --data.skip-bad-images leaves out files, not whole classes"
        )
    # Validation keeps build_splits's rule, a warning; for the classes this scan emptied (build_splits has
    # named the others).
    emptied_val = [
        name
        for name in classes_without_images(kept.val, kept.classes)
        if name not in classes_without_images(splits.val, splits.classes)
    ]
    if emptied_val:
        warnings.warn(
            f"classes with no validation images once unreadable ones are left out: {emptied_val}",
            stacklevel=2,
        )
    return kept
