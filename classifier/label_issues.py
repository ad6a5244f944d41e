"""The label-issue queue: every image ranked by how much the model doubts its given label, so a person
reviews the likeliest annotation mistakes first. Writes label_issues.csv (all images, most doubted
first) and label_issues.png (the top of the queue as the model saw it). Running the model is the
caller's job (evaluate.py, train.py): this module takes logits.

The score is cleanlab's default label-quality score, "self-confidence" (cleanlab.rank,
method="self_confidence"): the given class's probability under the model, calibrated (softmax(logits / T)
with the model's fitted temperature), lowest first. Its known weakness: it needs held-out probabilities.
On the images the model trained on they are in-sample, and a model that has memorized a wrong label is
confident in it, so that mistake ranks low. cleanlab gets held-out probabilities for every image by
cross-validation (K trainings); this queue does not, and says which it is in its `held_out` column:
False for the training split; True for val and test (val did choose the checkpoint and fit T).
"""

from __future__ import annotations

import csv
import io
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from classifier import calibration, distributed, files, plots
from classifier.data import Sample
from classifier.images import load_image
from classifier.transforms import eval_resize_crop

FILE_CSV = "label_issues.csv"
FILE_PNG = "label_issues.png"
GALLERY = 36  # images label_issues.png shows at the end of training


@dataclass(frozen=True)
class LabelScores:
    """Per image, in the order of the inputs: the given label's calibrated probability, the predicted
    class and its probability, and the margin p_given - (largest probability of any other class): below 0
    when the model prefers another class. `order` lists the image indices, most doubted first."""

    p_given: torch.Tensor  # float64 (N,)
    predicted: torch.Tensor  # int64 (N,)
    p_predicted: torch.Tensor  # float64 (N,)
    margin: torch.Tensor  # float64 (N,)
    order: list[int]


def score_labels(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> LabelScores:
    """Self-confidence of each given label under softmax(logits / temperature), ranked lowest first.
    Ties (e.g. two probabilities that underflow to 0) go to the smaller margin, then to file order."""
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"score_labels: logits {tuple(logits.shape)} do not match labels {len(labels)}")
    if not temperature > 0:
        raise ValueError(f"score_labels: the temperature must be > 0, got {temperature}")
    # float64: the top of the queue holds probabilities around 1e-6, where float32 rounding reorders.
    probs = (logits.double() / temperature).softmax(dim=1)
    labels = labels.long()
    p_given = probs.gather(1, labels[:, None]).squeeze(1)
    p_predicted, predicted = probs.max(dim=1)
    others = probs.scatter(1, labels[:, None], -1.0)  # the given class can never be the largest "other"
    margin = p_given - others.max(dim=1).values
    # np.lexsort sorts by the last key first and is stable: p_given, then margin, then index.
    order = np.lexsort((margin.numpy(), p_given.numpy())).tolist()
    return LabelScores(p_given, predicted, p_predicted, margin, order)


def write_queue(
    out: Path,
    samples: list[Sample],
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    *,
    temperature: float,
    held_out: bool,
    gallery: int,
    preprocessing: dict,
    groups: dict[str, str] | None = None,
) -> LabelScores:
    """Write out/label_issues.csv (rank, path, given, predicted, p_given, p_predicted, margin, held_out,
    and group when `groups` maps each path to its track or clip: one wrong track label shows as a run of
    its crops) and out/label_issues.png (the first `gallery` images of the queue, resized and cropped as
    the model saw them by `preprocessing`, transforms.preprocessing_spec's dict). `held_out`: whether the
    model never trained on these images. Returns the scores, in the order of `samples`."""
    if len(samples) != len(labels):
        raise ValueError(f"write_queue: {len(samples)} samples but {len(labels)} labels")
    scores = score_labels(logits, labels, temperature)
    header = ["rank", "path", "given", "predicted", "p_given", "p_predicted", "margin", "held_out"]
    header += ["group"] if groups else []
    rows = []
    for rank, i in enumerate(scores.order, start=1):
        path, given = samples[i][0], int(labels[i])
        row = [
            rank,
            path,
            classes[given],
            classes[int(scores.predicted[i])],
            f"{scores.p_given[i]:.6g}",  # 6 significant digits: the top of the queue is near 0
            f"{scores.p_predicted[i]:.6g}",
            f"{scores.margin[i]:.6g}",
            int(held_out),
        ]
        rows.append(row + [groups[path]] if groups else row)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    files.write_text(out / FILE_CSV, buffer.getvalue())

    top = scores.order[:gallery]
    crop = eval_resize_crop(preprocessing)
    figure = label_issues_figure(
        [crop(load_image(samples[i][0])) for i in top],
        [classes[int(labels[i])] for i in top],
        [classes[int(scores.predicted[i])] for i in top],
        [float(scores.p_given[i]) for i in top],
        held_out=held_out,
    )
    plots.save_figure(figure, out / FILE_PNG)
    return scores


def queue_training_images(
    run_dir: Path,
    samples: list[Sample],
    classes: list[str],
    loader,
    *,
    groups: dict[str, str],
    device: torch.device,
    autocast: AbstractContextManager,
    channels_last: bool,
    log,
) -> None:
    """The end of training: score `samples` (the train split; `loader` serves them as validation would,
    without augmentation, in file order) with best.pt's weights and temperature, and write the queue to
    RUN/label_issues/. Every rank must call it (the logits are gathered); rank 0 writes."""
    found = calibration.best_logits(
        run_dir, loader, device=device, autocast=autocast, channels_last=channels_last
    )
    if found is None:
        return
    state, logits, labels = found
    if distributed.is_main():
        out = Path(run_dir) / "label_issues"
        write_queue(
            out,
            samples,
            logits,
            labels,
            classes,
            temperature=state.get("temperature") or calibration.NO_TEMPERATURE,
            held_out=False,
            gallery=GALLERY,
            preprocessing=state["preprocessing"],
            groups=groups or None,
        )
        log.print(queue_line(out, len(samples), GALLERY, held_out=False))
    distributed.barrier()


def queue_line(out: Path, count: int, gallery: int, held_out: bool) -> str:
    """The printed line saying where the queue is, and whether its scores are held out."""
    which = (
        "held out: the model did not train on these images"
        if held_out
        else "in-sample: the model trained on these images and may have learned a wrong label"
    )
    return (
        f"label issues: {out / FILE_CSV} ranks the {count} images by the model's doubt in their label, "
        f"most doubted first; {FILE_PNG} shows the first {min(gallery, count)} ({which})"
    )


def label_issues_figure(
    images: list, given_names: list[str], predicted_names: list[str], p_given: list[float], *, held_out: bool
) -> Figure:
    """The most doubted labels, in queue order: each image (uint8 CHW tensor) titled with its rank, given
    label, predicted class and the given label's probability."""
    titles = [
        f"#{i + 1} given: {plots.shorten(given, 18)}\nmodel: {plots.shorten(predicted, 20)}\np(given) {p:.2g}"
        for i, (given, predicted, p) in enumerate(zip(given_names, predicted_names, p_given, strict=True))
    ]
    where = "held-out images" if held_out else "training images, in-sample"
    shown = f"{len(images)} shown" if images else "no images"
    heading = f"Labels the model doubts most ({shown}; {where})"
    return plots.tiles_figure(images, titles, heading, cols=6, colors=["darkred"] * len(images))
