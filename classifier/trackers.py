"""Where a run's numbers go besides metrics.jsonl: TensorBoard (the default), Weights & Biases, MLflow.

`--log tensorboard,wandb,mlflow` picks any of them. Every tracker class here has the same methods:
its constructor opens its run with the resolved config (config.json's content), then `scalars`, `image`,
`flush`, `artifacts` (the final files' paths) and `finish`. runlog.RunLog calls each chosen tracker in
turn, so the training loop never asks which are on, and under DDP only rank 0 has any.

W&B and MLflow are optional extras (`pip install -e '.[wandb]'`, `'.[mlflow]'`), imported only when
chosen. A resumed run continues the same W&B run and MLflow run: their ids are kept in
RUN_DIR/trackers.json. Steps a resumed run repeats (those after its last checkpoint) are logged again;
W&B keeps the first value of a step it has seen, MLflow keeps both points.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from classifier.config import TrackingConfig, TrainConfig
from classifier.files import write_text

NAMES = ("tensorboard", "wandb", "mlflow")
# The optional trackers; each name is both the module imported and the pyproject.toml extra installing it.
OPTIONAL = ("wandb", "mlflow")
IDS_FILE = "trackers.json"  # in the run directory: which W&B and MLflow runs a resume continues


def parse_names(text: str) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb'], after checking each name and that the optional
    packages are installed, so a missing extra stops the run before the data scan (on every DDP rank)."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # in order, once
    choices = ", ".join(NAMES)
    if not names:
        raise ValueError(f"--log {text!r} names no tracker; choose any of {choices}, comma-separated")
    for name in names:
        if name not in NAMES:
            raise ValueError(f"--log: unknown tracker {name!r}; choose any of {choices}")
        if name in OPTIONAL:
            import_extra(name)
    return names


def import_extra(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ValueError(
            f"--log {name} needs the optional package {name!r}, which is not installed: "
            f"pip install -e '.[{name}]' ({err})"
        ) from None


def open_trackers(names: list[str], run_dir: Path, config: dict, settings: TrackingConfig) -> list:
    """Open one run per chosen tracker, named after the run directory, with `config` as its config.
    A tracker that RUN_DIR/trackers.json names is continued, not started again."""
    ids_path = run_dir / IDS_FILE
    previous = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    classes = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    opened = [classes[name](run_dir, config, settings, previous.get(name)) for name in names]
    ids = dict(previous)
    for name, tracker in zip(names, opened, strict=True):
        if tracker.ids:  # TensorBoard has none: a resume writes to the same folder
            ids[name] = tracker.ids
    if ids:  # a TensorBoard-only run has nothing to remember
        write_text(ids_path, json.dumps(ids, indent=2) + "\n")
    return opened


class TensorBoard:
    """Event files in RUN_DIR/tensorboard; the config and the artifacts' paths as text."""

    def __init__(self, run_dir: Path, config: dict, settings: TrackingConfig, previous: dict | None):
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        self.ids = None
        self.where = f"tensorboard: {run_dir / 'tensorboard'} (view: tensorboard --logdir {run_dir.parent})"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def artifacts(self, paths: dict[str, Path]) -> None:
        self.writer.add_text("artifacts", "\n".join(f"- {name}: `{path}`" for name, path in paths.items()))

    def finish(self, status: str) -> None:
        self.writer.close()


class WandB:
    """A W&B run in RUN_DIR/wandb. Online or offline, entity and API key are W&B's own settings
    (WANDB_MODE, WANDB_ENTITY, WANDB_API_KEY or `wandb login`); an offline run is uploaded later with
    `wandb sync RUN_DIR/wandb/offline-run-*`."""

    def __init__(self, run_dir: Path, config: dict, settings: TrackingConfig, previous: dict | None):
        self.wandb = import_extra("wandb")
        project = previous["project"] if previous else settings.wandb_project  # a resume stays in it
        try:
            self.run = self.wandb.init(
                project=project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                id=previous["id"] if previous else None,
                resume="allow" if previous else None,
            )
        except self.wandb.Error as err:
            raise SystemExit(
                f"error: --log wandb could not start a run: {err} Log in with `wandb login`, or set "
                "WANDB_MODE=offline to write the run under the run directory and `wandb sync` it later."
            ) from None
        self.ids = {"id": self.run.id, "project": project}
        folder, mode = Path(self.run.dir).parent, self.run.settings.mode
        self.where = f"wandb: run {self.run.id} ({mode}) in {folder}"
        if mode == "offline":
            self.where += f"; upload it with: wandb sync {folder}"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(pixels)}, step=step)

    def flush(self) -> None:
        pass  # W&B writes in its own process as values arrive

    def artifacts(self, paths: dict[str, Path]) -> None:
        for name, path in paths.items():
            self.run.summary[f"artifacts/{name}"] = str(path)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# A character MLflow refuses in a metric name (a class name in a tag may have one); each becomes _.
MLFLOW_REFUSED = re.compile(r"[^0-9A-Za-z_\-. :/]")
MLFLOW_PARAMS_PER_CALL = 100  # log_batch's limit
PARAM_SECTIONS = ("derived", "resolved", "machine")  # config.json's facts that become MLflow params


class MLflow:
    """An MLflow run through MlflowClient (no global "active run"). The store is --tracking.mlflow-uri,
    else MLFLOW_TRACKING_URI, else sqlite:///OUT_DIR/mlflow.db with artifacts in OUT_DIR/mlflow-artifacts,
    so nothing lands in the working directory. The flags and resolved settings are the run's params
    (lists as JSON), config.json its first artifact; characters MLflow refuses in a metric name become _."""

    def __init__(self, run_dir: Path, config: dict, settings: TrackingConfig, previous: dict | None):
        import_extra("mlflow")
        from mlflow.tracking import MlflowClient

        if previous:  # the run a resume continues, in the store it started in, whatever the flags say now
            uri = previous["tracking_uri"]
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            uri = settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(run_dir)
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self.new_run(run_dir, config, settings.mlflow_experiment, uri)
        self.ids = {"tracking_uri": uri, "run_id": self.run_id}
        self.where = f"mlflow: run {self.run_id} in {uri} (experiment {settings.mlflow_experiment!r})"

    def new_run(self, run_dir: Path, config: dict, experiment_name: str, uri: str) -> str:
        """Create the run (and its experiment when there is none), log its params and config.json; its id."""
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None  # the store's default, except beside our own default store
            if uri == default_uri(run_dir):
                artifacts = (run_dir.parent / "mlflow-artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifacts)
        run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(name, value) for name, value in flat_params(config).items()]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start : start + MLFLOW_PARAMS_PER_CALL])
        self.client.log_dict(run_id, config, "config.json")
        return run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        milliseconds = int(time.time() * 1000)
        metrics = [
            Metric(MLFLOW_REFUSED.sub("_", name), float(value), milliseconds, step)
            for name, value in values.items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, pixels, key=MLFLOW_REFUSED.sub("_", tag), step=step)

    def flush(self) -> None:
        pass  # every call above is written to the store before it returns

    def artifacts(self, paths: dict[str, Path]) -> None:
        for name, path in paths.items():
            self.client.set_tag(self.run_id, f"artifact.{name}", str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def default_uri(run_dir: Path) -> str:
    """The SQLite store beside the run directories, shared by every run under OUT_DIR."""
    return "sqlite:///" + str((run_dir.parent / "mlflow.db").resolve())


def flat_params(config: dict) -> dict[str, str]:
    """The flags and the derived, resolved and machine sections of config.json, flattened for MLflow's
    params: 'optim.lr' -> '0.01', lists and None as JSON. The dataset fingerprint and package versions
    stay in the config.json artifact."""
    flags = {field.name for field in dataclasses.fields(TrainConfig)}
    chosen = {key: value for key, value in config.items() if key in flags or key in PARAM_SECTIONS}

    def flat(values: dict, prefix: str) -> dict[str, str]:
        out = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value if isinstance(value, str) else json.dumps(value)
        return out

    return flat(chosen, "")
