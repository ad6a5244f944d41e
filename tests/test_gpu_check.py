"""bench/gpu_check.py: its CPU quick mode end to end (the plumbing a GPU session will depend on, run once
with no chance to fix it there), and that a part that fails, hangs or raises shows as its own row."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
from helpers import REPO_ROOT, run_script


@pytest.fixture(scope="module")
def gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_reports_every_row(gpu_check, tmp_path):
    """About 40 s on 2 cores another job half uses: three small train.py runs (straight, stopped by
    SIGTERM, resumed) and the throughput worker; every other part is a SKIP row that says why."""
    proc = run_script(["bench/gpu_check.py", "--device", "cpu", "--quick", "--out", tmp_path], cwd=REPO_ROOT)
    assert proc.returncode == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["check"]: row for row in report["rows"]}
    expected = [name for _, names in gpu_check.CHECKS for name in names]
    assert [row["check"] for row in report["rows"]] == expected
    assert report["header"].startswith("CPU ") and "torch " in report["header"]

    assert rows["train auto"]["result"] == "PASS"
    assert "resolved " in rows["train auto"]["figures"] and "img/s" in rows["train auto"]["figures"]
    # On a CPU the resumed run must end with exactly the uninterrupted run's weights.
    assert rows["exact resume"]["result"] == "PASS"
    assert "stopped at step" in rows["exact resume"]["figures"]
    assert "max abs weight difference 0 " in rows["exact resume"]["figures"]
    for name in ("throughput resnet18", "throughput resnet50"):
        assert rows[name]["result"] == "PASS" and "img/s" in rows[name]["figures"]
    gpu_only = (
        "gpu tests (pytest -m gpu)",
        "torchrun NCCL 1 process",
        "torchrun NCCL 2 GPUs",
        "train bf16",
        "train fp16",
    )
    for name in gpu_only:
        assert rows[name]["result"] == "SKIP" and "--device cpu" in rows[name]["figures"]
    assert all(row["result"] in ("PASS", "SKIP") for row in report["rows"])

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check | result | figures | seconds |" in table and "| exact resume | PASS |" in table
    assert "| exact resume | PASS |" in proc.stdout  # the table is printed last, for a session's output tail
    # Every subprocess log in one file (the device tool brings back at most 8 files).
    logs = (tmp_path / "gpu_check_logs.txt").read_text()
    assert "===== auto.log\n$ " in logs and not (tmp_path / "logs").exists()


def quick_context(gpu_check, tmp_path, seconds_left: float):
    return gpu_check.Context(
        device="cpu",
        quick=True,
        sizes=gpu_check.QUICK,
        out=tmp_path,
        scratch=tmp_path,
        deadline=time.perf_counter() + seconds_left,
    )


def test_a_command_that_exits_1_makes_a_fail_row(gpu_check, tmp_path, monkeypatch):
    """The 'train auto' check, its train.py replaced by a command that fails as a GPU run might."""
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'RuntimeError: CUDA error: out of memory'\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))  # what gpu_check starts train.py with
    ctx = quick_context(gpu_check, tmp_path, seconds_left=60)

    [row] = gpu_check.run_check(ctx, gpu_check.check_train_auto, ("train auto",))
    assert (row.check, row.result) == ("train auto", "FAIL")
    assert row.figures == "exit 1: RuntimeError: CUDA error: out of memory"
    table = gpu_check.markdown_table([row])
    assert "| train auto | FAIL | exit 1: RuntimeError: CUDA error: out of memory |" in table
    assert "CUDA error" in (tmp_path / "logs" / "auto.log").read_text()
    # Exact resume then has no reference run: it runs nothing and says why, without failing a second time.
    [row] = gpu_check.run_check(ctx, gpu_check.check_exact_resume, ("exact resume",))
    assert row.result == "SKIP" and "train auto" in row.figures


def test_hangs_exceptions_and_a_spent_budget_become_rows(gpu_check, tmp_path):
    """A command that hangs is killed at its timeout and fails; a check that raises fails its remaining
    rows; a part with no budget left is a SKIP; none of them stops the next check."""
    ctx = quick_context(gpu_check, tmp_path, seconds_left=60)
    start = time.perf_counter()
    hung = ctx.run("hang", [sys.executable, "-c", "import time; time.sleep(60)"], kind="train", timeout_s=1)
    assert time.perf_counter() - start < 15 and hung.returncode is None
    assert gpu_check.judge_run(ctx, tmp_path / "no-run", hung) == (False, ["timed out after 1 s"])

    def check_that_raises(ctx):
        yield gpu_check.Row("first", gpu_check.PASS, "done")
        raise RuntimeError("metrics.jsonl missing")

    rows = gpu_check.run_check(ctx, check_that_raises, ("first", "second", "third"))
    assert [(row.check, row.result) for row in rows] == [
        ("first", "PASS"),
        ("second", "FAIL"),
        ("third", "FAIL"),
    ]
    assert rows[1].figures == "RuntimeError: metrics.jsonl missing"

    ctx.deadline = time.perf_counter()  # budget spent: nothing starts, the row says so
    [row] = gpu_check.run_check(ctx, gpu_check.check_train_auto, ("train auto",))
    assert row.result == "SKIP" and "not started" in row.figures

    table = gpu_check.markdown_table([*rows, gpu_check.Row("pipes", "FAIL", "a | b")])
    assert "| second | FAIL | RuntimeError: metrics.jsonl missing |" in table
    assert "| pipes | FAIL | a / b |" in table  # a pipe in the figures would split the cell
