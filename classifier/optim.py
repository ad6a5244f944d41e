"""The optimizer and the learning-rate schedule.

Weight decay skips norm layers and biases (decaying a BatchNorm scale only fights the normalization).
The LR is a pure function of the optimizer step, like nanoGPT's get_lr: nothing to save but the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of conv/linear layers decay; biases and norm parameters (all 1-d) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def default_lr(optimizer: str, pretrained: bool) -> float:
    """Fine-tuning a pretrained net wants a much lower LR than training from scratch (DESIGN pitfall 7)."""
    if optimizer == "sgd":
        return 0.01 if pretrained else 0.1
    return 1e-4 if pretrained else 1e-3


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown --optim.optimizer {name!r}")


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from peak/warmup_steps to peak, then cosine down to peak * min_lr_ratio at the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
