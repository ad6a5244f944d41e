"""The optimizer and the learning-rate schedule.

Weight decay skips norm layers and biases (decaying a BatchNorm scale only fights the normalization).
The LR is a pure function of the optimizer step, like nanoGPT's get_lr: nothing to save but the step.
Warmup + cosine by default; step and multi-step decay as in torchvision's reference recipes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from classifier import finetune
from classifier.config import OptimConfig


def param_groups(
    model: nn.Module, weight_decay: float, *, backbone_lr_mult: float = 1.0, layer_decay: float = 1.0
) -> list[dict]:
    """Weights of conv/linear layers decay; biases and norm parameters (all 1-d) do not. With
    discriminative LRs (--optim.backbone-lr-mult, --optim.layer-decay) that is two groups per stage
    (finetune.stages), else two groups for stage 'all'. Each group carries its stage's name and
    `lr_mult`, the fraction of the scheduled LR that set_lr gives it."""
    if (backbone_lr_mult, layer_decay) == (1.0, 1.0):
        model_stages, multipliers = [("all", list(model.named_parameters()))], [1.0]
    else:
        model_stages = finetune.stages(model)
        multipliers = finetune.lr_multipliers(
            [name for name, _ in model_stages], backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay
        )
    groups = []
    for (stage, named), lr_mult in zip(model_stages, multipliers, strict=True):
        params = [param for _, param in named if param.requires_grad]
        decay = [param for param in params if param.ndim > 1]
        no_decay = [param for param in params if param.ndim <= 1]
        for members, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
            if members:
                groups.append(
                    {"params": members, "weight_decay": decay_value, "lr_mult": lr_mult, "stage": stage}
                )
    return groups


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
    backbone_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay)
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


def head_first_lr_at(step: int, *, freeze_steps: int, warmup_steps: int, peak_lr: float, then) -> float:
    """--freeze-epochs: while only the head trains (the first `freeze_steps` steps), a linear warmup to
    the peak and then the peak; from the unfreeze on, `then` (lr_at over the remaining steps) counted
    from the unfreeze, so the whole network warms up again before the cosine or the steps."""
    if step < freeze_steps:
        return peak_lr * min(1.0, (step + 1) / max(1, warmup_steps))
    return then(step - freeze_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule owns the learning rate: each parameter group gets `lr` times its `lr_mult` (1 unless
    discriminative LRs are on) before each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def peak_lr(cfg: OptimConfig, fine_tuning: bool) -> tuple[float, str]:
    """(the peak learning rate, where it came from): --optim.lr when given (or set by a preset), else
    default_lr for the optimizer and for fine-tuning or training from scratch."""
    if cfg.lr:
        return cfg.lr, "--optim.lr or the preset"
    regime = "for fine-tuning" if fine_tuning else "from scratch"
    return default_lr(cfg.optimizer, pretrained=fine_tuning), f"{cfg.optimizer} default {regime}"
