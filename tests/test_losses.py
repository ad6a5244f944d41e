"""classifier/losses.py: the soft-target cross-entropy against a hand computation and nn.CrossEntropyLoss,
MixUp/CutMix batches, and train.py with mixing on (trains on the mixed batches) and off (trains exactly as
with a bare nn.CrossEntropyLoss and no mixer). The mixing run's exact resume is tests/test_train.py's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FAST
from torch import nn
from torch.nn import functional as F

import train
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.losses import BatchMixer, build_criterion, soft_target_cross_entropy

LOGITS = [[2.0, -1.0, 0.5], [0.0, 1.5, -0.5], [-1.0, 0.2, 3.0], [0.3, 0.3, -2.0]]
LABELS = [0, 1, 2, 1]
MIXED = [[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [0.25, 0.0, 0.75], [0.0, 1.0, 0.0]]  # MixUp-like rows, one unmixed
WEIGHT = [0.5, 2.0, 1.25]


def hand_loss(logits, targets, weight, eps):
    """The docstring's formula in plain Python: sum_i sum_c w_c t_ic (-l_ic) / sum_i sum_c w_c y_ic."""
    num_classes = len(logits[0])
    weight = weight or [1.0] * num_classes
    numerator = denominator = 0.0
    for z, y in zip(logits, targets, strict=True):
        log_sum_exp = math.log(sum(math.exp(v) for v in z))
        for c in range(num_classes):
            log_prob = z[c] - log_sum_exp
            smoothed = (1 - eps) * y[c] + eps / num_classes
            numerator += weight[c] * smoothed * -log_prob
            denominator += weight[c] * y[c]
    return numerator / denominator


# --- the loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["one_hot", "mixed"])
def test_soft_loss_matches_the_hand_computation(weighted, eps, kind):
    targets = MIXED if kind == "mixed" else [[float(c == y) for c in range(3)] for y in LABELS]
    weight = WEIGHT if weighted else None
    got = soft_target_cross_entropy(
        torch.tensor(LOGITS),
        torch.tensor(targets),
        weight=torch.tensor(weight) if weighted else None,
        label_smoothing=eps,
    )
    assert got.item() == pytest.approx(hand_loss(LOGITS, targets, weight, eps), rel=1e-6)


def test_mixed_weighted_loss_mixes_the_hard_losses():
    """A mixed target's weighted loss is lam * (a's weighted terms) + (1 - lam) * (b's), over the mixed
    weight, and not the per-sample alternative s_i * CE(t_i), which differs here."""
    z = torch.tensor([LOGITS[0]])
    w = torch.tensor(WEIGHT)
    lam, eps = 0.7, 0.2
    target = torch.tensor([[lam, 1 - lam, 0.0]])
    got = soft_target_cross_entropy(z, target, weight=w, label_smoothing=eps)
    hard = nn.CrossEntropyLoss(
        weight=w, label_smoothing=eps, reduction="sum"
    )  # sum: the unnormalized numerator
    expected = (lam * hard(z, torch.tensor([0])) + (1 - lam) * hard(z, torch.tensor([1]))) / (
        lam * w[0] + (1 - lam) * w[1]
    )
    assert torch.allclose(got, expected, rtol=1e-6)
    smoothed = (1 - eps) * target + eps / 3
    per_sample = -(smoothed * z.log_softmax(-1)).sum()  # s_i cancels with one sample
    assert not torch.allclose(got, per_sample, rtol=1e-3)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_equals_cross_entropy_loss_on_hard_labels(weighted, eps):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5, dtype=torch.float64), torch.randint(5, (16,))
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if weighted else None
    reference = nn.CrossEntropyLoss(weight=weight, label_smoothing=eps)(logits, labels)
    soft = soft_target_cross_entropy(
        logits, F.one_hot(labels, 5).double(), weight=weight, label_smoothing=eps
    )
    assert torch.allclose(soft.double(), reference, rtol=1e-6)
    criterion = build_criterion(weight=weight, label_smoothing=eps)
    assert torch.equal(criterion(logits, labels), reference)  # int labels: the very same nn.CrossEntropyLoss
    assert torch.allclose(criterion(logits, F.one_hot(labels, 5).double()).double(), reference, rtol=1e-6)


def test_gradient_is_the_closed_form():
    """d loss / d z_ik = (softmax_ik * sum_c w_c t_ic - w_k t_ik) / sum_i s_i; and gradcheck agrees."""
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    targets, weight, eps = (
        torch.tensor(MIXED, dtype=torch.float64),
        torch.tensor(WEIGHT, dtype=torch.float64),
        0.2,
    )
    soft_target_cross_entropy(logits, targets, weight=weight, label_smoothing=eps).backward()
    smoothed = (1 - eps) * targets + eps / 3
    probs = logits.detach().softmax(-1)
    expected = (probs * (smoothed * weight).sum(1, keepdim=True) - smoothed * weight) / (
        targets * weight
    ).sum()
    assert torch.allclose(logits.grad, expected, atol=1e-12)
    fn = lambda z: soft_target_cross_entropy(z, targets, weight=weight, label_smoothing=eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits.detach().requires_grad_(),))


# --- the mixer --------------------------------------------------------------------------------------


def batch(n=6, num_classes=6, height=10, width=14):
    torch.manual_seed(1)
    return torch.randn(n, 3, height, width), torch.randperm(num_classes)[
        :n
    ]  # distinct labels: lam is readable


@pytest.mark.parametrize("seed", range(5))
def test_mixup_is_a_convex_combination_with_the_targets_lambda(seed):
    images, labels = batch()
    mixer = BatchMixer(6, mixup_alpha=0.4)
    torch.manual_seed(seed)
    mixed, targets = mixer(images, labels)
    assert targets.shape == (6, 6) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(6))
    lam = targets[0, labels[0]].item()  # one lambda per batch
    assert 0 < lam < 1
    assert torch.allclose(targets, lam * F.one_hot(labels, 6) + (1 - lam) * F.one_hot(labels.roll(1), 6))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_box_area_is_the_targets_mixing_weight(seed):
    n, height, width = 5, 9, 16
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, height, width).contiguous()
    labels = torch.arange(n)
    torch.manual_seed(seed)
    mixed, targets = BatchMixer(n, cutmix_alpha=1.0)(images, labels)
    pasted = mixed == images.roll(1, 0)  # every pixel is either the image's own or its neighbour's
    assert (pasted | (mixed == images)).all()
    pasted_fraction = pasted[:, 0].float().mean(dim=(1, 2))
    assert torch.allclose(pasted_fraction, pasted_fraction[0].expand(n))  # one box for the batch
    assert torch.allclose(
        targets[torch.arange(n), labels.roll(1)], pasted_fraction
    )  # clipped box area = 1 - lam
    assert torch.allclose(targets[torch.arange(n), labels], 1 - pasted_fraction)


def test_both_on_picks_one_of_the_two_per_batch():
    images, labels = batch()
    mixer = BatchMixer(6, mixup_alpha=0.4, cutmix_alpha=1.0)
    kinds = set()
    for seed in range(30):
        torch.manual_seed(seed)
        mixed, _ = mixer(images, labels)
        box = (mixed == images) | (mixed == images.roll(1, 0))
        kinds.add("cutmix" if box.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_mix_prob_zero_keeps_the_images_with_one_hot_targets():
    images, labels = batch()
    torch.manual_seed(0)
    mixed, targets = BatchMixer(6, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)(images, labels)
    assert torch.equal(mixed, images) and torch.equal(targets, F.one_hot(labels, 6).float())


def test_mixing_off_returns_the_int_labels_and_draws_nothing():
    images, labels = batch()
    before = torch.get_rng_state()
    mixed, targets = BatchMixer(6)(images, labels)
    assert mixed is images and targets is labels and targets.dtype == torch.int64
    assert torch.equal(torch.get_rng_state(), before)
    assert not BatchMixer(6).enabled and BatchMixer(6, cutmix_alpha=0.5).enabled


def test_mixer_follows_the_global_rng_and_fork_rng_isolates_it():
    images, labels = batch()
    mixer = BatchMixer(6, mixup_alpha=0.4, cutmix_alpha=1.0)
    before = torch.get_rng_state()
    outputs = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            outputs.append(mixer(images, labels))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        assert not torch.equal(mixer(images, labels)[1], outputs[0][1])


def test_channels_last_stays_channels_last():
    images, labels = batch()
    images = images.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    mixed, _ = BatchMixer(6, mixup_alpha=0.4)(images, labels)
    assert mixed.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "flags, message",
    [({"mixup_alpha": -1.0}, "--optim.mixup-alpha"), ({"mix_prob": 1.5}, "--optim.mix-prob")],
)
def test_bad_settings_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        BatchMixer(3, **flags)


# --- train.py with mixing ---------------------------------------------------------------------------


def uneven_copy(root: Path, dest: Path) -> Path:
    """The small Fashion-MNIST fixture with half of its first class's training images gone: the fixture is
    balanced, so --data.class-weighted-loss would otherwise weight every class 1 and test nothing."""
    shutil.copytree(root, dest)
    first = next(folder for folder in sorted((dest / "train").iterdir()) if folder.is_dir())
    for extra in sorted(first.iterdir())[6:]:
        extra.unlink()
    return dest


def test_training_with_mixup_and_cutmix_trains_on_the_mixed_batches(fmnist_small_root, tmp_path, monkeypatch):
    """Both flags reach the step: every training batch goes through a mixer holding MixUp and CutMix, both
    occur, the model sees the mixed images, the loss is the class-weighted soft cross-entropy of the mixed
    targets, and metrics.jsonl reports that loss and top-1 against the targets' argmax. Spies wrap the real
    mixer, model and criterion and change nothing. (That mixing changes the weights at all is shown by
    test_mixing_off_trains_exactly_as_plain_cross_entropy, with MixUp alone.)"""
    mixes, model_inputs, losses = [], [], []

    class RecordingMixer(BatchMixer):
        def __call__(self, images, labels):
            mixed, targets = super().__call__(images, labels)
            mixes.append((images, labels, mixed, targets))
            return mixed, targets

    real_build_model, real_build_criterion = train.models.build_model, train.losses.build_criterion

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        # Training forwards only: the input-size probe and validation run in eval mode, and the start-up
        # FLOP count (model_card.count_flops) runs on meta tensors.
        model.register_forward_pre_hook(
            lambda module, inputs: (
                model_inputs.append(inputs[0])
                if module.training and inputs[0].device.type != "meta"
                else None
            )
        )
        return model

    def build_criterion(weight, label_smoothing):
        criterion = real_build_criterion(weight=weight, label_smoothing=label_smoothing)

        def recording(logits, targets):
            loss = criterion(logits, targets)
            losses.append((logits.detach(), targets, loss.detach()))
            return loss

        return recording

    monkeypatch.setattr(train.losses, "BatchMixer", RecordingMixer)
    monkeypatch.setattr(train.models, "build_model", build_model)
    monkeypatch.setattr(train.losses, "build_criterion", build_criterion)
    root = uneven_copy(fmnist_small_root, tmp_path / "data")
    result = train.main(
        parse_cli(
            [
                "--data.root",
                str(root),
                "--out-dir",
                str(tmp_path),
                "--name",
                "mix",
                "--epochs",
                "2",
                "--data.batch-size",
                "16",
                "--data.max-train-batches",
                "3",
                "--data.num-workers",
                "0",
                "--optim.mixup-alpha",
                "0.2",
                "--optim.cutmix-alpha",
                "1.0",
                "--data.class-weighted-loss",
                *FAST,
            ]
        )
    )
    assert len(mixes) == len(model_inputs) == len(losses) == result["step"] > 0
    kinds = []
    for (images, _, mixed, targets), seen, (_, loss_targets, _) in zip(
        mixes, model_inputs, losses, strict=True
    ):
        assert torch.equal(seen, mixed) and loss_targets is targets
        # Soft targets, not the int labels a disabled mixer passes through.
        assert targets.dtype == torch.float32 and targets.shape == (16, 10)
        assert torch.allclose(targets.sum(1), torch.ones(16))
        if torch.equal(mixed, images):
            kinds.append("unchanged")  # MixUp with lambda within 1e-7 of 0 or 1 (Beta(0.2, 0.2) draws those)
        else:
            # CutMix: each pixel is its own image's or its neighbour's.
            box = (mixed == images) | (mixed == images.roll(1, 0))
            kinds.append("cutmix" if box.all() else "mixup")
    assert {"cutmix", "mixup"} <= set(kinds), kinds

    run = tmp_path / "mix"
    config = json.loads((run / "config.json").read_text())
    weight = torch.tensor(config["derived"]["loss_class_weights"])
    smoothing = config["optim"]["label_smoothing"]
    assert weight[0] > 1.5 * weight[1]
    for logits, targets, loss in losses:
        expected = soft_target_cross_entropy(logits, targets, weight=weight, label_smoothing=smoothing)
        assert torch.allclose(loss, expected, rtol=1e-5)
    # Each epoch's train loss and top-1 are the mean over its batches (all of 16 images).
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_epoch = len(losses) // 2
    assert len(records) == 2 and per_epoch * 2 == len(losses)
    for record, epoch in zip(records, (losses[:per_epoch], losses[per_epoch:]), strict=True):
        mean_loss = torch.stack([loss for _, _, loss in epoch]).mean().item()
        right = [logits.argmax(1) == targets.argmax(1) for logits, targets, _ in epoch]
        top1 = torch.cat(right).float().mean()
        assert record["train"]["loss"] == pytest.approx(mean_loss, rel=1e-5)
        assert record["train"]["top1"] == pytest.approx(top1.item(), abs=1e-6)
        assert math.isfinite(record["val"]["loss"])


def test_mixing_off_trains_exactly_as_plain_cross_entropy(fmnist_small_root, tmp_path, monkeypatch):
    """With both alphas 0 the step must be the plain one: nn.CrossEntropyLoss on int labels, no extra
    draws from the global RNG (dropout in mobilenet_v3_small would show them). The reference run swaps in
    a bare nn.CrossEntropyLoss and no mixer. And with mixing on, the weights differ."""
    root = uneven_copy(fmnist_small_root, tmp_path / "data")
    common = [
        "--model",
        "mobilenet_v3_small",
        "--data.root",
        str(root),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--data.max-train-batches",
        "6",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "0",
        "--data.class-weighted-loss",
        "--ema-half-life-epochs",
        "0.1",
        *FAST,
    ]
    train.main(parse_cli([*common, "--name", "new"]))
    weight = json.loads((tmp_path / "new" / "config.json").read_text())["derived"]["loss_class_weights"]
    assert weight[0] > 1.5 * weight[1]  # the weights are really in play
    train.main(parse_cli([*common, "--name", "mixed", "--optim.mixup-alpha", "0.4"]))
    mixed = load_checkpoint(tmp_path / "mixed")["model"]["classifier.3.weight"]
    assert not torch.equal(load_checkpoint(tmp_path / "new")["model"]["classifier.3.weight"], mixed)

    class NoMixer:
        enabled = False

        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, images, labels):
            return images, labels

    monkeypatch.setattr(train.losses, "BatchMixer", NoMixer)
    monkeypatch.setattr(
        train.losses,
        "build_criterion",
        lambda weight, label_smoothing: nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing),
    )
    train.main(parse_cli([*common, "--name", "old"]))
    a, b = load_checkpoint(tmp_path / "new"), load_checkpoint(tmp_path / "old")
    for key in ("model", "ema"):
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key}: {different[:5]}"
