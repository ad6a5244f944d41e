"""Named presets: each module defines `CONFIG`, a TrainConfig. `--preset NAME` makes it the base that
command-line flags override. Presets are plain Python so a reader can see every value and why."""

from __future__ import annotations

from classifier.config import TrainConfig
from configs import fashion_mnist, jersey

# CLI name -> the preset. A preset is an ordinary TrainConfig instance, nothing more.
PRESETS = {"fashion-mnist": fashion_mnist.CONFIG, "jersey": jersey.CONFIG}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r} for --preset; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
