"""classifier/plots.py: the pictures are valid PNGs of sensible size, and they show the right numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import plots


def confusion(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    matrix = rng.integers(0, 3, (n, n))
    np.fill_diagonal(matrix, 20)
    matrix[1] = 0  # a class without images: its normalized row must stay 0, not NaN
    return matrix


def cell_texts(ax) -> dict[tuple[int, int], tuple[str, str]]:
    """The numbers written in a heatmap's cells: {(column, row): (text, colour)}."""
    return {
        (round(t.get_position()[0]), round(t.get_position()[1])): (t.get_text(), t.get_color())
        for t in ax.texts
    }


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every byte: a truncated file fails here
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100, "the picture is blank"
    return image.size


@pytest.mark.parametrize("n", [10, 100])
def test_confusion_matrix_png(n, tmp_path):
    classes = [f"class_{i}_{'long_name' if i % 7 == 0 else 'x'}" for i in range(n)]
    matrix = confusion(n)
    fig = plots.confusion_matrix_figure(matrix, classes, normalize=True)
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    totals = matrix.sum(1, keepdims=True)
    expected = np.divide(matrix, totals, out=np.zeros((n, n)), where=totals > 0)
    np.testing.assert_allclose(shown, expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == classes  # every class named, in index order
    assert ax.get_xlabel() == "Predicted class" and ax.get_ylabel() == "True class"
    # Numbers in the cells only while they can be read: then each non-empty cell's value, at its place.
    nonzero = [(int(r), int(c)) for r, c in np.argwhere(matrix)]
    readable = n <= plots.ANNOTATE_MAX_CLASSES
    shown_texts = {cell: text for cell, (text, _) in cell_texts(ax).items()}
    assert shown_texts == ({(c, r): f"{expected[r, c]:.2f}" for r, c in nonzero} if readable else {})
    counts = plots.confusion_matrix_figure(matrix, classes, normalize=False)
    counts_ax = counts.axes[0]
    np.testing.assert_array_equal(np.asarray(counts_ax.images[0].get_array()), matrix)
    # White on the dark diagonal (20 images), black on the light errors (1 or 2).
    want = {(c, r): (str(matrix[r, c]), "white" if r == c else "black") for r, c in nonzero}
    assert cell_texts(counts_ax) == (want if readable else {})
    assert counts_ax.get_title().endswith(f"counts: {matrix.sum()} images, {n} classes")

    # Rendering is the slow part (seconds at 100 classes): one PNG per size; both kinds share the layout.
    plots.save_figure(counts, tmp_path / "counts.png")
    width, height = png_size(tmp_path / "counts.png")
    # At 110 dpi, >= ~12 px per class row keeps 100 names legible; under 2800 px keeps it viewable.
    assert 600 <= width <= 2800 and 600 <= height <= 2800
    assert height >= 12 * n
    assert [p.name for p in tmp_path.iterdir()] == ["counts.png"]  # no temp file left behind


def test_curves_figure_draws_each_epoch_once(tmp_path):
    def record(epoch, val_top1):
        return {
            "epoch": epoch,
            "step": 10 * epoch,
            "lr": 1e-3 / (epoch + 1),
            "train": {"loss": 2.0 - epoch / 5, "top1": 0.1 * epoch},
            "val": {
                "loss": 2.1 - epoch / 5,
                "top1": val_top1,
                "macro_f1": val_top1 - 0.05,
                "confusion": [[1]],
            },
        }

    # Epoch 1 logged twice (crash after the log line, then resume): the later record wins.
    records = [record(0, 0.2), record(1, 0.3), record(1, 0.35), record(2, 0.5)]
    fig = plots.curves_figure(records)
    top1_ax = next(ax for ax in fig.axes if ax.get_title() == "Top-1 accuracy")
    val_line = next(line for line in top1_ax.get_lines() if line.get_label() == "val")
    assert list(val_line.get_xdata()) == [0, 1, 2]
    assert list(val_line.get_ydata()) == [0.2, 0.35, 0.5]
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert {ax.get_xlabel() for ax in fig.axes[2:]} == {"epoch"}
    plots.save_figure(fig, tmp_path / "curves.png")
    width, height = png_size(tmp_path / "curves.png")
    assert 800 <= width <= 2000 and 500 <= height <= 1500


def test_errors_grid(tmp_path):
    images = [torch.full((3, 32, 32), 40 * i, dtype=torch.uint8) for i in range(7)]
    fig = plots.errors_grid_figure(
        images, [f"true{i}" for i in range(7)], ["a_class_name_far_too_long_to_fit"] * 7, [0.9] * 7
    )
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 7
    assert titled[3].get_title().startswith("true: true3\npred: a_class_name_far_too_…")
    assert "90% confident" in titled[3].get_title()
    assert titled[3].images[0].get_array().shape == (32, 32, 3)  # CHW was turned into HWC
    plots.save_figure(fig, tmp_path / "errors.png")
    width, height = png_size(tmp_path / "errors.png")
    assert 300 <= width <= 1600 and 300 <= height <= 1600

    empty = plots.errors_grid_figure([], [], [], [])
    assert "no misclassified images" in empty.texts[0].get_text()
    plots.save_figure(empty, tmp_path / "none.png")
    assert png_size(tmp_path / "none.png")[0] > 100


def test_reliability_figure_shows_each_bins_accuracy(tmp_path):
    from classifier.report import reliability_bins

    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(400, 5, generator=generator)
    labels = torch.randint(0, 5, (400,), generator=generator)
    before, after = reliability_bins(logits, labels), reliability_bins(logits / 3.0, labels)
    fig = plots.reliability_figure(before, after, 3.0, 0.5, 0.1)
    top_left, top_right = fig.axes[0], fig.axes[1]
    for ax, bins in ((top_left, before), (top_right, after)):
        filled = [a for a, n in zip(bins["accuracy"], bins["count"], strict=True) if n]
        heights = [bar.get_height() for bar in ax.containers[0]]  # the accuracy bars, one per non-empty bin
        np.testing.assert_allclose(heights, filled)
    assert "ECE 0.5000" in top_left.get_title() and "logits / 3" in top_right.get_title()
    assert [bar.get_height() for bar in fig.axes[2].containers[0]] == before["count"]
    plots.save_figure(fig, tmp_path / "reliability.png")
    width, height = png_size(tmp_path / "reliability.png")
    assert 600 <= width <= 1600 and 400 <= height <= 1000
