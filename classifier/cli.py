"""How a command line becomes a TrainConfig, and where the run it describes lives.

The precedence is: the resumed run's saved config, else a named preset, else the dataclass defaults;
flags given on the command line override whichever base that is. The run directory's rules live here
too (a resume continues in its run's folder; a new run never writes into an old one). config.py holds
only the dataclasses, resume.py what a resumed run may change; this module is the one that reads
`sys.argv`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import tyro

from classifier import checkpoint, resume
from classifier.config import TrainConfig, from_dict
from classifier.files import write_text
from configs import get_preset


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv, read before tyro parses the rest."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def run_dir_for(cfg: TrainConfig) -> Path:
    """OUT_DIR/NAME, NAME defaulting to <model>-<data root folder name>; OUT_DIR/NAME-lr-find for the LR
    range test (--find-lr), so that the real run's directory stays free."""
    name = cfg.name or f"{cfg.model}-{cfg.data.root.resolve().name}"
    return cfg.out_dir / (f"{name}-lr-find" if cfg.find_lr else name)


def parse_cli(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Parse train.py's flags. The base config is, in order of precedence: the resumed run's saved
    config (`--resume`), a named preset (`--preset`), or the dataclass defaults. Flags override the base.
    `--resume auto` becomes `--resume OUT_DIR/NAME` when that run has a checkpoint, else no resume.
    """
    argv = sys.argv[1:] if argv is None else argv
    base = TrainConfig()
    preset = _flag_value(argv, "--preset")
    resume = _flag_value(argv, "--resume")
    if preset is not None:
        base = get_preset(preset)
    if resume == "auto":
        fresh = tyro.cli(TrainConfig, default=base, args=argv, description=description)
        run_dir = run_dir_for(fresh)
        if not checkpoint.has_checkpoint(run_dir):
            return dataclasses.replace(fresh, resume=None)
        argv = [*argv, "--resume", str(run_dir)]  # the last --resume wins
        resume = str(run_dir)
    if resume is not None:
        # --accept-config-changes covers the command it is given on: the saved config may hold it from an
        # earlier resume, and a later plain resume must check the flags and files again.
        base = dataclasses.replace(load_run_config(Path(resume)), accept_config_changes=False)
    return tyro.cli(TrainConfig, default=base, args=argv, description=description)


def run_directory(cfg: TrainConfig, resumed: dict | None) -> Path:
    """Where this run lives. A resume continues in the run's own folder (no timestamped folders
    scattering one run), with the saved config unless --accept-config-changes; a new run never
    writes into an old one."""
    if cfg.resume is not None:
        diffs = resume.config_differences(from_dict(resumed["config"]), cfg)
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
        write_text(run_dir / ".write-test", "ok")
        (run_dir / ".write-test").unlink()
    except OSError as err:
        raise SystemExit(
            f"error: cannot write to the run directory {run_dir} (check --out-dir): {err.strerror or err}"
        ) from err


def load_run_config(path: Path) -> TrainConfig:
    """The config a run was started with, from its checkpoint (a file or a run directory)."""
    return from_dict(checkpoint.load_checkpoint(path)["config"])
