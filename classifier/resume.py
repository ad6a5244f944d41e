"""May this checkpoint be resumed, here, with these flags, on these files? The checks a resume passes.

A resume must continue the interrupted run exactly, or refuse with a message naming what differs and the
way past it (`--accept-config-changes`). What a checkpoint holds and how it is read is checkpoint.py's;
train.py calls these right after reading one.
"""

from __future__ import annotations

from pathlib import Path

from classifier.checkpoint import RESUME_ONLY, cuda_devices_here
from classifier.config import TrainConfig, to_dict


def check_resumable(checkpoint: dict, path: Path) -> None:
    """Refuse a checkpoint saved without the optimizer-side state (best.pt, epoch-NNN.pt): a run cannot
    continue from it."""
    missing = [key for key in RESUME_ONLY if key not in checkpoint]
    if missing:
        raise SystemExit(
            f"error: {path} holds no {', '.join(missing)} state: best.pt and epoch-NNN.pt are for "
            "evaluate.py and export.py; resume from the run directory (its last.pt)"
        )


def check_resumed_precision(checkpoint: dict, precision: str, accept_changes: bool) -> None:
    """Refuse to resume in another precision than the run trained in (a different 'auto' on another
    kind of machine, say): the continuation would not be the run that was interrupted. Checkpoints that
    do not record it are taken as they are."""
    trained = checkpoint.get("precision")
    if trained is None or trained == precision or accept_changes:
        return
    raise SystemExit(
        f"error: this run trained in {trained} and would continue in {precision} here; pass "
        f"--accept-config-changes to continue in {precision}, with --precision {trained} to keep {trained}"
    )


def check_resumed_files(resumed: dict, fingerprint: dict, root: Path, accept_changes: bool, log) -> None:
    """Refuse to resume on other files than the run trained on, unless --accept-config-changes: the
    samplers index the file list, so on other files the same positions are other images. `fingerprint`
    is data.fingerprint of the files found now."""
    if resumed["dataset"] == fingerprint:
        return
    changed = (
        f"the files under {root} changed since the checkpoint was written (counts were "
        f"{resumed['dataset']['counts']}, now {fingerprint['counts']})"
    )
    if not accept_changes:
        raise SystemExit(
            f"error: {changed}; resumed on them, the run would not continue the interrupted one exactly. "
            "Pass --accept-config-changes to continue on the new files."
        )
    log(f"warning: {changed}; continuing on the new files (--accept-config-changes)")


def check_resumed_rng(checkpoint: dict, accept_changes: bool) -> None:
    """The CUDA generators' states can be restored only onto as many CUDA devices as saved them. Refuse a
    resume that would go on with fresh CUDA streams (another GPU count, or none): it would not repeat the
    interrupted run. With `accept_changes`, go on; restore_rng then leaves the CUDA generators alone."""
    saved, here = len(checkpoint["rng"]["cuda"]), cuda_devices_here()
    if saved == 0 or saved == here or accept_changes:
        return
    raise SystemExit(
        f"error: this run saved the random state of {saved} CUDA devices and this machine has {here}; "
        "resumed here, it would not continue the interrupted run exactly. Pass --accept-config-changes "
        "to continue anyway (the CUDA random state is then not restored)."
    )


# Fields a resumed run may change without --accept-config-changes: they do not change the results.
HARMLESS_ON_RESUME = {
    "resume",
    "accept_config_changes",
    "early_stop_patience",
    "keep_best",
    "progress",
    "log_every_steps",
    "log",
    "tracking.wandb_project",
    "tracking.mlflow_uri",
    "tracking.mlflow_experiment",
    "checkpoint_every_steps",
    "data.num_workers",
    "data.cache_dir",
    "debug_overfit_failure",
    "label_issues",
    "data.audit",
    "data.audit_threshold",
    "data.strict_groups",
}


def config_differences(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """'field: saved -> now' for every field that differs, nested fields as data.xxx; the fields in
    HARMLESS_ON_RESUME are left out."""

    def flat(values: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in values.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = flat(to_dict(saved)), flat(to_dict(now))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in HARMLESS_ON_RESUME]
