"""The exponential moving average of the weights (torch.optim.swa_utils.AveragedModel).

The EMA is configured as a half-life in epochs and turned into a per-step decay here, so it smooths
over the same share of training on 2k images as on 2M (a fixed per-step decay of 0.999 barely moves
from its initial weights in a 300-step run). With use_buffers=True the BatchNorm statistics are averaged
too, so the EMA model can be evaluated as it is. The EMA is a candidate, not the result: train.py
validates the EMA and the raw weights every epoch and keeps the better by --select-metric
(selection.pick_weights). Checkpoints hold both and record which won (`weights: ema|raw`);
best.safetensors, evaluate.py and export.py take that one.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def decay_per_step(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The decay d with d ** (half_life_epochs * steps_per_epoch) == 0.5."""
    return 0.5 ** (1.0 / max(1.0, half_life_epochs * steps_per_epoch))


def build_ema(
    model: nn.Module, half_life_epochs: float | None, steps_per_epoch: int, epochs: int
) -> AveragedModel | None:
    """A deep copy of `model` (pass the unwrapped module) that averages it; None when EMA is off."""
    if half_life_epochs is None:
        return None
    if half_life_epochs > epochs / 4:
        warnings.warn(
            f"--ema-half-life-epochs {half_life_epochs} is long for a {epochs}-epoch run: the EMA model will "
            "still carry much of the early, poor weights at the end",
            stacklevel=2,
        )
    decay = decay_per_step(half_life_epochs, steps_per_epoch)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
