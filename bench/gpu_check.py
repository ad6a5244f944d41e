r"""A prepared GPU check: every CUDA path of the trainer run once, reported as one table, in under 6 minutes.

The CPU-only test suite cannot reach these paths; this script runs them. A session lent a GPU machine (torch
and the other dependencies preinstalled, but no tyro, no internet and no data) runs, from the repo root,
with `carry: [".whl"]` (the wheels `bash bench/gpu_wheels.sh` downloads here into the git-ignored .whl/):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT

with a timeout of 420 s (the parts share a 330 s --budget-s; the rest is start-up and the install). The
table comes last in the output. To redo some parts in the time left, add e.g. `--only compile,torchrun`.

The same plumbing runs on a CPU, the GPU-only parts as SKIP rows (tests/test_gpu_check.py does this):

    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu-check

What it checks, in this order (the most telling first, so a short budget still answers the main questions):
the machine (header line); train.py per precision: auto, bf16, fp16; the fp16 GradScaler skipping an
overflow step and its state surviving resume; exact resume; the fast path with its cache on the GPU;
--channels-last on; training throughput from memory (ResNet18 32 px, ResNet50 224 px); the `gpu`-marked
tests; torchrun with NCCL (2 GPUs, or 1 process on a single GPU); --compile. The data is generated here
(10 classes of coloured stripes), and so are stand-in Fashion-MNIST IDX files, so that the gpu-marked
tests run instead of skipping.

Output: the table (| check | result | figures | seconds |) on stdout and in OUT/gpu_check.md, the same
as JSON in OUT/gpu_check.json, every subprocess's output in OUT/gpu_check_logs.txt. Exit status 1 when a
row FAILs.
Data and run directories (GBs of checkpoints on the GPU) live in a temporary folder, deleted as they go.

Every part runs in a subprocess with a timeout (its whole process group is killed then), and all parts
share one --budget-s: a part that fails or hangs costs its own row, never the rest of the table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # `classifier` and `train` without installing the repo

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NUM_CLASSES = 10
IMAGE_SIDE = 32
# torch.amp.GradScaler's defaults, which train.py keeps: the scale starts at 2**16 and halves on overflow.
INITIAL_SCALE = 2.0**16
# A run stopped by SIGTERM exits with 128 + 15, the shell's convention (classifier/faults.py).
EXIT_SIGTERM = 128 + signal.SIGTERM
# Seconds each kind of subprocess may take on the GPU machine; each is also capped by what is left of
# --budget-s. A train.py run there should take ~10-15 s, mostly start-up; --compile adds a cold compile.
TIMEOUT_S = {"train": 120, "compile": 240, "pytest": 180, "throughput": 150, "torchrun": 150}
# ... and is not started with less of the budget left than this: it could not finish, and its timeout
# would read as a FAIL of the code when it is one of the budget (a SKIP row says so instead).
NEEDS_S = {"train": 20, "compile": 90, "pytest": 45, "throughput": 30, "torchrun": 40}


@dataclass(frozen=True)
class Sizes:
    """How much work each part does: FULL fits one GPU in the budget, QUICK tests the plumbing on a CPU."""

    model: str  # what the training rows train
    train_per_class: int  # generated training images per class (val/ gets val_per_class)
    val_per_class: int
    epochs: int
    batch_size: int
    num_workers: str  # train.py's --data.num-workers
    log_every_steps: int
    min_val_top1: float  # a training row PASSes only above this (chance is 0.1)
    throughput: tuple[tuple[str, int, int], ...]  # (model, image side, batch size) per throughput row
    warmup_steps: int  # throughput: untimed steps before the first timing
    timed_steps: int  # throughput: steps per timing
    repeats: int  # throughput: timings per model; the row shows their median


FULL = Sizes(
    model="resnet18",
    train_per_class=50,
    val_per_class=10,
    epochs=2,
    batch_size=32,
    num_workers="auto",
    log_every_steps=5,
    min_val_top1=0.3,
    throughput=(("resnet18", 32, 256), ("resnet50", 224, 128)),
    warmup_steps=10,
    timed_steps=30,
    repeats=5,
)
# small_resnet (0.48M parameters) rather than resnet18: resnet18's checkpoints (model, EMA and AdamW state,
# ~180 MB a save) cost more CPU time than its steps. 5 steps per epoch leave room for a mid-epoch stop; too
# few steps to demand learning, so any val top-1 passes.
QUICK = Sizes(
    model="small_resnet",
    train_per_class=4,
    val_per_class=1,
    epochs=2,
    batch_size=8,
    num_workers="0",
    log_every_steps=1,
    min_val_top1=0.0,
    throughput=(("resnet18", 32, 8), ("resnet50", 32, 2)),
    warmup_steps=1,
    timed_steps=2,
    repeats=2,
)


# --- rows, subprocesses and the budget ----------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str  # PASS, FAIL or SKIP
    figures: str
    seconds: float = 0.0


# `RuntimeError: ...`, `torch.OutOfMemoryError: ...`, train.py's `error: ...`; under torchrun `[rank0]: ...`.
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(Error|Exception)|error): ")


@dataclass
class Proc:
    """What a subprocess did: its exit status (None when it was killed at its timeout) and its output."""

    returncode: int | None
    output: str
    seconds: float
    timeout_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure(self) -> str:
        """Why it did not succeed, for the table: the timeout, or the exit status and the last exception
        line (`SomeError: ...`, train.py's `error: ...`), else the last line that mentions an error."""
        if self.returncode is None:
            return f"timed out after {self.timeout_s:.0f} s"
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        # torchrun ends with its own ChildFailedError and a summary: the rank's exception is the news.
        raised = [line for line in lines if EXCEPTION_LINE.match(line) and "ChildFailedError" not in line]
        mentions = [line for line in lines if "error" in line.lower()]
        last = (raised or mentions or lines or ["no output"])[-1]
        return f"exit {self.returncode}: {last[:200]}"


class OutOfTime(Exception):
    """Raised instead of starting a part that the rest of --budget-s cannot hold."""


def kill_group(pid: int) -> None:
    """SIGKILL the process group that `pid` leads: DataLoader workers, torchrun's ranks, compile workers."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def run_command(
    command: list[str],
    *,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    on_line: Callable[[str, subprocess.Popen], None] | None = None,
) -> Proc:
    """Run `command` in the repo root, stdout and stderr merged into `log_path`; never raises on failure.

    The child leads its own process group, so at the timeout the whole group is killed, grandchildren
    included. `on_line(line, process)` sees every line as it comes (used to send SIGTERM mid-run).
    """
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # The repo first, then what the caller had (on the GPU machine: /tmp/site with tyro).
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    lines: list[str] = []
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def read_lines() -> None:
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line, process)

    # A thread reads, so the timeout holds even when the child hangs without printing anything.
    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    kill_group(process.pid)  # after a timeout: everything; after an exit: leftovers holding the pipe open
    process.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - start
    output = "".join(lines)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    status = f"exit {returncode}" if returncode is not None else f"killed at the {timeout_s:.0f} s timeout"
    log_path.write_text(f"$ {' '.join(command)}\n{output}\n[{status} after {seconds:.1f} s]\n")
    return Proc(returncode, output, seconds, timeout_s)


@dataclass
class Context:
    """What every check needs: the device, the sizes, where files go, the clock, the reference run."""

    device: str  # "cuda" or "cpu"
    quick: bool
    sizes: Sizes
    out: Path
    scratch: Path
    deadline: float  # time.perf_counter() by which every part must have ended
    only: tuple[str, ...] = ()  # --only's words
    env: dict[str, str] = field(default_factory=dict)  # added to every subprocess's environment
    data_root: Path | None = None
    reference_run: Path | None = None  # the finished 'train auto' run: exact resume compares against it

    def skip_on_quick_cpu(self) -> bool:
        """--quick on a CPU leaves out the parts that take long there, unless --only asks for them."""
        return self.device == "cpu" and self.quick and not self.only

    def run(
        self,
        name: str,
        command: list[str],
        *,
        kind: str,
        timeout_s: float | None = None,
        env: dict[str, str] | None = None,
        on_line: Callable[[str, subprocess.Popen], None] | None = None,
    ) -> Proc:
        """run_command with its log in OUT/logs/NAME.log (joined at the end), the timeout of its kind (or
        `timeout_s`) capped by the budget left; OutOfTime when less is left than a part of its kind needs."""
        left = self.deadline - time.perf_counter()
        if left < NEEDS_S[kind]:
            raise OutOfTime(
                f"not started: {left:.0f} s of the budget left, a {kind} part needs {NEEDS_S[kind]} s"
            )
        return run_command(
            command,
            log_path=self.out / "logs" / f"{name}.log",
            timeout_s=min(timeout_s or TIMEOUT_S[kind], left),
            env={**self.env, **(env or {})},
            on_line=on_line,
        )


# --- data: generated, so the GPU machine needs none -----------------------------------------------------


def draw_image(rng: np.random.Generator, label: int, side: int) -> np.ndarray:
    """uint8 (side, side, 3): stripes in the class's colour and at the class's angle on a grey background,
    with a random phase, stripe width, background level and pixel noise. Colour and angle both tell the
    class: resnet18 learns it from scratch in a couple of short epochs (on a CPU here: 0.87 val top-1
    after 20 steps of 16 images)."""
    hue = label / NUM_CLASSES
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.arange(3) / 3))
    angle = np.pi * label / NUM_CLASSES
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) * (32 / side)
    frequency = rng.uniform(0.5, 0.9)
    stripes = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi)) > 0
    image = np.where(stripes[..., None], colour, rng.uniform(0.1, 0.4))
    image = image + rng.normal(0, 0.08, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_image_folder(root: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    """root/train/class_N/*.png and root/val/class_N/*.png, IMAGE_SIDE px, seeded."""
    rng = np.random.default_rng(seed)
    for label in range(NUM_CLASSES):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(draw_image(rng, label, IMAGE_SIDE)).save(folder / f"{index:04d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file: two zero bytes, type 0x08, the number of dimensions, each size as
    big-endian int32, then the values (the format classifier/fashion_mnist.py reads)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fake_fashion_mnist(folder: Path, train_per_class: int = 60, test_per_class: int = 20) -> Path:
    """The four Fashion-MNIST IDX files with generated 28x28 grayscale images, enough per class for the
    test fixtures (tests/conftest.py: 60 and 12 train, 20 and 4 test). With FASHION_MNIST_DIR pointing
    here the gpu-marked tests that train run instead of skipping; they check finiteness, not accuracy."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_per_class),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test_per_class),
    }
    for images_name, labels_name, per_class in files.values():
        labels = np.tile(np.arange(NUM_CLASSES), per_class)  # interleaved, as in the real files
        images = np.stack([draw_image(rng, int(label), 28).mean(axis=2) for label in labels])
        write_idx(folder / images_name, images)
        write_idx(folder / labels_name, labels)
    return folder


# --- reading runs ---------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict:
    """The project's own loader (weights-only). Imported here, not at the top: classifier needs tyro, and
    a missing tyro must show as a header line and FAIL rows, not as an ImportError before any output."""
    from classifier.checkpoint import load_checkpoint as load

    return load(path)


STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| epoch (\d+) \| .* \| (\d+) img/s")


def median_rate(output: str) -> float | None:
    """Median img/s of train.py's step lines after epoch 0 (which pays for warm-up), else of all of them."""
    rates = [(int(m[3]), float(m[4])) for m in map(STEP_LINE.match, output.splitlines()) if m]
    later = [rate for epoch, rate in rates if epoch > 0]
    chosen = later or [rate for _, rate in rates]
    return statistics.median(chosen) if chosen else None


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl records, config.json) of a run directory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((run_dir / "config.json").read_text())


def adam_steps(state: dict) -> int:
    """How many updates AdamW applied. The GradScaler skips optimizer.step() on overflow, and a skipped
    step leaves AdamW's own counter behind train.py's `step`, so the difference counts skipped steps."""
    return int(state["optimizer"]["state"][0]["step"])


def weight_difference(a: dict, b: dict) -> tuple[float, list[str]]:
    """Largest |a - b| over the floating-point tensors of the model and its EMA, and the names of integer
    tensors (BatchNorm's num_batches_tracked, the EMA's count) that differ: those must match exactly."""
    largest, mismatched = 0.0, []
    for key in ("model", "ema"):
        for name, x in (a[key] or {}).items():
            y = b[key][name]
            if x.is_floating_point():
                largest = max(largest, (x.double() - y.double()).abs().max().item())
            elif not torch.equal(x, y):
                mismatched.append(f"{key}.{name}")
    return largest, mismatched


def finite_weights(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- train.py runs --------------------------------------------------------------------------------------


def train_args(ctx: Context, name: str, *extra: str, log_every_steps: int | None = None) -> list[str]:
    """train.py's flags for a run on the generated data; `extra` adds or overrides (the last flag wins)."""
    s = ctx.sizes
    return [
        "--model",
        s.model,
        "--data.root",
        str(ctx.data_root),
        "--out-dir",
        str(ctx.scratch / "runs"),
        "--name",
        name,
        "--device",
        ctx.device,
        "--epochs",
        str(s.epochs),
        "--data.batch-size",
        str(s.batch_size),
        "--data.num-workers",
        s.num_workers,
        "--data.image-size",
        str(IMAGE_SIDE),
        "--data.resize-size",
        str(IMAGE_SIDE),
        "--data.crop-scale",
        "0.5",
        "1",
        "--no-progress",
        "--log-every-steps",
        str(log_every_steps or s.log_every_steps),
        *extra,
    ]


def worker_command(kind: str, *flags: str) -> list[str]:
    """This script in a subprocess, as one of the workers at the bottom of the file."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *flags]


def signal_after(line_start: str) -> Callable[[str, subprocess.Popen], None]:
    """An on_line callback that sends SIGTERM (a scheduler's preemption) once a line starts with
    `line_start`; train.py then finishes the step, saves a mid-epoch checkpoint and exits 143."""
    sent = threading.Event()

    def on_line(line: str, process: subprocess.Popen) -> None:
        if line.startswith(line_start) and not sent.is_set():
            sent.set()
            process.send_signal(signal.SIGTERM)

    return on_line


def train(ctx: Context, name: str, *extra: str, kind: str = "train") -> tuple[Path, Proc]:
    """One train.py run (its run directory, its Proc)."""
    command = [sys.executable, "train.py", *train_args(ctx, name, *extra)]
    return ctx.scratch / "runs" / name, ctx.run(name, command, kind=kind)


def resume(ctx: Context, run_dir: Path) -> Proc:
    """`train.py --resume RUN`: the saved config, device included, is the whole configuration."""
    command = [sys.executable, "train.py", "--resume", str(run_dir)]
    return ctx.run(f"{run_dir.name}-resume", command, kind="train")


def interrupted_train(
    ctx: Context, name: str, *extra: str, stop_after_step: int, worker_flags: tuple[str, ...] = ()
) -> tuple[Path, Proc]:
    """A run that gets SIGTERM once it has logged `stop_after_step` steps (it logs every step), through the
    train worker when `worker_flags` asks for one of its hooks."""
    args = train_args(ctx, name, *extra, log_every_steps=1)
    if worker_flags:
        command = worker_command("train", *worker_flags, "--", *args)
    else:
        command = [sys.executable, "train.py", *args]
    on_line = signal_after(f"step {stop_after_step}/")
    return ctx.scratch / "runs" / name, ctx.run(name, command, kind="train", on_line=on_line)


def judge_run(ctx: Context, run_dir: Path, proc: Proc) -> tuple[bool, list[str]]:
    """(passed, figures) of a run that should have finished every epoch: exit 0, one metrics line per
    epoch, a finite final train loss and val top-1 above the bar; figures: img/s and val top-1."""
    if not proc.ok:
        return False, [proc.failure()]
    records, _ = read_run(run_dir)
    top1, train_loss = records[-1]["val"]["top1"], records[-1]["train"]["loss"]
    rate = median_rate(proc.output)
    figures = [f"{rate:.0f} img/s" if rate is not None else "no img/s logged", f"val top-1 {top1:.3f}"]
    problems = []
    if len(records) != ctx.sizes.epochs:
        problems.append(f"{len(records)} epochs in metrics.jsonl, expected {ctx.sizes.epochs}")
    if not math.isfinite(train_loss):
        problems.append(f"final train loss {train_loss}")
    if top1 < ctx.sizes.min_val_top1:
        problems.append(f"val top-1 below {ctx.sizes.min_val_top1}")
    return not problems, figures + problems


# --- the checks, one function each; each yields its rows -----------------------------------------------


def check_train_auto(ctx: Context) -> Iterator[Row]:
    """--precision auto: what it resolved to (config.json's `resolved`), img/s, val top-1. This run is also
    the uninterrupted reference of the exact-resume check."""
    run_dir, proc = train(ctx, "auto")
    passed, figures = judge_run(ctx, run_dir, proc)
    if proc.ok:
        ctx.reference_run = run_dir
        resolved = read_run(run_dir)[1]["resolved"]
        precision, channels_last = resolved["precision"], resolved["channels_last"]
        figures.insert(
            0,
            f"resolved {precision['value']} ({precision['reason']}), channels_last {channels_last['value']}",
        )
    yield Row("train auto", PASS if passed else FAIL, "; ".join(figures), proc.seconds)


def check_train_bf16(ctx: Context) -> Iterator[Row]:
    """bf16 autocast without a scaler, in the contiguous layout: on the GPU 'auto' already gives bf16 with
    channels_last, so this row is the other layout."""
    if ctx.device == "cpu":
        yield Row(
            "train bf16",
            SKIP,
            "--device cpu: a GPU precision here (emulated bf16 is 2-12x slower "
            "on a CPU without avx512_bf16/AMX); tests/test_train.py runs it on CPU",
        )
        return
    run_dir, proc = train(ctx, "bf16", "--precision", "bf16", "--channels-last", "off")
    passed, figures = judge_run(ctx, run_dir, proc)
    figures.insert(0, "channels_last off")
    yield Row("train bf16", PASS if passed else FAIL, "; ".join(figures), proc.seconds)


def check_train_fp16(ctx: Context) -> Iterator[Row]:
    """fp16 autocast with the GradScaler: img/s, val top-1, and how many steps the scaler skipped on its
    own (the initial scale of 2**16 often overflows in the first steps) and where the scale ended."""
    if ctx.device == "cpu":
        yield Row("train fp16", SKIP, "--device cpu: a GPU precision here; tests/test_train.py runs it")
        return
    run_dir, proc = train(ctx, "fp16", "--precision", "fp16")
    passed, figures = judge_run(ctx, run_dir, proc)
    if proc.ok:
        state = load_checkpoint(run_dir)
        figures.append(
            f"scaler skipped {state['step'] - adam_steps(state)} of {state['step']} steps, "
            f"scale now {state['scaler']['scale']:g}"
        )
    yield Row("train fp16", PASS if passed else FAIL, "; ".join(figures), proc.seconds)


def check_fp16_scaler(ctx: Context) -> Iterator[Row]:
    """Two rows. Overflow: an fp16 run whose 2nd loss is made inf (the train worker's hook, as if the
    forward had overflowed) must skip that optimizer step (AdamW's counter stays behind train.py's step)
    and halve the scale; SIGTERM stops it once it has logged step 3. Resume: `--resume` must continue
    with the saved scale and growth tracker. The injected overflow makes the saved scale <= 2**15, so a
    scaler that was not restored (starting again at 2**16) cannot pass by chance."""
    overflow, survives = "fp16 scaler skips an overflow step", "fp16 scaler state survives resume"
    if ctx.skip_on_quick_cpu():
        why = "--quick: fp16 on a CPU is slow (two runs); --only fp16 runs them"
        yield Row(overflow, SKIP, why)
        yield Row(survives, SKIP, why)
        return
    run_dir, cut = interrupted_train(
        ctx,
        "fp16-overflow",
        "--precision",
        "fp16",
        stop_after_step=3,
        worker_flags=("--inf-loss-at-call", "2"),
    )
    if cut.returncode != EXIT_SIGTERM:
        why = cut.failure() if not cut.ok else "the run ended before SIGTERM could stop it"
        yield Row(overflow, FAIL, f"expected exit {EXIT_SIGTERM} after SIGTERM; {why}", cut.seconds)
        yield Row(survives, FAIL, "needs the interrupted fp16 run above")
        return
    saved = load_checkpoint(run_dir)
    scaler = saved["scaler"]
    skipped = saved["step"] - adam_steps(saved)
    expected_scale = INITIAL_SCALE * scaler["backoff_factor"] ** skipped
    passed = skipped >= 1 and scaler["scale"] == expected_scale and finite_weights(saved)
    yield Row(
        overflow,
        PASS if passed else FAIL,
        f"inf loss at step 2: {skipped} of {saved['step']} optimizer steps skipped; scale "
        f"{INITIAL_SCALE:g} -> {scaler['scale']:g} (expected {expected_scale:g}); growth tracker "
        f"{scaler['_growth_tracker']}; weights finite {finite_weights(saved)}",
        cut.seconds,
    )

    proc = resume(ctx, run_dir)
    if not proc.ok:
        yield Row(survives, FAIL, proc.failure(), proc.seconds)
        return
    final = load_checkpoint(run_dir)
    steps_after = final["step"] - saved["step"]
    skipped_after = steps_after - (adam_steps(final) - adam_steps(saved))
    # The scale only halves in this short run (growth needs 2000 clean steps in a row); the growth
    # tracker counts clean steps since the last overflow, so it is predictable when none came after.
    expected_scale = scaler["scale"] * scaler["backoff_factor"] ** skipped_after
    expected_tracker = scaler["_growth_tracker"] + steps_after if skipped_after == 0 else None
    passed = final["scaler"]["scale"] == expected_scale and (
        expected_tracker is None or final["scaler"]["_growth_tracker"] == expected_tracker
    )
    yield Row(
        survives,
        PASS if passed else FAIL,
        f"resumed at step {saved['step']} with scale {scaler['scale']:g}, tracker "
        f"{scaler['_growth_tracker']}; after {steps_after} more steps ({skipped_after} skipped): scale "
        f"{final['scaler']['scale']:g} (expected {expected_scale:g}), tracker "
        f"{final['scaler']['_growth_tracker']} (expected {expected_tracker})",
        proc.seconds,
    )


def check_exact_resume(ctx: Context) -> Iterator[Row]:
    """The 'train auto' run again, stopped by SIGTERM mid-epoch and resumed, against the uninterrupted one.

    Tolerance. On a CPU, 0: train.py's resume is bit-exact there (tests/test_train.py asserts it). On a
    GPU, train.py does not turn on deterministic algorithms (no torch.use_deterministic_algorithms, no
    cudnn.deterministic), so kernels that reduce with atomics may round differently from run to run and
    two uninterrupted runs can already differ. The check measures that floor with a second uninterrupted
    run and allows 4x it: the max over ~11M weights of a chaotic difference varies by a small factor
    between two pairs of runs, while a resume bug (a batch repeated or skipped, lost optimizer, RNG or
    LR state) changes weights by about one AdamW step, lr = 1e-3, orders above a rounding floor. A floor
    of 0 (cuDNN picked deterministic kernels) leaves a tolerance of 0, as on the CPU.
    """
    name = "exact resume"
    straight = ctx.reference_run
    if straight is None:  # its own row already says why; a FAIL here would count that failure twice
        yield Row(name, SKIP, "needs the 'train auto' run, which did not finish")
        return
    run_dir, cut = interrupted_train(ctx, "auto-cut", stop_after_step=2)
    if cut.returncode != EXIT_SIGTERM:
        why = cut.failure() if not cut.ok else "the run ended before SIGTERM could stop it"
        yield Row(name, FAIL, f"expected exit {EXIT_SIGTERM} after SIGTERM; {why}", cut.seconds)
        return
    stopped = load_checkpoint(run_dir)
    where = (
        f"SIGTERM: stopped at step {stopped['step']} (epoch {stopped['epoch']}, batch "
        f"{stopped['batches_in_epoch']})"
    )
    proc = resume(ctx, run_dir)
    seconds = cut.seconds + proc.seconds
    if not proc.ok:
        yield Row(name, FAIL, f"{where}; resume: {proc.failure()}", seconds)
        return
    reference, resumed = load_checkpoint(straight), load_checkpoint(run_dir)
    difference, mismatched = weight_difference(reference, resumed)
    figures = [where, f"max abs weight difference {difference:.3g} (model + EMA, resumed vs straight)"]
    tolerance = 0.0
    if ctx.device != "cpu":
        again_dir, again = train(ctx, "auto-again")
        seconds += again.seconds
        if not again.ok:
            yield Row(name, FAIL, "; ".join([*figures, f"second straight run: {again.failure()}"]), seconds)
            return
        floor, _ = weight_difference(reference, load_checkpoint(again_dir))
        tolerance = 4 * floor
        figures.append(f"two straight runs differ by {floor:.3g}")
    figures.append(f"tolerance {tolerance:.3g}")
    if mismatched:
        figures.append(f"integer buffers differ: {', '.join(mismatched[:3])}")
    passed = resumed["step"] == reference["step"] and not mismatched and difference <= tolerance
    yield Row(name, PASS if passed else FAIL, "; ".join(figures), seconds)


CACHE_LINE = re.compile(r"^fast-path cache: (\d+) bytes on (\S+)")


def check_fast_path(ctx: Context) -> Iterator[Row]:
    """--data.fast-path through the train worker, which reports where fastdata.cache_device put each
    split's decoded images (on the GPU when they take under a quarter of its free memory)."""
    if ctx.skip_on_quick_cpu():
        yield Row(
            "fast path (cache on device)",
            SKIP,
            "--quick: the cache can only be on the CPU here; --only fast runs it",
        )
        return
    args = train_args(ctx, "fast-path", "--data.fast-path")
    proc = ctx.run("fast-path", worker_command("train", "--report-cache-device", "--", *args), kind="train")
    run_dir = ctx.scratch / "runs" / "fast-path"
    passed, figures = judge_run(ctx, run_dir, proc)
    caches = [(int(m[1]), m[2]) for m in map(CACHE_LINE.match, proc.output.splitlines()) if m]
    where = ", ".join(f"{size / 2**20:.2f} MiB on {device}" for size, device in caches)
    figures.insert(0, f"caches (train, val): {where or 'not reported'}")
    if not caches or (ctx.device == "cuda" and any(not device.startswith("cuda") for _, device in caches)):
        passed = False
        figures.append(f"expected every cache on {ctx.device}")
    yield Row("fast path (cache on device)", PASS if passed else FAIL, "; ".join(figures), proc.seconds)


def check_channels_last(ctx: Context) -> Iterator[Row]:
    """--channels-last on in fp32: on CUDA the one combination 'auto' never picks (auto: on for bf16/fp16)."""
    if ctx.skip_on_quick_cpu():
        yield Row(
            "channels-last on",
            SKIP,
            "--quick: on a CPU 'auto' already trains channels_last (the 'train auto' row)",
        )
        return
    run_dir, proc = train(ctx, "channels-last", "--precision", "fp32", "--channels-last", "on")
    passed, figures = judge_run(ctx, run_dir, proc)
    yield Row("channels-last on", PASS if passed else FAIL, "fp32; " + "; ".join(figures), proc.seconds)


def check_compile(ctx: Context) -> Iterator[Row]:
    """--compile: the whole run, cold compile included, in its own longer timeout."""
    if ctx.skip_on_quick_cpu():
        yield Row(
            "compile",
            SKIP,
            "--quick: a cold torch.compile takes minutes on this CPU; tests/test_train.py compiles on CPU",
        )
        return
    run_dir, proc = train(ctx, "compile", "--compile", kind="compile")
    passed, figures = judge_run(ctx, run_dir, proc)
    yield Row("compile", PASS if passed else FAIL, "; ".join(figures), proc.seconds)


def check_throughput(ctx: Context) -> Iterator[Row]:
    """Training steps on batches already in device memory (the bare loop of bench/throughput.py): bf16
    autocast (on a CPU whatever 'auto' picks), channels_last, AdamW. One worker measures every model in
    turn and prints one RESULT line each, so a model that fails still leaves the others' rows."""
    precision = "bf16" if ctx.device == "cuda" else "auto"
    models = [f"--model={name}:{side}:{batch}" for name, side, batch in ctx.sizes.throughput]
    s = ctx.sizes
    command = worker_command(
        "throughput",
        "--device",
        ctx.device,
        "--precision",
        precision,
        *models,
        "--warmup",
        str(s.warmup_steps),
        "--steps",
        str(s.timed_steps),
        "--repeats",
        str(s.repeats),
    )
    proc = ctx.run("throughput", command, kind="throughput")
    results = {}
    for line in proc.output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result["model"]] = result
    for name, side, batch in ctx.sizes.throughput:
        result = results.get(name)
        if result is None:
            yield Row(f"throughput {name}", FAIL, f"{side} px, batch {batch}: {proc.failure()}", proc.seconds)
            continue
        memory = result["peak_memory_gib"]
        repeats = ", ".join(f"{rate:.0f}" for rate in result["repeats"])
        figures = [
            f"{side} px, batch {batch}, {result['precision']}, channels_last",
            "cudnn.benchmark off, as in train.py",
            f"{result['images_per_s']:.0f} img/s (median of {repeats})",
            f"peak memory {memory:.2f} GiB" if memory is not None else "peak memory n/a on CPU",
        ]
        yield Row(f"throughput {name}", PASS, "; ".join(figures), result["seconds"])


SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def check_gpu_tests(ctx: Context) -> Iterator[Row]:
    """`python -m pytest -m gpu -q`, with stand-in Fashion-MNIST files so the training tests run."""
    name = "gpu tests (pytest -m gpu)"
    if ctx.device == "cpu":
        yield Row(name, SKIP, "--device cpu: the gpu-marked tests skip without CUDA")
        return
    idx = make_fake_fashion_mnist(ctx.scratch / "fashion-mnist-idx")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    proc = ctx.run("pytest-gpu", command, kind="pytest", env={"FASHION_MNIST_DIR": str(idx)})
    summary = [line for line in proc.output.splitlines() if SUMMARY_COUNT.search(line) and " in " in line]
    counts = {
        word.rstrip("s") if word.startswith("error") else word: int(n)
        for n, word in SUMMARY_COUNT.findall(summary[-1] if summary else "")
    }
    figures = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no pytest summary line"
    lines = proc.output.splitlines()
    failed_tests = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if failed_tests:
        figures += "; " + ", ".join(failed_tests[:3])
    if counts.get("skipped") and not counts.get("passed"):
        figures += "; nothing ran: does CUDA work in a subprocess?"
    passed = proc.ok and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    if proc.returncode is None or (not proc.ok and not counts):
        figures = proc.failure()
    yield Row(name, PASS if passed else FAIL, figures, proc.seconds)


def check_torchrun(ctx: Context) -> Iterator[Row]:
    """train.py under `torchrun --nproc_per_node=N` (as python -m torch.distributed.run: no torchrun needed
    on PATH), NCCL on CUDA. Two rows. 2 GPUs: DDP, one process per GPU; config.json must record world
    size 2. 1 process: with a single GPU (two ranks on one GPU is an NCCL error) this still runs every
    collective of classifier/distributed.py through an NCCL process group, which a plain run never
    initializes; with 2 GPUs the 2-process row covers that."""
    one, two = "torchrun NCCL 1 process", "torchrun NCCL 2 GPUs"
    if ctx.device == "cpu":
        why = "--device cpu: NCCL needs CUDA (gloo DDP on CPU: tests/test_distributed.py)"
        yield Row(one, SKIP, why)
        yield Row(two, SKIP, why)
        return
    count = torch.cuda.device_count()  # reads the count without creating a CUDA context here
    if count >= 2:
        yield Row(one, SKIP, f"{count} GPUs: the 2-GPU row runs the same process-group path")
    else:
        yield torchrun_row(ctx, one, processes=1)
    if count < 2:
        yield Row(two, SKIP, f"torch.cuda.device_count() is {count}: DDP over NCCL needs 2 GPUs")
    else:
        yield torchrun_row(ctx, two, processes=2)


def torchrun_row(ctx: Context, name: str, processes: int) -> Row:
    """One torchrun of train.py with `processes` ranks, judged as any run, plus the world size it saw."""
    run_name = f"torchrun-{processes}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, f"--nproc_per_node={processes}", "train.py", *train_args(ctx, run_name)]
    proc = ctx.run(run_name, command, kind="torchrun")
    run_dir = ctx.scratch / "runs" / run_name
    passed, figures = judge_run(ctx, run_dir, proc)
    if proc.ok:
        derived = read_run(run_dir)[1]["derived"]
        figures.insert(0, f"world size {derived['world_size']}, global batch {derived['global_batch']}")
        passed = passed and derived["world_size"] == processes
    return Row(name, PASS if passed else FAIL, "; ".join(figures), proc.seconds)


# (check, its row names): the row names also let a check that raises or runs out of time leave FAIL or
# SKIP rows for the rows it did not get to.
CHECKS: list[tuple[Callable[[Context], Iterator[Row]], tuple[str, ...]]] = [
    (check_train_auto, ("train auto",)),
    (check_train_bf16, ("train bf16",)),
    (check_train_fp16, ("train fp16",)),
    (check_fp16_scaler, ("fp16 scaler skips an overflow step", "fp16 scaler state survives resume")),
    (check_exact_resume, ("exact resume",)),
    (check_fast_path, ("fast path (cache on device)",)),
    (check_channels_last, ("channels-last on",)),
    (check_throughput, ("throughput resnet18", "throughput resnet50")),
    (check_gpu_tests, ("gpu tests (pytest -m gpu)",)),
    (check_torchrun, ("torchrun NCCL 1 process", "torchrun NCCL 2 GPUs")),
    (check_compile, ("compile",)),
]


def run_check(ctx: Context, check: Callable[[Context], Iterator[Row]], names: tuple[str, ...]) -> list[Row]:
    """The check's rows; a row it did not get to becomes SKIP (budget spent) or FAIL (it raised)."""
    rows: list[Row] = []
    start = time.perf_counter()
    try:
        for row in check(ctx):
            rows.append(row)
            print(f"[{row.result}] {row.check}: {row.figures}", flush=True)
    except OutOfTime as err:
        rows += [Row(name, SKIP, str(err)) for name in names[len(rows) :]]
    except Exception as err:  # a bug here, or a run that left no files: that row fails, the rest goes on
        seconds = time.perf_counter() - start
        rows += [Row(name, FAIL, f"{type(err).__name__}: {err}", seconds) for name in names[len(rows) :]]
    return rows


def discard_runs(ctx: Context, keep: Path | None) -> None:
    """Delete the finished checks' run directories but `keep` (exact resume's reference): a resnet18 run
    leaves ~0.6 GB of checkpoints (last, last.prev, best), and a dozen could fill a small /tmp."""
    for run_dir in (ctx.scratch / "runs").glob("*"):
        if run_dir != keep:
            shutil.rmtree(run_dir, ignore_errors=True)


# --- the header and the report ------------------------------------------------------------------------


def nvidia_smi() -> str:
    """Name, memory, compute capability and driver of each GPU, from nvidia-smi (no CUDA context here)."""
    query = "--query-gpu=name,memory.total,compute_cap,driver_version"
    try:
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return "; ".join(done.stdout.strip().splitlines()) or f"nvidia-smi: {done.stderr.strip()}"


def describe_machine(device: str) -> dict:
    """The header's facts. The parent never creates a CUDA context: with the GPU in an exclusive compute
    mode, one held here would lock every subprocess out."""
    versions = {}
    for package in ("torch", "torchvision", "tyro", "typeguard", "typing_extensions"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "MISSING"
    info = {
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_devices": torch.cuda.device_count(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device == "cuda":
        info["gpus"] = nvidia_smi()
    else:
        from classifier.hardware import cpu_model  # only torch behind it: safe without tyro

        info["cpu"] = cpu_model()
    return info


def header_line(info: dict) -> str:
    versions = info["versions"]
    machine = f"GPU {info['gpus']}" if info["device"] == "cuda" else f"CPU {info['cpu']}"
    line = (
        f"{machine} | {info['cuda_devices']} CUDA device(s) | torch {versions['torch']} (CUDA "
        f"{info['torch_cuda']}, cuDNN {info['cudnn']}) | torchvision {versions['torchvision']} | python "
        f"{info['python']} | {info['cores']} cores | tyro {versions['tyro']}"
    )
    if versions["tyro"] == "MISSING":
        line += " (install .whl/ as the top of bench/gpu_check.py says: every train row will fail)"
    return line


def markdown_table(rows: list[Row]) -> str:
    lines = ["| check | result | figures | seconds |", "|---|---|---|---:|"]
    for row in rows:
        figures = row.figures.replace("|", "/").replace("\n", " ")  # a pipe or newline would break the row
        lines.append(f"| {row.check} | {row.result} | {figures} | {row.seconds:.1f} |")
    return "\n".join(lines)


def write_report(
    out: Path, header: str, info: dict, rows: list[Row], args: argparse.Namespace, seconds: float
) -> None:
    """gpu_check.md, gpu_check.json, and every subprocess log joined into gpu_check_logs.txt (the device
    tool brings back at most 8 files from its output folder, so the logs travel as one)."""
    logs = sorted((out / "logs").glob("*.log"))
    joined = "".join(f"===== {log.name}\n{log.read_text(errors='replace')}\n" for log in logs)
    (out / "gpu_check_logs.txt").write_text(joined)
    shutil.rmtree(out / "logs", ignore_errors=True)
    mode = f"--device {args.device}{' --quick' if args.quick else ''}, budget {args.budget_s:.0f} s"
    text = f"# GPU check\n\n{header}\n\n{mode}; {seconds:.0f} s in all\n\n{markdown_table(rows)}\n"
    (out / "gpu_check.md").write_text(text)
    report = {
        "header": header,
        "machine": info,
        "mode": mode,
        "seconds": seconds,
        "rows": [asdict(row) for row in rows],
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # argparse, not tyro like the other scripts: this one must start, and say so, when tyro is missing.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for gpu_check.md, gpu_check.json and gpu_check_logs.txt",
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the same plumbing, GPU-only parts as SKIP rows",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for testing this script on a CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=330,
        help="seconds for all parts together (default: 6 minutes less 30 s for start-up)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated words: run only checks whose row names contain one (a rerun)",
    )
    parser.add_argument("--keep-scratch", action="store_true", help="keep the data and run directories")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    info = describe_machine(args.device)
    header = header_line(info)
    print(header, flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(
        device=args.device,
        quick=args.quick,
        sizes=QUICK if args.quick else FULL,
        out=args.out,
        scratch=scratch,
        deadline=start + args.budget_s,
        only=tuple(word for word in args.only.split(",") if word),
    )
    if args.device == "cpu" and args.quick:
        # One thread per subprocess: tiny steps gain nothing from a second, and on a CPU shared with other
        # work a thread whose core is busy stalls the other at every parallel region (measured on 2 shared
        # cores: a quick train.py run 32 s with 2 threads, 10 s with 1).
        ctx.env["OMP_NUM_THREADS"] = "1"
    s = ctx.sizes
    ctx.data_root = make_image_folder(scratch / "data", s.train_per_class, s.val_per_class)
    print(
        f"data: {NUM_CLASSES} classes x {s.train_per_class} train + {s.val_per_class} val images, "
        f"{IMAGE_SIDE} px, in {scratch / 'data'}; model {s.model}",
        flush=True,
    )
    rows: list[Row] = []
    try:
        for check, names in CHECKS:
            if ctx.only and not any(word in name for name in names for word in ctx.only):
                rows += [Row(name, SKIP, f"not selected by --only {args.only}") for name in names]
                continue
            rows += run_check(ctx, check, names)
            if not args.keep_scratch:
                discard_runs(ctx, keep=ctx.reference_run)
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    write_report(args.out, header, info, rows, args, seconds)
    print(f"\n{header}\n\n{markdown_table(rows)}\n\n{seconds:.0f} s; written to {args.out / 'gpu_check.md'}")
    return 1 if any(row.result == FAIL for row in rows) else 0


# --- workers: the subprocess side of the parts that need code around the trainer or the model ----------


def train_worker(argv: list[str]) -> None:
    """train.main on the flags after `--`, with hooks the parent reads back from the output:
    --inf-loss-at-call N makes the N-th training loss inf (an fp16 overflow, on purpose);
    --report-cache-device prints where the fast path put each split's decoded images."""
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="gpu_check.py --worker train")
    parser.add_argument("--inf-loss-at-call", type=int)
    parser.add_argument("--report-cache-device", action="store_true")
    args = parser.parse_args(argv[:split])

    import train as trainer
    from classifier import fastdata
    from classifier.cli import parse_cli

    if args.inf_loss_at_call is not None:
        build_criterion = trainer.build_criterion

        def build_overflowing_criterion(**kwargs):
            criterion, calls = build_criterion(**kwargs), itertools.count(1)

            def overflowing(logits, targets):
                loss = criterion(logits, targets)
                return loss * math.inf if next(calls) == args.inf_loss_at_call else loss

            return overflowing

        trainer.build_criterion = build_overflowing_criterion  # train() looks the name up when it runs
    if args.report_cache_device:
        cache_device = fastdata.cache_device

        def reporting_cache_device(nbytes: int, device: torch.device) -> torch.device:
            chosen = cache_device(nbytes, device)
            print(f"fast-path cache: {nbytes} bytes on {chosen}", flush=True)
            return chosen

        fastdata.cache_device = reporting_cache_device  # TensorLoader looks the name up when it runs
    trainer.main(parse_cli(argv[split + 1 :]))


def throughput_worker(argv: list[str]) -> None:
    """Prints `RESULT {json}` per --model NAME:SIDE:BATCH: median images/s of training steps on one
    random batch already on the device, and the peak memory they allocated."""
    parser = argparse.ArgumentParser(prog="gpu_check.py --worker throughput")
    parser.add_argument("--device", required=True)
    parser.add_argument("--precision", required=True, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    args = parser.parse_args(argv)

    from classifier.hardware import resolve_precision

    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device).value
    for spec in args.model:
        name, side, batch = spec.split(":")
        result = measure_steps(
            name,
            int(side),
            int(batch),
            device,
            precision,
            warmup=args.warmup,
            steps=args.steps,
            repeats=args.repeats,
        )
        print("RESULT " + json.dumps(result), flush=True)


def measure_steps(
    name: str,
    side: int,
    batch: int,
    device: torch.device,
    precision: str,
    *,
    warmup: int,
    steps: int,
    repeats: int,
) -> dict:
    """train.py's step without data loading, EMA and metrics: forward under autocast, backward, AdamW."""
    from throughput import images_per_s  # bench/throughput.py: warm-up, synchronize, time `count` steps
    from torch import nn

    from classifier.config import OptimConfig
    from classifier.models import build_model
    from classifier.optim import build_optimizer, default_lr

    start = time.perf_counter()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the peak of this model alone
    model = build_model(name, NUM_CLASSES).to(device, memory_format=torch.channels_last)
    o = OptimConfig()
    optimizer = build_optimizer(
        model,
        "adamw",
        lr=default_lr("adamw", pretrained=False),
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        betas=o.betas,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=precision != "fp32")
    images = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast:
            loss = criterion(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    batches = itertools.repeat((images, labels))
    rates = [
        images_per_s(batches, step, warmup=warmup if r == 0 else 0, count=steps, device=device)
        for r in range(repeats)
    ]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "model": name,
        "side": side,
        "batch": batch,
        "precision": precision,
        "repeats": rates,
        "images_per_s": statistics.median(rates),
        "peak_memory_gib": peak,
        "seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        workers = {"train": train_worker, "throughput": throughput_worker}
        workers[sys.argv[2]](sys.argv[3:])
    else:
        sys.exit(main(parse_args()))
