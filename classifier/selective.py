"""Selective prediction: when to abstain rather than answer. From one split's calibrated top-1 confidences
and whether each prediction was right: the risk-coverage curve (accuracy of the images kept against the
share kept, as the threshold rises), and per target accuracy the threshold to abstain below.

calibration.calibrate_best stores the val split's thresholds with best.pt when training ends (they
travel in the model card), evaluate.py reports them on the split it judges, predict.py --target-accuracy
abstains below one. The temperature is calibration.py's; the card that carries the thresholds is card.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from matplotlib.figure import Figure

TARGETS = (0.95, 0.99, 0.995)  # the accuracies a threshold is stored for, unless a caller asks for others
RULE = "abstain when the top-1 probability softmax(logits / temperature) is below the threshold"


@dataclass(frozen=True)
class Curve:
    """The risk-coverage curve of one split, one point per distinct confidence, most confident first:
    keeping the images whose confidence is >= threshold[i] keeps kept[i] of `images`, correct[i] of them
    right. Equal confidences are kept or dropped together, so no point falls inside a tie."""

    threshold: list[float]
    kept: list[int]
    correct: list[int]
    images: int

    def coverage(self, i: int) -> float:
        return self.kept[i] / self.images

    def accuracy(self, i: int) -> float:
        return self.correct[i] / self.kept[i]


def top1_confidence(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(float32 top-1 probability of softmax(logits / temperature), whether the top-1 class is the label):
    the same expression as evaluate.py's confidence_calibrated and predict.py's probability."""
    # T > 0 keeps the argmax, so the calibrated top-1 is the same class as the logits' top-1.
    confidence, predicted = (logits.float() / temperature).softmax(dim=1).max(dim=1)
    return confidence, predicted == labels


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> Curve:
    """The curve of one split. Confidences are taken as float32, as the models give them."""
    if len(confidence) == 0:
        raise ValueError("risk_coverage: no images (an empty split has no curve)")
    order = torch.argsort(confidence.float(), descending=True, stable=True)
    sorted_confidence = confidence.float()[order].tolist()  # float64 copies of float32 values: exact
    correct_so_far = torch.cumsum(correct[order].long(), dim=0).tolist()
    n = len(sorted_confidence)
    thresholds, kept, correct_kept = [], [], []
    for i in range(n):
        below = sorted_confidence[i + 1] if i + 1 < n else None  # the next confidence, dropped at this point
        if below == sorted_confidence[i]:
            continue  # a tie with the next image: only after the last of equal confidences is a cut
        thresholds.append(cut_between(sorted_confidence[i], below))
        kept.append(i + 1)
        correct_kept.append(correct_so_far[i])
    return Curve(threshold=thresholds, kept=kept, correct=correct_kept, images=n)


def cut_between(lowest_kept: float, highest_dropped: float | None) -> float:
    """The threshold that keeps confidence `lowest_kept` and drops `highest_dropped` (two float32 values):
    halfway between, so a probability moved by float rounding (another backend, a CSV's six decimals)
    stays on its side unless it moves by half the gap. Rounded up to a float32: a consumer that compares
    float32 probabilities with it (numpy does) decides exactly as one comparing doubles, and rounding up
    keeps it above `highest_dropped` even when the two are neighbouring floats. Nothing dropped: 0.0."""
    if highest_dropped is None:
        return 0.0
    halfway = (lowest_kept + highest_dropped) / 2  # exact in float64
    threshold = np.float32(halfway)
    if threshold < halfway:  # rounded down, possibly onto highest_dropped: the next float32 up
        threshold = np.nextafter(threshold, np.float32(np.inf))
    return float(threshold)


def min_kept(target: float) -> int:
    """The fewest kept images a threshold for `target` may rest on: 1 / (1 - target), rounded up (20 at
    0.95, 100 at 0.99, 200 at 0.995). A smaller kept set meets the target only with no error at all (one
    error among k < 1 / (1 - target) images already costs more than 1 - target), so a threshold drawn
    from it cannot tell the target from luck."""
    if not 0 < target < 1:
        raise ValueError(f"a target accuracy must be between 0 and 1 (exclusive), got {target}")
    return math.ceil(1 / (1 - Fraction(str(target))))  # Fraction: 1 / (1 - 0.99) is 100.00000000000009


def thresholds_for(curve: Curve, targets: tuple[float, ...]) -> list[dict]:
    """Per target: the lowest threshold (the largest kept set) whose kept images reach at least that
    accuracy and number at least min_kept(target), with its coverage, accuracy and kept count. Accuracy
    need not fall steadily as more images are kept, so every point of the curve is a candidate. A target
    no point reaches is recorded as not reachable, with threshold, coverage, accuracy and kept None."""
    rows = []
    for target in targets:
        need = min_kept(target)
        reaching = [
            i for i in range(len(curve.kept)) if curve.kept[i] >= need and curve.accuracy(i) >= target
        ]
        row = {"target": target, "reachable": bool(reaching), "min_kept": need}
        if reaching:
            i = reaching[-1]  # the points run from the highest threshold to the lowest
            row.update(
                threshold=curve.threshold[i],
                coverage=curve.coverage(i),
                accuracy=curve.accuracy(i),
                kept=curve.kept[i],
            )
        else:
            row.update(threshold=None, coverage=None, accuracy=None, kept=None)
        rows.append(row)
    return rows


def abstain_thresholds(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    *,
    split: str,
    temperature: float,
    targets: tuple[float, ...] = TARGETS,
) -> dict:
    """What travels with a model (and what evaluate.py reports): the thresholds per target on `split`,
    with the split's image count and the temperature its confidences were calibrated with."""
    curve = risk_coverage(confidence, correct)
    return {
        "split": split,
        "images": curve.images,
        "temperature": temperature,
        "rule": RULE,
        "targets": thresholds_for(curve, targets),
    }


def apply_threshold(confidence: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict:
    """Keep the images whose confidence is >= `threshold`: how many, their share, their accuracy (None
    when none is kept). Compared as Python floats, as predict.py compares."""
    kept = [c >= threshold for c in confidence.float().tolist()]
    right = sum(k and bool(r) for k, r in zip(kept, correct.tolist(), strict=True))
    count = sum(kept)
    return {
        "threshold": threshold,
        "kept": count,
        "coverage": count / len(kept),
        "accuracy": right / count if count else None,
    }


def at_stored_thresholds(
    confidence: torch.Tensor, correct: torch.Tensor, stored: dict | None, temperature: float
) -> dict | None:
    """The thresholds a model carries (from its val split), applied to another split: what they keep
    there and at what accuracy. None when the model carries none. Thresholds cut on confidences of
    another temperature than `temperature` (the one `confidence` was computed with) are not applied, and
    `not_applied` says why."""
    if stored is None:
        return None
    applied = {"from_split": stored["split"], "from_images": stored["images"], "targets": []}
    if stored["temperature"] != temperature:
        why = f"cut on confidences at temperature {stored['temperature']}, these are at {temperature}"
        return {**applied, "not_applied": why}
    applied["targets"] = [
        {"target": row["target"], **apply_threshold(confidence, correct, row["threshold"])}
        for row in stored["targets"]
        if row["reachable"]
    ]
    return applied


def stored_threshold(stored: dict | None, target: float) -> dict:
    """The row a model's thresholds hold for `target`. ValueError naming the targets it does hold (or
    saying it holds none) when there is no usable threshold for this one."""
    if stored is None:
        raise ValueError("no abstain thresholds are stored with this model")
    reachable = [row["target"] for row in stored["targets"] if row["reachable"]]
    where = f"on its {stored['split']} split ({stored['images']} images)"
    for row in stored["targets"]:
        if row["target"] == target and row["reachable"]:
            return row
        if row["target"] == target:
            raise ValueError(
                f"{target} was not reachable {where} (it needs >= {row['min_kept']} kept images); "
                f"reachable targets: {reachable or 'none'}"
            )
    stored_targets = [row["target"] for row in stored["targets"]]
    raise ValueError(
        f"no threshold stored for {target}; stored targets: {stored_targets}, reachable {where}: "
        f"{reachable or 'none'}"
    )


def summary_line(thresholds: dict | None) -> str:
    """One line: per target, the threshold and the share it keeps, or that it was not reachable."""
    if thresholds is None:
        return "abstain thresholds: none (no best.pt, an empty val split or no fitted temperature)"
    parts = []
    for row in thresholds["targets"]:
        if row["reachable"]:
            parts.append(
                f"{row['target']}: >= {row['threshold']:.4f} keeps {row['coverage']:.1%} "
                f"({row['kept']}) at {row['accuracy']:.4f}"
            )
        else:
            parts.append(f"{row['target']}: not reachable (needs >= {row['min_kept']} kept)")
    return f"abstain thresholds on {thresholds['split']} ({thresholds['images']} images) | " + " | ".join(
        parts
    )


def stored_line(applied: dict, split: str) -> str:
    """One line: what the model's own thresholds (at_stored_thresholds) keep on `split`."""
    parts = [
        f"{row['target']}: >= {row['threshold']:.4f} keeps {row['coverage']:.1%} ({row['kept']})"
        + (f" at {row['accuracy']:.4f}" if row["accuracy"] is not None else "")
        for row in applied["targets"]
    ]
    source = f"the model's thresholds from {applied['from_split']} ({applied['from_images']} images)"
    if "not_applied" in applied:
        return f"{source}: not applied on {split}: {applied['not_applied']}"
    return f"{source} on {split} | " + (" | ".join(parts) or "none reachable there")


# --- the figure ---------------------------------------------------------------------------------------


def risk_coverage_figure(curve: Curve, thresholds: dict) -> Figure:
    """risk_coverage.png: top, the accuracy of the kept images against the share kept, with each target
    as a dashed line and its threshold's point marked; below, the threshold giving each coverage."""
    coverage = np.array([curve.coverage(i) for i in range(len(curve.kept))])
    accuracy = np.array([curve.accuracy(i) for i in range(len(curve.kept))])
    targets = thresholds["targets"]
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])
    top.plot(coverage, accuracy, color="tab:blue", label="accuracy of the kept images")
    for i, row in enumerate(targets):
        color = f"C{i + 1}"  # matplotlib's colour cycle; C0 is the curve's blue
        if row["reachable"]:
            label = (
                f"target {row['target']}: threshold {row['threshold']:.4f}, "
                f"keeps {row['coverage']:.1%} ({row['kept']} images)"
            )
            top.plot(row["coverage"], row["accuracy"], "o", color=color, markersize=8)
            bottom.plot(row["coverage"], row["threshold"], "o", color=color, markersize=8)
        else:
            label = f"target {row['target']}: not reachable (needs >= {row['min_kept']} kept images)"
        top.axhline(row["target"], linestyle="--", linewidth=1, color=color, label=label)
    # The first few points rest on one or two images and swing between 0 and 1: the axis starts below the
    # accuracy of all images and the lowest target, not at the swings.
    low = min([accuracy[-1], *[row["target"] for row in targets]])
    top.set_ylim(max(0.0, low - 0.05 * (1.0 - low) - 0.005), 1.0 + 0.02 * (1.0 - low) + 0.002)
    top.set_ylabel("accuracy of the kept images", fontsize=10)
    top.grid(alpha=0.3)
    # steps-pre: a coverage between two points needs the threshold of the larger one.
    bottom.plot(coverage, curve.threshold, drawstyle="steps-pre", color="gray")
    bottom.set(xlim=(0, 1.01), ylim=(0, 1.02))
    bottom.set_xlabel("coverage (share of the images kept)", fontsize=10)
    bottom.set_ylabel("threshold", fontsize=10)
    bottom.grid(alpha=0.3)
    # Below the panels: inside, the legend would hide the curve wherever it runs.
    fig.legend(*top.get_legend_handles_labels(), loc="outside lower center", fontsize=9)
    fig.suptitle(
        f"Risk-coverage on {thresholds['split']}: {curve.images} images, keep when "
        f"softmax(logits / {thresholds['temperature']:.3g}) >= threshold",
        fontsize=12,
    )
    return fig
