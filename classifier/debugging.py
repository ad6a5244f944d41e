"""Aids for `--debug`: the overfit-one-batch check.

A model that cannot drive the loss of one fixed batch towards zero has a bug upstream of the optimizer
(labels shuffled against images, a frozen layer, a wrong loss). The check trains a copy, so the real
run is untouched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def overfit_one_batch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 30, lr: float = 1e-3
) -> tuple[float, float]:
    """Train a copy of `model` on one batch for `steps` Adam steps; return (first loss, last loss)."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]
