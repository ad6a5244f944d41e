"""The LR range test: a real scan on Fashion-MNIST has the textbook shape; the sweep, the stop rule, the
suggestion on curves with a known answer, and the three files written."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from classifier import lr_finder, optim
from classifier.lr_finder import LRCurve, lr_at, range_test, suggest_lr, write_results
from classifier.models import SmallResNet


def load_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every train/ image of an ImageFolder as normalized (N, 3, H, W) floats, and its class index."""
    folders = sorted(p for p in (root / "train").iterdir() if p.is_dir())
    images, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (pixels - 0.286) / 0.353, torch.tensor(labels)  # Fashion-MNIST's mean and std


def cycle_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """Shuffled batches forever, a new order each pass (what train.py's cycled loader gives)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            yield images[batch], labels[batch]


def test_real_scan_falls_then_rises_and_suggests_below_the_minimum(fmnist_root):
    # 600 images, a narrowed SmallResNet and 60 steps from 1e-5: the same ~0.1 decade per step as the
    # defaults, in a few seconds of CPU.
    images, labels = load_images(fmnist_root)
    torch.manual_seed(0)
    model = SmallResNet(num_classes=10, widths=(16, 32, 64)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    lrs_set = []

    def set_lr(optimizer, lr):
        lrs_set.append(lr)
        optim.set_lr(optimizer, lr)

    step = lr_finder.make_step(
        model,
        cycle_batches(images, labels, batch_size=32, seed=0),
        nn.CrossEntropyLoss(),
        optimizer,
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
        set_lr=set_lr,
    )
    start_lr, end_lr = 1e-5, 10.0
    curve = range_test(step, start_lr=start_lr, end_lr=end_lr, num_steps=60)
    suggestion, rule = suggest_lr(curve)
    smoothed = np.asarray(curve.smoothed)
    lowest = int(np.argmin(smoothed))
    print(
        f"{len(curve.lrs)} steps, {curve.stopped}: smoothed {smoothed[0]:.3f} at the start, "
        f"{smoothed[lowest]:.3f} at {curve.lrs[lowest]:.2e}, {smoothed[-1]:.3f} at the end; "
        f"suggested {suggestion:.2e} ({rule})"
    )
    assert lrs_set == curve.lrs  # one step per recorded point, at the LR recorded
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) after the step
    # Margins from seeds 0-5: the first 10 points moved at most 9.6% from the first, the minimum was at
    # most 0.77 x the start, and every scan diverged.
    # The low end is flat: the first 10 smoothed points (1e-5 to 8e-5) stay within 15% of the first.
    assert np.all(np.abs(smoothed[:10] / smoothed[0] - 1) < 0.15)
    # A clear minimum well below the start, in the middle of the scan.
    assert smoothed[lowest] < 0.85 * smoothed[0]
    assert 10 <= lowest <= len(curve.lrs) - 5
    # Then it rises: the stop rule fired, or the end is well above the minimum.
    assert curve.stopped == "diverged" or smoothed[-1] > 1.5 * smoothed[lowest]
    assert start_lr <= suggestion < curve.lrs[lowest] <= end_lr
    assert suggestion in curve.lrs


def test_lrs_grow_by_a_constant_ratio_from_start_to_end():
    seen = []
    curve = range_test(lambda lr: seen.append(lr) or 1.0, start_lr=1e-6, end_lr=1.0, num_steps=25)
    assert curve.stopped == "reached end_lr" and seen == curve.lrs and len(curve.lrs) == 25
    assert curve.lrs[0] == pytest.approx(1e-6, rel=1e-12) and curve.lrs[-1] == pytest.approx(1.0, rel=1e-12)
    ratios = np.asarray(curve.lrs[1:]) / np.asarray(curve.lrs[:-1])
    assert ratios == pytest.approx(np.full(24, 10 ** (6 / 24)), rel=1e-9)  # 6 decades in 24 steps
    assert curve.smoothed == pytest.approx(curve.losses)  # bias-corrected: a constant loss stays put


def test_smoothed_loss_is_the_bias_corrected_average():
    losses = iter([2.0, 1.0, 4.0])
    curve = range_test(lambda lr: next(losses), num_steps=3, smoothing=0.5)
    # beta 0.5: averages 1.0, 1.0, 2.5 before correction, divided by 1 - 0.5 ** (i + 1)
    assert curve.smoothed == pytest.approx([2.0, 1.0 / 0.75, 2.5 / 0.875])


def test_stops_when_the_smoothed_loss_passes_the_factor_or_is_not_finite():
    curve = range_test(lambda lr: 1.0 if lr < 1e-2 else 50.0, start_lr=1e-6, end_lr=1.0, num_steps=61)
    first_high = next(i for i, lr in enumerate(curve.lrs) if lr >= 1e-2)
    assert curve.stopped == "diverged" and len(curve.lrs) < 61
    assert curve.smoothed[-1] > 4.0 * min(curve.smoothed) and curve.smoothed[-2] <= 4.0 * min(curve.smoothed)
    assert len(curve.lrs) - 1 - first_high <= 2  # 0.05 x 50 = 2.5 above 1.0: caught within a few steps

    curve = range_test(lambda lr: 1.0 if lr < 1e-3 else math.nan, start_lr=1e-6, end_lr=1.0, num_steps=61)
    assert curve.stopped == "diverged"
    assert max(curve.lrs) < 1e-3 and all(math.isfinite(x) for x in curve.losses + curve.smoothed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start_lr=1.0, end_lr=1e-3), "start_lr"),
        (dict(start_lr=0.0), "start_lr"),
        (dict(num_steps=1), "num_steps"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(diverge_factor=1.0), "diverge_factor"),
    ],
)
def test_range_test_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        range_test(lambda lr: 1.0, **kwargs)


def synthetic_curve(steepest_log_lr: float, num_steps: int = 100) -> LRCurve:
    """A falling sigmoid in log10(lr), steepest at `steepest_log_lr`, then a quadratic rise two decades
    later; the same values as raw and smoothed loss."""
    lrs = [lr_at(i, start_lr=1e-7, end_lr=10.0, num_steps=num_steps) for i in range(num_steps)]
    x = np.log10(lrs)
    loss = (
        2.5
        - 2.0 / (1 + np.exp(-(x - steepest_log_lr) / 0.4))
        + 0.5 * np.maximum(0, x - steepest_log_lr - 2) ** 2
    )
    return LRCurve(lrs=lrs, losses=loss.tolist(), smoothed=loss.tolist(), stopped="reached end_lr")


@pytest.mark.parametrize("steepest_log_lr", [-4.0, -2.5, -1.0])
def test_suggest_lr_finds_the_steepest_descent(steepest_log_lr):
    curve = synthetic_curve(steepest_log_lr)
    nearest = curve.lrs[int(np.argmin(np.abs(np.log10(curve.lrs) - steepest_log_lr)))]
    suggestion, rule = suggest_lr(curve)
    assert suggestion == nearest and "steepest" in rule


def test_suggest_lr_ignores_the_edges_and_what_follows_the_minimum():
    curve = synthetic_curve(-3.0)
    curve.smoothed[0] = 10.0  # a start-up spike: the steepest fall of all, but within the first 10%
    # past the minimum (near 1e-1) and before the last 10%, a spike: the fall after it is the steepest of
    # all, but the loss is rising there
    curve.smoothed[86] = 20.0
    suggestion, _ = suggest_lr(curve)
    assert suggestion == pytest.approx(1e-3, rel=0.1)


def test_suggest_lr_refuses_short_and_never_falling_curves():
    short = LRCurve(lrs=[1e-3] * 9, losses=[1.0] * 9, smoothed=[1.0] * 9, stopped="diverged")
    with pytest.raises(ValueError, match="recorded 9 points .* at least 10"):
        suggest_lr(short)
    lrs = [lr_at(i, start_lr=1e-3, end_lr=10.0, num_steps=40) for i in range(40)]
    rising = LRCurve(lrs=lrs, losses=lrs, smoothed=[1.0 + lr for lr in lrs], stopped="reached end_lr")
    with pytest.raises(ValueError, match="never fell"):
        suggest_lr(rising)


def test_write_results_writes_the_figure_the_csv_and_the_json(tmp_path):
    curve = synthetic_curve(-2.0, num_steps=80)
    curve.stopped = "diverged"
    out_dir = tmp_path / "run-lr-find"
    write_results(out_dir, curve, 1e-2, "steepest descent of the smoothed loss")
    assert sorted(p.name for p in out_dir.iterdir()) == ["lr_find.csv", "lr_find.json", "lr_find.png"]
    assert (out_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out_dir / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(80))
    assert [float(row["lr"]) for row in rows] == curve.lrs  # exact: every digit written
    assert [float(row["loss"]) for row in rows] == curve.losses
    assert [float(row["smoothed"]) for row in rows] == curve.smoothed
    assert json.loads((out_dir / "lr_find.json").read_text()) == {
        "suggested_lr": 1e-2,
        "rule": "steepest descent of the smoothed loss",
        "start_lr": curve.lrs[0],
        "end_lr": curve.lrs[-1],
        "steps_run": 80,
        "stopped": "diverged",
    }
