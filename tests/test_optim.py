"""Optimizer groups and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from classifier.models import build_model
from classifier.optim import build_optimizer, default_lr, lr_at, param_groups


def test_norms_and_biases_get_no_weight_decay():
    model = build_model("resnet18", 3)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in no_decay_ids and id(model.fc.bias) in no_decay_ids
    assert id(model.conv1.weight) not in no_decay_ids and id(model.fc.weight) not in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sgd_is_nesterov_and_adamw_default():
    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, momentum=0.9, betas=(0.8, 0.9))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
    assert default_lr("adamw", pretrained=True) == 1e-4 and default_lr("adamw", pretrained=False) == 1e-3


def test_warmup_then_cosine():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # linear rise
    assert all(b <= a for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # then never rises
    mid = 10 + 50
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)  # ends at peak * min_lr_ratio
    assert lr_at(0, peak_lr=2.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(2.0)


def test_step_and_multistep_schedules():
    from classifier.optim import milestones_in_steps

    assert milestones_in_steps("step", 2.0, (), steps_per_epoch=10, total_steps=60) == (20, 40, 60)
    assert milestones_in_steps("multistep", 0.0, (1.5, 4.0), steps_per_epoch=10, total_steps=60) == (15, 40)
    assert milestones_in_steps("cosine", 2.0, (1.0,), steps_per_epoch=10, total_steps=60) == ()
    kw = dict(
        peak_lr=1.0,
        warmup_steps=5,
        total_steps=60,
        min_lr_ratio=0.0,
        schedule="multistep",
        milestones=(15, 40),
        gamma=0.5,
    )
    assert [lr_at(s, **kw) for s in (0, 4, 5, 14, 15, 39, 40, 59)] == pytest.approx(
        [0.2, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    )
