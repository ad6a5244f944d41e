"""The run directory and what a run records in it: TensorBoard scalars and images, metrics.jsonl (one
line per epoch), config.json.

Only rank 0 writes. Other ranks get a NullLog whose methods do nothing, so the loop never branches on
"am I the logging rank" (the no-op logger idea from nanochat).
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from classifier import checkpoint
from classifier.config import TrainConfig, config_differences, from_dict, run_dir_for


def run_directory(cfg: TrainConfig, resumed: dict | None) -> Path:
    """Where this run lives. A resume continues in the run's own folder (no timestamped folders
    scattering one run), with the saved config unless --accept-config-changes; a new run never
    writes into an old one."""
    if cfg.resume is not None:
        diffs = config_differences(from_dict(resumed["config"]), cfg)
        if diffs and not cfg.accept_config_changes:
            raise SystemExit(
                f"error: flags given with --resume {cfg.resume} change the run's saved config:\n  "
                + "\n  ".join(diffs)
                + "\npass --accept-config-changes if these changes are intended"
            )
        return checkpoint.find_checkpoint(cfg.resume).parent.parent  # RUN/checkpoints/last.pt -> RUN
    run_dir = run_dir_for(cfg)
    if checkpoint.has_checkpoint(run_dir):
        raise SystemExit(
            f"error: {run_dir} already holds a run: continue it with --resume {run_dir}, "
            "or give this run another --name"
        )
    return run_dir


def check_writable(run_dir: Path) -> None:
    """Fail now, not after the first epoch, when the run directory cannot be written."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(run_dir / ".write-test", "ok")
        (run_dir / ".write-test").unlink()
    except OSError as err:
        raise SystemExit(
            f"error: cannot write to the run directory {run_dir} (check --out-dir): {err.strerror or err}"
        ) from err


class RunLog:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Numbers only; NaN and inf are written too (TensorBoard shows them), so a diverging loss is seen."""
        for name, value in values.items():
            if isinstance(value, (int, float)):
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
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=5
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}
