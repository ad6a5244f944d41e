"""The validation pass during training (`validate`) and the torchmetrics collections it and the training
steps fill; `batch_logits` is the inference loop it shares with calibration.py.

One pattern everywhere: update in the step, compute and reset at epoch end. Under DDP torchmetrics
gathers the states across ranks in compute(), and EpochSampler never pads evaluation data, so every
validation image is counted exactly once. The numbers of evaluate.py's report are report.py's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from classifier.distributed import all_reduce_sum


def build_val_metrics(num_classes: int) -> MetricCollection:
    metrics = {
        "top1": MulticlassAccuracy(num_classes, average="micro"),
        "per_class_acc": MulticlassAccuracy(num_classes, average=None),  # = per-class recall
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        # per class: torchmetrics' macro average scores a class with no val images as 0 and averages it in
        "auroc_per_class": MulticlassAUROC(num_classes, average=None),
        "confusion": MulticlassConfusionMatrix(num_classes),
    }
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def build_train_metrics(num_classes: int) -> dict[str, Metric]:
    """Running loss and accuracy of the training batches. No argument checks and no NaN filtering in the
    hot path: both are sync points on GPU, and a NaN loss must show, not be dropped. Persistent, so a
    mid-epoch checkpoint carries the partial sums and a resumed epoch reports what an uninterrupted would."""
    metrics = {
        "loss": MeanMetric(nan_strategy="disable"),
        "top1": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
    }
    for metric in metrics.values():
        metric.persistent(True)
    return metrics


def to_plain(computed: dict[str, torch.Tensor]) -> dict:
    """Tensors -> floats (scalars) and lists (per-class values, the confusion matrix) for JSON."""
    return {name: value.item() if value.ndim == 0 else value.tolist() for name, value in computed.items()}


@torch.no_grad()
def batch_logits(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    autocast: AbstractContextManager,
    channels_last: bool = False,
    logit_bias: torch.Tensor | None = None,
):
    """Yield (fp32 logits, labels) on `device` per batch of `loader`, the model in eval mode; `logit_bias`
    (one value per class: the logit adjustment, when on) is added to the logits. The one inference loop
    of validation and calibration."""
    model.eval()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        logits = logits.float()  # metrics and softmax in fp32, whatever the autocast dtype
        yield (logits if logit_bias is None else logits + logit_bias), labels


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    metrics: MetricCollection,
    *,
    device: torch.device,
    autocast: AbstractContextManager,
    channels_last: bool = False,
    logit_bias: torch.Tensor | None = None,
) -> dict:
    """Run `model` over `loader` and return the computed metrics (plain numbers), with the mean loss.
    `logit_bias` (one value per class) is added to the logits first: the logit adjustment, when on."""
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for logits, labels in batch_logits(
        model, loader, device=device, autocast=autocast, channels_last=channels_last, logit_bias=logit_bias
    ):
        metrics.update(logits, labels)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        count += len(labels)
    all_reduce_sum(loss_sum)
    all_reduce_sum(count)
    computed = metrics.compute()  # gathers across ranks: a sync point
    metrics.reset()
    present = computed["confusion"].sum(dim=1) > 0
    computed["macro_auroc"] = computed.pop("auroc_per_class")[present].mean()  # over classes with val images
    computed["balanced_accuracy"] = computed["per_class_acc"][present].mean()  # mean recall, as scikit-learn
    result = to_plain(computed)
    result["loss"] = (loss_sum / count.clamp(min=1)).item()
    return result
