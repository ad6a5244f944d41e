"""The numbers of an evaluation report, computed from one split's logits and labels: accuracy, F1,
balanced accuracy, AUROC, calibration, per-class precision/recall/F1, confusion, the most-confused pairs
and the most confident errors.

Inputs are whole-split tensors, so a PyTorch model and an ONNX graph are judged by the same code.
Running models and writing files is evaluate.py's job; the validation pass during training is
validation.py's.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

ECE_BINS = 15  # the usual choice since Guo et al. 2017, "On Calibration of Modern Neural Networks"


def compute_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Every number of the report as plain floats and lists (None where undefined). Classes without images
    in the split are left out of balanced accuracy and macro AUROC (they have no recall and no ROC curve;
    torchmetrics would average in a 0 for each) and are listed."""
    k = len(classes)
    logits, labels = logits.float(), labels.long()
    # Probabilities, not logits: torchmetrics guesses "logits" only when values fall outside [0, 1].
    probs = logits.softmax(dim=1)
    confusion = MulticlassConfusionMatrix(k)(probs, labels)
    support = confusion.sum(dim=1)
    present = support > 0
    per_class = {
        "precision": MulticlassPrecision(k, average=None)(probs, labels),
        "recall": MulticlassRecall(k, average=None)(probs, labels),
        "f1": MulticlassF1Score(k, average=None)(probs, labels),
    }
    with warnings.catch_warnings():
        # torchmetrics warns about, and scores 0 for, classes with no positives; those are excluded below.
        warnings.filterwarnings("ignore", message="No positive samples")
        auroc = MulticlassAUROC(k, average=None)(probs, labels)
    report = {
        "num_images": len(labels),
        "num_classes": k,
        "top1": MulticlassAccuracy(k, average="micro")(probs, labels).item(),
        "top5": MulticlassAccuracy(k, top_k=5, average="micro")(probs, labels).item() if k >= 5 else None,
        "macro_f1": MulticlassF1Score(k, average="macro")(probs, labels).item(),
        "weighted_f1": MulticlassF1Score(k, average="weighted")(probs, labels).item(),
        # Mean recall over the classes that have images (scikit-learn's balanced_accuracy_score).
        "balanced_accuracy": per_class["recall"][present].mean().item() if present.any() else None,
        "macro_auroc": auroc[present].mean().item() if present.sum() >= 2 else None,
        "ece": expected_calibration_error(logits, labels),
        "ece_bins": ECE_BINS,
        "loss": F.cross_entropy(logits, labels).item(),
        "classes_without_images": [
            name for name, has in zip(classes, present.tolist(), strict=True) if not has
        ],
        "per_class": [
            {
                "class": name,
                "index": i,
                "precision": per_class["precision"][i].item(),
                "recall": per_class["recall"][i].item(),
                "f1": per_class["f1"][i].item(),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        ],
        "most_confused": most_confused(confusion, classes),
        "confusion": confusion.tolist(),
    }
    return report


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 ECE (L1, ECE_BINS equal-width bins) of softmax(logits): torchmetrics' implementation, the one
    place the project computes it, so reports, training's calibration and the tests all agree."""
    probs = logits.float().softmax(dim=1)  # probabilities: torchmetrics would guess logits from their range
    return MulticlassCalibrationError(logits.shape[1], n_bins=ECE_BINS, norm="l1")(
        probs, labels.long()
    ).item()


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """Reliability-diagram data: per equal-width confidence bin, the mean top-1 confidence, the accuracy
    and the image count (NaN confidence/accuracy where a bin is empty). The bins are torchmetrics'
    (bucketize on linspace(0, 1), right-closed), except that a confidence of exactly 1.0, which
    torchmetrics puts in an extra bin of its own, is drawn in the top bin. ECE is
    sum(count * |accuracy - confidence|) / total over these bins; expected_calibration_error says the
    number."""
    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)  # float32, as the ECE sees them
    confidence, correct = confidence.double(), (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    sums = torch.zeros(3, n_bins, dtype=torch.float64)
    for row, values in enumerate((torch.ones_like(confidence), confidence, correct)):
        sums[row].index_add_(0, index, values)
    count = sums[0]
    return {
        "edges": edges.tolist(),
        "confidence": (sums[1] / count).tolist(),
        "accuracy": (sums[2] / count).tolist(),
        "count": count.long().tolist(),
    }


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """NLL and ECE of softmax(logits) and of softmax(logits / temperature): what temperature scaling
    bought."""
    logits, labels = logits.float(), labels.long()
    scaled = logits / temperature
    return {
        "temperature": temperature,
        "nll": F.cross_entropy(logits, labels).item(),
        "nll_calibrated": F.cross_entropy(scaled, labels).item(),
        "ece": expected_calibration_error(logits, labels),
        "ece_calibrated": expected_calibration_error(scaled, labels),
    }


def most_confused(confusion: torch.Tensor, classes: list[str], limit: int = 20) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class's images)."""
    off_diagonal = confusion.clone()
    off_diagonal.fill_diagonal_(0)
    counts, flat = off_diagonal.flatten().sort(descending=True, stable=True)
    support = confusion.sum(dim=1)
    pairs = []
    for count, index in zip(counts[:limit].tolist(), flat[:limit].tolist(), strict=True):
        if count == 0:
            break
        true, pred = divmod(index, len(classes))
        pairs.append(
            {
                "true": classes[true],
                "predicted": classes[pred],
                "count": count,
                "share_of_true": count / int(support[true]),
            }
        )
    return pairs


def per_class_from_confusion(confusion: list[list[int]], classes: list[str]) -> list[dict]:
    """compute_report's per-class rows (precision, recall, F1, support), from a confusion matrix
    (rows true, columns predicted). An undefined precision, recall or F1 (nothing predicted, no images)
    is 0, as torchmetrics scores it."""
    matrix = torch.tensor(confusion, dtype=torch.float64)
    hits, support, predicted = matrix.diagonal(), matrix.sum(dim=1), matrix.sum(dim=0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), 0.0)
    return [
        {
            "class": name,
            "index": i,
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    ]


def worst_first(per_class: list[dict]) -> list[dict]:
    """Per-class rows ordered by F1, then recall, lowest first; classes without images go last."""
    return sorted(per_class, key=lambda row: (row["support"] == 0, row["f1"], row["recall"], row["index"]))


def confident_errors(logits: torch.Tensor, labels: torch.Tensor, limit: int) -> list[int]:
    """Indices of the misclassified images, most confident (highest softmax probability) first."""
    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order][:limit].tolist()
