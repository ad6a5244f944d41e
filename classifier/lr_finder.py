"""The LR range test (Smith, https://arxiv.org/abs/1506.01186; fastai's lr_find): one optimizer step per
learning rate, the rate growing exponentially, the loss recorded until it diverges; a suggested LR, the
figure and the files. Building the data, model, loss and optimizer is train.py's job (--find-lr).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from classifier.files import atomic_write, write_text
from classifier.plots import save_figure

MIN_POINTS = 10  # fewer points than this cannot show a descent and a minimum
EDGE_FRACTION = 0.1  # the first and last 10% of points are ignored by the suggestion: start-up and blow-up


@dataclass
class LRCurve:
    """One range test: the learning rate of each step, its batch's loss (raw), the running smoothed loss
    that the stop rule watched, and why the test ended ('diverged' or 'reached end_lr')."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str


def lr_at(step: int, *, start_lr: float, end_lr: float, num_steps: int) -> float:
    """The exponential sweep: start_lr at step 0, end_lr at step num_steps - 1, a constant ratio between
    neighbours (each step multiplies the rate by (end_lr / start_lr) ** (1 / (num_steps - 1)))."""
    return start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))


def range_test(
    step: Callable[[float], float],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.05,
    diverge_factor: float = 4.0,
) -> LRCurve:
    """Call `step(lr)` (one optimizer step on the next batch, returning its loss) for num_steps rates from
    start_lr to end_lr, and stop early once the smoothed loss passes diverge_factor x its best so far.

    `smoothing` is the weight of each new loss in an exponential moving average (beta = 1 - smoothing =
    0.95, about the last 20 steps), bias-corrected so that the first points are not pulled towards 0.
    fastai's beta of 0.98 averages over about 50 steps, half a 100-step test, and shifts every feature
    of the curve to a far larger LR. A loss that is not finite ends the test as 'diverged' without being
    recorded: it can be neither smoothed nor drawn. The losses are assumed positive (cross-entropy)."""
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ValueError(f"start_lr {start_lr} and end_lr {end_lr}: need 0 < start_lr < end_lr < inf")
    if num_steps < 2:
        raise ValueError(f"num_steps {num_steps}: need at least 2 to sweep from start_lr to end_lr")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing {smoothing}: the weight of each new loss must be in (0, 1]")
    if not diverge_factor > 1:
        raise ValueError(f"diverge_factor {diverge_factor}: must be above 1")
    beta = 1.0 - smoothing
    curve = LRCurve(lrs=[], losses=[], smoothed=[], stopped="reached end_lr")
    average, best = 0.0, math.inf
    for i in range(num_steps):
        lr = lr_at(i, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps)
        loss = float(step(lr))
        if not math.isfinite(loss):
            curve.stopped = "diverged"
            break
        average = beta * average + smoothing * loss
        smoothed = average / (1.0 - beta ** (i + 1))  # bias correction: the average started at 0
        curve.lrs.append(lr)
        curve.losses.append(loss)
        curve.smoothed.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge_factor * best:
            curve.stopped = "diverged"
            break
    return curve


def make_step(
    net: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    autocast: torch.autocast,
    set_lr: Callable[[torch.optim.Optimizer, float], None],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Callable[[float], float]:
    """A `step(lr)` for range_test: the next (images, labels) from `batches`, the LR set by set_lr, the
    forward under `autocast`, backward and optimizer step, as train.py's loop does them. There is no
    GradScaler: the test runs in fp32 or bf16 (train.py refuses fp16 for --find-lr), so no loss scaling
    is needed. `net` must already be in train mode."""

    def step(lr: float) -> float:
        images, labels = next(batches)
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        set_lr(optimizer, lr)
        with autocast:
            logits = net(images)
            loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a sync point every step: the stop rule needs each loss as it comes

    return step


def suggest_lr(curve: LRCurve) -> tuple[float, str]:
    """(the suggested LR, the rule in words): the LR where the smoothed loss falls fastest, the most
    negative d(loss)/d(log10 lr), looked for before the smoothed minimum and away from the first and last
    10% of the points. Raises ValueError when the curve is too short or its loss never fell.

    Chosen over fastai's 'valley' and (LR of the minimum) / 10 by training at each one's suggestions from
    two range tests (SmallResNet, 300 Fashion-MNIST images, 90 steps, mean test top-1 of two seeds).
    Fine-tuning with AdamW: steepest 1.1e-3 and 1.9e-3 gave 93.0%, valley 6.3e-4 and 2.8e-3 92.8%,
    min/10 9.6e-3 and 6.1e-2 91.8%. From scratch with SGD: steepest 3.1e-2 (both tests) 78.1%, min/10
    7.9e-3 75.8%, valley 9.1e-4 66.8%. It also moved least between the two tests. The smoothed curve
    lags the raw losses by about (1 - smoothing) / smoothing steps, 19 at the defaults (1.5 decades of
    LR), which moves its steepest point towards larger LRs: the rule was measured with range_test's
    defaults, not with other smoothings."""
    n = len(curve.smoothed)
    if n < MIN_POINTS:
        raise ValueError(
            f"the range test recorded {n} points ({curve.stopped}); at least {MIN_POINTS} are needed to "
            "suggest an LR: use a lower start_lr or more num_steps"
        )
    log_lrs = np.log10(np.asarray(curve.lrs))
    smoothed = np.asarray(curve.smoothed)
    slopes = np.gradient(smoothed, log_lrs)  # central differences inside, one-sided at the two ends
    edge = max(1, round(EDGE_FRACTION * n))
    lowest = int(np.argmin(smoothed))
    stop = min(n - edge, lowest)  # past the minimum the loss rises: nothing there to suggest
    if stop <= edge:
        raise ValueError(
            f"the smoothed loss is lowest at {curve.lrs[lowest]:.2e}, within the first {edge} of {n} "
            f"points: it never fell, so there is no descent to suggest from; use a lower start_lr"
        )
    steepest = edge + int(np.argmin(slopes[edge:stop]))
    return float(curve.lrs[steepest]), "steepest descent of the smoothed loss"


def lr_find_figure(curve: LRCurve, suggestion: float, rule: str) -> Figure:
    """The loss against the LR on a log axis: raw (faint) and smoothed, a line at the suggestion. The y
    axis ends a little above the smoothed curve's highest point, so a diverging raw batch does not
    flatten everything else."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curve.lrs, curve.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss per batch")
    ax.plot(curve.lrs, curve.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.axvline(
        suggestion, color="tab:red", linestyle="--", linewidth=1.2, label=f"suggested {suggestion:.2e}"
    )
    at = int(np.argmin(np.abs(np.log(np.asarray(curve.lrs) / suggestion))))  # the point nearest to it
    ax.plot(curve.lrs[at], curve.smoothed[at], "o", color="tab:red", markersize=7)
    ax.set_xscale("log")
    low, high = min(curve.losses), max(curve.smoothed)
    spread = (high - low) or 1.0  # a flat curve still gets a visible band
    ax.set_ylim(low - 0.05 * spread, high + 0.15 * spread)
    ax.set_xlabel("learning rate (log scale)", fontsize=10)
    ax.set_ylabel("training loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(
        f"LR range test: suggested LR {suggestion:.2e} ({rule})\n"
        f"{len(curve.lrs)} steps from {curve.lrs[0]:.1e} to {curve.lrs[-1]:.1e}, {curve.stopped}",
        fontsize=11,
    )
    return fig


def write_results(out_dir: Path, curve: LRCurve, suggestion: float, rule: str) -> None:
    """lr_find.png (the figure), lr_find.csv (step, lr, loss, smoothed per step) and lr_find.json (the
    suggestion, its rule, the first and last LR scanned, the steps run and why the test stopped) in
    `out_dir`, each written atomically. After a divergence "end_lr" is the last LR run, below the end the
    test was asked for."""
    out_dir = Path(out_dir)
    save_figure(lr_find_figure(curve, suggestion, rule), out_dir / "lr_find.png")

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "lr", "loss", "smoothed"])
            for i, row in enumerate(zip(curve.lrs, curve.losses, curve.smoothed, strict=True)):
                writer.writerow([i, *(repr(value) for value in row)])  # repr: every digit of a float

    atomic_write(out_dir / "lr_find.csv", write_csv)
    summary = {
        "suggested_lr": suggestion,
        "rule": rule,
        "start_lr": curve.lrs[0],
        "end_lr": curve.lrs[-1],
        "steps_run": len(curve.lrs),
        "stopped": curve.stopped,
    }
    write_text(out_dir / "lr_find.json", json.dumps(summary, indent=2) + "\n")
