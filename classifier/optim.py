"""The optimizer and the learning-rate schedule.

Weight decay skips norm layers and biases (decaying a BatchNorm scale only fights the normalization).
The LR is a pure function of the optimizer step, like nanoGPT's get_lr: nothing to save but the step.
Warmup + cosine by default; step and multi-step decay as in torchvision's reference recipes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from classifier.config import OptimConfig


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
    """The peak LR when --optim.lr is not given: 10x lower for pretrained weights than from scratch (AdamW
    1e-4 vs 1e-3, SGD 0.01 vs 0.1), as a from-scratch LR would wreck the pretrained features in the first
    steps (README, "Pretrained weights, offline"; tests/test_optim.py)."""
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


def milestones_in_steps(
    schedule: str,
    step_size_epochs: float,
    milestones_epochs: tuple[float, ...],
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[int, ...]:
    """The optimizer steps at which a 'step' or 'multistep' schedule multiplies the LR by gamma."""
    if schedule == "step":
        every = max(1, round(step_size_epochs * steps_per_epoch))
        return tuple(range(every, total_steps + 1, every))
    if schedule == "multistep":
        return tuple(sorted(round(m * steps_per_epoch) for m in milestones_epochs))
    return ()


def lr_at(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Linear warmup from peak/warmup_steps to peak, then either a cosine down to peak * min_lr_ratio at
    the end, or ('step', 'multistep') the peak multiplied by gamma at every milestone step passed."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule in ("step", "multistep"):
        return peak_lr * gamma ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule owns the learning rate: every parameter group gets `lr` before each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def peak_lr(cfg: OptimConfig, fine_tuning: bool) -> tuple[float, str]:
    """(the peak learning rate, where it came from): --optim.lr when given (or set by a preset), else
    default_lr for the optimizer and for fine-tuning or training from scratch."""
    if cfg.lr:
        return cfg.lr, "--optim.lr or the preset"
    regime = "for fine-tuning" if fine_tuning else "from scratch"
    return default_lr(cfg.optimizer, pretrained=fine_tuning), f"{cfg.optimizer} default {regime}"
