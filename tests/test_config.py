"""Config: JSON round trip, presets, resume base, --help."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_script

from classifier.config import DataConfig, OptimConfig, TrainConfig, from_dict, parse_cli, to_dict


def test_round_trip_restores_paths_tuples_and_nesting():
    cfg = TrainConfig(
        model="resnet50",
        resume=Path("runs/x"),
        data=DataConfig(root=Path("/d"), crop_scale=(0.5, 1.0)),
        optim=OptimConfig(lr=3e-4, betas=(0.8, 0.99)),
    )
    raw = to_dict(cfg)
    assert raw["data"]["root"] == "/d" and raw["data"]["crop_scale"] == [0.5, 1.0]
    back = from_dict(raw)
    assert back == cfg
    assert isinstance(back.data.root, Path) and isinstance(back.optim.betas, tuple)


def test_unknown_key_is_an_error_naming_it():
    raw = to_dict(TrainConfig())
    raw["data"]["rooot"] = "x"
    with pytest.raises(ValueError, match="rooot"):
        from_dict(raw)


def test_plain_flags_without_a_preset():
    cfg = parse_cli(["--model", "resnet50", "--data.root", "/some/dir", "--optim.lr", "0.01"])
    assert cfg.model == "resnet50" and cfg.data.root == Path("/some/dir") and cfg.optim.lr == 0.01
    assert cfg.epochs == TrainConfig().epochs  # untouched fields keep their defaults


def test_preset_is_the_base_and_flags_override_it():
    cfg = parse_cli(["--preset", "jersey", "--epochs", "3", "--data.root", "/j"])
    assert cfg.preset == "jersey" and cfg.epochs == 3 and cfg.data.root == Path("/j")
    assert cfg.data.hflip is False and cfg.data.weighted_sampler is True  # from the preset


def test_unknown_preset_names_the_choices():
    with pytest.raises(SystemExit, match="fashion-mnist"):
        parse_cli(["--preset", "nope"])


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_cli(["--model", "resnet9000"])
    assert "resnet9000" in capsys.readouterr().err


def test_help_lists_every_option_with_its_doc(repo_root):
    proc = run_script(["train.py", "--help"], cwd=repo_root, env={"COLUMNS": "200"})
    assert proc.returncode == 0
    import dataclasses

    for prefix, cls in (("", TrainConfig), ("data.", DataConfig), ("optim.", OptimConfig)):
        for f in dataclasses.fields(cls):
            if f.name in ("data", "optim"):
                continue
            flag = "--" + prefix + f.name.replace("_", "-")
            assert flag in proc.stdout, f"{flag} missing from --help"
    assert "ImageFolder root holding" in proc.stdout  # a field docstring became help text
