"""Checkpoints: the full training state as one plain dict, written atomically, read weights-only.

A checkpoint holds everything a resume needs (model, EMA, optimizer, scaler, the loop's TrainState,
RNG states, metric sums) plus everything inference needs (classes in training order, preprocessing,
model name). It is plain data: `torch.load(weights_only=True)` reads it, and a file that would run code
is refused. `make_state` builds it and `restore` reads it back into the live objects; the architecture
is rebuilt by models.model_from_checkpoint.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from classifier.files import atomic_write

FORMAT = "classifier-training/1"


@dataclass
class TrainState:
    """What the training loop changes as it runs, and a resume puts back. The loop mutates it in place
    (`state.step += 1`), so every read of it is visible at the call site."""

    best: dict  # selection.update_best's record: {"metric", "value", "epoch", "kept"}
    weights: str  # 'ema' or 'raw': which weights the last validation preferred
    drawn: torch.Tensor  # images per class the sampler delivered so far this epoch (CPU, int64)
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch being trained
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained
    val: dict | None = None  # the last validation's metrics
    skipped_nonfinite: int = 0  # --nonfinite-loss skip: batches left out
    scaler_skipped: int = 0  # fp16: optimizer steps the GradScaler skipped on overflowing gradients


def make_state(
    state: TrainState,
    *,
    drawn: torch.Tensor,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_metrics: dict,
    run_facts: dict,
    device: torch.device,
) -> dict:
    """The checkpoint: the weights, every optimizer-side state, the loop's TrainState (with `drawn`
    summed over ranks) and the RNG states; `run_facts` (config, classes, preprocessing, ...) as given.
    Plain data, loadable with weights_only=True."""
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "train_metrics": {name: metric.state_dict() for name, metric in train_metrics.items()},
        "step": state.step,
        "epoch": state.epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "best": state.best,
        "weights": state.weights,
        "val_metrics": state.val,
        "drawn": drawn,
        "skipped_nonfinite": state.skipped_nonfinite,
        "scaler_skipped": state.scaler_skipped,
        "rng": rng_state(device),
        **run_facts,
    }


def restore(
    resumed: dict,
    *,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    train_metrics: dict,
    holds_drawn: bool,
) -> TrainState:
    """Load a checkpoint into the live objects and the RNGs; return the loop's state. `holds_drawn`: this
    rank carries on the saved per-class counts (rank 0 saved all ranks' sum; the others start at 0)."""
    model.load_state_dict(resumed["model"])
    if ema is not None:
        ema.load_state_dict(resumed["ema"])
    optimizer.load_state_dict(resumed["optimizer"])
    if scaler.is_enabled() and resumed["scaler"]:  # a disabled scaler saved {} (e.g. a CPU run)
        scaler.load_state_dict(resumed["scaler"])
    for name, metric in train_metrics.items():
        metric.load_state_dict(resumed["train_metrics"][name])
    restore_rng(resumed["rng"])
    mid_epoch = resumed["batches_in_epoch"] > 0
    return TrainState(
        best=resumed["best"],
        weights=resumed["weights"],
        drawn=resumed["drawn"].clone() if mid_epoch and holds_drawn else torch.zeros_like(resumed["drawn"]),
        step=resumed["step"],
        epoch=resumed["epoch"],
        batches_in_epoch=resumed["batches_in_epoch"],
        val=resumed["val_metrics"],
        # Skip counts a checkpoint does not carry start at 0: a resume must not fail on a counter.
        skipped_nonfinite=resumed.get("skipped_nonfinite", 0),
        scaler_skipped=resumed.get("scaler_skipped", 0),
    )


def previous_of(path: Path) -> Path:
    """checkpoints/last.pt -> checkpoints/last.prev.pt: the checkpoint that `path` replaced."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path: Path, keep_previous: bool = True) -> None:
    """`keep_previous=False` when rewriting a checkpoint with the same weights (e.g. adding the fitted
    temperature): the kept previous file must stay the older save, not a copy of this one."""
    path = Path(path)
    previous = previous_of(path) if keep_previous else None
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp), keep_previous=previous)


# Only a resume needs these: with AdamW they are twice the model's size. best.pt and epoch-NNN.pt, which
# are for evaluation and export, leave them out.
RESUME_ONLY = ("optimizer", "scaler", "train_metrics")


def save_epoch(
    run_dir: Path,
    state: dict,
    epoch: int,
    *,
    keep: bool,
    drop: list[int],
    best_weights: dict[str, torch.Tensor] | None,
    best_metadata: dict,
) -> None:
    """An epoch's files: last.pt always (the full state); checkpoints/epoch-NNN.pt when the epoch is
    among the best k, deleted once it drops out (`drop`); on a new best (`best_weights` given), best.pt
    and best.safetensors (the inference weights, `best_metadata` attached). epoch-NNN.pt and best.pt
    hold everything but the RESUME_ONLY state."""
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    without_resume_state = {k: v for k, v in state.items() if k not in RESUME_ONLY}
    if keep:
        epoch_path = run_dir / "checkpoints" / f"epoch-{epoch:03d}.pt"
        save_checkpoint(without_resume_state, epoch_path, keep_previous=False)
    for e in drop:
        (run_dir / "checkpoints" / f"epoch-{e:03d}.pt").unlink(missing_ok=True)
    if best_weights is not None:
        save_checkpoint(without_resume_state, run_dir / "checkpoints" / "best.pt", keep_previous=False)
        save_safetensors(best_weights, run_dir / "best.safetensors", best_metadata)


def add_to_best(run_dir: Path, best: dict, fields: dict, weights_metadata: dict) -> None:
    """Rewrite best.pt (`best`, its state as read) with `fields` added, last.pt too when it is the same
    save (same epoch and step), and add `weights_metadata` to best.safetensors' metadata. For what is
    fitted after training on best.pt's weights (the temperature, the abstain thresholds). The weights are
    unchanged, so keep_previous=False: last.prev.pt must stay the save before, the one a corrupt last.pt
    falls back to."""
    checkpoints = Path(run_dir) / "checkpoints"
    save_checkpoint({**best, **fields}, checkpoints / "best.pt", keep_previous=False)
    if (checkpoints / "last.pt").is_file():
        last = read_checkpoint(checkpoints / "last.pt")
        if all(last.get(k) == best.get(k) for k in ("epoch", "batches_in_epoch", "step")):
            save_checkpoint({**last, **fields}, checkpoints / "last.pt", keep_previous=False)
    weights = Path(run_dir) / "best.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
        save_safetensors(load_file(weights), weights, {**metadata, **weights_metadata})


def find_checkpoint(path: Path) -> Path:
    """A run directory means its checkpoints/last.pt (or last.prev.pt when a crash fell between the two
    renames of a save); a file means itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
        if not path.exists() and previous_of(path).is_file():
            path = previous_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def has_checkpoint(run_dir: Path) -> bool:
    last = Path(run_dir) / "checkpoints" / "last.pt"
    return last.is_file() or previous_of(last).is_file()


def read_checkpoint(path: Path) -> dict:
    """Read one checkpoint file on the CPU, weights-only (no code runs), with errors naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot load checkpoint {path}: it is corrupt, truncated or not plain data ({err})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a classifier-training checkpoint (format {FORMAT!r})")
    return state


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint (a file, or a run directory's last one). When it is unreadable and the one it
    replaced is still there (last.prev.pt), say so on stderr and fall back to that one. The file actually
    read is in the returned dict's "loaded_from", for whatever records where the weights came from."""
    path = find_checkpoint(path)
    try:
        state = read_checkpoint(path)
    except ValueError as err:
        previous = previous_of(path)
        if not previous.is_file():
            raise
        print(f"warning: {err}\nwarning: falling back to the previous checkpoint {previous}", file=sys.stderr)
        state, path = read_checkpoint(previous), previous
    state["loaded_from"] = str(path.resolve())
    return state


def inference_weights(checkpoint: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The weights the last validation preferred, as the checkpoint records them ('ema' or 'raw'), with
    which they are. The EMA's are stored inside AveragedModel's state, under "module."."""
    which = checkpoint["weights"]
    if which == "ema":
        prefix = "module."
        ema = checkpoint["ema"]
        return {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}, "ema"
    return checkpoint["model"], "raw"


# --- RNG state --------------------------------------------------------------------------------------


def rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy and torch generator states as plain data; with a CUDA `device`, every CUDA
    device's generator too (a CPU run does not depend on them, so it does not save them)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device is not None and device.type == "cuda" else [],
    }


def cuda_devices_here() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and len(state["cuda"]) == cuda_devices_here():  # else refused or accepted (above)
        torch.cuda.set_rng_state_all(state["cuda"])


# --- what inference consumers read ------------------------------------------------------------------


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """Weights only, with string metadata (safetensors allows str -> str). channels_last tensors must be
    made contiguous first, and shared storage cloned, or save_file refuses them."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def nonfinite_tensors(*state_dicts: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, across `state_dicts`. One host sync."""
    named = [(name, t) for sd in state_dicts for name, t in sd.items() if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
