"""What a run records: config.json and labels_mapping.json at the start, the class table, the step and
epoch lines on stdout, metrics.jsonl (one record per epoch), and scalars and figures for the trackers
chosen with --log (TensorBoard, W&B, MLflow: classifier/trackers.py).

Only rank 0 writes. Other ranks get a NullLog whose methods do nothing, so the loop never branches on
"am I the logging rank" (the no-op logger idea from nanochat). Where the run directory is and when it
may be reused is cli.py's; plots are plots.py's.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from classifier import plots, trackers
from classifier.card import ModelCard
from classifier.checkpoint import TrainState
from classifier.config import TrackingConfig, TrainConfig, save_json
from classifier.files import write_text


class RunLog:
    """The run's one logging object: stdout, metrics.jsonl and the trackers chosen with --log
    (classifier/trackers.py), which open in `start` once config.json is written. As a context manager it
    finishes the trackers however the run ends, marking their runs finished, killed or failed."""

    def __init__(self, run_dir: Path, tracker_names: list[str], tracking: TrackingConfig):
        self.run_dir = run_dir
        self.tracker_names = tracker_names
        self.tracking = tracking
        self.trackers = []

    def start(self, config: dict) -> None:
        self.trackers = trackers.open_trackers(self.tracker_names, self.run_dir, config, self.tracking)
        for tracker in self.trackers:
            self.print(tracker.where)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Numbers only; NaN and inf are logged too (the trackers show them), so a diverging loss is seen."""
        numbers = {f"{prefix}{name}": v for name, v in values.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.scalars(step, numbers)

    def figure(self, tag: str, figure, step: int) -> None:
        """The figure drawn once, its pixels to every tracker."""
        if self.trackers:
            pixels = plots.figure_pixels(figure)
            for tracker in self.trackers:
                tracker.image(tag, pixels, step)

    def epoch(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.flush()

    def artifacts(self, paths: dict[str, Path]) -> None:
        """The final files' paths, to every tracker."""
        for tracker in self.trackers:
            tracker.artifacts(paths)

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs, flush=True)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """Finish every tracker's run with how train() ended; the error, if any, goes on.

        Not after a KeyboardInterrupt (a second Ctrl-C, or one outside the signal handler): it can land
        inside a tracker's own code, such as TensorBoard's queue to its writer thread, and closing that
        tracker would then wait forever (seen in tests/test_reliability.py). The runs stay unfinished."""
        if isinstance(error, KeyboardInterrupt):
            if self.trackers:
                self.print("stopped at once: the trackers' runs are left unfinished")
            return
        for tracker in self.trackers:
            tracker.finish(end_status(error))


def end_status(error: BaseException | None) -> str:
    """FINISHED when train() returned; KILLED on a stop request (faults.py's SystemExit with the signal's
    exit status); FAILED on any other error, a SystemExit with an error message included."""
    if error is None:
        return "FINISHED"
    if isinstance(error, SystemExit) and (error.code is None or isinstance(error.code, int)):
        return "FINISHED" if not error.code else "KILLED"
    return "FAILED"


class NullLog(RunLog):
    """Stands in for RunLog on ranks other than 0: the same methods, each doing nothing. Written out, so
    a misspelt method fails on every rank alike and "go to definition" finds these."""

    def __init__(self) -> None:
        pass

    def start(self, config: dict) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        pass

    def figure(self, tag: str, figure, step: int) -> None:
        pass

    def epoch(self, record: dict) -> None:
        pass

    def artifacts(self, paths: dict[str, Path]) -> None:
        pass

    def print(self, *args, **kwargs) -> None:
        pass

    def __exit__(self, error_type, error, traceback) -> None:
        pass


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


def record_start(run_dir: Path, cfg: TrainConfig, card: ModelCard, **facts) -> dict:
    """config.json (the config, then `facts`: derived numbers, resolved 'auto' choices, machine, data
    fingerprint, package versions and git commit) and labels_mapping.json (the card so far). Returns
    config.json's content, which the trackers get as their run's config."""
    config = save_json(cfg, run_dir / "config.json", **facts, **environment())
    write_text(run_dir / "labels_mapping.json", json.dumps(card.to_mapping(), indent=2) + "\n")
    return config


def step_line(state: TrainState, total_steps: int, loss: float, lr: float, images_per_s: float) -> str:
    """'step 40/400 | epoch 0 | loss 0.5123 | lr 1.00e-02 | 812 img/s', then any skip counts."""
    parts = [
        f"step {state.step}/{total_steps}",
        f"epoch {state.epoch}",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
        f"{images_per_s:.0f} img/s",
    ]
    if state.skipped_nonfinite:
        parts.append(f"{state.skipped_nonfinite} non-finite batches skipped")
    if state.scaler_skipped:
        parts.append(f"{state.scaler_skipped} steps skipped by the fp16 GradScaler")
    return " | ".join(parts)


def step_scalars(state: TrainState, loss: float, lr: float, images_per_s: float) -> dict[str, float]:
    """The TensorBoard scalars of a log step, by tag."""
    return {
        "train/loss": loss,
        "train/lr": lr,
        "train/images_per_s": images_per_s,
        "train/skipped_nonfinite": state.skipped_nonfinite,
        "train/scaler_skipped_steps": state.scaler_skipped,
    }


# The metrics each validated set of weights is compared by in metrics.jsonl.
COMPARED = ("top1", "macro_f1", "balanced_accuracy", "loss")


def epoch_record(state: TrainState, lr: float, train: dict, results: dict[str, dict]) -> dict:
    """metrics.jsonl's line for the epoch that `state` just finished: `train` metrics, the validation of
    the weights kept (state.weights), and the headline numbers of every set of weights validated."""
    return {
        "epoch": state.epoch,
        "step": state.step,
        "lr": lr,
        "train": train,
        "val": results[state.weights],
        "weights": state.weights,
        "drawn_per_class": state.drawn.tolist(),
        "skipped_nonfinite_batches": state.skipped_nonfinite,
        "scaler_skipped_steps": state.scaler_skipped,
        "val_by_weights": {which: {k: r[k] for k in COMPARED} for which, r in results.items()},
    }


def epoch_line(record: dict, best: dict, classes: list[str], rare: list[int]) -> str:
    """One line per epoch: train and val loss/top-1, macro-F1, the other weights' score, the rare
    classes' recall and the best so far."""
    train, val, metric = record["train"], record["val"], best["metric"]
    line = (
        f"epoch {record['epoch']} | train loss {train['loss']:.4f} top1 {train['top1']:.4f}"
        f" | val loss {val['loss']:.4f} top1 {val['top1']:.4f} macro-F1 {val['macro_f1']:.4f}"
    )
    others = [w for w in record["val_by_weights"] if w != record["weights"]]
    if others:
        other_value = record["val_by_weights"][others[0]][metric]
        line += f" ({record['weights']}; {others[0]} {other_value:.4f})"
    line += rare_recall_text(val["per_class_acc"], classes, rare)
    return line + f" | best {metric} {best['value']:.4f} (epoch {best['epoch']})"


def rare_recall_text(per_class_recall: list[float], classes: list[str], rare: list[int]) -> str:
    """' | rare recall Bag 0.61, Coat 0.70' for the log line; the lowest recall when no class is rarer."""
    if rare:
        return " | rare recall " + ", ".join(f"{classes[c]} {per_class_recall[c]:.2f}" for c in rare)
    worst = min(range(len(classes)), key=lambda c: per_class_recall[c])
    return f" | min recall {classes[worst]} {per_class_recall[worst]:.2f}"


def epoch_scalars(record: dict, select_metric: str, classes: list[str], rare: list[int]) -> dict[str, float]:
    """The TensorBoard scalars of an epoch record, by tag."""
    scalars = {f"train_epoch/{name}": value for name, value in record["train"].items()}
    for name, value in record["val"].items():
        if not isinstance(value, list):  # per-class lists and the confusion matrix are not scalars
            scalars[f"val/{name}"] = value
    for which, result in record["val_by_weights"].items():
        scalars[f"val_weights/{which}_{select_metric}"] = result[select_metric]
    for c in rare:
        scalars[f"val_recall_rare/{classes[c]}"] = record["val"]["per_class_acc"][c]
    return scalars


def class_table(classes: list[str], counts: dict[str, torch.Tensor]) -> str:
    """Per-class image counts for each split, and the train split's imbalance ratio (largest/smallest)."""
    splits = [name for name, c in counts.items() if int(c.sum()) > 0]
    width = max(5, *(len(name) for name in classes))
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits)]
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}} " + " ".join(f"{int(counts[s][i]):>8}" for s in splits))
    train = counts["train"]
    ratio = train.max().item() / max(1, train[train > 0].min().item()) if int(train.sum()) else float("nan")
    lines.append(f"{len(classes)} classes, imbalance ratio (train, largest/smallest) {ratio:.1f}")
    return "\n".join(lines)


# The files a finished run's trackers point to (relative to the run directory), those that exist.
FINAL_FILES = {
    "best_checkpoint": "checkpoints/best.pt",
    "best_weights": "best.safetensors",
    "last_checkpoint": "checkpoints/last.pt",
    "labels_mapping": "labels_mapping.json",
    "config": "config.json",
    "metrics": "metrics.jsonl",
    "report": "report.html",
    "label_issues": "label_issues/label_issues.csv",
}


def final_artifacts(run_dir: Path) -> dict[str, Path]:
    """FINAL_FILES that this run wrote, as absolute paths (a tracker's page is read on other machines)."""
    paths = {name: (run_dir / relative).resolve() for name, relative in FINAL_FILES.items()}
    return {name: path for name, path in paths.items() if path.exists()}
