"""Fine-tuning: stages and LR multipliers, head-first freezing (what moves and what does not, BatchNorm
statistics, exact resume across the unfreeze), frozen BatchNorm statistics for a whole run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import NO_DATA_REPORTS, TINY_RUN

import train
from classifier import finetune, optim
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.models import build_model


class Interrupt(Exception):
    """Raised inside a run to simulate a crash."""


def test_resnet_stages_and_layer_wise_multipliers():
    model = torchvision.models.resnet18(num_classes=7)
    names = [name for name, _ in finetune.stages(model)]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    groups = optim.param_groups(model, 0.05, backbone_lr_mult=0.1, layer_decay=0.5)
    # every parameter in exactly one group; weights decay, biases and norm parameters do not
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    assert all((g["weight_decay"] > 0) == (g["params"][0].ndim > 1) for g in groups)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    optim.set_lr(optimizer, 2e-3)
    lr_of = {g["stage"]: g["lr"] for g in optimizer.param_groups}
    expected = {
        "head": 2e-3,
        "layer4": 2e-3 * 0.1 * 0.5,
        "layer3": 2e-3 * 0.1 * 0.25,
        "layer2": 2e-3 * 0.1 * 0.125,
        "layer1": 2e-3 * 0.1 * 0.0625,
        "stem": 2e-3 * 0.1 * 0.03125,
    }
    assert lr_of == pytest.approx(expected, rel=1e-12)
    assert set(lr_of) == set(expected)


def test_other_families_have_their_head_last_and_their_features_as_stages():
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    named = finetune.stages(model)
    names = [name for name, _ in named]
    assert names[0] == "features.0" and names[-2:] == ["classifier", "head"]
    assert [n for n, _ in named[-1][1]] == ["classifier.3.weight", "classifier.3.bias"]
    with pytest.raises(ValueError, match="--optim.layer-decay 1.5"):
        finetune.lr_multipliers(names, backbone_lr_mult=1.0, layer_decay=1.5)


def test_set_lr_keeps_plain_groups_at_the_scheduled_lr():
    model = build_model("small_resnet", 3)
    optimizer = optim.build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.99))
    optim.set_lr(optimizer, 0.03)
    assert {g["lr"] for g in optimizer.param_groups} == {0.03}


def test_head_first_schedule_warms_up_again_at_the_unfreeze():
    def then(step):
        return optim.lr_at(step, peak_lr=1.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.0)

    lrs = [
        optim.head_first_lr_at(step, freeze_steps=6, warmup_steps=4, peak_lr=1.0, then=then)
        for step in range(26)
    ]
    assert lrs[:6] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # the head: warmup, then the peak
    assert lrs[6:10] == [0.25, 0.5, 0.75, 1.0]  # everything: warmup again
    assert lrs[10] == 1.0 and lrs[11] < 1.0 and lrs[-1] < 0.02  # then the cosine over the remaining 20


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """mobilenet_v3_small weights saved by the test (torchvision's cannot be downloaded here): 1000
    classes, as an ImageNet file has; its BatchNorm statistics made non-trivial, so a drift shows."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.pth"
    torch.save(model.state_dict(), path)
    return path


def common_args(root, out_dir, pretrained) -> list[str]:
    return [
        *("--model", "mobilenet_v3_small", "--pretrained", str(pretrained)),
        *("--data.root", str(root), "--out-dir", str(out_dir)),
        *("--epochs", "2", "--freeze-epochs", "1", "--data.batch-size", "8"),
        *("--data.image-size", "32", "--data.resize-size", "32", "--data.num-workers", "0"),
        *("--optim.backbone-lr-mult", "0.5", "--optim.layer-decay", "0.9"),
        *("--checkpoint-every-steps", "4", "--no-progress", "--data.no-audit", "--no-label-issues"),
    ]


def test_head_first_freezes_the_backbone_then_trains_it_and_resumes_exactly(
    fmnist_small_root, tmp_path, monkeypatch, pretrained_file
):
    """Frozen epoch: backbone parameters and BatchNorm statistics stay as loaded while the head moves;
    after the unfreeze all move. A run interrupted before the unfreeze and one interrupted after it, both
    resumed, end with exactly the weights and optimizer state of the uninterrupted run."""
    common = common_args(fmnist_small_root, tmp_path, pretrained_file)
    seen = []  # per optimizer step: (backbone parameters, backbone BN statistics, head) sums
    real_set_lr = optim.set_lr

    def spying_set_lr(optimizer, lr):
        real_set_lr(optimizer, lr)
        for group in optimizer.param_groups:  # each group's LR is the schedule's times its multiplier
            assert group["lr"] == pytest.approx(lr * group["lr_mult"])
        backbone = [p for g in optimizer.param_groups if g["stage"] != "head" for p in g["params"]]
        head = [p for g in optimizer.param_groups if g["stage"] == "head" for p in g["params"]]
        bn = [m for m in spying_set_lr.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        seen.append(
            (
                sum(p.detach().double().sum().item() for p in backbone),
                sum(m.running_mean.double().sum().item() for m in bn),
                sum(p.detach().double().sum().item() for p in head),
            )
        )

    real_freeze_bn = finetune.freeze_batchnorm_stats

    def remembering_freeze_bn(model):
        spying_set_lr.model = model
        real_freeze_bn(model)

    monkeypatch.setattr(train.optim, "set_lr", spying_set_lr)
    monkeypatch.setattr(train.finetune, "freeze_batchnorm_stats", remembering_freeze_bn)
    straight = train.main(parse_cli([*common, "--name", "straight"]))
    monkeypatch.setattr(train.optim, "set_lr", real_set_lr)
    steps_per_epoch = straight["step"] // 2
    # seen[i] is taken before step i's update and after its forward: seen[:13] are the frozen steps,
    # seen[13] follows the last frozen update (and the first forward in train mode), then all train
    frozen, after = seen[:steps_per_epoch], seen[steps_per_epoch + 1 :]
    backbones = {backbone for backbone, _, _ in seen[: steps_per_epoch + 1]}
    assert len(backbones) == 1, "the backbone moved while frozen"
    assert len({bn for _, bn, _ in frozen}) == 1, "BatchNorm statistics drifted while frozen"
    assert len({head for _, _, head in frozen}) == len(frozen), "the head did not train"
    assert len({backbone for backbone, _, _ in after}) == len(after), "the backbone did not train"
    assert after[-1][1] != frozen[0][1], "BatchNorm statistics did not update after the unfreeze"

    straight_ckpt = load_checkpoint(tmp_path / "straight")
    # set_lr runs once per optimizer step: dying in call n is dying in step n - 1, before its update
    for name, die_at_call in (("cut-frozen", 7), ("cut-after", steps_per_epoch + 7)):
        calls = {"n": 0}

        def set_lr_then_die(optimizer, lr, calls=calls, die_at_call=die_at_call):
            calls["n"] += 1
            if calls["n"] == die_at_call:
                raise Interrupt
            real_set_lr(optimizer, lr)

        monkeypatch.setattr(train.optim, "set_lr", set_lr_then_die)
        with pytest.raises(Interrupt):
            train.main(parse_cli([*common, "--name", name]))
        monkeypatch.setattr(train.optim, "set_lr", real_set_lr)
        cut = load_checkpoint(tmp_path / name)
        assert (cut["step"] < steps_per_epoch) == (name == "cut-frozen")
        train.main(parse_cli(["--resume", str(tmp_path / name)]))
        resumed = load_checkpoint(tmp_path / name)
        for key in ("model", "ema"):
            different = [
                k for k in straight_ckpt[key] if not torch.equal(straight_ckpt[key][k], resumed[key][k])
            ]
            assert not different, f"{name} {key}: {different[:5]}"
        a, b = straight_ckpt["optimizer"]["state"], resumed["optimizer"]["state"]
        assert a.keys() == b.keys()
        for index, state in a.items():
            assert all(torch.equal(value, b[index][key]) for key, value in state.items())


def test_freeze_bn_stats_keeps_the_loaded_statistics_for_the_whole_run(
    fmnist_small_root, tmp_path, pretrained_file
):
    args = common_args(fmnist_small_root, tmp_path, pretrained_file)
    args[args.index("--freeze-epochs") + 1] = "0"
    result = train.main(
        parse_cli([*args, "--freeze-bn-stats", "--name", "bn", "--ema-half-life-epochs", "None"])
    )
    loaded = torch.load(pretrained_file, weights_only=True)
    trained = result["model"].state_dict()
    statistics = [k for k in loaded if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(loaded[k], trained[k]) for k in statistics)
    scales = [k for k in loaded if k.startswith("features") and k.endswith(".weight") and loaded[k].ndim == 1]
    assert any(not torch.equal(loaded[k], trained[k]) for k in scales)  # their scale and shift still train


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--freeze-epochs", "2"], "--freeze-epochs 2.0: must be at least 0 and below --epochs 2"),
        (["--pretrained", "None"], "--freeze-epochs 1.0 freezes a random backbone"),
        (["--freeze-epochs", "0.01"], "--freeze-epochs 0.01 is less than one optimizer step"),
        (["--optim.layer-decay", "0"], "--optim.layer-decay 0.0: must be in"),
        (["--data.jpeg", "1.5"], "--data.jpeg must be a probability in"),
    ],
)
def test_bad_freeze_settings_are_named(extra, message, fmnist_small_root, tmp_path, pretrained_file):
    args = [*common_args(fmnist_small_root, tmp_path, pretrained_file), *extra]
    with pytest.raises(SystemExit, match=message):
        train.main(parse_cli(args))


def test_find_lr_scans_writes_its_own_folder_and_leaves_the_run_free(fmnist_root, tmp_path):
    """The LR range test on a real small run: the loss falls, then climbs or diverges; the suggestion
    lies inside the scanned range; no checkpoint is written and the run's own name stays free."""
    args = [
        *TINY_RUN,
        *NO_DATA_REPORTS,
        *("--data.root", str(fmnist_root), "--out-dir", str(tmp_path), "--name", "run"),
        *("--data.batch-size", "32", "--optim.optimizer", "sgd"),
    ]
    found = train.main(parse_cli([*args, "--find-lr"]))
    folder = tmp_path / "run-lr-find"
    assert Path(found["run_dir"]) == folder
    assert {"lr_find.png", "lr_find.csv", "lr_find.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.rglob("*.pt")) and not (tmp_path / "run").exists()
    curve = found["curve"]
    smoothed = curve.smoothed
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    plateau = statistics.median(smoothed[:10])  # the loss at LRs too small to move the weights
    assert smoothed[lowest] < 0.85 * plateau, "the loss never fell"
    # With SGD and BatchNorm the loss at LR 10 may settle near chance (ln 10 = 2.3) instead of diverging:
    # 1.2x the lowest smoothed loss is a rise well clear of the smoothing's noise (1.27x and over 1.5x,
    # with one and two threads).
    assert curve.stopped == "diverged" or smoothed[-1] > 1.2 * smoothed[lowest], "the loss never rose"
    assert curve.lrs[0] <= found["suggested_lr"] <= curve.lrs[-1]
    assert found["suggested_lr"] < curve.lrs[lowest]  # below the LR of the lowest loss
    saved = json.loads((folder / "lr_find.json").read_text())
    assert saved["suggested_lr"] == pytest.approx(found["suggested_lr"])
    # the real run with the same name starts as if the scan had never happened
    real = train.main(
        parse_cli([*args, "--data.max-train-batches", "1", "--optim.lr", str(saved["suggested_lr"])])
    )
    assert Path(real["run_dir"]) == tmp_path / "run"
