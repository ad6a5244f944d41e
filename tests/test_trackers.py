"""--log tensorboard,wandb,mlflow (classifier/trackers.py): a real run logs to W&B in offline mode and to
MLflow in a local SQLite store, and the values read back (W&B's own run file, MLflow's own client) equal
metrics.jsonl and config.json; a resume continues both runs. No network is used.

W&B and MLflow are optional extras; these tests skip when they are not installed (CI installs both).
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
import zlib
from pathlib import Path

import pytest
from helpers import NO_DATA_REPORTS, TINY_RUN

import train
from classifier import trackers
from classifier.cli import parse_cli
from classifier.config import TrackingConfig
from classifier.runlog import RunLog

STEPS_BETWEEN_LOGS = 2


def test_log_names_are_checked_before_anything_runs(monkeypatch):
    assert trackers.parse_names("tensorboard") == ["tensorboard"]
    assert trackers.parse_names(" tensorboard , tensorboard") == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker 'wandbb'"):
        trackers.parse_names("tensorboard,wandbb")
    with pytest.raises(ValueError, match="names no tracker"):
        trackers.parse_names(" , ")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(ValueError, match=r"--log mlflow needs the optional package 'mlflow'.*'\.\[mlflow\]'"):
        trackers.parse_names("tensorboard,mlflow")


def test_a_missing_extra_stops_the_run_before_its_directory_is_made(fmnist_small_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = [*TINY_RUN, "--data.root", str(fmnist_small_root), "--out-dir", str(tmp_path), "--log", "wandb"]
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[wandb\]'"):
        train.main(parse_cli(args))
    assert not any(tmp_path.iterdir())


def test_tracker_runs_are_marked_by_how_training_ended(tmp_path):
    """The status each tracker's run is finished with, for every way train() can leave."""
    finished = []

    class Recorder:
        def finish(self, status: str) -> None:
            finished.append(status)

    endings = [None, SystemExit(130), KeyboardInterrupt(), SystemExit("error: bad flag"), RuntimeError("x")]
    for ending in endings:
        log = RunLog(tmp_path, ["tensorboard"], TrackingConfig())
        log.trackers = [Recorder()]
        with contextlib.suppress(BaseException), log:
            if ending is not None:
                raise ending
    # A KeyboardInterrupt finishes nothing: it may have landed inside a tracker (RunLog.__exit__).
    assert finished == ["FINISHED", "KILLED", "FAILED", "FAILED"]


def wandb_records(run_folder: Path) -> list:
    """Every record of a W&B run file (run-ID.wandb), parsed with W&B's own protobuf classes.

    The file is a 7-byte header (':W&B', magic 0xBEE1, version 0), then LevelDB's log format: 32 KiB
    blocks of chunks, each with a CRC-32 (over its type byte and data), a length and a type (1 whole, 2
    first, 3 middle, 4 last piece of a record); fewer than 7 bytes left in a block are padding."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block = 32768
    records, pieces, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:  # zeroed space at the end of the file
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk in {path}"
        pieces += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_history(records: list) -> dict[int, dict]:
    """W&B's logged rows by step: {step: {key: value}} (nested keys joined with '/')."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def wandb_config(records: list) -> dict:
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def wandb_summary(records: list) -> dict:
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


@pytest.fixture(scope="module")
def logged_run(fmnist_small_root, tmp_path_factory):
    """Two epochs logged to TensorBoard, W&B (offline) and MLflow (SQLite), then resumed for a third."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install -e '.[wandb]'")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    base = tmp_path_factory.mktemp("trackers")
    store = f"sqlite:///{base / 'mlflow.db'}"
    args = [*TINY_RUN, *NO_DATA_REPORTS, "--data.root", str(fmnist_small_root), "--out-dir", str(base),
            "--name", "run", "--epochs", "2", "--log-every-steps", str(STEPS_BETWEEN_LOGS),
            "--log", "tensorboard,wandb,mlflow", "--tracking.mlflow-uri", store]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        train.main(parse_cli(args))
        run_dir = base / "run"
        ids_after_first = json.loads((run_dir / trackers.IDS_FILE).read_text())
        resume = ["--resume", str(run_dir), "--epochs", "3", "--accept-config-changes", "--no-progress"]
        train.main(parse_cli(resume))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "dir": run_dir,
        "records": records,
        "config": json.loads((run_dir / "config.json").read_text()),
        "ids_after_first": ids_after_first,
        "ids": json.loads((run_dir / trackers.IDS_FILE).read_text()),
        "store": store,
    }


def test_mlflow_holds_the_run_s_numbers(logged_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=logged_run["store"])
    ids = logged_run["ids"]["mlflow"]
    assert ids == logged_run["ids_after_first"]["mlflow"]  # the resume continued the same run
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    records = logged_run["records"]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for tag, key in (("val/top1", "top1"), ("val/loss", "loss"), ("val/macro_f1", "macro_f1")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == [(r["step"], pytest.approx(r["val"][key], abs=1e-12)) for r in records], tag
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted({m.step for m in losses})
    assert steps == list(range(STEPS_BETWEEN_LOGS, records[-1]["step"] + 1, STEPS_BETWEEN_LOGS))
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    # the flags and resolved settings as params; the whole config.json as an artifact
    config = logged_run["config"]
    assert run.data.params["epochs"] == "2"  # the run's first config; the resume's change is in config.json
    assert run.data.params["data.image_size"] == str(config["data"]["image_size"])
    assert run.data.params["resolved.precision.value"] == config["resolved"]["precision"]["value"]
    artifact = Path(client.download_artifacts(run.info.run_id, "config.json", str(logged_run["dir"].parent)))
    assert json.loads(artifact.read_text())["data"] == config["data"]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for epoch in records:
        for tag in ("val~confusion_matrix", "val~curves"):
            assert any(p.startswith(f"images/{tag}+step+{epoch['step']}+") for p in images), (tag, epoch)
    assert run.data.tags["artifact.best_checkpoint"] == str(
        (logged_run["dir"] / "checkpoints/best.pt").resolve()
    )


def test_wandb_offline_run_holds_the_run_s_numbers(logged_run):
    run_dir, records = logged_run["dir"], logged_run["records"]
    run_id = logged_run["ids"]["wandb"]["id"]
    assert run_id == logged_run["ids_after_first"]["wandb"]["id"]  # the resume continued the same run
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2  # the first run and its resume: `wandb sync` joins them under one id
    first, resumed = (wandb_records(folder) for folder in folders)
    history = {**wandb_history(first), **wandb_history(resumed)}
    for record in records:
        row = history[record["step"]]
        for key in ("top1", "loss", "macro_f1", "balanced_accuracy"):
            assert row[f"val/{key}"] == pytest.approx(record["val"][key], abs=1e-12), (key, record["epoch"])
        assert row["train_epoch/loss"] == pytest.approx(record["train"]["loss"], abs=1e-12)
        assert row["val/confusion_matrix/_type"] == "image-file"
        assert row["val/curves/_type"] == "image-file"
    logged_steps = sorted(step for step, row in history.items() if "train/loss" in row)
    assert logged_steps == list(range(STEPS_BETWEEN_LOGS, records[-1]["step"] + 1, STEPS_BETWEEN_LOGS))
    config = wandb_config(first)
    for section in ("data", "optim", "resolved", "machine", "dataset"):
        assert config[section] == logged_run["config"][section], section
    summary = wandb_summary(resumed)
    assert summary["artifacts/best_checkpoint"] == str((run_dir / "checkpoints/best.pt").resolve())
