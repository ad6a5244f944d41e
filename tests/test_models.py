"""Models: every named family builds with the right head; pretrained weights load offline only."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from test_checkpoint import RunsCode
from torch.optim.swa_utils import AveragedModel

from classifier import checkpoint as ckpt
from classifier.models import build_model, check_input_size, fold_logit_bias, head_name


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]
)
def test_named_models_get_a_head_for_the_class_count(name):
    model = build_model(name, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_small_input_stem_keeps_resolution():
    model = build_model("resnet18", 4, small_input_stem=True)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="ResNets"):
        build_model("mobilenet_v3_large", 4, small_input_stem=True)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet9000"):
        build_model("resnet9000", 3)


def imagenet_resnet18_state() -> dict:
    torch.manual_seed(123)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_from_a_file(tmp_path, suffix):
    state = imagenet_resnet18_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    model = build_model("resnet18", 5, pretrained=str(path))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 5  # head replaced after loading the 1000-class weights


def test_pretrained_default_reads_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as err:
        build_model("resnet18", 3, pretrained="DEFAULT")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(err.value) and "download" in str(err.value).lower()
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)
    expected.parent.mkdir(parents=True)
    state = imagenet_resnet18_state()
    torch.save(state, expected)
    model = build_model("resnet18", 3, pretrained="DEFAULT")
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_bad_weights_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_model("resnet18", 3, pretrained=str(garbage))
    with pytest.raises(SystemExit, match=f"--pretrained {tmp_path / 'missing.pth'}: no such file"):
        build_model("resnet18", 3, pretrained=str(tmp_path / "missing.pth"))  # a message, not a traceback
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_model("resnet18", 3, pretrained=str(wrong))


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_pretrained_from_our_checkpoint_takes_the_validated_weights(tmp_path, which):
    """A checkpoint written by train.py holds the raw model and its EMA; its "weights" says which of the two
    validation preferred, and those are the ones to start from, as evaluate and export take them."""
    model = torchvision.models.mobilenet_v3_small(num_classes=1000)
    ema = AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        for param in ema.module.parameters():
            param.add_(1.0)  # EMA weights unlike the raw ones
    path = tmp_path / "best.pt"
    ckpt.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "weights": which}, path)
    lines = []
    loaded = build_model("mobilenet_v3_small", 3, pretrained=str(path), log=lines.append)
    expected = (ema.module if which == "ema" else model).features[0][0].weight
    assert torch.equal(loaded.features[0][0].weight, expected)
    described = "EMA" if which == "ema" else "raw"
    assert lines == [f"pretrained: {described} weights of {path} (the ones validated)"]


def test_a_pretrained_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RunsCode writes ./PWNED
    legacy = tmp_path / "evil-legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"conv1.weight": RunsCode()}, f, protocol=2)
    zipped = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCode()}, zipped)  # torch's own zip format
    for path in (legacy, zipped):
        with pytest.raises(ValueError, match=f"cannot read pretrained weights {path}"):
            build_model("resnet18", 3, pretrained=str(path))
    assert not (tmp_path / "PWNED").exists()


def test_image_size_errors_say_whether_the_size_is_the_cause():
    """Too small is reported as such, with the flag; any other failure of the probe as what it is."""
    small = build_model("small_resnet", 3)  # three 2x2 max-pools: 4 px reaches 0x0
    with pytest.raises(ValueError, match="--data.image-size 4 is too small for small_resnet"):
        check_input_size(small, 4, "small_resnet")
    check_input_size(small, 8, "small_resnet")
    assert small.training  # the probe leaves the mode as it found it
    four_channels = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))  # refuses RGB at any size
    with pytest.raises(RuntimeError, match="expected input.*to have 4 channels") as err:
        check_input_size(four_channels, 16, "four_channels")
    assert "too small" not in str(err.value) and "--model four_channels" in str(err.value)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_small_resnet_takes_small_images_and_has_a_replaceable_head(size):
    model = build_model("small_resnet", 5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
    assert head_name(model) == "fc" and sum(p.numel() for p in model.parameters()) < 600_000
    bias = torch.arange(5.0)
    assert torch.equal(fold_logit_bias(model, bias)["fc.bias"], model.fc.bias.detach() + bias)


def test_small_resnet_refuses_pretrained_and_the_small_stem():
    with pytest.raises(ValueError, match="--pretrained"):
        build_model("small_resnet", 3, pretrained="DEFAULT")
    with pytest.raises(ValueError, match="small-input-stem"):
        build_model("small_resnet", 3, small_input_stem=True)


def test_stem_stride_two_halves_the_resolution_once():
    model = build_model("resnet18", 4, small_input_stem=True, stem_stride=2)
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, torch.nn.Identity)
    assert model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32))))).shape[-1] == 16
    with pytest.raises(ValueError, match="needs --small-input-stem"):
        build_model("resnet18", 4, stem_stride=2)
    with pytest.raises(ValueError, match="1 or 2"):
        build_model("resnet18", 4, small_input_stem=True, stem_stride=3)


def test_pretrained_from_another_runs_checkpoint_keeps_its_stem_and_swaps_its_head(tmp_path):
    """Fine-tuning from one of our runs: its head has that run's class count and its stem may be the small
    one. The weights are loaded into that architecture, then the head is replaced for the new classes."""
    from classifier.config import TrainConfig, to_dict

    source = build_model("resnet18", 3, small_input_stem=True, stem_stride=2)
    config = to_dict(TrainConfig(model="resnet18", small_input_stem=True, stem_stride=2))
    path = tmp_path / "best.pt"
    state = {"model": source.state_dict(), "ema": None, "weights": "raw", "config": config}
    ckpt.save_checkpoint(state, path)
    loaded = build_model(
        "resnet18",
        5,
        pretrained=str(path),
        small_input_stem=True,
        stem_stride=2,
        log=lambda line: None,
    )
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)  # the trained small stem, not a fresh one
    assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert loaded.fc.out_features == 5
    with pytest.raises(ValueError, match="trained with --small-input-stem --stem-stride 2; pass the same"):
        build_model("resnet18", 5, pretrained=str(path))
    with pytest.raises(ValueError, match="is a resnet18 checkpoint, not resnet34"):
        build_model("resnet34", 5, pretrained=str(path))
