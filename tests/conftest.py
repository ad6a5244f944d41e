"""Shared fixtures: the repo root, small Fashion-MNIST ImageFolders, and skipping GPU tests without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `from helpers import run_script` in the test files, and `import classifier` under a bare `pytest`
# (only `python -m pytest` puts the working directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from helpers import REPO_ROOT, run_script  # noqa: E402

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
