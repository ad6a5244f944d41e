"""Test helpers shared by the test files: running the project's scripts as subprocesses, and the exit
status a script would give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(
    args: list[str], cwd: Path | str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python *args` with the repo importable; never raises on a non-zero exit.

    `env` adds to (not replaces) the current environment. The output is printed so that pytest shows it
    when the test fails; tests assert on `returncode` themselves.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"$ python {' '.join(map(str, args))}  (cwd {cwd}, exit {proc.returncode})")
    print(f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}")
    return proc


def exit_status(stop: SystemExit) -> int:
    """The status a script ending in `stop` exits with, by Python's rule: None is 0, an int is itself,
    anything else (an error message, which Python prints on stderr) is 1."""
    if stop.code is None:
        return 0
    return stop.code if isinstance(stop.code, int) else 1


# The cheapest real training run: one epoch of a small model from scratch on 28-pixel images, loaded in
# the test's own process. Add --data.root, --out-dir and --name.
TINY_RUN = [
    "--model",
    "small_resnet",
    "--pretrained",
    "None",
    "--epochs",
    "1",
    "--data.image-size",
    "28",
    "--data.resize-size",
    "28",
    "--data.num-workers",
    "0",
    "--no-progress",
]

# The run test_selective.py and test_predict.py share (conftest.py's `scored_run`): fifteen steps of the
# small ResNet at a high LR with half the images held out for val. About 20% top-1 on 60 val images,
# enough for low target accuracies to have abstain thresholds that keep part of the split; 0.999 needs
# 1000 kept images, so it is never reachable here.
SCORED_RUN_TARGETS = (0.2, 0.4, 0.6, 0.999)
SCORED_RUN_FLAGS = ["--data.val-fraction", "0.5", "--data.batch-size", "4", "--optim.lr", "3e-3",
                    "--ema-half-life-epochs", "0.1"]  # fmt: skip

# The leakage audit before training and the label-issue queue after it cost about 2 s a tiny run. Tests
# about other things leave them out; test_audit.py, test_label_issues.py and test_groups.py test them.
NO_DATA_REPORTS = ["--data.no-audit", "--no-label-issues"]

# 32-pixel images, no progress bar, no step lines, no data reports: for runs whose numbers are the test.
FAST = [
    "--data.image-size",
    "32",
    "--data.resize-size",
    "32",
    "--no-progress",
    "--log-every-steps",
    "1000",
    *NO_DATA_REPORTS,
]
