"""What a run records: TensorBoard scalars and images, metrics.jsonl (one line per epoch), config.json.

Only rank 0 writes. Other ranks get a NullLog whose methods do nothing, so the loop never branches on
"am I the logging rank" (the no-op logger idea from nanochat).
"""

from __future__ import annotations

import json
import math
import subprocess
from importlib import metadata
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}{name}", value, step)

    def figure(self, tag: str, figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step)

    def epoch(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.writer.flush()

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    def close(self) -> None:
        self.writer.close()


class NullLog:
    """Stands in for RunLog on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def environment() -> dict:
    """Package versions and the git commit, recorded in config.json so a run can be reproduced."""
    packages = ["torch", "torchvision", "torchmetrics", "tyro", "numpy", "onnx", "onnxruntime"]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}
