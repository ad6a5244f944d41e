"""Per-group results: one decision per track (or clip, or game), as a tracking pipeline consumes them.

A group's prediction is a vote over its images: the argmax of the mean of their calibrated probabilities
(softmax(logits / T)), so one confident crop outweighs several unsure ones. Its true label is its images'
label, the most common one when they disagree (those groups are counted). Which images form a group is
groups.py's business; evaluate.py runs the model and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.classification import MulticlassF1Score

from classifier.data import Sample, Splits
from classifier.groups import groups_from_pattern, overlap, overlap_line
from classifier.manifest import is_manifest


@dataclass(frozen=True)
class GroupVote:
    """One row per group, groups in sorted order: the label, the vote, the vote's mean probability, the
    image count and whether the group's images carry more than one label."""

    names: list[str]
    labels: torch.Tensor  # int64 (G,): the most common label of the group's images (smallest index on ties)
    predicted: torch.Tensor  # int64 (G,): argmax of the mean probability
    p_predicted: torch.Tensor  # float64 (G,): that mean probability
    images: torch.Tensor  # int64 (G,)
    mixed_labels: torch.Tensor  # bool (G,)


def vote_by_group(probs: torch.Tensor, labels: torch.Tensor, groups: list[str]) -> GroupVote:
    """`probs` (N, K) calibrated probabilities, `labels` (N,) and `groups` (N names): the vote of each
    group over its images."""
    if not len(probs) == len(labels) == len(groups):
        raise ValueError(
            f"vote_by_group: {len(probs)} probabilities, {len(labels)} labels, {len(groups)} groups"
        )
    names = sorted(set(groups))
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[name] for name in groups], dtype=torch.long)
    num_groups, num_classes = len(names), probs.shape[1]
    sums = torch.zeros(num_groups, num_classes, dtype=torch.float64).index_add_(0, index, probs.double())
    images = torch.bincount(index, minlength=num_groups)
    p_predicted, predicted = (sums / images[:, None]).max(dim=1)
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes)
    label_counts = torch.zeros(num_groups, num_classes, dtype=torch.long).index_add_(0, index, one_hot)
    return GroupVote(
        names=names,
        labels=label_counts.argmax(dim=1),  # torch.argmax returns the first of equal maxima
        predicted=predicted,
        p_predicted=p_predicted,
        images=images,
        mixed_labels=(label_counts > 0).sum(dim=1) > 1,
    )


def judge_groups(
    probs: torch.Tensor,
    labels: torch.Tensor,
    samples: list[Sample],
    groups: dict[str, str],
    train: list[Sample] | None,
) -> tuple[GroupVote, dict]:
    """The vote over the groups of `samples` and metrics.json's "groups" (group_summary). With `train`
    (when `samples` is another split), "also_in_train" is groups.overlap: the split's groups that have
    training images too, and their images. Such groups make the numbers measure memory, as twins would."""
    vote = vote_by_group(probs, labels, [groups[path] for path, _ in samples])
    summary = group_summary(vote, probs.shape[1])
    summary["also_in_train"] = overlap(train, samples, groups) if train is not None else None
    return vote, summary


def summary_lines(summary: dict, split: str) -> list[str]:
    """The printed report's lines about groups."""
    lines = [
        f"groups: {summary['num_groups']} ({summary['num_images']} images, median "
        f"{summary['images_per_group']['median']:g} a group), one vote each (argmax of the mean calibrated "
        f"probability): top-1 {summary['top1']:.4f} | "
        f"macro F1 {summary['macro_f1']:.4f} | {summary['mixed_labels']} with mixed labels | groups.csv"
    ]
    shared = summary["also_in_train"]
    if shared is not None and shared["groups"]:
        lines.append(f"WARNING: {overlap_line(split, shared)}: the {split} numbers are optimistic")
    return lines


def group_summary(vote: GroupVote, num_classes: int) -> dict:
    """metrics.json's "groups": top-1 and macro F1 over groups (classes with no group and no vote left
    out of the macro mean, as torchmetrics does for images), the counts of groups, of images and of
    groups with mixed labels, and the images per group (smallest, median, largest)."""
    correct = vote.predicted == vote.labels
    macro_f1 = MulticlassF1Score(num_classes, average="macro")(vote.predicted, vote.labels)
    return {
        "vote": "argmax of the mean calibrated probability of the group's images",
        "num_groups": len(vote.names),
        "num_images": int(vote.images.sum()),
        "top1": correct.double().mean().item(),
        "macro_f1": macro_f1.item(),
        "mixed_labels": int(vote.mixed_labels.sum()),
        "images_per_group": {
            "min": int(vote.images.min()),
            "median": float(vote.images.double().median()),
            "max": int(vote.images.max()),
        },
    }


def group_rows(vote: GroupVote, classes: list[str]) -> tuple[list[str], list[list]]:
    """groups.csv's header and rows, worst first: wrong groups, most confidently wrong first (a wrong
    track label, or a track that swapped players), then right ones, least confident first."""
    correct = (vote.predicted == vote.labels).tolist()
    p_predicted = vote.p_predicted.tolist()
    order = sorted(
        range(len(vote.names)), key=lambda i: (correct[i], p_predicted[i] if correct[i] else -p_predicted[i])
    )
    header = ["group", "label", "predicted", "images", "p_predicted", "correct", "mixed_labels"]
    rows = [
        [
            vote.names[i],
            classes[int(vote.labels[i])],
            classes[int(vote.predicted[i])],
            int(vote.images[i]),
            f"{p_predicted[i]:.4f}",
            int(correct[i]),
            int(vote.mixed_labels[i]),
        ]
        for i in order
    ]
    return header, rows


def groups_for_eval(
    splits: Splits, root: Path, pattern: str | None, run_pattern: str | None
) -> dict[str, str]:
    """{path: group} for an evaluation of `splits` (read from `root` with the run's `run_pattern`): the
    run's own groups (its --data.group-pattern or the manifest's group column), or, when `pattern`
    overrides the run's, the groups that regex finds in every path, relative to the data root or the
    manifest's folder, as build_splits reads them. The split itself stays the run's."""
    if pattern is None or pattern == run_pattern:
        return splits.groups
    if splits.groups and run_pattern is None:
        raise ValueError("the data has a group column and --data.group-pattern is given: use one of them")
    paths = [path for path, _ in splits.train + splits.val + splits.test]
    return groups_from_pattern(paths, pattern, root.parent if is_manifest(root) else root)
