"""Shared fixtures: the repo root, small Fashion-MNIST ImageFolders, and skipping GPU tests without CUDA."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

# `from helpers import run_script` in the test files, and `import classifier` under a bare `pytest`
# (only `python -m pytest` puts the working directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from helpers import (  # noqa: E402
    NO_DATA_REPORTS,
    REPO_ROOT,
    SCORED_RUN_FLAGS,
    SCORED_RUN_TARGETS,
    TINY_RUN,
    run_script,
)

from classifier import fashion_mnist  # noqa: E402

__all__ = ["run_script"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return  # don't pay for importing torch when no test asks for a GPU
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="marked gpu and torch.cuda.is_available() is False")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def _prepared(tmp_path_factory: pytest.TempPathFactory, per_class: int, test_per_class: int) -> Path:
    # Only local files: a test run must never try the network (and CI installs the Debian package).
    if fashion_mnist.local_source() is None:
        pytest.skip(f"Fashion-MNIST IDX files not found; {fashion_mnist.HOW_TO_GET}")
    out = tmp_path_factory.mktemp(f"fmnist{per_class}") / "fmnist"
    return fashion_mnist.prepare(out, per_class=per_class, test_per_class=test_per_class)


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST ImageFolder with 60 train and 20 test images per class (train/, test/)."""
    return _prepared(tmp_path_factory, per_class=60, test_per_class=20)


@pytest.fixture(scope="session")
def fmnist_small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST ImageFolder with 12 train and 4 test images per class (train/, test/)."""
    return _prepared(tmp_path_factory, per_class=12, test_per_class=4)


@pytest.fixture(scope="session")
def scored_run(fmnist_small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small trained run whose best weights come in every form a consumer reads: best.pt (with its
    temperature and its abstain thresholds for SCORED_RUN_TARGETS), best.safetensors, and export.py's
    folder (model.onnx, labels_mapping.json). Shared by test_predict.py and test_selective.py; trained
    in this process (seconds)."""
    import export
    import train
    from classifier import calibration, plots
    from classifier.cli import parse_cli

    base = tmp_path_factory.mktemp("scored-run")
    args = [*TINY_RUN, *NO_DATA_REPORTS, *SCORED_RUN_FLAGS, "--data.root", str(fmnist_small_root)]
    with pytest.MonkeyPatch.context() as patch:
        # The per-epoch confusion matrix and curves are not under test here and cost seconds.
        patch.setattr(plots, "save_epoch_pictures", lambda *args, **kwargs: None)
        with_targets = functools.partial(calibration.calibrate_best, targets=SCORED_RUN_TARGETS)
        patch.setattr(calibration, "calibrate_best", with_targets)
        run_dir = Path(train.main(parse_cli([*args, "--out-dir", str(base), "--name", "run"]))["run_dir"])
    best = run_dir / "checkpoints" / "best.pt"
    export_dir = export.main(export.ExportArgs(best, out=base / "export", batch_size=8))
    return {
        "checkpoint": best,
        "safetensors": run_dir / "best.safetensors",
        "onnx": export_dir / "model.onnx",
        "export_dir": export_dir,
    }
