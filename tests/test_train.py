"""train.py end to end: a real run on Fashion-MNIST, exact resume, --debug, and bad input."""

from __future__ import annotations

import json
import re
from importlib import metadata

import pytest
import torch
from helpers import FAST, run_script
from safetensors import safe_open

import train
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli


@pytest.mark.parametrize("path", ["regular", "fast"])
def test_trains_fashion_mnist_far_above_chance(path, fmnist_root, tmp_path, repo_root):
    args = [
        "train.py",
        "--model",
        "resnet18",
        "--data.root",
        fmnist_root,
        "--out-dir",
        tmp_path,
        "--name",
        "e2e",
        "--epochs",
        "4",
        "--data.batch-size",
        "32",
        "--data.num-workers",
        "1",
        "--optim.lr",
        "2e-3",
        "--data.crop-scale",
        "0.7",
        "1",
        "--data.mean",
        "0.286",
        "0.286",
        "0.286",
        "--data.std",
        "0.353",
        "0.353",
        "0.353",
        *FAST,
        *(["--data.fast-path"] if path == "fast" else []),
    ]
    proc = run_script(args, cwd=repo_root)
    assert proc.returncode == 0
    run = tmp_path / "e2e"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    best = max(r["val"]["top1"] for r in records)
    assert best >= 0.5, f"val top-1 {best} (chance is 0.1)"
    assert {"top1", "top5", "macro_f1", "macro_auroc", "per_class_acc", "confusion", "loss"} <= set(
        records[-1]["val"]
    )
    assert f"best val top1 {best:.4f}" in proc.stdout
    assert "imbalance ratio" in proc.stdout and "images drawn per class" in proc.stdout

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "resnet18" and config["versions"]["torch"] == metadata.version("torch")
    assert config["dataset"]["counts"]["train"] == [54] * 10 and len(config["dataset"]["files_sha256"]) == 64
    assert config["derived"]["steps_per_epoch"] == 540 // 32

    mapping = json.loads((run / "labels_mapping.json").read_text())
    assert mapping["idx_to_class"]["0"] == "Ankle_boot" and mapping["preprocessing"]["center_crop"] == 32

    # EMA and raw weights are both validated every epoch; the better one is the epoch's result.
    best_ckpt = load_checkpoint(run / "checkpoints" / "best.pt")
    best_record = next(r for r in records if r["epoch"] == best_ckpt["best"]["epoch"])
    assert best_ckpt["val_metrics"]["top1"] == best and best_ckpt["weights"] == best_record["weights"]
    scores = {w: r["top1"] for w, r in best_record["val_by_weights"].items()}
    assert set(scores) == {"ema", "raw"} and best_record["weights"] == (
        "ema" if scores["ema"] >= scores["raw"] else "raw"
    )
    assert all(r["val"]["top1"] == r["val_by_weights"][r["weights"]]["top1"] for r in records)
    with safe_open(run / "best.safetensors", "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["idx_to_class"])["9"] == "Trouser" and meta["weights"] == best_ckpt["weights"]
        ema_fc = {k[len("module.") :]: v for k, v in best_ckpt["ema"].items() if k.startswith("module.")}[
            "fc.weight"
        ]
        chosen_fc = ema_fc if best_ckpt["weights"] == "ema" else best_ckpt["model"]["fc.weight"]
        assert torch.equal(f.get_tensor("fc.weight"), chosen_fc)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


class Interrupt(Exception):
    pass


# MixUp + CutMix (mix_prob < 1) with class weights: the mixer's draws interleave with dropout's in the
# global RNG, so both must come back exactly from the checkpoint.
MIXING = [
    "--optim.mixup-alpha",
    "0.4",
    "--optim.cutmix-alpha",
    "1.0",
    "--optim.mix-prob",
    "0.8",
    "--data.class-weighted-loss",
]


@pytest.mark.parametrize("path", ["regular", "fast", "regular+mixing"])
def test_interrupted_and_resumed_run_is_bit_identical(path, fmnist_small_root, tmp_path, monkeypatch):
    """Mid-epoch interruption, with gradient accumulation, 2 workers, the weighted sampler, augmentation
    and EMA: the run resumed with another worker count (0: loading in the main process) must end with
    exactly the weights of the uninterrupted one, on both the regular (PIL, workers) and the fast (tensor
    cache, batch augmentation) data path, and with mixing."""
    # mobilenet_v3_small: it has dropout, so the restored torch RNG state matters too.
    common = [
        "--model",
        "mobilenet_v3_small",
        "--data.root",
        str(fmnist_small_root),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "3",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "2",
        "--optim.grad-accum-steps",
        "2",
        "--data.weighted-sampler",
        "--data.color-jitter",
        "0.3",
        "--data.image-size",
        "32",
        "--data.resize-size",
        "32",
        "--checkpoint-every-steps",
        "4",
        "--no-progress",
        "--ema-half-life-epochs",
        "0.5",
        *(["--data.fast-path", "--data.cache-dir", str(tmp_path / "cache")] if path == "fast" else []),
        *(MIXING if path.endswith("+mixing") else []),
    ]
    straight = train.main(parse_cli([*common, "--name", "straight"]))

    calls = {"n": 0}
    real_lr_at = train.optim.lr_at

    def lr_at_then_die(step, **kw):
        calls["n"] += 1
        if calls["n"] == 11:  # one call before the loop, then one per step: dies in step 9 of 18
            raise Interrupt
        return real_lr_at(step, **kw)

    monkeypatch.setattr(train.optim, "lr_at", lr_at_then_die)
    with pytest.raises(Interrupt):
        train.main(parse_cli([*common, "--name", "cut"]))
    monkeypatch.setattr(train.optim, "lr_at", real_lr_at)
    cut = load_checkpoint(tmp_path / "cut")
    assert (cut["epoch"], cut["batches_in_epoch"], cut["step"]) == (
        1,
        4,
        8,
    )  # the step-8 checkpoint: mid-epoch 1

    resumed = train.main(parse_cli(["--resume", str(tmp_path / "cut"), "--data.num-workers", "0"]))
    assert resumed["step"] == straight["step"] == 18
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "cut")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key}: {different[:5]}"
    assert a["val_metrics"] == b["val_metrics"]
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():  # every moment of every parameter, and its step
        assert all(torch.equal(value, b["optimizer"]["state"][index][name]) for name, value in state.items())
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines("straight")[1:] == lines("cut")[1:]  # epoch 1's train numbers survive the interruption too


def test_debug_mode_runs_the_overfit_check(fmnist_small_root, tmp_path, monkeypatch, capsys):
    """--debug: loaders in the main process, anomaly detection on while training (and off again after),
    a handful of batches, and the overfit check on a copy that leaves the model untouched."""
    seen = {"workers": [], "anomaly": []}
    real_make_loader, real_overfit = train.data.make_loader, train.faults.overfit_one_batch

    def make_loader(*args, **kw):
        seen["workers"].append(kw["num_workers"])
        return real_make_loader(*args, **kw)

    def overfit_one_batch(model, images, labels):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        seen["anomaly"].append(torch.is_anomaly_enabled())
        result = real_overfit(model, images, labels)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was trained
        return result

    monkeypatch.setattr(train.data, "make_loader", make_loader)
    monkeypatch.setattr(train.faults, "overfit_one_batch", overfit_one_batch)
    args = [
        "--debug",
        "--data.root",
        str(fmnist_small_root),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "2",
        *FAST,
    ]
    result = train.main(parse_cli(args))
    out = capsys.readouterr().out
    assert "debug: overfit one batch: loss" in out and ": ok" in out
    assert "5 steps/epoch" in out and result["step"] == 5  # a handful of batches
    assert seen["workers"] and set(seen["workers"]) == {0}  # --data.num-workers 2 overridden
    assert seen["anomaly"] == [True] and not torch.is_anomaly_enabled()


def test_a_failed_overfit_check_stops_the_run_unless_told_to_continue(
    fmnist_small_root, tmp_path, monkeypatch
):
    cannot_learn = lambda model, images, labels: (2.30, 2.25)  # noqa: E731  first and last loss
    monkeypatch.setattr(train.faults, "overfit_one_batch", cannot_learn)
    args = [
        "--debug",
        "--data.root",
        str(fmnist_small_root),
        "--out-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--data.batch-size",
        "8",
        *FAST,
    ]
    with pytest.raises(SystemExit, match="overfit-one-batch check failed"):
        train.main(parse_cli([*args, "--name", "stop"]))
    assert not list((tmp_path / "stop" / "checkpoints").glob("*.pt"))  # stopped before the first step
    result = train.main(parse_cli([*args, "--name", "go", "--debug-overfit-failure", "continue"]))
    assert result["step"] == 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.root", "/no/such/dir"], "/no/such/dir"),
        (["--model", "resnet9000"], "resnet9000"),
        (["--pretrained", "/no/weights.pth"], "/no/weights.pth"),
        (["--data.batch-size", "100000"], "--data.batch-size 100000"),
        (["--data.max-train-batches", "0"], "--data.max-train-batches 0"),
    ],
)
def test_bad_input_is_named(extra, message, fmnist_small_root, tmp_path, repo_root):
    proc = run_script(
        ["train.py", "--data.root", fmnist_small_root, "--out-dir", tmp_path, *FAST, *extra], cwd=repo_root
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr  # an error message, not a crash
    assert not list(tmp_path.glob("*/checkpoints/*.pt"))  # stopped before training


def test_an_existing_run_is_not_overwritten(fmnist_small_root, tmp_path, repo_root):
    (tmp_path / "taken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "taken" / "checkpoints" / "last.pt").write_bytes(b"precious")
    proc = run_script(
        ["train.py", "--data.root", fmnist_small_root, "--out-dir", tmp_path, "--name", "taken", *FAST],
        cwd=repo_root,
    )
    assert proc.returncode != 0 and "--resume" in proc.stderr and str(tmp_path / "taken") in proc.stderr
    assert (tmp_path / "taken" / "checkpoints" / "last.pt").read_bytes() == b"precious"


def test_empty_split_is_named(tmp_path, repo_root):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    proc = run_script(
        ["train.py", "--data.root", tmp_path / "data", "--out-dir", tmp_path, *FAST], cwd=repo_root
    )
    assert proc.returncode != 0 and "no image files under" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(precision, fmnist_small_root, tmp_path, monkeypatch):
    """bf16 autocast without a scaler; fp16 autocast with an enabled GradScaler, whose state is saved.
    The training forwards really run in that dtype: the model's logits come out in it."""
    logits_dtypes = set()
    real_build = train.models.build_model

    def note_dtype(module, inputs, output) -> None:
        # Training forwards only: check_input_size's probe runs in eval mode, outside autocast, and the
        # start-up FLOP count (model_card.count_flops) on meta tensors.
        if module.training and output.device.type != "meta":
            logits_dtypes.add(output.dtype)

    def build_and_watch(*args, **kw):
        model = real_build(*args, **kw)
        model.register_forward_hook(note_dtype)
        return model

    monkeypatch.setattr(train.models, "build_model", build_and_watch)
    result = train.main(
        parse_cli(
            [
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                precision,
                "--precision",
                precision,
                "--epochs",
                "1",
                "--data.batch-size",
                "16",
                "--data.num-workers",
                "0",
                *FAST,
            ]
        )
    )
    assert logits_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float16}
    saved = load_checkpoint(tmp_path / precision)
    assert result["step"] == 6 and saved["config"]["precision"] == precision
    assert bool(saved["scaler"]) == (precision == "fp16")  # a disabled scaler saves {}
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_compile_and_channels_last_save_the_plain_module(fmnist_small_root, tmp_path, monkeypatch):
    # Inductor's own cache, not the machine's /tmp/torchinductor_$USER: kernels cached there by a run with
    # ATEN_CPU_CAPABILITY=avx2 crashed (segfault) a later run without it.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = []
    real_compile = torch.compile

    def compile_and_note(module, *args, **kw):
        compiled.append(type(module).__name__)
        return real_compile(module, *args, **kw)

    monkeypatch.setattr(torch, "compile", compile_and_note)
    result = train.main(
        parse_cli(
            [
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                "c",
                "--compile",
                "--channels-last",
                "on",
                "--epochs",
                "1",
                "--data.max-train-batches",
                "2",
                "--data.batch-size",
                "8",
                "--data.num-workers",
                "0",
                *FAST,
            ]
        )
    )
    assert compiled == ["ResNet"]  # the training model, once
    assert result["model"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    saved = load_checkpoint(tmp_path / "c")
    assert not any(
        k.startswith(("_orig_mod.", "module.")) for k in saved["model"]
    )  # loadable into a plain model
    with safe_open(tmp_path / "c" / "best.safetensors", "pt") as f:
        assert "conv1.weight" in f.keys()


def test_class_weighted_loss_uses_train_counts(tmp_path, fmnist_small_root):
    """The weights are the inverse train frequencies (config.json), and the loss the trainer minimizes
    uses them: the same first batch from the same initial model gives another loss with them than without."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fmnist_small_root, data)
    for extra in sorted((data / "train" / "Bag").iterdir())[4:]:  # Bag: 4 training images, the others 12
        extra.unlink()
    common = [
        "--data.root",
        str(data),
        "--out-dir",
        str(tmp_path),
        "--data.val-fraction",
        "0.25",
        "--epochs",
        "1",
        "--data.max-train-batches",
        "1",
        "--data.batch-size",
        "8",
        "--data.num-workers",
        "0",
        *FAST,
    ]
    train.main(parse_cli([*common, "--name", "w", "--data.class-weighted-loss"]))
    train.main(parse_cli([*common, "--name", "plain"]))
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    counts = torch.tensor(config["dataset"]["counts"]["train"], dtype=torch.float64)
    assert counts[1] == 3 and counts[0] == 9  # Bag is index 1; a quarter of each class went to val
    expected = counts.sum() / (len(counts) * counts)
    assert torch.allclose(
        torch.tensor(config["derived"]["loss_class_weights"], dtype=torch.float64), expected, atol=1e-6
    )
    first_loss = lambda run: json.loads((tmp_path / run / "metrics.jsonl").read_text())["train"]["loss"]  # noqa: E731
    assert abs(first_loss("w") - first_loss("plain")) > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_amp_paths(precision, fmnist_small_root, tmp_path):
    """On a GPU: autocast fp16 with a working GradScaler (state saved) or bf16, channels_last, fast path."""
    result = train.main(
        parse_cli(
            [
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                precision,
                "--device",
                "cuda",
                "--precision",
                precision,
                "--channels-last",
                "on",
                "--data.fast-path",
                "--epochs",
                "2",
                "--data.batch-size",
                "16",
                *FAST,
            ]
        )
    )
    saved = load_checkpoint(tmp_path / precision)
    assert result["step"] == 12 and bool(saved["scaler"]) == (precision == "fp16")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_select_metric_keep_best_and_early_stopping(fmnist_small_root, tmp_path):
    common = [
        "--data.root",
        str(fmnist_small_root),
        "--out-dir",
        str(tmp_path),
        "--data.batch-size",
        "16",
        "--data.num-workers",
        "0",
        "--data.no-scan-images",
        *FAST,
    ]
    train.main(
        parse_cli(
            [*common, "--name", "k", "--epochs", "4", "--select-metric", "macro_f1", "--keep-best", "2"]
        )
    )
    records = [json.loads(x) for x in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val"]["macro_f1"] for r in records]
    best_epoch = max(range(4), key=lambda e: (scores[e], -e))
    assert load_checkpoint(tmp_path / "k" / "checkpoints" / "best.pt")["best"]["epoch"] == best_epoch
    top2 = sorted(range(4), key=lambda e: (-scores[e], e))[:2]
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("epoch-*.pt")) == [
        f"epoch-{e:03d}.pt" for e in sorted(top2)
    ]
    for r in records:  # balanced accuracy: the mean recall over classes (every class has val images here)
        recalls = r["val"]["per_class_acc"]
        assert abs(r["val"]["balanced_accuracy"] - sum(recalls) / len(recalls)) < 1e-6
    # best.pt and epoch-NNN.pt are for evaluation and export: no optimizer state, and no resuming from them.
    checkpoints = tmp_path / "k" / "checkpoints"
    for path in [checkpoints / "best.pt", *checkpoints.glob("epoch-*.pt")]:
        state = load_checkpoint(path)
        assert "optimizer" not in state and "scaler" not in state and state["ema"] is not None
    assert "optimizer" in load_checkpoint(checkpoints / "last.pt")
    with pytest.raises(SystemExit, match="best.pt holds no optimizer, scaler, train_metrics state"):
        train.main(parse_cli(["--resume", str(checkpoints / "best.pt")]))

    # With an LR of ~0 only the BatchNorm statistics move, so val top-1 soon stops improving. Replay the
    # rule on the recorded values: the run must end exactly at the first epoch that breaks the patience.
    result = train.main(
        parse_cli(
            [
                *common,
                "--name",
                "es",
                "--epochs",
                "6",
                "--optim.lr",
                "1e-12",
                "--early-stop-patience",
                "1",
                "--ema-half-life-epochs",
                "None",
            ]
        )
    )
    values = [
        json.loads(x)["val"]["top1"] for x in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()
    ]
    best_value, best_epoch, stop_epoch = float("-inf"), -1, None
    for epoch, value in enumerate(values):
        if value > best_value:
            best_value, best_epoch = value, epoch
        if epoch - best_epoch >= 1:
            stop_epoch = epoch
            break
    assert stop_epoch is not None and stop_epoch == len(values) - 1 < 5
    assert result["best"]["epoch"] == best_epoch


def test_a_preset_lr_applies_from_scratch_too_and_the_start_up_line_says_so(
    fmnist_small_root, tmp_path, capsys
):
    """The jersey preset sets its LR (4e-4, from the LR finder on bench/fine_tune.py), so it also applies
    with --pretrained None, where the trainer's own default would be 1e-3: the start-up line must say the
    preset set it, or a user could not tell why their from-scratch run crawls."""
    train.main(
        parse_cli(
            [
                "--preset",
                "jersey",
                "--pretrained",
                "None",
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--name",
                "j",
                "--epochs",
                "1",
                "--data.max-train-batches",
                "1",
                "--data.batch-size",
                "8",
                "--data.num-workers",
                "0",
                *FAST,
            ]
        )
    )
    assert json.loads((tmp_path / "j" / "config.json").read_text())["derived"]["peak_lr"] == 4e-4
    assert "peak lr 4.0e-04 (--optim.lr or the preset)" in capsys.readouterr().out


def test_step_log_rate_covers_every_image_since_the_last_log_line(
    fmnist_small_root, tmp_path, monkeypatch, capsys
):
    """img/s is the images of all steps since the previous log line over the time since then. With a
    clock that advances one second per reading, and the loop reading it where a window starts and where
    it ends, each window lasts one second, so the figure is the image count: 4 steps x 8 images."""
    from types import SimpleNamespace

    readings = iter(range(10**6))
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: float(next(readings))))
    train.main(
        parse_cli(
            [
                "--data.root",
                str(fmnist_small_root),
                "--out-dir",
                str(tmp_path),
                "--epochs",
                "1",
                "--data.max-train-batches",
                "8",
                "--data.batch-size",
                "8",
                "--data.num-workers",
                "0",
                *FAST,
                "--log-every-steps",
                "4",
            ]
        )
    )
    rates = re.findall(r"step \d+/8 \| .* \| (\d+) img/s", capsys.readouterr().out)
    assert rates == ["32", "32"]
