"""report.html: one self-contained page per evaluation (evaluate.py) or per training run's best epoch
(write_run_report), to open in any browser or attach to a message. The PNGs are embedded as base64 data:
URIs and the style is inline, so the page fetches nothing and runs no script.

Every number carries its exact value in a data-value attribute (JSON) beside the rounded one shown, so a
test reads the page back and compares it with metrics.json. The numbers are report.py's and
validation.py's; the pictures are plots.py's; this module only lays them out.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path

import torch

from classifier import checkpoint, files, plots
from classifier.report import most_confused, per_class_from_confusion, worst_first

FILE_HTML = "report.html"

# evaluate.py's pictures in page order: (file, heading, caption). A missing one gets a sentence instead.
EVAL_FIGURES = [
    ("confusion_matrix.png", "Confusion matrix", "Rows are true classes, columns predictions."),
    ("errors.png", "Most confident errors", "The wrong images the model was surest of."),
    ("correct.png", "Correct predictions", "A seeded sample of right answers, the control."),
    ("reliability.png", "Reliability diagram", "Accuracy against confidence per bin, before and after T."),
    ("risk_coverage.png", "Risk-coverage curve", "Accuracy of the images kept as the threshold rises."),
]
# evaluate.py writes no correct.png for an ONNX model (no gradients for Grad-CAM) or with --correct 0.
WHY_MISSING = {"correct.png": "no Grad-CAM for an ONNX model, or --correct 0"}

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1a1a1a; max-width: 1100px; margin: 24px auto;
       padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; }
.sub { color: #555; margin-top: 0; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ccd; border-radius: 6px; padding: 8px 14px; min-width: 140px; }
.card .label { color: #555; font-size: 13px; } .card .value { font-size: 22px; font-weight: 600; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; text-align: right; border-bottom: 1px solid #e4e4ea; }
th { background: #f0f0f5; } td.name, th.name { text-align: left; }
tr:nth-child(even) td { background: #fafafc; }
.bar { display: inline-block; height: 9px; background: #4a7bd0; margin-right: 6px; vertical-align: middle; }
figure { margin: 8px 0; } figure img { max-width: 100%; border: 1px solid #e4e4ea; }
figcaption, .note { color: #555; font-size: 13px; }
"""


# --- the page's parts -------------------------------------------------------------------------------


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def exact(value) -> str:
    """The data-value attribute: the value as JSON (floats at full precision, null for None)."""
    return f'data-value="{escape(json.dumps(value))}"'


def fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def four_decimals(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plain(value) -> str:
    return "n/a" if value is None else str(value)


# A headline number: (metric key, label, value, how it is shown).
Metric = tuple[str, str, object, Callable[[object], str]]


def cards_html(metrics: list[Metric]) -> str:
    cards = [
        f'<div class="card"><div class="label">{escape(label)}</div>'
        f'<div class="value" data-metric="{escape(key)}" {exact(value)}>{escape(shown(value))}</div></div>'
        for key, label, value, shown in metrics
    ]
    return '<div class="cards">\n' + "\n".join(cards) + "\n</div>"


def details_html(metrics: list[Metric]) -> str:
    rows = [
        f'<tr><td class="name">{escape(label)}</td>'
        f'<td class="name" data-metric="{escape(key)}" {exact(value)}>{escape(shown(value))}</td></tr>'
        for key, label, value, shown in metrics
    ]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def per_class_html(per_class: list[dict]) -> str:
    """The per-class table worst first (report.worst_first, the order of per_class.csv), with a bar for
    F1; each row carries its class index and each number its exact value."""
    header = (
        '<tr><th class="name">class</th><th>index</th><th>support</th><th>precision</th><th>recall</th>'
        '<th class="name">F1</th></tr>'
    )
    rows = []
    for row in worst_first(per_class):
        numbers = "".join(
            f'<td data-field="{name}" {exact(row[name])}>{fraction(row[name])}</td>'
            for name in ("precision", "recall")
        )
        rows.append(
            f'<tr data-class-index="{row["index"]}"><td class="name">{escape(row["class"])}</td>'
            f"<td>{row['index']}</td>"
            f'<td data-field="support" {exact(row["support"])}>{row["support"]}</td>{numbers}'
            f'<td class="name" data-field="f1" {exact(row["f1"])}>'
            f'<span class="bar" style="width: {100 * row["f1"]:.0f}px"></span>{fraction(row["f1"])}</td></tr>'
        )
    return '<table id="per-class">\n' + header + "\n" + "\n".join(rows) + "\n</table>"


def pairs_html(pairs: list[dict]) -> str:
    """The most confused (true, predicted) pairs, largest count first (report.most_confused)."""
    if not pairs:
        return '<p class="note">No image was misclassified.</p>'
    header = (
        '<tr><th class="name">true</th><th class="name">predicted</th><th>images</th>'
        "<th>share of the true class</th></tr>"
    )
    rows = [
        f'<tr><td class="name">{escape(p["true"])}</td><td class="name">{escape(p["predicted"])}</td>'
        f'<td data-field="count" {exact(p["count"])}>{p["count"]}</td>'
        f'<td data-field="share_of_true" {exact(p["share_of_true"])}>{percent(p["share_of_true"])}</td></tr>'
        for p in pairs
    ]
    return '<table id="confused-pairs">\n' + header + "\n" + "\n".join(rows) + "\n</table>"


def figure_html(heading: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<h2>{escape(heading)}</h2>\n<figure><img alt="{escape(heading)}" '
        f'src="data:image/png;base64,{data}">\n<figcaption>{escape(caption)}</figcaption></figure>'
    )


def missing_html(heading: str, sentence: str) -> str:
    return f'<h2>{escape(heading)}</h2>\n<p class="note">{escape(sentence)}</p>'


def page_html(title: str, subtitle: str, sections: list[str]) -> str:
    body = "\n".join(sections)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="sub">{escape(subtitle)}</p>\n{body}\n</body>\n</html>\n'
    )


# --- evaluate.py's page -----------------------------------------------------------------------------


def write_eval_report(out: Path, report: dict) -> Path:
    """out/report.html from `report` (what evaluate.py writes as metrics.json) and the pictures it wrote
    into `out` (EVAL_FIGURES); the page says which of them are not there."""
    temperature = f"T = {report['temperature']:.3f}" if report["temperature_fitted"] else "none fitted"
    headline: list[Metric] = [
        ("top1", "Top-1 accuracy", report["top1"], percent),
        ("top5", "Top-5 accuracy", report["top5"], percent),
        ("macro_f1", "Macro F1", report["macro_f1"], fraction),
        ("balanced_accuracy", "Balanced accuracy", report["balanced_accuracy"], percent),
        ("loss", "Loss (cross-entropy)", report["loss"], four_decimals),
        ("ece", "ECE before temperature", report["ece"], four_decimals),
        ("ece_calibrated", f"ECE after temperature ({temperature})", report["ece_calibrated"], four_decimals),
        ("num_images", "Images", report["num_images"], plain),
    ]
    details: list[Metric] = [
        ("model", "Model file", report["model"], plain),
        ("split", "Split", report["split"], plain),
        ("data_root", "Data root", report["data_root"], plain),
        ("backend", "Backend", report["backend"], plain),
        ("weights", "Weights", report["weights"], plain),
        ("num_classes", "Classes", report["num_classes"], plain),
        ("weighted_f1", "Weighted F1", report["weighted_f1"], fraction),
        ("macro_auroc", "Macro AUROC", report["macro_auroc"], fraction),
        ("temperature", "Temperature", report["temperature"], four_decimals),
        ("temperature_fitted", "Temperature fitted on val", report["temperature_fitted"], plain),
        ("nll", "NLL before temperature", report["nll"], four_decimals),
        ("nll_calibrated", "NLL after temperature", report["nll_calibrated"], four_decimals),
    ]
    sections = [cards_html(headline), "<h2>Details</h2>", details_html(details)]
    if report["classes_without_images"]:
        absent = ", ".join(report["classes_without_images"])
        sections.append(
            f'<p class="note">No images in this split, left out of the averages: {escape(absent)}</p>'
        )
    sections += [
        "<h2>Per class, worst F1 first</h2>",
        per_class_html(report["per_class"]),
        "<h2>Most confused pairs</h2>",
        pairs_html(report["most_confused"]),
    ]
    for name, heading, caption in EVAL_FIGURES:
        path = out / name
        if path.is_file():
            sections.append(figure_html(heading, path.read_bytes(), caption))
        else:
            why = f" ({WHY_MISSING[name]})" if name in WHY_MISSING else ""
            sections.append(missing_html(heading, f"{name} is not in {out}{why}."))
    title = f"Evaluation on {report['split']}: {Path(report['model']).name}"
    page = page_html(title, report["model"], sections)
    files.write_text(out / FILE_HTML, page)
    return out / FILE_HTML


# --- train.py's page for the best epoch --------------------------------------------------------------


def write_run_report(run_dir: Path) -> Path | None:
    """run_dir/report.html for the run's best epoch, from checkpoints/best.pt (its validation metrics,
    the temperature fitted after training) and plots/curves.png. None, and no page, without best.pt.

    Validation during training keeps counts, not each image's prediction: the page has the headline,
    the per-class table and confused pairs (from the confusion matrix), the confusion matrix and the
    curves, and says which of evaluate.py's sections need `evaluate.py best.pt --split val`."""
    run_dir = Path(run_dir)
    best_path = run_dir / "checkpoints" / "best.pt"
    if not best_path.is_file():
        return None
    state = checkpoint.read_checkpoint(best_path)
    val, classes, epoch = state["val_metrics"], list(state["classes"]), state["best"]["epoch"]
    fit = state.get("temperature_fit")  # absent when calibration had no validation images
    ece_before = fit["val_ece_before"] if fit else None
    ece_after = fit["val_ece_after"] if fit else None
    temperature = f"T = {state['temperature']:.3f}" if fit else "none fitted"
    headline: list[Metric] = [
        ("top1", "Top-1 accuracy", val["top1"], percent),
        ("top5", "Top-5 accuracy", val.get("top5"), percent),  # only with 5 classes or more
        ("macro_f1", "Macro F1", val["macro_f1"], fraction),
        ("balanced_accuracy", "Balanced accuracy", val["balanced_accuracy"], percent),
        ("loss", "Loss (cross-entropy)", val["loss"], four_decimals),
        ("ece", "ECE before temperature", ece_before, four_decimals),
        ("ece_calibrated", f"ECE after temperature ({temperature})", ece_after, four_decimals),
        ("num_images", "Val images", sum(map(sum, val["confusion"])), plain),
    ]
    details: list[Metric] = [
        ("model", "Model file", str(best_path), plain),
        ("split", "Split", "val", plain),
        ("epoch", "Best epoch", epoch, plain),
        ("select_metric", "Chosen by", state["best"]["metric"], plain),
        ("weights", "Weights", state["weights"], plain),
        ("model_name", "Architecture", state["model_name"], plain),
        ("macro_auroc", "Macro AUROC", val["macro_auroc"], fraction),
    ]
    confusion = plots.confusion_matrix_figure(val["confusion"], classes, normalize=False)
    curves = run_dir / "plots" / "curves.png"
    sections = [
        cards_html(headline),
        "<h2>Details</h2>",
        details_html(details),
        "<h2>Per class, worst F1 first</h2>",
        per_class_html(per_class_from_confusion(val["confusion"], classes)),
        "<h2>Most confused pairs</h2>",
        pairs_html(most_confused(torch.tensor(val["confusion"]), classes)),
        figure_html(
            "Confusion matrix",
            plots.figure_png(confusion),
            f"Epoch {epoch}: rows are true classes, columns predictions.",
        ),
        figure_html(
            "Training curves", curves.read_bytes(), "Loss, top-1, macro F1 and learning rate per epoch."
        )
        if curves.is_file()
        else missing_html("Training curves", "plots/curves.png was not written for this run."),
        missing_html(
            "Errors and reliability",
            "Validation during training keeps counts, not each image's prediction: the error gallery "
            f"and the reliability diagram come from python evaluate.py {best_path} --split val",
        ),
    ]
    page = page_html(f"Training run {run_dir.name}: best epoch {epoch}", str(run_dir), sections)
    files.write_text(run_dir / FILE_HTML, page)
    return run_dir / FILE_HTML
