"""Class imbalance: how strongly the sampler rebalances, which class prior training therefore sees, and
the logit adjustment that corrects for that prior afterwards.

A model trained on data whose class prior is q learns p_q(y|x) ∝ p(x|y) q_y. For a deployment prior t,
Bayes' rule gives p_t(y|x) ∝ p_q(y|x) t_y / q_y: adding log t_y - log q_y to the logits moves the model
from one prior to the other, without retraining (Menon et al. 2021, "Long-tail learning via logit
adjustment", use t = uniform). Every rebalancing option changes q:
- the weighted sampler draws class c with probability ∝ n_c * n_c^-alpha = n_c^(1 - alpha);
- the class-weighted loss counts class c's examples w_c times, as if it were sampled ∝ n_c * w_c.
So q is computed from the options, never assumed, and the correction is a fixed per-class vector.
"""

from __future__ import annotations

from typing import Literal

import torch

LogitAdjustment = Literal["none", "frequency", "balanced"]


def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights n / (k * n_c): 1 for every class when balanced. Empty classes get 0."""
    counts = counts.double()
    weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def sampler_weights(labels: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-image draw weights count^-alpha of the image's class: alpha 0 draws classes at their natural
    frequencies, 1 draws every class equally often, values between interpolate (on a log scale)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--data.sampler-alpha must be in [0, 1], not {alpha}")
    per_class = (
        1.0 / counts.clamp(min=1).double() if alpha == 1.0 else counts.clamp(min=1).double().pow(-alpha)
    )
    return per_class[labels]


def training_prior(
    counts: torch.Tensor, sampler_alpha: float | None, loss_weights: torch.Tensor | None
) -> torch.Tensor:
    """The class prior q the loss effectively sees (float64, sums to 1): the train split's frequencies,
    reshaped by the sampler (alpha, None when it is off) and by the loss's class weights."""
    q = counts.double()
    if sampler_alpha is not None:
        q = q * sampler_weights(torch.arange(len(counts)), counts, sampler_alpha)
    if loss_weights is not None:
        q = q * loss_weights.double().cpu()
    return q / q.sum()


def logit_bias(
    mode: LogitAdjustment,
    counts: torch.Tensor,
    sampler_alpha: float | None,
    loss_weights: torch.Tensor | None,
) -> torch.Tensor | None:
    """The vector added to the logits: log t - log q, t being the train split's class frequencies
    ('frequency': probabilities as the data occurs, undoing the sampler) or uniform ('balanced': every
    class equally likely a priori, which favours balanced accuracy). None for 'none'. Classes without
    training images keep bias 0 (their prior is unknown, and log 0 would be -inf)."""
    if mode == "none":
        return None
    q = training_prior(counts, sampler_alpha, loss_weights)
    present = counts > 0
    target = counts.double() / counts.sum() if mode == "frequency" else present.double() / present.sum()
    bias = torch.zeros(len(counts), dtype=torch.float64)
    bias[present] = target[present].log() - q[present].log()
    bias[present] -= bias[present].mean()  # softmax ignores a shared constant; centred reads better
    return bias.float()


def rarest_classes(counts: torch.Tensor, k: int = 3) -> list[int]:
    """Indices of the k classes with the fewest training images (ties: the lower index), rarest first;
    empty when every class has as many images as the others (no class is rarer)."""
    if len(counts) == 0 or int(counts.min()) == int(counts.max()):
        return []
    order = sorted(range(len(counts)), key=lambda c: (int(counts[c]), c))
    return order[: min(k, len(counts))]
