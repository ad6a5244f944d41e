"""The training loss and the batch mixing that feeds it soft targets (MixUp, CutMix).

Owns: cross-entropy for int labels or (N, C) soft targets, with class weights and label smoothing
composed one way for both; and BatchMixer, which turns an (images, labels) batch into mixed images
and soft targets. The per-image augmentation stays in transforms.py / batch_augment.py; validation never
mixes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2


def soft_target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of `logits` (N, C) against probability `targets` (N, C), each row summing to 1.

    With y the targets, w the class weights (all 1 when None), eps the smoothing and l = log_softmax(logits):

        t_ic  = (1 - eps) * y_ic + eps / C                      smoothed targets
        s_i   = sum_c w_c * y_ic                                the weight of the mixed, unsmoothed target
        loss  = sum_i sum_c w_c * t_ic * (-l_ic)  /  sum_i s_i

    Every term is linear in y, so the loss of a mixed target lam * a + (1 - lam) * b mixes the two hard
    losses' numerators and denominators with the same lam ("mix the labels" = "mix the losses", the
    original MixUp criterion). For one-hot y it is exactly nn.CrossEntropyLoss(weight=w,
    label_smoothing=eps) on the int labels, in all four weight/smoothing combinations: PyTorch weights
    the smoothing term per class, eps / C * sum_c w_c * (-l_ic), and divides by sum_i w_{y_i}, which is
    sum_i s_i. So with mixing on, a batch that happens to be unmixed gets the same loss as with mixing off.

    The alternative of weighting whole samples, sum_i s_i * sum_c t_ic * (-l_ic) / sum_i s_i, agrees
    with PyTorch only without weights or without smoothing, and not for mixed targets even at eps = 0:
    its optimum for a mixed image is p = t, while class weighting everywhere else moves the optimum to
    p ~ w * y. Note nn.CrossEntropyLoss itself, given float targets, divides by N instead of sum_i s_i,
    so for weighted losses it would not match its own int-label result; hence this function.
    """
    num_classes = logits.shape[-1]
    # fp32 at least, as under autocast
    log_probs = logits.log_softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    if weight is None:
        return -(smoothed * log_probs).sum() / len(targets)  # sum_i s_i = N (rows sum to 1)
    return -(smoothed * log_probs * weight).sum() / (targets * weight).sum()


class CrossEntropy(nn.Module):
    """`criterion(logits, targets)`: int labels (N,) go to a plain nn.CrossEntropyLoss(weight,
    label_smoothing), so a run without mixing trains exactly as with that loss alone; float (N, C) soft
    targets go to soft_target_cross_entropy with the same weight and smoothing (which for one-hot targets
    gives the same value)."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.hard = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return soft_target_cross_entropy(
                logits, targets, weight=self.hard.weight, label_smoothing=self.label_smoothing
            )
        return self.hard(logits, targets)


def build_criterion(weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> CrossEntropy:
    return CrossEntropy(weight=weight, label_smoothing=label_smoothing)


class BatchMixer:
    """MixUp / CutMix on a whole batch already on its device: `images, targets = mixer(images, labels)`.

    Each image is mixed with the one before it in the (shuffled) batch, with one lambda per batch:
    torchvision's v2.MixUp and v2.CutMix, whose soft targets are (N, C) floats; CutMix's lambda is
    the kept area after the box is clipped to the image. A batch is mixed with probability mix_prob; with
    both alphas > 0 one of the two is picked per batch with equal odds, like the torchvision reference
    recipe's v2.RandomChoice([MixUp, CutMix]). When enabled, the targets are always (N, C) floats (one-hot
    for an unmixed batch); when both alphas are 0, the call returns its arguments and draws nothing.

    Every random number comes from torch's global CPU generator (also for CUDA images: v2 samples lambda
    and the box on the CPU), which train.py seeds and checkpoints, so a resumed run mixes exactly as an
    uninterrupted one. To mix a batch for a picture without moving the training stream:

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            images, targets = mixer(images, labels)
    """

    def __init__(
        self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0
    ):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(
                f"--optim.mixup-alpha {mixup_alpha} and --optim.cutmix-alpha {cutmix_alpha} must be >= 0"
            )
        if not 0.0 <= mix_prob <= 1.0:
            raise ValueError(f"--optim.mix-prob {mix_prob} must be in [0, 1]")
        self.num_classes, self.mix_prob = num_classes, mix_prob
        self.mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
        self.mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []

    @property
    def enabled(self) -> bool:
        return bool(self.mixes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.mixes:
            return images, labels
        # The same two draws for every batch, so the stream does not depend on mix_prob's outcome.
        mix_draw, choice_draw = torch.rand(2).tolist()
        if mix_draw >= self.mix_prob:
            return images, F.one_hot(labels, self.num_classes).float()
        mix = self.mixes[int(choice_draw * len(self.mixes))]
        mixed, targets = mix(images, labels)
        # MixUp's roll() hands back a contiguous tensor; keep the caller's channels_last layout.
        if (
            images.dim() == 4
            and images.is_contiguous(memory_format=torch.channels_last)
            and not images.is_contiguous()
        ):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        return mixed, targets
