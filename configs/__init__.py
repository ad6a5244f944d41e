"""Named presets: each module defines `CONFIG`, a TrainConfig. `--preset NAME` makes it the base that
command-line flags override. Presets are plain Python so a reader can see every value and why."""

from __future__ import annotations

import importlib

from classifier.config import TrainConfig

# CLI name -> module in this package. A preset is an ordinary TrainConfig instance, nothing more.
PRESETS = {"fashion-mnist": "fashion_mnist", "jersey": "jersey"}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r} for --preset; choose one of {sorted(PRESETS)}")
    module = importlib.import_module(f"configs.{PRESETS[name]}")
    return module.CONFIG
