"""Pictures of a run and of an evaluation: the confusion matrix heatmap, the training curves, one
augmented training batch, a grid of misclassified images (with Grad-CAM heatmaps beside them when the
model has gradients) and the reliability diagram, saved as PNG.

Figures are built as plain `matplotlib.figure.Figure` objects drawn by the Agg renderer, never through
pyplot: no display is needed, no backend is switched under a notebook user, and no global figure
registry grows epoch after epoch (a figure is freed with its last reference). Computing the numbers
shown is the job of validation.py and report.py.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from classifier.files import atomic_write

ANNOTATE_MAX_CLASSES = 30  # above this, numbers in the cells are too small to read


def confusion_matrix_figure(confusion, classes: list[str], normalize: bool) -> Figure:
    """Rows are true classes, columns predictions. `normalize` divides each row by its count, so the
    diagonal is per-class recall. Size and fonts scale with the class count (readable from 10 to 100)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    cell_in = min(0.6, max(0.17, 8.0 / n))  # 0.6 in per cell at 10 classes, 0.17 in at 100
    font_pt = min(10.0, max(5.0, cell_in * 72 * 0.5))  # a label fits in about half a cell's height
    label_in = max(len(name) for name in classes) * font_pt * 0.6 / 72 + 0.5  # room for the longest name
    side = n * cell_in
    fig = Figure(figsize=(side + label_in + 1.6, side + label_in + 0.9), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, matrix.max()))
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true class" if normalize else "images", fontsize=10)
    ticks = np.arange(n)
    rotation = 45 if n <= ANNOTATE_MAX_CLASSES else 90
    ax.set_xticks(
        ticks,
        classes,
        fontsize=font_pt,
        rotation=rotation,
        ha="right" if rotation == 45 else "center",
        rotation_mode="anchor" if rotation == 45 else "default",
    )
    ax.set_yticks(ticks, classes, fontsize=font_pt)
    ax.set_xlabel("Predicted class", fontsize=11)
    ax.set_ylabel("True class", fontsize=11)
    total = int(np.asarray(confusion).sum())
    what = "row-normalized (diagonal = recall)" if normalize else "counts"
    ax.set_title(f"Confusion matrix, {what}: {total} images, {n} classes", fontsize=12)
    if n <= ANNOTATE_MAX_CLASSES:
        threshold = (1.0 if normalize else matrix.max()) / 2  # white text on dark cells
        for (row, col), value in np.ndenumerate(matrix):
            if value == 0:
                continue  # empty cells stay blank: the eye finds the errors faster
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            color = "white" if value > threshold else "black"
            ax.text(col, row, text, ha="center", va="center", fontsize=font_pt * 0.85, color=color)
    return fig


def curves_figure(records: list[dict]) -> Figure:
    """Loss, top-1, macro F1 and learning rate per epoch from metrics.jsonl records. An epoch logged twice
    (a crash between the log line and the checkpoint, then resume) is drawn once, with its last record."""
    by_epoch = {record["epoch"]: record for record in records}
    epochs = sorted(by_epoch)
    rows = [by_epoch[e] for e in epochs]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = [
        (
            axes[0, 0],
            "Loss",
            [("train", [r["train"]["loss"] for r in rows]), ("val", [r["val"]["loss"] for r in rows])],
        ),
        (
            axes[0, 1],
            "Top-1 accuracy",
            [
                ("train (augmented)", [r["train"]["top1"] for r in rows]),
                ("val", [r["val"]["top1"] for r in rows]),
            ],
        ),
        (axes[1, 0], "Macro F1 (val)", [("val", [r["val"]["macro_f1"] for r in rows])]),
        (axes[1, 1], "Learning rate (at epoch end)", [("lr", [r["lr"] for r in rows])]),
    ]
    for ax, title, series in panels:
        for label, values in series:
            ax.plot(epochs, values, marker="o", markersize=4, label=label)
        ax.set_title(title, fontsize=12)
        ax.set_ylabel(title.split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("epoch", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(f"Training curves ({len(epochs)} epochs)", fontsize=13)
    return fig


def errors_grid_figure(
    images, true_names: list[str], pred_names: list[str], confidences: list[float]
) -> Figure:
    """Misclassified images with their true and predicted class and the prediction's confidence.
    `images` are uint8 RGB, CHW tensors (as data.load_image returns) or HWC arrays."""
    n = len(images)
    if n == 0:
        fig = Figure(figsize=(5, 1.5), layout="constrained")
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        return fig
    cols = min(6, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 2.1, rows * 2.6 + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).flatten()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i]
        if isinstance(image, torch.Tensor):
            image = image.permute(1, 2, 0).numpy()  # CHW -> HWC for imshow
        ax.imshow(image, interpolation="nearest")  # small crops: show the pixels the model saw
        title = (
            f"true: {shorten(true_names[i])}\npred: {shorten(pred_names[i])}\n{confidences[i]:.0%} confident"
        )
        ax.set_title(title, fontsize=8, color="darkred")
    fig.suptitle(f"Most confident errors ({n} shown)", fontsize=12)
    return fig


def gradcam_gallery_figure(
    crops: list[torch.Tensor],
    cams: list[torch.Tensor],
    titles: list[str],
    heading: str,
    *,
    empty_text: str,
    color: str = "black",
) -> Figure:
    """Each crop (uint8 CHW, as the model saw it) under its title, and beside it the same crop with its
    Grad-CAM heatmap (`cams`: one (H, W) map in [0, 1] each, gradcam.grad_cam) laid over it: four pairs
    a row."""
    if not crops:
        fig = Figure(figsize=(5, 1.5), layout="constrained")
        fig.text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=12)
        return fig
    tiles, tile_titles = [], []
    for crop, cam, title in zip(crops, cams, titles, strict=True):
        tiles += [crop, heatmap_overlay(crop, cam)]
        tile_titles += [title, "where it looks\n(Grad-CAM)"]
    return tiles_figure(tiles, tile_titles, heading, cols=8, tile=1.3, colors=[color] * len(tiles))


def heatmap_overlay(crop: torch.Tensor, cam: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """`crop` (uint8 CHW) blended with `cam` ((H, W) in [0, 1]) in the jet colormap: HWC float in [0, 1].
    Red is where the evidence for the class lies, blue where there is none."""
    pixels = crop.permute(1, 2, 0).float().numpy() / 255.0
    heat = matplotlib.colormaps["jet"](cam.numpy())[..., :3]  # RGBA -> RGB
    return (1 - alpha) * pixels + alpha * heat


def reliability_figure(
    before: dict, after: dict, temperature: float, ece_before: float, ece_after: float
) -> Figure:
    """Accuracy against top-1 confidence per bin, before and after temperature scaling (side by side), with
    the diagonal a calibrated model follows and the image count per bin below. `before`/`after` are
    report.reliability_bins results; bars above the diagonal are under-confident, below over-confident."""
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, height_ratios=[3, 1.1])
    panels = (
        (before, "Before: softmax(logits)", ece_before),
        (after, f"After: softmax(logits / {temperature:.3g})", ece_after),
    )
    for col, (bins, title, ece) in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
        width = np.diff(edges)
        filled = count > 0  # empty bins have no accuracy (NaN): draw nothing there
        accuracy, confidence = np.asarray(bins["accuracy"])[filled], np.asarray(bins["confidence"])[filled]
        top.bar(
            edges[:-1][filled],
            accuracy,
            width[filled],
            align="edge",
            color="tab:blue",
            alpha=0.75,
            edgecolor="navy",
            label="accuracy in the bin",
        )
        # Hatching only, no fill: where the gap lies inside a bar (under-confident) the blue stays readable.
        top.bar(
            edges[:-1][filled],
            confidence - accuracy,
            width[filled],
            bottom=accuracy,
            align="edge",
            facecolor="none",
            edgecolor="tab:red",
            hatch="///",
            linewidth=1.2,
            label="gap to the mean confidence",
        )
        top.plot([0, 1], [0, 1], "--", color="black", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1))
        top.set_title(f"{title}\nECE {ece:.4f}", fontsize=12)
        top.set_ylabel("accuracy in bin", fontsize=10)
        top.grid(alpha=0.3)
        bottom.bar(edges[:-1], count, width, align="edge", color="gray", edgecolor="black")
        for left, w, n in zip(edges[:-1], width, count, strict=True):
            if n:
                bottom.text(left + w / 2, n, str(int(n)), ha="center", va="bottom", fontsize=7)
        bottom.set_ylim(0, max(1, count.max()) * 1.25)  # room for the numbers above the tallest bar
        bottom.set_xlabel("confidence (top-1 probability)", fontsize=10)
        bottom.set_ylabel("images", fontsize=10)
    # One legend below both panels: inside, it would hide bars wherever the model puts them.
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=10)
    fig.suptitle(
        f"Reliability diagram: {int(np.sum(before['count']))} images, {len(before['count'])} bins "
        "(accuracy vs top-1 confidence; bars below the diagonal are over-confident)",
        fontsize=12,
    )
    return fig


def train_batch_figure(
    images: torch.Tensor, targets: torch.Tensor, classes: list[str], mean, std, max_images: int = 64
) -> Figure:
    """A grid of (up to `max_images` of) one training batch as the model gets it: `images` normalized float
    (N, 3, H, W), shown with `mean`/`std` undone; `targets` class indices (N,), titled with the class name,
    or (N, C) soft targets (MixUp/CutMix), titled with their two largest shares ("0.6 Shirt" over
    "0.4 Coat")."""
    images, targets = images[:max_images].detach().float().cpu(), targets[:max_images].detach().cpu()
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC for imshow
    h, w = images.shape[-2:]
    return tiles_figure(
        list(pixels),
        [target_text(target, classes) for target in targets],
        f"One augmented training batch, as the model sees it ({len(images)} images, {h}x{w} px)",
        cols=8,
        tile=1.2,
    )


def tiles_figure(
    images: list, titles: list[str], heading: str, *, cols: int, tile: float = 1.5, colors: list | None = None
) -> Figure:
    """`images` in rows of `cols`, each under its title (in `colors`, default black), `heading` on top.
    An image is an HWC array (float 0-1 or uint8) or a uint8 CHW tensor; it keeps its aspect ratio inside
    a square tile of `tile` inches. One axes in inch coordinates holds every tile: a subplot per image
    would take seconds to lay out and draw."""
    n, cols = len(images), max(1, min(cols, len(images)))
    rows = max(1, math.ceil(n / cols))
    gap, title_in, top_in = 0.15, 0.14 * max((t.count("\n") + 1 for t in titles), default=0) + 0.06, 0.45
    content = cols * (tile + gap) + gap
    width, height = max(content, 6.0), rows * (tile + title_in) + top_in  # 6 in: room for the heading
    left = (width - content) / 2 + gap  # the tiles centred under the heading
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # y grows downwards, as rows do
    ax.axis("off")
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            image = image.permute(1, 2, 0).numpy()  # CHW -> HWC for imshow
        x0, y0 = left + (i % cols) * (tile + gap), top_in + (i // cols) * (tile + title_in) + title_in
        scale = tile / max(image.shape[:2])  # the longer side fills the tile: a tall crop stays tall
        w, h = image.shape[1] * scale, image.shape[0] * scale
        x, y = x0 + (tile - w) / 2, y0 + (tile - h)  # centred across, standing on the tile's bottom
        # interpolation="nearest": the model's pixels, not a smoothed picture of them
        ax.imshow(image, extent=(x, x + w, y + h, y), interpolation="nearest")
        color = colors[i] if colors is not None else "black"
        ax.text(x0 + tile / 2, y - 0.03, titles[i], ha="center", va="bottom", fontsize=7, color=color)
    ax.text(width / 2, 0.1, heading, ha="center", va="top", fontsize=11)
    return fig


def target_text(target: torch.Tensor, classes: list[str]) -> str:
    """A class index as its name; a soft target as its (up to) two largest shares, one a line:
    "0.6 Shirt\n0.4 Coat"."""
    if target.ndim == 0:
        return shorten(classes[int(target)], 16)
    shares, indices = target.float().topk(min(2, len(target)))
    if shares[0] > 0.99 or len(shares) == 1 or shares[1] < 0.01:  # not mixed (label smoothing aside)
        return shorten(classes[int(indices[0])], 16)
    return "\n".join(
        f"{float(s):.2g} {shorten(classes[int(c)], 14)}" for s, c in zip(shares, indices, strict=True)
    )


def shorten(name: str, limit: int = 22) -> str:
    """Long class names would run into the neighbouring title (22 characters fit 2.1 in at 8 pt)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def save_epoch_pictures(run_dir: Path, confusion, classes: list[str], log, step: int) -> None:
    """After each validation: plots/confusion_matrix.png and plots/curves.png from the run's
    metrics.jsonl so far, each also to the trackers."""
    figure = confusion_matrix_figure(confusion, classes, normalize=False)
    save_figure(figure, run_dir / "plots" / "confusion_matrix.png")
    log.figure("val/confusion_matrix", figure, step)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    figure = curves_figure(history)
    save_figure(figure, run_dir / "plots" / "curves.png")
    log.figure("val/curves", figure, step)


# How every figure becomes a PNG. bbox_inches="tight" crops the margins left where a square heatmap does
# not fill its figure.
PNG_OPTIONS = {"format": "png", "dpi": 110, "bbox_inches": "tight", "pad_inches": 0.15}


def save_figure(fig: Figure, path: Path) -> None:
    """Write `fig` as PNG atomically (a reader never sees half a file). The figure is not registered with
    pyplot, so there is nothing to close: it can still be logged to the trackers afterwards."""
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, **PNG_OPTIONS))


def figure_png(fig: Figure) -> bytes:
    """The PNG file save_figure would write, as bytes (report.html embeds them)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def figure_pixels(fig: Figure) -> np.ndarray:
    """The PNG save_figure would write, as an RGB uint8 array (height, width, 3), for the trackers."""
    with Image.open(io.BytesIO(figure_png(fig))) as image:
        return np.asarray(image.convert("RGB"))
