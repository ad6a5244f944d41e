"""Time to accuracy of a training recipe: train, then judge every epoch's weights on the test split.

    python -m classifier.fashion_mnist data/fashion-mnist            # once: Fashion-MNIST as an ImageFolder
    python bench/time_to_accuracy.py                                   # the fashion-mnist preset, 10 min goal
    python bench/time_to_accuracy.py --target 0.95 --train-args="--device cuda"   # extra train.py flags

train.py runs as a subprocess, its log read line by line as it comes: the clock starts when train.py
prints its `run ...` line (data decoded, model built: what is left is training and validation) and an
epoch's time is when its `epoch N |` line appears. Wall time from launch is shown too. Afterwards, outside
the clock, evaluate.py scores each epoch's checkpoint (kept with --keep-best EPOCHS) on DATA_ROOT/test,
and a PNG of test top-1 against minutes is written. Timing on a shared box is noisy: run it alone.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from classifier.cli import parse_cli  # noqa: E402


@dataclass
class Args:
    preset: str = "fashion-mnist"
    """train.py preset to time."""
    target: float = 0.93
    """Test top-1 to report the time to."""
    out_dir: Path = Path("runs")
    """Parent of the run directory."""
    name: str = "time-to-accuracy"
    """Run name (an existing run of that name is replaced)."""
    plot: Path | None = None
    """Where to write the curve PNG (default: RUN/plots/time_to_accuracy.png)."""
    train_args: str = ""
    """Extra train.py flags, as one string (split like a shell would)."""


def train(args: Args, run_dir: Path) -> tuple[list[dict], float]:
    """Run train.py; return per-epoch {epoch, minutes, wall_minutes, val_top1} and the total wall minutes."""
    extra = shlex.split(args.train_args)
    epochs = parse_cli(["--preset", args.preset, *extra]).epochs
    command = [
        sys.executable,
        "train.py",
        "--preset",
        args.preset,
        "--out-dir",
        str(args.out_dir),
        "--name",
        args.name,
        "--keep-best",
        str(epochs),
        "--no-progress",
        *extra,
    ]
    print("$", " ".join(command), flush=True)
    launched = time.perf_counter()
    started, rows = None, []
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            print(line, end="", flush=True)
            if started is None and line.startswith("run "):
                started = now
            match = re.match(r"epoch (\d+) \|.* val loss \S+ top1 (\S+)", line)
            if match and started is not None:
                rows.append(
                    {
                        "epoch": int(match[1]),
                        "minutes": (now - started) / 60,
                        "wall_minutes": (now - launched) / 60,
                        "val_top1": float(match[2]),
                    }
                )
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py exited with {proc.returncode}")
    return rows, (time.perf_counter() - launched) / 60


def test_top1(checkpoint: Path, out: Path) -> float:
    """evaluate.py's test top-1 for one checkpoint."""
    subprocess.run(
        [sys.executable, "evaluate.py", str(checkpoint), "--split", "test", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads((out / "metrics.json").read_text())["top1"]


def main(args: Args) -> list[dict]:
    run_dir = args.out_dir / args.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    rows, total = train(args, run_dir)
    for row in rows:
        ckpt = run_dir / "checkpoints" / f"epoch-{row['epoch']:03d}.pt"
        row["test_top1"] = test_top1(ckpt, run_dir / "time-to-accuracy" / f"epoch-{row['epoch']:03d}")
    print(f"\n{args.preset}: training clock starts at train.py's `run` line; wall includes start-up\n")
    print("| epoch | minutes (training) | minutes (wall) | val top-1 | test top-1 |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['epoch'] + 1} | {row['minutes']:.2f} | {row['wall_minutes']:.2f} "
            f"| {row['val_top1']:.4f} | {row['test_top1']:.4f} |"
        )
    reached = next((row for row in rows if row["test_top1"] >= args.target), None)
    if reached:
        print(
            f"\ntime to {args.target} test top-1: {reached['minutes']:.2f} min of training "
            f"(epoch {reached['epoch'] + 1}), {reached['wall_minutes']:.2f} min wall"
        )
    else:
        print(
            f"\n{args.target} test top-1 not reached (best {max(r['test_top1'] for r in rows):.4f}); "
            f"run took {total:.1f} min"
        )
    (run_dir / "time_to_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_curve(rows, args.target, args.plot or run_dir / "plots" / "time_to_accuracy.png", args.preset)
    return rows


def plot_curve(rows: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    minutes = [r["minutes"] for r in rows]
    ax.plot(minutes, [r["test_top1"] for r in rows], marker="o", label="test top-1")
    ax.plot(minutes, [r["val_top1"] for r in rows], marker=".", linestyle=":", label="val top-1")
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"{target}")
    low = min(r["test_top1"] for r in rows)
    ax.set_ylim(max(0.0, min(low, target) - 0.03), 1.0)
    ax.set_xlim(0, max(minutes) * 1.05)
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("top-1")
    ax.set_title(f"{title}: top-1 against training time")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"curve: {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
