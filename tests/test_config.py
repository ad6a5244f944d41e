"""Config: JSON round trip, presets and the values each documents, resume base, --help, the demo flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import run_script

from classifier.cli import parse_cli
from classifier.config import DataConfig, OptimConfig, TrainConfig, from_dict, to_dict
from classifier.models import build_model, check_input_size


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


def test_fashion_mnist_preset_is_the_documented_recipe():
    """configs/fashion_mnist.py and README "A recipe on the clock": small_resnet from scratch at native
    28 px for 8 epochs, Fashion-MNIST statistics, mild crops and flips, no RandAugment, erasing or mixing,
    AdamW 2e-3 with 0.3 warmup epochs and cosine decay, label smoothing 0.1, EMA half-life 0.25 epochs,
    5% held out (57,000 train / 3,000 val), the fast path. Catches an edit of the preset that the docs
    (or the benchmark figures measured with it) no longer describe."""
    cfg = parse_cli(["--preset", "fashion-mnist"])
    assert cfg.preset == "fashion-mnist"
    assert (cfg.model, cfg.pretrained, cfg.epochs) == ("small_resnet", None, 8)
    # Native 28 px: no resize before the crop, so nothing is interpolated at evaluation.
    assert (cfg.data.image_size, cfg.data.resize_size) == (28, 28)
    # Grayscale copied to three channels: one statistic per channel, and not ImageNet's.
    assert cfg.data.mean == (0.286,) * 3 and cfg.data.std == (0.353,) * 3
    assert cfg.data.crop_scale == (0.7, 1.0) and cfg.data.hflip is True  # "70-100% of the area", flips
    assert (cfg.data.auto_augment, cfg.data.random_erasing) == ("none", 0.0)
    assert (cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha) == (0.0, 0.0)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.warmup_epochs, o.schedule) == ("adamw", 2e-3, 0.3, "cosine")
    assert o.label_smoothing == 0.1
    assert cfg.ema_half_life_epochs == 0.25
    assert cfg.data.val_fraction == 0.05 and round(60_000 * cfg.data.val_fraction) == 3_000
    assert cfg.data.fast_path is True
    # Precision and channels_last are left to the hardware ('auto'): README's "bf16, channels_last" is what
    # auto picked on the AMX machine it was measured on, not a fixed choice of the preset.
    assert (cfg.precision, cfg.channels_last) == ("auto", "auto")


def test_fashion_mnist_preset_flags_override_single_fields_only():
    """A flag replaces one field of a nested config; its siblings keep the preset's values (not
    TrainConfig's defaults). Catches a parser that rebuilds data/optim from the defaults when one of
    their fields is given."""
    flags = ["--epochs", "1", "--data.no-fast-path", "--optim.lr", "1e-3", "--data.root", "/f"]
    cfg = parse_cli(["--preset", "fashion-mnist", *flags])
    assert (cfg.epochs, cfg.data.fast_path, cfg.optim.lr, cfg.data.root) == (1, False, 1e-3, Path("/f"))
    # Untouched siblings in the same nested configs, each different from TrainConfig's default.
    assert cfg.data.image_size == 28 and cfg.data.mean == (0.286,) * 3 and cfg.data.val_fraction == 0.05
    assert cfg.optim.warmup_epochs == 0.3 and cfg.model == "small_resnet" and cfg.ema_half_life_epochs == 0.25
    defaults = TrainConfig()
    assert defaults.data.image_size != 28 and defaults.optim.warmup_epochs != 0.3  # so the checks above bite


def test_fashion_mnist_preset_image_size_suits_its_model():
    """28 px is small: the preset's model must take it (small_resnet's pools need no power of two).
    Catches a preset whose model cannot run at its image size (it would fail at start-up)."""
    cfg = parse_cli(["--preset", "fashion-mnist"])
    check_input_size(build_model(cfg.model, 10, log=lambda *_: None), cfg.data.image_size, cfg.model)


def test_jersey_preset_is_the_documented_fine_tuning_recipe():
    """README's presets table: pretrained ResNet18, 64 px stretched to the square, LR 4e-4 (from the LR
    finder), no head-first phase, no flip, mild crops, weighted sampler; no RandAugment, erasing, MixUp,
    CutMix or video degradations. Catches any of those switched back on or off."""
    cfg = parse_cli(["--preset", "jersey"])
    defaults = TrainConfig().data
    assert (cfg.model, cfg.pretrained) == ("resnet18", "DEFAULT")
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.resize_mode) == (64, 64, "stretch")
    assert (cfg.optim.lr, cfg.freeze_epochs, cfg.optim.backbone_lr_mult, cfg.optim.layer_decay) == (
        4e-4,
        0.0,
        1.0,
        1.0,
    )
    assert (cfg.data.motion_blur, cfg.data.low_resolution, cfg.data.jpeg, cfg.data.occlusion) == (0, 0, 0, 0)
    assert cfg.data.hflip is False  # digits are not mirror-symmetric
    # Mild crops: at least half the area is always kept, far from the default's 8%, and the aspect ratio
    # stays within the default's range.
    assert cfg.data.crop_scale[0] >= 0.5 > defaults.crop_scale[0] and cfg.data.crop_scale[1] == 1.0
    low, high = cfg.data.crop_ratio
    assert defaults.crop_ratio[0] <= low <= high <= defaults.crop_ratio[1]
    # Weighted sampler drawing every class equally often (alpha 1), as the preset's docstring says.
    assert cfg.data.weighted_sampler is True and cfg.data.sampler_alpha == 1.0
    assert (cfg.data.auto_augment, cfg.data.random_erasing) == ("none", 0.0)
    assert (cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha) == (0.0, 0.0)
    assert cfg.optim.optimizer == "adamw"


def test_make_demo_trains_one_epoch_of_the_preset_on_the_data_it_prepares(repo_root):
    """README: `make demo` prepares Fashion-MNIST, then trains 1 epoch of the fashion-mnist preset. The
    Makefile's DEMO_ARGS must parse to that, and the folder `make data` fills must be the preset's data
    root. Catches the two folders drifting apart (the demo would then fail on missing data) or the demo's
    epochs changing without the README."""
    makefile = (repo_root / "Makefile").read_text()
    data = re.search(r"^DATA :?= (.+)$", makefile, re.MULTILINE).group(1).strip()
    demo_args = re.search(r"^DEMO_ARGS \??= (.+)$", makefile, re.MULTILINE).group(1).strip()
    assert "$(PY) -m classifier.fashion_mnist $(DATA)" in makefile
    assert "$(PY) train.py $(DEMO_ARGS)" in makefile
    cfg = parse_cli(shlex.split(demo_args))
    assert (cfg.preset, cfg.epochs, cfg.data.root) == ("fashion-mnist", 1, Path(data))
