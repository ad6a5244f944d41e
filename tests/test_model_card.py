"""classifier/model_card.py: its counts against independent ones (numel sums, a hand count per layer,
torchvision's published figures), the card an export writes against the files and checkpoint it
describes, and the parameters/FLOPs train.py prints at start."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import NO_DATA_REPORTS, TINY_RUN
from safetensors.torch import load_file
from test_export import tiny_fmnist_export, tiny_fmnist_run
from torch import nn

from classifier import checkpoint as ckpt
from classifier import model_card, models
from classifier.inference import read_safetensors

# BatchNorm's buffers: what a state dict (and so a .safetensors file) holds besides the parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def tiny_export(fmnist_small_root, tmp_path_factory) -> tuple[Path, Path]:
    """(the memoized tiny run's export folder, the best.pt it was exported from)."""
    base = tmp_path_factory.getbasetemp()
    run_dir = tiny_fmnist_run(fmnist_small_root, base)
    out, _ = tiny_fmnist_export(run_dir, base)
    return out, run_dir / "checkpoints" / "best.pt"


def parameters_in_state_dict(state_dict: dict[str, torch.Tensor]) -> int:
    """Elements of a state dict's tensors that are not BatchNorm buffers: an independent parameter count."""
    return sum(t.numel() for name, t in state_dict.items() if not name.endswith(BUFFER_SUFFIXES))


# --- counts against independent ones -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "small_resnet"])
def test_parameters_equal_the_numel_sum(name):
    model = models.build_model(name, 10)
    expected = sum(p.numel() for p in model.parameters())
    assert model_card.count_parameters(model) == expected == parameters_in_state_dict(model.state_dict())
    for p in model.parameters():  # frozen parameters are still the model's
        p.requires_grad_(False)
    assert model_card.count_parameters(model) == expected


def test_resnet18_matches_torchvisions_published_figures():
    """torchvision's table for resnet18 (IMAGENET1K_V1): 11,689,512 parameters, 1.81 "GFLOPS", which
    torchvision counts as multiply-adds at 224x224."""
    model = models.build_model("resnet18", 1000)
    assert model_card.count_parameters(model) == 11_689_512
    macs = model_card.count_flops(model, 224) / 2
    assert macs == pytest.approx(1.81e9, rel=0.01)


def conv_flops(conv: nn.Conv2d, h_out: int, w_out: int) -> int:
    """2 FLOPs per multiply-add: each output element takes Cin/groups * kh * kw of them."""
    kh, kw = conv.kernel_size
    return 2 * conv.out_channels * h_out * w_out * (conv.in_channels // conv.groups) * kh * kw


@pytest.mark.parametrize(
    "conv, side, out_hw",
    [
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), 17, (9, 9)),  # (17 + 2 - 3) // 2 + 1
        (nn.Conv2d(3, 6, (3, 5), groups=3, bias=False), 12, (10, 8)),  # grouped, not square
        (nn.Conv2d(3, 4, 1), 5, (5, 5)),
    ],
)
def test_flops_of_a_conv_by_hand(conv, side, out_hw):
    assert model_card.count_flops(conv, side) == conv_flops(conv, *out_hw)


def test_flops_of_a_linear_and_a_two_layer_model_by_hand():
    linear = nn.Linear(3 * 5 * 5, 7)
    assert model_card.count_flops(nn.Sequential(nn.Flatten(), linear), 5) == 2 * 75 * 7
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 9x9 out of 17x17
    head = nn.Linear(4 * 9 * 9, 7)
    two_layers = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), head)
    assert model_card.count_flops(two_layers, 17) == conv_flops(conv, 9, 9) + 2 * head.in_features * 7


def test_counting_flops_leaves_the_model_and_the_rng_alone():
    model = models.build_model("small_resnet", 10).train()  # BatchNorm would update its statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model_card.count_flops(model, 28)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- the card an export writes -----------------------------------------------------------------------


def lscpu_model_name() -> str:
    """The CPU's name as lscpu prints it, or /proc/cpuinfo's when lscpu is not installed."""
    if shutil.which("lscpu"):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    pytest.skip("no CPU model name on this machine")


def test_the_export_card_describes_its_files(tiny_export):
    out, best_path = tiny_export
    card = json.loads((out / "model_card.json").read_text())
    tensors = load_file(out / "model.safetensors")
    assert card["parameters"] == parameters_in_state_dict(tensors)
    assert card["buffer_elements"] == sum(
        t.numel() for n, t in tensors.items() if n.endswith(BUFFER_SUFFIXES)
    )
    assert card["macs_per_image"] * 2 == card["flops_per_image"] > 0
    assert card["file_bytes"] == {name: (out / name).stat().st_size for name in card["file_bytes"]}
    assert set(card["file_bytes"]) >= {"model.onnx", "model.safetensors"}

    for batch_size in ("1", "32"):
        row = card["latency"]["model.onnx"]["batch"][batch_size]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["runs"] >= model_card.MIN_RUNS
        assert row["images_per_s"] == pytest.approx(int(batch_size) / row["median_ms"] * 1e3)
    assert card["latency_machine"]["cpu"] == lscpu_model_name()
    assert set(card["latency_machine"]["cpu_flags"]) == set(model_card.SPEED_FLAGS)

    best = ckpt.read_checkpoint(best_path)
    assert card["validation"]["metrics"] == {k: v for k, v in best["val_metrics"].items() if k != "confusion"}
    assert card["validation"]["epoch"] == best["best"]["epoch"]
    assert card["weights"] == card["validation"]["weights"] == best["weights"]
    assert card["trained_on"]["files_sha256"] == best["dataset"]["files_sha256"]
    assert card["trained_on"]["class_counts"] == best["dataset"]["counts"]
    assert card["temperature"] == best["temperature"]
    assert card["abstain_thresholds"] == best["abstain_thresholds"]

    page = (out / "MODEL_CARD.md").read_text()
    for fact in (
        f"{card['parameters']:,}",
        card["latency_machine"]["cpu"],
        best["dataset"]["files_sha256"],
        f"{best['val_metrics']['top1']:.4f}",
        f"{best['temperature']:.4f}",
    ):
        assert fact in page


def test_a_safetensors_source_says_what_it_does_not_record(tiny_export, tmp_path):
    """model.safetensors carries no data fingerprint and no validation metrics: null, and a note naming the
    file, never numbers from elsewhere. latency_repeats 0 measures nothing and says so."""
    out, _ = tiny_export
    for name in ("model.onnx", "model.safetensors"):
        (tmp_path / name).symlink_to(out / name)
    model, _ = read_safetensors(out / "model.safetensors")
    sidecar = json.loads((out / "labels_mapping.json").read_text())
    card = model_card.write_model_card(tmp_path, model, sidecar, out / "model.safetensors", latency_repeats=0)
    assert card["trained_on"] is None and card["validation"] is None and card["latency"] is None
    assert card["trained_on_note"] == card["validation_note"] == "not recorded in model.safetensors"
    page = (tmp_path / "MODEL_CARD.md").read_text()
    assert "not recorded in model.safetensors" in page and "not measured" in page
    assert json.loads((tmp_path / "model_card.json").read_text()) == card
    with pytest.raises(ValueError, match="--latency-repeats -1"):
        model_card.write_model_card(tmp_path, model, sidecar, out / "model.safetensors", latency_repeats=-1)


def test_a_mid_epoch_checkpoint_has_no_validation_of_its_weights(tiny_export, tmp_path):
    _, best_path = tiny_export
    state = ckpt.read_checkpoint(best_path)
    ckpt.save_checkpoint({**state, "batches_in_epoch": 3}, tmp_path / "last.pt", keep_previous=False)
    facts = model_card.recorded_facts(tmp_path / "last.pt")
    assert facts["validation"] is None and "mid-epoch" in facts["validation_note"]
    assert facts["trained_on"]["files_sha256"] == state["dataset"]["files_sha256"]


# --- train.py's start-up line ------------------------------------------------------------------------


class StopAfterStartUp(Exception):
    """Raised where the run would show its first batch, right after the start-up line: the epochs, the
    plots and the calibration are not under test here and cost most of a tiny run."""


def test_training_prints_parameters_and_flops(fmnist_small_root, tmp_path, monkeypatch, capsys):
    import train
    from classifier.cli import parse_cli

    def stop(*args, **kwargs):
        raise StopAfterStartUp

    monkeypatch.setattr(train.data, "peek_batch", stop)
    args = [*TINY_RUN, *NO_DATA_REPORTS, "--data.root", str(fmnist_small_root), "--out-dir", str(tmp_path)]
    with pytest.raises(StopAfterStartUp):
        train.main(parse_cli(args))
    found = re.search(r"\| small_resnet \((\S+) params, (\S+) GFLOPs at 28x28\) \|", capsys.readouterr().out)
    assert found, "no parameters/FLOPs on the run line"
    model = models.build_model("small_resnet", 10)
    assert found[1] == model_card.short_number(sum(p.numel() for p in model.parameters()))
    assert float(found[2]) == pytest.approx(model_card.count_flops(model, 28) / 1e9, rel=1e-2)
