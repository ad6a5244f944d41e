"""Interruptions, crashes, corrupt files, bad flags and NaN losses: nothing is lost, every failure is
named."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import NO_DATA_REPORTS, REPO_ROOT, run_script

import train
from classifier import checkpoint as ckpt
from classifier import resume
from classifier.cli import parse_cli

# mobilenet_v3_small at 32 px: small checkpoints, fast steps, and dropout (so RNG restore matters).
SMALL = [
    "--model",
    "mobilenet_v3_small",
    "--data.image-size",
    "32",
    "--data.resize-size",
    "32",
    "--data.batch-size",
    "8",
    "--data.num-workers",
    "0",
    "--no-progress",
    "--ema-half-life-epochs",
    "0.5",
    *NO_DATA_REPORTS,
]


def small_args(root, out, name, *extra):
    return [*SMALL, "--data.root", str(root), "--out-dir", str(out), "--name", name, *map(str, extra)]


def same_weights(a: Path, b: Path) -> bool:
    x, y = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    return all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"]) and all(
        torch.equal(x["ema"][k], y["ema"][k]) for k in x["ema"]
    )


@pytest.fixture(scope="module")
def straight(fmnist_small_root, tmp_path_factory):
    """The uninterrupted reference run: 3 epochs of 13 steps."""
    out = tmp_path_factory.mktemp("straight")
    train.main(parse_cli(small_args(fmnist_small_root, out, "ref", "--epochs", "3")))
    return out / "ref"


def start(args, command=("train.py",), env=None, **kw):
    """train.py (or another script) with `args`, in a process whose output (stdout and stderr) is piped."""
    env = {**(env or os.environ), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, *map(str, command), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def wait_for_line(proc, text, timeout=300):
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen)
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_resumable_checkpoint(signum, straight, fmnist_small_root, tmp_path):
    proc = start(small_args(fmnist_small_root, tmp_path, "sig", "--epochs", "3", "--log-every-steps", "1"))
    wait_for_line(proc, "step 16/")  # in epoch 1
    proc.send_signal(signum)
    output = proc.stdout.read()
    assert proc.wait(60) == 128 + signum
    assert "continue with: python train.py --resume" in output
    saved = ckpt.load_checkpoint(tmp_path / "sig")
    assert saved["epoch"] == 1 and 0 < saved["batches_in_epoch"] < 13  # stopped mid-epoch, at a step boundary
    resumed = run_script(["train.py", "--resume", tmp_path / "sig"], cwd=REPO_ROOT)
    assert resumed.returncode == 0
    assert same_weights(straight, tmp_path / "sig")


def test_a_second_signal_stops_at_once():
    """The first Ctrl-C only sets a flag the loop reads at the next step; the second raises at once."""
    from classifier.faults import StopRequest

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under nohup or `cmd &`
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert stop.requested(torch.device("cpu")) and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt, match="second signal"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_stops_a_running_trainer_at_once(fmnist_small_root, tmp_path):
    """Two Ctrl-Cs in a row to a training process with data workers: it leaves at once (no checkpoint
    of the interrupted step), and its workers with it."""
    args = small_args(
        fmnist_small_root,
        tmp_path,
        "twice",
        "--epochs",
        "3",
        "--log-every-steps",
        "1",
        "--data.num-workers",
        "2",
    )
    env = {**os.environ, "FAULT": "slow-steps"}  # 3 s a step: the second signal lands before the step ends
    proc = start(args, command=["tests/faulty_train.py"], env=env, start_new_session=True)
    wait_for_line(proc, "step 1/")
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "SIGINT: finishing this step")  # the first one was handled: two are not merged
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("still running 60 s after the second SIGINT") from None
    assert proc.returncode != 0 and "second signal (SIGINT): stopping at once" in output
    assert "stopped at step" not in output and not (tmp_path / "twice" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("where", ["mid-step", "mid-save"])
def test_kill_9_loses_nothing_before_the_last_checkpoint(where, straight, fmnist_small_root, tmp_path):
    args = small_args(
        fmnist_small_root,
        tmp_path,
        "k9",
        "--epochs",
        "3",
        "--checkpoint-every-steps",
        "1",
        "--log-every-steps",
        "1",
    )
    checkpoints = tmp_path / "k9" / "checkpoints"
    if where == "mid-step":
        proc = start(args)
        wait_for_line(proc, "step 20/")
    else:  # killed between a save's two renames: last.pt moved aside, the new one not yet in place
        proc = start(args, command=["tests/faulty_train.py"], env={**os.environ, "FAULT": "hang-mid-save"})
        wait_for_line(proc, "MID-SAVE")
        assert not (checkpoints / "last.pt").exists() and (checkpoints / "last.prev.pt").is_file()
        assert list(checkpoints.glob(".last.pt.*.tmp"))  # the complete new checkpoint, under its temp name
    proc.kill()
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    ckpt.load_checkpoint(tmp_path / "k9")  # the newest complete checkpoint survives
    resumed = run_script(["train.py", "--resume", tmp_path / "k9"], cwd=REPO_ROOT)
    assert resumed.returncode == 0
    assert same_weights(straight, tmp_path / "k9")


def test_resume_refuses_changed_flags_unless_accepted(straight, tmp_path):
    proc = run_script(
        ["train.py", "--resume", straight, "--optim.lr", "0.5", "--data.no-hflip"], cwd=REPO_ROOT
    )
    assert proc.returncode != 0
    assert (
        "optim.lr: None -> 0.5" in proc.stderr
        and "data.hflip" in proc.stderr
        and "--accept-config-changes" in proc.stderr
    )
    import shutil

    shutil.copytree(straight, tmp_path / "more")
    proc = run_script(
        ["train.py", "--resume", tmp_path / "more", "--epochs", "4", "--accept-config-changes"], cwd=REPO_ROOT
    )
    assert proc.returncode == 0
    assert ckpt.load_checkpoint(tmp_path / "more")["epoch"] == 4


def test_resume_refuses_data_with_other_classes(straight, tmp_path):
    import shutil

    from classifier.config import from_dict

    data = tmp_path / "data"
    shutil.copytree(from_dict(ckpt.load_checkpoint(straight)["config"]).data.root, data)
    shutil.move(data / "train" / "Bag", data / "train" / "Purse")  # Bag gone, a new class Purse
    shutil.rmtree(data / "test" / "Bag")
    shutil.copytree(straight, tmp_path / "run")
    proc = run_script(
        ["train.py", "--resume", tmp_path / "run", "--data.root", data, "--accept-config-changes"],
        cwd=REPO_ROOT,
    )
    assert proc.returncode != 0 and "missing from the data: ['Bag']" in proc.stderr
    assert "not in the checkpoint: ['Purse']" in proc.stderr and "step " not in proc.stdout


def test_corrupt_last_checkpoint_falls_back_to_the_previous(straight, tmp_path, capsys):
    import shutil

    shutil.copytree(straight, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert ckpt.previous_of(last).is_file()  # the save before the last one was kept
    last.write_bytes(last.read_bytes()[:1000])
    fallback = ckpt.load_checkpoint(tmp_path / "run")
    assert fallback["epoch"] == 2 and fallback["loaded_from"] == str(ckpt.previous_of(last).resolve())
    assert f"falling back to the previous checkpoint {ckpt.previous_of(last)}" in capsys.readouterr().err
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    proc = run_script(["train.py", "--resume", tmp_path / "resumed"], cwd=REPO_ROOT)  # redoes the last epoch
    assert proc.returncode == 0 and "falling back to the previous checkpoint" in proc.stderr
    assert "resumed" in proc.stdout and "at epoch 2, step 26" in proc.stdout
    assert same_weights(straight, tmp_path / "resumed")
    ckpt.previous_of(last).unlink()
    with pytest.raises(ValueError, match="last.pt"):
        ckpt.load_checkpoint(tmp_path / "run")


def test_resume_auto_recovers_a_crashed_worker_under_torchrun(straight, fmnist_small_root, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "CRASH_MARKER": str(tmp_path / "crashed"),
        "DIE_AT_STEP": "20",
        # torchrun would set 1 thread; the reference ran with this process's count, and CPU kernels
        # split their sums by thread, so bit-identity needs the same count.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    args = small_args(
        fmnist_small_root,
        tmp_path,
        "auto",
        "--epochs",
        "3",
        "--checkpoint-every-steps",
        "3",
        "--resume",
        "auto",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "--max-restarts=1",
        "tests/crash_once_worker.py",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert (tmp_path / "crashed").exists()  # it did die once
    assert "resumed" in proc.stdout and "at epoch 1, step 18" in proc.stdout
    assert same_weights(straight, tmp_path / "auto")


def test_a_diverging_run_stops_before_saving_anything_nonfinite(fmnist_small_root, tmp_path):
    """LR 1e6: which comes first depends on the CPU's kernels: a NaN loss (the batch is named and its 8
    files listed), or weights gone NaN/inf after a step whose loss was still finite (the tensors named).
    Either way the run stops before its first save."""
    proc = run_script(
        [
            "train.py",
            *small_args(
                fmnist_small_root,
                tmp_path,
                "nan",
                "--epochs",
                "2",
                "--optim.lr",
                "1e6",
                "--optim.clip-grad-norm",
                "None",
                "--optim.warmup-epochs",
                "0",
                "--log-every-steps",
                "1",
            ),
        ],
        cwd=REPO_ROOT,
    )
    assert proc.returncode != 0
    if "the loss became NaN/inf in epoch 0, batch" in proc.stderr:
        listed = (tmp_path / "nan" / "nonfinite_batch.txt").read_text().split()
        assert len(listed) == 8 and all(Path(p).is_file() for p in listed)
    else:
        assert re.search(r"error: after step \d+ the weights hold NaN/inf \(\S+", proc.stderr), proc.stderr
        assert not (tmp_path / "nan" / "nonfinite_batch.txt").exists()
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()  # nothing NaN was saved


def poison_first_training_image(monkeypatch) -> list[str]:
    """Make training image 0 all NaN in its batch (regular path, main-process loading). The dataset's items
    are uint8, which cannot hold a NaN, so the item is only marked in __getitem__ and its row of the
    normalized batch is set to NaN in collate. Returns the list its file's path is appended to each time
    it is served."""
    from classifier.data import ImageDataset

    real_getitem, real_collate = ImageDataset.__getitem__, ImageDataset.collate
    served, marked = [], []

    def poisoned_getitem(self, key):
        image, label = real_getitem(self, key)
        if isinstance(key, tuple) and key[0] == 0:  # a training draw (the val loader passes plain indices)
            served.append(self.samples[0][0])
            marked.append(image)
        return image, label

    def poisoned_collate(self, items):
        images, labels = real_collate(self, items)
        for position, (image, _) in enumerate(items):
            if any(image is bad for bad in marked):
                images[position] = float("nan")
        return images, labels

    monkeypatch.setattr(ImageDataset, "__getitem__", poisoned_getitem)
    monkeypatch.setattr(ImageDataset, "collate", poisoned_collate)
    return served


def finite_checkpoints(run_dir: Path) -> list[str]:
    """Every checkpoint file of the run, each checked to hold only finite model and EMA tensors."""
    files = sorted((run_dir / "checkpoints").glob("*.pt"))
    for path in files:
        state = ckpt.read_checkpoint(path)
        assert not ckpt.nonfinite_tensors(state["model"], state["ema"] or {}), path
    return [path.name for path in files]


def test_nan_loss_can_be_skipped(fmnist_small_root, tmp_path, monkeypatch):
    served = poison_first_training_image(monkeypatch)
    result = train.main(
        parse_cli(
            small_args(
                fmnist_small_root,
                tmp_path,
                "skip",
                "--epochs",
                "2",
                "--nonfinite-loss",
                "skip",
                "--log-every-steps",
                "1",
            )
        )
    )
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert len(served) >= 1 and records[-1]["skipped_nonfinite_batches"] == len(
        served
    )  # each NaN draw skipped
    saved = ckpt.load_checkpoint(tmp_path / "skip")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert result["step"] == 26
    events = (tmp_path / "skip" / "metrics.jsonl").read_text()
    assert "NaN" not in events


def test_disk_full_while_saving_keeps_the_previous_checkpoint(fmnist_small_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(f, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save_until_disk_full)
    named = r"could not write \S+/last\.pt \(No space left on device\); the previous file is intact"
    with pytest.raises(OSError, match=named):
        train.main(
            parse_cli(
                small_args(
                    fmnist_small_root, tmp_path, "full", "--epochs", "2", "--checkpoint-every-steps", "5"
                )
            )
        )
    assert ckpt.load_checkpoint(tmp_path / "full")["step"] == 10
    assert not list((tmp_path / "full" / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out-dir", "/etc/hostname/runs"], "cannot write to the run directory"),
        (
            ["--model", "convnext_tiny", "--data.image-size", "8", "--data.resize-size", "8"],
            "--data.image-size 8 is too small for convnext_tiny",
        ),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    ],
)
def test_bad_flags_are_named(extra, message, fmnist_small_root, tmp_path):
    proc = run_script(
        ["train.py", "--data.root", fmnist_small_root, "--out-dir", tmp_path, "--no-progress", *extra],
        cwd=REPO_ROOT,
    )
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert "step " not in proc.stdout and not list(tmp_path.glob("*/checkpoints/*.pt"))  # before training


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')",))

    (tmp_path / "evil" / "checkpoints").mkdir(parents=True)
    with open(tmp_path / "evil" / "checkpoints" / "last.pt", "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "config": RunsCode()}, f)
    torch.save({"format": ckpt.FORMAT, "config": RunsCode()}, tmp_path / "evil2.pt")
    for command in (
        ["train.py", "--resume", tmp_path / "evil"],
        ["train.py", "--resume", tmp_path / "evil2.pt"],
        ["export.py", tmp_path / "evil2.pt"],
        ["evaluate.py", tmp_path / "evil2.pt"],
    ):
        proc = run_script(command, cwd=REPO_ROOT)
        assert proc.returncode != 0 and "cannot load checkpoint" in proc.stderr
    assert not (tmp_path / "PWNED").exists()


def test_fp16_nan_forward_stops_and_saves_nothing_nonfinite(fmnist_small_root, tmp_path, monkeypatch):
    """fp16: the GradScaler skips the optimizer step of a NaN batch, but the forward has already put NaN
    into BatchNorm's running statistics, so the run must stop as under fp32."""
    served = poison_first_training_image(monkeypatch)
    args = small_args(
        fmnist_small_root,
        tmp_path,
        "f16",
        "--epochs",
        "2",
        "--precision",
        "fp16",
        "--checkpoint-every-steps",
        "1",
        "--log-every-steps",
        "4",
    )
    with pytest.raises(SystemExit, match=r"the loss became NaN/inf in epoch \d, batch"):
        train.main(parse_cli(args))
    listed = (tmp_path / "f16" / "nonfinite_batch.txt").read_text().split()
    assert served[0] in listed and len(listed) == 8
    assert finite_checkpoints(tmp_path / "f16") != []  # saves before the NaN batch, none after it


def test_fp16_scaler_skipped_steps_are_counted_not_stopped_on(fmnist_small_root, tmp_path, monkeypatch):
    """An overflowing gradient with a finite loss is what the GradScaler is for: it skips that step and
    lowers its scale, and the run goes on, counting the skipped steps."""
    real_build = train.models.build_model
    backward_calls = []

    def build_with_one_overflow(*args, **kw):
        model = real_build(*args, **kw)
        first = next(model.parameters())

        def third_overflows(grad):  # the third backward gives this weight an infinite gradient
            backward_calls.append(1)
            return grad * float("inf") if len(backward_calls) == 3 else grad

        first.register_hook(third_overflows)  # the loss stays finite
        return model

    monkeypatch.setattr(train.models, "build_model", build_with_one_overflow)
    args = small_args(
        fmnist_small_root, tmp_path, "f16", "--epochs", "1", "--precision", "fp16", "--log-every-steps", "5"
    )
    result = train.main(parse_cli(args))
    record = json.loads((tmp_path / "f16" / "metrics.jsonl").read_text())
    assert result["step"] == 13 and record["scaler_skipped_steps"] == 1
    assert ckpt.read_checkpoint(tmp_path / "f16" / "checkpoints" / "last.pt")["scaler"]["scale"] == 2.0**15
    finite_checkpoints(tmp_path / "f16")


@pytest.mark.parametrize("failure", ["exception", "nan-stop"])
def test_a_failing_run_with_data_workers_exits_at_once(failure, fmnist_small_root, tmp_path):
    """Every exit path shuts the DataLoader workers down: they ignore signals, and at interpreter exit
    multiprocessing would wait for them forever."""
    args = small_args(fmnist_small_root, tmp_path, "w", "--epochs", "1", "--data.num-workers", "2")
    if failure == "exception":  # late: after training, with both loaders' persistent workers alive
        env = {**os.environ, "FAULT": "fail-after-training"}
        proc = start(args, command=["tests/faulty_train.py"], env=env, start_new_session=True)
        expected = "injected failure after the last epoch"
    else:
        args += [
            "--optim.optimizer",
            "sgd",
            "--optim.lr",
            "1e5",
            "--precision",
            "fp16",
            "--log-every-steps",
            "2",
        ]
        proc = start(args, start_new_session=True)
        expected = "the loss became NaN/inf"
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no exit 120 s after start:\n{proc.communicate()[0][-3000:]}") from None
    assert proc.returncode == 1 and expected in output


def test_resume_on_changed_files_is_refused_unless_accepted(fmnist_small_root, tmp_path):
    """The samplers index the file list, so the same positions on other files are other images: a resume
    on changed files (same classes, same root) cannot continue the run exactly and is refused unless
    accepted."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fmnist_small_root, data)
    train.main(parse_cli(small_args(data, tmp_path, "run", "--epochs", "1", "--data.max-train-batches", "2")))
    next(iter((data / "train" / "Bag").iterdir())).unlink()
    refused = run_script(["train.py", "--resume", tmp_path / "run"], cwd=REPO_ROOT)
    assert refused.returncode != 0
    assert f"the files under {data} changed since the checkpoint was written" in refused.stderr
    assert "--accept-config-changes" in refused.stderr
    accepted = run_script(
        ["train.py", "--resume", tmp_path / "run", "--accept-config-changes"], cwd=REPO_ROOT
    )
    assert accepted.returncode == 0 and "continuing on the new files" in accepted.stdout


def test_resume_with_another_cuda_device_count_is_refused_unless_accepted(straight, tmp_path):
    """A checkpoint holding the CUDA generators of 3 devices, resumed where there are not 3: refused, as
    the CUDA random streams would start afresh; accepted, the run goes on and leaves them alone."""
    import shutil

    shutil.copytree(straight, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = ckpt.read_checkpoint(last)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3
    torch.save(state, last)
    with pytest.raises(SystemExit, match="saved the random state of 3 CUDA devices and this machine has"):
        resume.check_resumed_rng(ckpt.read_checkpoint(last), accept_changes=False)
    resume.check_resumed_rng(ckpt.read_checkpoint(last), accept_changes=True)
    proc = run_script(["train.py", "--resume", tmp_path / "run"], cwd=REPO_ROOT)
    assert proc.returncode != 0 and "3 CUDA devices" in proc.stderr


def test_fp16_resume_continues_the_gradscaler(fmnist_small_root, tmp_path, monkeypatch):
    """CPU fp16 (GradScaler runs on the CPU too): a run cut mid-epoch resumes with the scaler's scale and
    growth tracker as saved. The saved scaler is set to values a fresh one never has (scale 1024, 7
    good steps) so that a resume that dropped it would show."""
    args = small_args(
        fmnist_small_root,
        tmp_path,
        "f16",
        "--epochs",
        "2",
        "--precision",
        "fp16",
        "--checkpoint-every-steps",
        "5",
    )
    real_lr_at = train.optim.lr_at
    calls = []

    def lr_at_then_die(step, **kw):
        calls.append(step)
        if len(calls) == 9:  # one call before the loop, then one per step: dies in step 8
            raise KeyboardInterrupt
        return real_lr_at(step, **kw)

    monkeypatch.setattr(train.optim, "lr_at", lr_at_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(parse_cli(args))
    monkeypatch.setattr(train.optim, "lr_at", real_lr_at)
    last = tmp_path / "f16" / "checkpoints" / "last.pt"
    state = ckpt.read_checkpoint(last)
    assert (
        state["step"] == 5 and state["scaler"]["scale"] == 2.0**16 and state["scaler"]["_growth_tracker"] == 5
    )
    state["scaler"].update(scale=1024.0, _growth_tracker=7)
    torch.save(state, last)
    result = train.main(parse_cli(["--resume", str(tmp_path / "f16")]))
    scaler = ckpt.read_checkpoint(last)["scaler"]
    assert result["step"] == 26
    assert (scaler["scale"], scaler["_growth_tracker"]) == (1024.0, 7 + 26 - 5)  # no overflow in between


def test_tensorboard_keeps_nan_and_inf_scalars(tmp_path):
    """A diverging loss must show in TensorBoard as it does in the log and metrics.jsonl, not vanish."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from classifier.config import TrackingConfig
    from classifier.runlog import RunLog

    with RunLog(tmp_path, ["tensorboard"], TrackingConfig()) as log:
        log.start({})
        values = {"loss": 2.5, "nan": float("nan"), "inf": float("inf"), "not_a_number": "text"}
        log.scalars(1, values, prefix="train/")
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/inf", "train/loss", "train/nan"]
    value = lambda tag: events.Scalars(tag)[0].value  # noqa: E731
    assert (
        value("train/loss") == 2.5 and math.isnan(value("train/nan")) and value("train/inf") == float("inf")
    )


def test_a_nan_batch_is_named_within_log_every_steps(fmnist_small_root, tmp_path, monkeypatch):
    """The stop comes at most --log-every-steps steps after the NaN batch, names that batch (its file
    listed), and nothing is saved after it."""
    served = poison_first_training_image(monkeypatch)
    args = small_args(fmnist_small_root, tmp_path, "nan", "--epochs", "2", "--log-every-steps", "4")
    with pytest.raises(SystemExit) as stopped:
        train.main(parse_cli(args))
    found = re.search(r"NaN/inf in epoch (\d), batch (\d+) \(near step (\d+)\)", str(stopped.value))
    epoch, batch, stop_step = map(int, found.groups())
    bad_step = epoch * 13 + batch + 1  # 13 steps per epoch, one batch per step
    assert bad_step <= stop_step < bad_step + 4
    listed = (tmp_path / "nan" / "nonfinite_batch.txt").read_text().split()
    assert served[0] in listed and len(listed) == 8
    saved = finite_checkpoints(tmp_path / "nan")
    assert saved == (["best.pt", "last.pt"] if epoch == 1 else [])  # epoch 0's files only, when it finished


def test_nonfinite_weights_after_a_finite_loss_are_never_saved(fmnist_small_root, tmp_path, monkeypatch):
    """A BatchNorm statistic made NaN after the third training forward (its loss stays finite): the check
    before the next save names the tensor and stops, and no saved file holds it."""
    real_build = train.models.build_model
    forwards = []

    def poison_after_third_forward(module, inputs, output) -> None:
        if output.device.type == "meta":
            return  # the start-up FLOP count (model_card.count_flops), not a step
        forwards.append(module.training)
        if forwards.count(True) == 3 and module.training:  # step 3's forward; the next save is at step 4
            module.running_var.data.fill_(float("nan"))  # .data: unseen by autograd, like a buffer update

    def build_and_poison(*args, **kw):
        model = real_build(*args, **kw)
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).register_forward_hook(
            poison_after_third_forward
        )
        return model

    monkeypatch.setattr(train.models, "build_model", build_and_poison)
    args = small_args(fmnist_small_root, tmp_path, "w", "--epochs", "1", "--checkpoint-every-steps", "2")
    with pytest.raises(
        SystemExit, match=r"after step 4 the weights hold NaN/inf \(features\.0\.1\.running_var"
    ):
        train.main(parse_cli(args))
    assert ckpt.read_checkpoint(tmp_path / "w" / "checkpoints" / "last.pt")["step"] == 2
    assert finite_checkpoints(tmp_path / "w") == ["last.pt"]
