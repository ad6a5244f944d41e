"""Sampler strength, the training prior it induces, logit adjustment, and the rare-class report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import run_script
from safetensors.torch import load_file
from torch.nn import functional as F

import export
from classifier import onnx_export
from classifier.checkpoint import inference_weights, load_checkpoint
from classifier.imbalance import logit_bias, rarest_classes, sampler_weights, training_prior
from classifier.models import model_from_checkpoint
from classifier.runlog import rare_recall_text
from classifier.selection import pick_weights, update_best

COUNTS = torch.tensor([400, 100, 20, 20])


def test_sampler_alpha_one_is_the_old_inverse_count_exactly():
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    assert torch.equal(sampler_weights(labels, COUNTS, 1.0), (1.0 / COUNTS.clamp(min=1).double())[labels])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sampler_alpha_sets_the_class_draw_probability(alpha):
    labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(COUNTS)])
    weights = sampler_weights(labels, COUNTS, alpha)
    per_class = torch.zeros(4, dtype=torch.float64).index_add_(0, labels, weights)
    expected = COUNTS.double() ** (1 - alpha)
    assert torch.allclose(per_class / per_class.sum(), expected / expected.sum())


def test_sampler_alpha_out_of_range_is_named():
    with pytest.raises(ValueError, match="sampler-alpha"):
        sampler_weights(torch.tensor([0]), COUNTS, 1.5)


def test_training_prior_follows_each_option():
    freq = COUNTS.double() / COUNTS.sum()
    assert torch.allclose(training_prior(COUNTS, None, None), freq)
    assert torch.allclose(training_prior(COUNTS, 1.0, None), torch.full((4,), 0.25, dtype=torch.float64))
    inverse = COUNTS.sum() / (4 * COUNTS.double())  # inverse_frequency_weights' formula
    assert torch.allclose(training_prior(COUNTS, None, inverse), torch.full((4,), 0.25, dtype=torch.float64))
    half = COUNTS.double().sqrt()
    assert torch.allclose(training_prior(COUNTS, 0.5, None), half / half.sum())


def gaussian_posterior_logits(x: torch.Tensor, means: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Bayes-optimal logits for 1-D unit-variance Gaussian classes under `prior`: log p(x|y) + log prior_y."""
    return -0.5 * (x[:, None] - means[None, :]) ** 2 + prior.log()[None, :]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_logit_adjustment_turns_the_sampled_prior_into_the_real_one(alpha):
    """A synthetic prior: the ideal model of data drawn with the sampler's prior q, adjusted with
    'frequency', gives exactly the posterior under the real class frequencies; with 'balanced', the
    posterior under a uniform prior. Unadjusted, it is neither."""
    means = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    x = torch.linspace(-4, 5, 101, dtype=torch.float64)
    real = COUNTS.double() / COUNTS.sum()
    q = training_prior(COUNTS, alpha, None)
    trained = gaussian_posterior_logits(x, means, q)
    for mode, target in [("frequency", real), ("balanced", torch.full((4,), 0.25, dtype=torch.float64))]:
        bias = logit_bias(mode, COUNTS, alpha, None).double()
        want = gaussian_posterior_logits(x, means, target).softmax(1)
        assert torch.allclose((trained + bias).softmax(1), want, atol=1e-6)
        if not torch.allclose(q, target):  # (alpha 1 already trains with the uniform prior)
            assert not torch.allclose(trained.softmax(1), want, atol=1e-3)


def test_logit_adjustment_off_and_without_rebalancing():
    assert logit_bias("none", COUNTS, 1.0, None) is None
    # Natural sampling already has the real prior: 'frequency' has nothing to correct.
    assert torch.allclose(logit_bias("frequency", COUNTS, None, None), torch.zeros(4), atol=1e-6)
    # 'balanced' from natural sampling is Menon et al.'s post-hoc adjustment: -log prior, centred.
    log_prior = (COUNTS.double() / COUNTS.sum()).log()
    assert torch.allclose(
        logit_bias("balanced", COUNTS, None, None).double(), -(log_prior - log_prior.mean()), atol=1e-6
    )
    # A class without training images keeps bias 0 instead of -inf.
    assert torch.isfinite(logit_bias("balanced", torch.tensor([10, 0, 5]), None, None)).all()


def test_rarest_classes_and_their_log_text():
    assert rarest_classes(torch.tensor([50, 5, 7, 5, 60]), k=3) == [1, 3, 2]
    assert rarest_classes(torch.tensor([9, 9, 9])) == []
    classes = ["a", "b", "c"]
    assert rare_recall_text([0.9, 0.25, 0.5], classes, [1]) == " | rare recall b 0.25"
    assert rare_recall_text([0.9, 0.25, 0.5], classes, []) == " | min recall b 0.25"


def test_pick_weights_prefers_the_better_and_ema_on_ties():
    assert pick_weights({"ema": {"top1": 0.7}, "raw": {"top1": 0.8}}, "top1") == "raw"
    assert pick_weights({"ema": {"top1": 0.8}, "raw": {"top1": 0.8}}, "top1") == "ema"


def test_update_best_keeps_the_best_k_and_names_the_dropped():
    best = {"metric": "top1", "value": float("-inf"), "epoch": -1, "kept": []}
    dropped_all = []
    for epoch, value in enumerate([0.5, 0.7, 0.6, 0.7]):
        best, improved, dropped = update_best(best, value, epoch, keep_best=2)
        dropped_all += [e for _, e in dropped]
        assert improved == (epoch in (0, 1))
    assert best["epoch"] == 1 and best["kept"] == [[0.7, 1], [0.7, 3]] and sorted(dropped_all) == [0, 2]


def imbalanced_copy(src, dest, keep_rare=6, rare=range(5, 10)):
    """The Fashion-MNIST fixture with classes 5-9 cut to `keep_rare` training images (10x rarer)."""
    shutil.copytree(src, dest)
    folders = sorted(p for p in (dest / "train").iterdir() if p.is_dir())
    for c in rare:
        for extra in sorted(folders[c].iterdir())[keep_rare:]:
            extra.unlink()
    return dest


def test_sampler_and_logit_adjustment_end_to_end(fmnist_root, tmp_path, repo_root):
    """A balanced-sampler run on 10x-imbalanced data with --logit-adjustment frequency: the checkpoint,
    best.safetensors and the ONNX export carry the bias, validation judged the adjusted logits, and their
    probabilities on the (naturally imbalanced) val split track the real class frequencies better than the
    same weights unadjusted do."""
    root = imbalanced_copy(fmnist_root, tmp_path / "imb")
    args = [
        "train.py",
        "--data.root",
        root,
        "--out-dir",
        tmp_path,
        "--name",
        "la",
        "--epochs",
        "3",
        "--data.batch-size",
        "32",
        "--data.image-size",
        "32",
        "--data.resize-size",
        "32",
        "--data.fast-path",
        "--data.weighted-sampler",
        "--data.sampler-alpha",
        "1.0",
        "--logit-adjustment",
        "frequency",
        "--data.val-fraction",
        "0.25",
        "--optim.lr",
        "2e-3",
        "--no-progress",
        "--log-every-steps",
        "1000",
    ]
    proc = run_script(args, cwd=repo_root)
    assert proc.returncode == 0
    run = tmp_path / "la"
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    counts = torch.tensor(state["dataset"]["counts"]["train"])
    expected = logit_bias("frequency", counts, 1.0, None)
    assert torch.allclose(torch.tensor(state["logit_bias"]), expected)
    assert json.loads((run / "config.json").read_text())["derived"]["logit_bias"] == state["logit_bias"]
    # The rarest classes' recall is reported next to top-1.
    rare_names = [state["classes"][c] for c in rarest_classes(counts)]
    assert all(name in proc.stdout.split("rare recall", 1)[1] for name in rare_names)

    # best.safetensors and model_from_checkpoint: the head bias includes the adjustment.
    raw_weights, which = inference_weights(state)
    adjusted = load_file(run / "best.safetensors")
    assert torch.allclose(adjusted["fc.bias"], raw_weights["fc.bias"] + expected, atol=1e-6)
    model, _ = model_from_checkpoint(state)
    folded = model.state_dict()
    assert folded.keys() == adjusted.keys() and all(torch.equal(folded[k], adjusted[k]) for k in adjusted)

    from classifier.data import ImageDataset, build_splits
    from classifier.transforms import eval_transform

    cfg = state["config"]["data"]
    splits = build_splits(root, cfg["val_fraction"], 0, classes=state["classes"])
    val = ImageDataset(splits.val, eval_transform(state["preprocessing"]))
    images, _ = val.collate([val[i] for i in range(len(val))])  # normalized, as validation sees them
    labels = torch.tensor([label for _, label in splits.val])
    with torch.no_grad():
        adjusted_logits = model(images)
        model.load_state_dict(raw_weights)
        plain_logits = model(images)
    adjusted_probs, plain_probs = adjusted_logits.softmax(1).mean(0), plain_logits.softmax(1).mean(0)

    # Validation judged the adjusted logits: the best epoch's val metrics (metrics.jsonl and best.pt) are
    # best.safetensors' model's on the val split, the confusion exactly, and not the raw weights'.
    def confusion(logits: torch.Tensor) -> list[list[int]]:
        matrix = torch.zeros(len(state["classes"]), len(state["classes"]), dtype=torch.long)
        return matrix.index_put_((labels, logits.argmax(1)), torch.tensor(1), accumulate=True).tolist()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["val"] for r in records if r["epoch"] == state["best"]["epoch"])
    assert logged == state["val_metrics"]
    assert logged["confusion"] == confusion(adjusted_logits) != confusion(plain_logits)
    assert logged["loss"] == pytest.approx(F.cross_entropy(adjusted_logits, labels).item(), rel=1e-5)

    # The ONNX export of best.pt gives the adjusted logits too (ORT matches PyTorch to ~1e-5 here).
    out = export.main(export.ExportArgs(run / "checkpoints" / "best.pt", out=tmp_path / "onnx", batch_size=4))
    assert json.loads((out / "labels_mapping.json").read_text())["logit_adjustment"] == "frequency"
    exported = onnx_export.onnx_session(out / "model.onnx").run(None, {"images": images.numpy()})[0]
    assert torch.allclose(torch.from_numpy(exported), adjusted_logits, atol=1e-4, rtol=0)

    # Mean predicted probabilities on val vs the real class frequencies.
    real = counts.double() / counts.sum()
    adjusted_gap = (adjusted_probs.double() - real).abs().sum().item()
    plain_gap = (plain_probs.double() - real).abs().sum().item()
    gaps = f"L1 gap to the real frequencies: adjusted {adjusted_gap:.3f}, plain {plain_gap:.3f}"
    assert adjusted_gap < plain_gap, gaps
    assert math.isclose(adjusted_probs.sum().item(), 1.0, rel_tol=1e-4)
