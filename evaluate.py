"""Judge a checkpoint or an exported ONNX model on one split and write a report people can look at.

    python evaluate.py runs/NAME/checkpoints/best.pt --split test        # -> .../checkpoints/best-eval-test/
    python evaluate.py runs/NAME/checkpoints/best-export/model.onnx --data.root DIR --out report/
    python evaluate.py runs/NAME/checkpoints/best.pt --split train      # label issues of the training images

The split is rebuilt with data.build_splits and the run's seed and val fraction, so `val` is exactly the
images the run validated on; data whose classes disagree with the model's mapping is refused. Writes
metrics.json, confusion matrices (PNG and CSV), per_class.csv (worst first), confused_pairs.csv,
predictions.csv, errors.png (the most confidently wrong images), correct.png (a seeded sample of right ones)
and reliability.png (calibration before and after the temperature the model carries: softmax(logits / T),
fitted by train.py on the val split). For a PyTorch model, errors.png and correct.png show beside each crop
where the model looked for the class it predicted (Grad-CAM, classifier/gradcam.py): at the object, or at
something beside it. An ONNX graph has no gradients: its errors.png shows the crops alone, no correct.png.
label_issues.csv ranks every image by how much the model doubts its label, most doubted first, and
label_issues.png shows the top of that queue (classifier/label_issues.py; on `--split train` the scores
are in-sample). When the data's groups are known (the run's --data.group-pattern, a manifest's group
column, or this command's --data.group-pattern), each group (track, clip) also gets one vote, the argmax
of its images' mean calibrated probability: metrics.json's "groups" and groups.csv (group_report.py).
Selective prediction (classifier/selective.py): risk_coverage.png (accuracy of the images kept against the
share kept as the calibrated-confidence threshold rises) and metrics.json's "selective": this split's
threshold per target accuracy (0.95, 0.99, 0.995) with its coverage, accuracy and kept count, and what the
thresholds the model carries from its val split keep here. report.html puts the headline numbers, the
per-class table (worst first), the most confused pairs and these pictures on one self-contained page: the
PNGs embedded, no script, nothing fetched (classifier/html_report.py).

predictions.csv has both confidences of the predicted class: `confidence` is softmax(logits), as the
model's logits give it (what errors.png shows), and `confidence_calibrated` is softmax(logits / T) with
the model's fitted T (equal to `confidence` when none was fitted), both with six decimals: keeping the rows
with confidence_calibrated >= a stored threshold (halfway between two confidences) gives the kept set it was
computed from, unless those two confidences lie within 1e-6 of each other. metrics.json's `model` names the
file whose weights were read: last.prev.pt when a run directory's last.pt was unreadable.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from classifier import files, gradcam, html_report, label_issues, plots, selective
from classifier.calibration import NO_TEMPERATURE
from classifier.data import ImageDataset, build_splits, make_loader
from classifier.group_report import GroupVote, group_rows, groups_for_eval, judge_groups, summary_lines
from classifier.images import load_image
from classifier.inference import Classifier, load_classifier
from classifier.report import (
    calibration_summary,
    compute_report,
    confident_errors,
    reliability_bins,
    worst_first,
)
from classifier.sampling import EpochSampler
from classifier.transforms import eval_resize_crop, eval_transform

CORRECT_SAMPLE_SEED = 0  # the same correct crops in correct.png on every evaluation of a split


@dataclass(frozen=True)
class EvalData:
    root: Path | None = None
    """ImageFolder root (with train/ for the class check). Default: the root the model was trained on, as
    its checkpoint records it (an exported model.onnx or model.safetensors records none: give it here)."""
    batch_size: int = 64
    """Images per forward pass."""
    num_workers: int = 0
    """DataLoader worker processes (0 loads in this process)."""
    group_pattern: str | None = None
    """Regex with one capture group naming each image's group (track, clip) in its path relative to the
    data root, for the per-group vote. Default: the run's --data.group-pattern (or a manifest's group
    column). The split stays the run's either way."""


@dataclass(frozen=True)
class EvalArgs:
    model: tyro.conf.Positional[Path]
    """A checkpoint (.pt), a run directory (its checkpoints/last.pt) or an exported model.onnx."""
    split: Literal["train", "val", "test"] = "val"
    """`val` is the run's own validation split (same seed, fraction and groups); `test` is DATA_ROOT/test
    (or a manifest's test rows); `train` the images the run trained on (without a val held out of them)."""
    out: Path | None = None
    """Report folder. Default: <stem>-eval-<split>/ beside the model file actually read
    (last.prev-eval-<split>/ when last.pt was unreadable and last.prev.pt was used)."""
    data: EvalData = field(default_factory=EvalData)
    device: str = "auto"
    """PyTorch checkpoints only: 'auto' (CUDA when available), 'cpu', 'cuda'. ONNX runs on the CPU."""
    errors: int = 36
    """How many of the most confidently wrong images errors.png shows."""
    correct: int = 16
    """How many correctly classified images (a seeded sample) correct.png shows with their Grad-CAM
    heatmaps; 0 writes no correct.png."""
    label_issues: int = 36
    """How many of the most doubted labels label_issues.png shows."""


def to_csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(out: Path, report: dict, samples: list, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """metrics.json and the CSVs: per class (worst first), confused pairs, confusion matrix, predictions
    (with the predicted class's probability before and after dividing the logits by the temperature)."""
    classes = [row["class"] for row in report["per_class"]]
    files.write_text(out / "metrics.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    files.write_text(
        out / "per_class.csv",
        to_csv(
            ["class", "index", "support", "precision", "recall", "f1"],
            [
                [
                    r["class"],
                    r["index"],
                    r["support"],
                    f"{r['precision']:.4f}",
                    f"{r['recall']:.4f}",
                    f"{r['f1']:.4f}",
                ]
                for r in worst_first(report["per_class"])
            ],
        ),
    )
    files.write_text(
        out / "confused_pairs.csv",
        to_csv(
            ["true", "predicted", "count", "share_of_true"],
            [
                [p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.4f}"]
                for p in report["most_confused"]
            ],
        ),
    )
    files.write_text(
        out / "confusion_matrix.csv",
        to_csv(
            ["true \\ predicted", *classes],
            [[name, *row] for name, row in zip(classes, report["confusion"], strict=True)],
        ),
    )
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    # T > 0 keeps the argmax, so the calibrated probability is the same class's.
    calibrated = (logits / report["temperature"]).softmax(dim=1).max(dim=1).values
    rows = zip(
        samples, labels.tolist(), predicted.tolist(), confidence.tolist(), calibrated.tolist(), strict=True
    )
    files.write_text(
        out / "predictions.csv",
        to_csv(
            ["path", "true", "predicted", "confidence", "confidence_calibrated", "correct"],
            [
                [path, classes[t], classes[p], f"{c:.6f}", f"{c_cal:.6f}", int(t == p)]
                for (path, _), t, p, c, c_cal in rows
            ],
        ),
    )


def write_pictures(
    out: Path,
    report: dict,
    samples: list,
    logits: torch.Tensor,
    labels: torch.Tensor,
    model: Classifier,
    *,
    errors: int,
    correct: int,
) -> None:
    """Both confusion matrices, the galleries of wrong and right crops (write_galleries), the reliability
    diagram and the risk-coverage curve."""
    classes = [row["class"] for row in report["per_class"]]
    for normalize, name in ((False, "confusion_matrix.png"), (True, "confusion_matrix_normalized.png")):
        plots.save_figure(plots.confusion_matrix_figure(report["confusion"], classes, normalize), out / name)
    write_galleries(out, samples, logits, labels, classes, model, errors=errors, correct=correct)
    temperature = report["temperature"]
    plots.save_figure(
        plots.reliability_figure(
            reliability_bins(logits, labels),
            reliability_bins(logits / temperature, labels),
            temperature,
            report["ece"],
            report["ece_calibrated"],
        ),
        out / "reliability.png",
    )
    curve = selective.risk_coverage(*selective.top1_confidence(logits, labels, temperature))
    plots.save_figure(selective.risk_coverage_figure(curve, report["selective"]), out / "risk_coverage.png")


def write_galleries(
    out: Path,
    samples: list,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    model: Classifier,
    *,
    errors: int,
    correct: int,
) -> None:
    """errors.png: the `errors` most confidently wrong images; correct.png: `correct` right ones, a seeded
    sample. Each is shown as the model saw it (resized and cropped, before normalization) and, beside it,
    with the Grad-CAM heatmap of the class it predicted. Only these images go through Grad-CAM. An ONNX
    graph has no gradients: errors.png then shows the crops alone, no correct.png is written, and a line
    says so."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    wrong = confident_errors(logits, labels, errors)
    right = correct_sample(predicted, labels, correct)
    preprocessing = model.card.preprocessing
    crop, to_model = eval_resize_crop(preprocessing), eval_transform(preprocessing)
    images = {i: load_image(samples[i][0]) for i in wrong + right}
    crops = {i: crop(image) for i, image in images.items()}

    def title(i: int) -> str:
        return (
            f"true: {plots.shorten(classes[int(labels[i])])}\n"
            f"pred: {plots.shorten(classes[int(predicted[i])])}\n{confidence[i].item():.0%} confident"
        )

    shown = wrong + right
    cams, note = explain(model, [to_model(images[i]) for i in shown], predicted[shown])
    if cams is None:
        print(f"Grad-CAM: {note}: errors.png shows the crops alone; no correct.png")
        plots.save_figure(
            plots.errors_grid_figure(
                [crops[i] for i in wrong],
                [classes[int(labels[i])] for i in wrong],
                [classes[int(predicted[i])] for i in wrong],
                [confidence[i].item() for i in wrong],
            ),
            out / "errors.png",
        )
        return
    cam_of = dict(zip(shown, cams, strict=True))
    # (file, images, heading, text when there are none, title colour); --correct 0: no correct.png
    galleries = [("errors.png", wrong, "Most confident errors", "no misclassified images", "darkred")]
    if correct > 0:
        galleries.append(("correct.png", right, "Correct predictions", "no correct predictions", "darkgreen"))
    for name, chosen, what, empty_text, color in galleries:
        plots.save_figure(
            plots.gradcam_gallery_figure(
                [crops[i] for i in chosen],
                [cam_of[i] for i in chosen],
                [title(i) for i in chosen],
                f"{what} ({len(chosen)}), each beside its Grad-CAM for the prediction",
                empty_text=empty_text,
                color=color,
            ),
            out / name,
        )
    print(f"Grad-CAM: {note}, in {' and '.join(name for name, *_ in galleries)}")


def explain(
    model: Classifier, inputs: list[torch.Tensor], classes: torch.Tensor
) -> tuple[torch.Tensor | None, str]:
    """Grad-CAM maps of `inputs` (normalized, as the model takes them) for `classes`, in one batch, and a
    few words on them (which layer); None and the reason when there can be none: an ONNX graph has no
    gradients, and a model whose feature maps are all 1x1 has nothing to localise."""
    if model.backend != "pytorch":
        return None, f"no heatmaps for {model.backend} (an ONNX graph has no gradients)"
    if not inputs:
        return torch.empty(0), "no images to explain"
    batch = torch.stack(inputs).to(next(model.module.parameters()).device)
    try:
        cams, layer = gradcam.grad_cam(model.module, batch, classes)
    except ValueError as err:  # no feature map Grad-CAM can use: the report goes on without heatmaps
        return None, f"no heatmaps ({err})"
    return cams, f"heatmaps of {layer} for the predicted class"


def correct_sample(predicted: torch.Tensor, labels: torch.Tensor, limit: int) -> list[int]:
    """Indices of `limit` correctly classified images, drawn with CORRECT_SAMPLE_SEED, in split order."""
    right = (predicted == labels).nonzero().flatten()
    order = torch.randperm(len(right), generator=torch.Generator().manual_seed(CORRECT_SAMPLE_SEED))
    return sorted(right[order[:limit]].tolist())


def write_groups(out: Path, vote: GroupVote, classes: list[str]) -> None:
    """groups.csv: one row per group, wrong groups first (group_report.group_rows)."""
    header, rows = group_rows(vote, classes)
    files.write_text(out / "groups.csv", to_csv(header, rows))


def main(args: EvalArgs) -> dict:
    if args.correct < 0:
        raise SystemExit(f"error: --correct {args.correct}: give how many correct images to show (0: none)")
    model = load_classifier(args.model, args.device)
    card, classes = model.card, list(model.card.classes)
    if args.data.root is None and card.data.root is None:
        raise SystemExit(
            f"error: {model.source} names no data root (an export ships no path of the training "
            "machine): give the data to evaluate on with --data.root DIR"
        )
    root = args.data.root or Path(card.data.root)
    try:
        splits = build_splits(
            root,
            card.data.val_fraction,
            card.data.seed,
            classes=classes,
            group_pattern=card.data.group_pattern,
        )
        samples = getattr(splits, args.split)
        groups = groups_for_eval(splits, root, args.data.group_pattern, card.data.group_pattern)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: refusing to evaluate {model.source} on {root}:\n{err}") from None
    if not samples:
        raise SystemExit(f"error: {root} has no {args.split} images")
    out = args.out or model.source.parent / f"{model.source.stem}-eval-{args.split}"

    # The split in file order: predictions.csv lines up with `samples`.
    loader = make_loader(
        ImageDataset(samples, model.transform),
        EpochSampler(len(samples), shuffle=False),
        batch_size=args.data.batch_size,
        num_workers=args.data.num_workers,
        drop_last=False,
        pin_memory=False,
    )
    batches = [(model.predict(images), labels) for images, labels in loader]
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])

    temperature = card.temperature or NO_TEMPERATURE
    report = {
        "model": str(model.source),
        "backend": model.backend,
        "weights": card.weights,
        "split": args.split,
        "data_root": str(root),
        **compute_report(logits, labels, classes),
        # ece/nll as the logits give them, and *_calibrated after dividing by the model's temperature
        **calibration_summary(logits, labels, temperature),
        "temperature_fitted": card.temperature is not None,
        "groups": None,  # filled below when the data's groups are known
    }
    # Selective prediction on this split's calibrated confidences, and the model's own thresholds applied.
    confidence, correct = selective.top1_confidence(logits, labels, temperature)
    report["selective"] = {
        **selective.abstain_thresholds(confidence, correct, split=args.split, temperature=temperature),
        "stored": selective.at_stored_thresholds(confidence, correct, card.abstain_thresholds, temperature),
    }
    if groups:
        calibrated = (logits.float() / temperature).softmax(dim=1)
        train = splits.train if args.split != "train" else None
        vote, report["groups"] = judge_groups(calibrated, labels, samples, groups, train)
        write_groups(out, vote, classes)
    write_tables(out, report, samples, logits, labels)
    write_pictures(
        out,
        report,
        samples,
        logits,
        labels,
        model,
        errors=args.errors,
        correct=args.correct,
    )
    html_report.write_eval_report(out, report)  # after the pictures it embeds
    label_issues.write_queue(
        out,
        samples,
        logits,
        labels,
        classes,
        temperature=temperature,
        held_out=args.split != "train",
        gallery=args.label_issues,
        preprocessing=card.preprocessing,
        groups=groups,
    )

    top5 = f" | top-5 {report['top5']:.4f}" if report["top5"] is not None else ""
    print(
        f"{model.backend} {model.source} on {args.split} ({len(samples)} images from {root}): "
        f"top-1 {report['top1']:.4f}{top5} | macro F1 {report['macro_f1']:.4f} | "
        f"balanced acc {report['balanced_accuracy']:.4f} | ECE {report['ece']:.4f}"
    )
    if card.temperature is None:
        print(
            f"calibration: no temperature stored with {model.source.name}: T = 1.0, "
            f"probabilities uncalibrated | NLL {report['nll']:.4f}"
        )
    else:
        print(
            f"calibration: temperature {report['temperature']:.3f} | "
            f"ECE {report['ece']:.4f} -> {report['ece_calibrated']:.4f} | "
            f"NLL {report['nll']:.4f} -> {report['nll_calibrated']:.4f}"
        )
    print(selective.summary_line(report["selective"]))
    if report["selective"]["stored"]:
        print(selective.stored_line(report["selective"]["stored"], args.split))
    if report["groups"]:
        print("\n".join(summary_lines(report["groups"], args.split)))
    worst = ", ".join(f"{r['class']} {r['f1']:.2f}" for r in worst_first(report["per_class"])[:5])
    print(f"worst classes by F1: {worst}")
    print(label_issues.queue_line(out, len(samples), args.label_issues, held_out=args.split != "train"))
    print(f"wrote {out}/")
    return report


if __name__ == "__main__":
    main(tyro.cli(EvalArgs, description=__doc__))
