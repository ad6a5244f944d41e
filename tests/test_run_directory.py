"""What one training run leaves behind and prints (README "The run directory" and "Imbalance"): config.json's
provenance and derived values, the plots and the TensorBoard events written at every validation, and the
imbalance report, each checked as numbers against the data the run was given and its metrics.jsonl.

One short run serves every test: small_resnet at 28 px, 2 epochs of 6 steps, on a copy of the small
Fashion-MNIST fixture whose three rarest classes are cut down (in train/ and in a val/ folder), so that the
class counts are known exactly, the rare classes are named, and top-1 differs from balanced accuracy.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from classifier import plots
from classifier.checkpoint import load_checkpoint
from classifier.cli import parse_cli
from classifier.data import build_splits
from classifier.ema import decay_per_step
from classifier.imbalance import sampler_weights
from classifier.sampling import EpochSampler

# Folder name -> images kept; every other class keeps the fixture's 12 train and 4 val (its test) images.
# 7 x 12 + 6 + 4 + 2 = 96 train images: 6 batches of 16, and no batch is dropped.
TRAIN_KEPT = {"Sneaker": 6, "T-shirt_top": 4, "Trouser": 2}
VAL_KEPT = {"Sneaker": 2, "T-shirt_top": 2, "Trouser": 1}
RAREST_FIRST = ["Trouser", "T-shirt_top", "Sneaker"]
BATCH, STEPS_PER_EPOCH, EPOCHS, HALF_LIFE, LOG_EVERY = 16, 6, 2, 0.5, 3


def git(*args: str) -> str | None:
    """git's answer in the repository, None when it is not a git checkout (an unpacked release)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def imbalanced_copy(src: Path, dest: Path) -> Path:
    """`src` with test/ renamed val/, and the classes of TRAIN_KEPT/VAL_KEPT cut to that many images."""
    shutil.copytree(src / "train", dest / "train")
    shutil.copytree(src / "test", dest / "val")
    for split, kept in (("train", TRAIN_KEPT), ("val", VAL_KEPT)):
        for name, keep in kept.items():
            for extra in sorted((dest / split / name).iterdir())[keep:]:
                extra.unlink()
    return dest


@pytest.fixture(scope="module")
def run(fmnist_small_root, tmp_path_factory) -> dict:
    """The run, trained in this process: its directory, what it printed, its metrics.jsonl records, every
    figure it saved (path and the Figure itself, in order), and git's HEAD before and after it."""
    base = tmp_path_factory.mktemp("run-directory")
    root = imbalanced_copy(fmnist_small_root, base / "data")
    args = ["--model", "small_resnet", "--data.root", str(root), "--out-dir", str(base), "--name", "run",
            "--epochs", str(EPOCHS), "--data.image-size", "28", "--data.resize-size", "28",
            "--data.batch-size", str(BATCH), "--data.num-workers", "0", "--data.weighted-sampler",
            "--select-metric", "balanced_accuracy", "--ema-half-life-epochs", str(HALF_LIFE),
            "--log-every-steps", str(LOG_EVERY), "--no-progress"]  # fmt: skip
    saved = []
    save_figure = plots.save_figure

    def recording_save_figure(fig, path, *rest, **kw):  # the real save, with a note of what was saved
        saved.append((Path(path), fig))
        return save_figure(fig, path, *rest, **kw)

    head_before = git("rev-parse", "HEAD")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(plots, "save_figure", recording_save_figure)
        train.main(parse_cli(args))
    status = git("status", "--porcelain")
    run_dir = base / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return dict(
        dir=run_dir,
        root=root,
        out=printed.getvalue(),
        records=records,
        saved=saved,
        heads={head_before, git("rev-parse", "HEAD")},
        dirty=None if status is None else bool(status),
    )


@pytest.fixture(scope="module")
def events(run) -> EventAccumulator:
    """The run's TensorBoard events, every scalar and image kept (size_guidance 0: no sampling)."""
    files = list((run["dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    accumulator = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def expected_train_counts(classes: list[str]) -> list[int]:
    return [TRAIN_KEPT.get(name, 12) for name in classes]


# --- #16, #17: the imbalance report, as values ----------------------------------------------------------


def test_start_prints_each_class_count_and_the_imbalance_ratio(run):
    """The table printed at start gives every class's train and val count and the ratio largest/smallest
    (12 / 2). Catches counts from the wrong split, a missing class, or a ratio taken the other way round."""
    lines = run["out"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["class", "train", "val"])
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[header + 1 : header + 11]}
    classes = sorted(rows)
    assert len(rows) == 10 and [lines[header + 1 + i].split()[0] for i in range(10)] == classes
    assert [rows[name][0] for name in classes] == expected_train_counts(classes)
    assert [rows[name][1] for name in classes] == [VAL_KEPT.get(name, 4) for name in classes]
    ratio = re.search(r"imbalance ratio \(train, largest/smallest\) ([\d.]+)", lines[header + 11])
    assert ratio and float(ratio.group(1)) == 12 / 2


def test_after_the_first_epoch_it_prints_what_the_sampler_drew(run):
    """'images drawn per class' is the class count of the 96 images the weighted sampler drew in epoch 0
    (its draw recomputed here from the seed), printed once; metrics.jsonl has it for every epoch. Catches
    printing the split's counts instead, counts summed over epochs, or the wrong epoch's draw."""
    prefix = "images drawn per class this epoch: "
    lines = [line for line in run["out"].splitlines() if line.startswith(prefix)]
    assert len(lines) == 1  # after the first epoch only
    printed = dict(item.split("=") for item in lines[0][len(prefix) :].split(", "))
    splits = build_splits(run["root"], 0.1, seed=0)
    labels = torch.tensor([label for _, label in splits.train])
    counts = torch.bincount(labels, minlength=10)
    assert counts.tolist() == expected_train_counts(splits.classes)
    sampler = EpochSampler(len(labels), shuffle=True, seed=0, weights=sampler_weights(labels, counts, 1.0))
    for record in run["records"]:
        sampler.set_epoch(record["epoch"])
        drawn = torch.bincount(labels[sampler.draw()[0][: STEPS_PER_EPOCH * BATCH]], minlength=10).tolist()
        assert record["drawn_per_class"] == drawn
        if record["epoch"] == 0:
            assert [int(printed[name]) for name in splits.classes] == drawn
    # Balanced draws: the class with 2 images is drawn more often than it has images.
    assert run["records"][0]["drawn_per_class"][splits.classes.index("Trouser")] > 2


# --- #64: config.json's provenance and derived values ---------------------------------------------------


def test_config_records_the_git_commit_and_whether_the_tree_was_dirty(run):
    """git_commit is HEAD when the run started (40 hex digits), git_dirty what `git status` says. Catches a
    commit read from elsewhere, or a dirty flag that is constant or inverted."""
    config = json.loads((run["dir"] / "config.json").read_text())
    if run["heads"] == {None}:
        assert config["git_commit"] is None and config["git_dirty"] is None
        return
    assert re.fullmatch(r"[0-9a-f]{40}", config["git_commit"])
    assert config["git_commit"] in run["heads"]
    assert config["git_dirty"] is run["dirty"]


def test_config_records_the_derived_values_the_run_used(run):
    """Global batch, steps per epoch and the EMA's per-step decay, which must halve the weight of old
    weights over HALF_LIFE epochs of this run's steps. Catches a decay computed from another step count
    (e.g. the uncapped epoch, or total steps) and a dataset fingerprint with the wrong counts."""
    config = json.loads((run["dir"] / "config.json").read_text())
    derived = config["derived"]
    assert (derived["global_batch"], derived["steps_per_epoch"]) == (BATCH, STEPS_PER_EPOCH)
    assert derived["total_steps"] == EPOCHS * STEPS_PER_EPOCH
    decay = derived["ema_decay_per_step"]
    assert decay == decay_per_step(HALF_LIFE, STEPS_PER_EPOCH)
    assert decay ** (HALF_LIFE * STEPS_PER_EPOCH) == pytest.approx(0.5, rel=1e-12)
    classes = json.loads((run["dir"] / "labels_mapping.json").read_text())["idx_to_class"]
    assert config["dataset"]["counts"]["train"] == expected_train_counts([classes[str(i)] for i in range(10)])


# --- #71, #72, #18: plots and TensorBoard at every validation -------------------------------------------


def test_every_validation_writes_the_confusion_matrix_and_the_curves(run):
    """plots/confusion_matrix.png and plots/curves.png are saved after each of the 2 validations, each
    from that epoch's numbers: the confusion figure's cells are the epoch's confusion counts, and the
    curves have one point per epoch so far. Catches plots written once at the end, or stale ones."""
    saved = [(path.relative_to(run["dir"]).as_posix(), fig) for path, fig in run["saved"]]
    confusions = [fig for path, fig in saved if path == "plots/confusion_matrix.png"]
    curves = [fig for path, fig in saved if path == "plots/curves.png"]
    assert len(confusions) == len(curves) == len(run["records"]) == EPOCHS
    for record, confusion, curve in zip(run["records"], confusions, curves, strict=True):
        cells = {}
        for text in confusion.axes[0].texts:
            col, row = text.get_position()
            cells[(int(row), int(col))] = int(text.get_text())
        confusion_counts = record["val"]["confusion"]
        assert cells == {(r, c): n for r, row in enumerate(confusion_counts) for c, n in enumerate(row) if n}
        val_top1 = curve.axes[1].lines[1]  # the top-1 panel: train, then val
        assert list(val_top1.get_xdata()) == list(range(record["epoch"] + 1))
        assert val_top1.get_ydata()[-1] == record["val"]["top1"]
    for name in ("confusion_matrix.png", "curves.png"):
        with Image.open(run["dir"] / "plots" / name) as image:
            image.verify()  # a complete PNG, not a truncated write


def test_tensorboard_gets_the_confusion_matrix_at_every_validation(run, events):
    """One confusion-matrix image per validation, at the step the epoch's record names."""
    images = events.Images("val/confusion_matrix")
    assert [image.step for image in images] == [record["step"] for record in run["records"]]
    assert all(image.width > 100 and image.height > 100 for image in images)


def test_tensorboard_scalars_are_the_logged_numbers(run, events):
    """The scalars hold what metrics.jsonl and the log lines say: val and train-epoch metrics at each
    epoch's step, both candidates' select metric, and the training loss every LOG_EVERY steps. Catches
    values logged under the wrong step or tag, or numbers that differ from the records."""
    records = run["records"]
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    # TensorBoard stores float32: equal to the record up to that rounding.
    for tag, value_of in [
        ("val/top1", lambda r: r["val"]["top1"]),
        ("val/loss", lambda r: r["val"]["loss"]),
        ("val/macro_f1", lambda r: r["val"]["macro_f1"]),
        ("train_epoch/loss", lambda r: r["train"]["loss"]),
        ("val_weights/ema_balanced_accuracy", lambda r: r["val_by_weights"]["ema"]["balanced_accuracy"]),
        ("val_weights/raw_balanced_accuracy", lambda r: r["val_by_weights"]["raw"]["balanced_accuracy"]),
    ]:
        expected = {r["step"]: value_of(r) for r in records}
        assert scalar(events, tag) == pytest.approx(expected, rel=1e-6), tag
    losses = scalar(events, "train/loss")
    assert sorted(losses) == list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))
    printed = {
        int(m[1]): float(m[2])
        for m in re.finditer(r"^step (\d+)/\d+ \| epoch \d+ \| loss ([\d.]+)", run["out"], re.MULTILINE)
    }
    assert printed == pytest.approx(losses, abs=5e-5)  # the log line prints 4 decimals


def test_rarest_classes_recall_is_logged_by_name(run, events):
    """The three rarest classes' val recall goes to TensorBoard as val_recall_rare/<class> and into each
    epoch's log line, rarest first, with the record's per-class recall. Catches the wrong classes (e.g.
    the most common, or by val count), indices taken as names, or a value from another class."""
    classes = json.loads((run["dir"] / "labels_mapping.json").read_text())["class_to_idx"]
    rare_tags = sorted(tag for tag in events.Tags()["scalars"] if tag.startswith("val_recall_rare/"))
    assert rare_tags == sorted(f"val_recall_rare/{name}" for name in RAREST_FIRST)
    for name in RAREST_FIRST:
        recall = {r["step"]: r["val"]["per_class_acc"][classes[name]] for r in run["records"]}
        assert scalar(events, f"val_recall_rare/{name}") == pytest.approx(recall, rel=1e-6)
    epoch_lines = [line for line in run["out"].splitlines() if line.startswith("epoch ")]
    for record, line in zip(run["records"], epoch_lines, strict=True):
        recall = record["val"]["per_class_acc"]
        recalls = ", ".join(f"{name} {recall[classes[name]]:.2f}" for name in RAREST_FIRST)
        assert f"| rare recall {recalls} |" in line


# --- #40: --select-metric balanced_accuracy --------------------------------------------------------------


def test_balanced_accuracy_picks_the_weights_and_the_best_epoch(run):
    """With --select-metric balanced_accuracy, each epoch's weights are the candidate (EMA on ties) with
    the higher balanced accuracy, and best.pt is the first epoch with the highest one, its value recorded.
    The val split is imbalanced, so top-1 differs from balanced accuracy: catches top-1 used instead."""
    records = run["records"]
    for record in records:
        scores = {w: s["balanced_accuracy"] for w, s in record["val_by_weights"].items()}
        assert record["weights"] == ("ema" if scores["ema"] >= scores["raw"] else "raw")
    best = load_checkpoint(run["dir"] / "checkpoints" / "best.pt")["best"]
    values = [r["val"]["balanced_accuracy"] for r in records]
    assert best["metric"] == "balanced_accuracy" and best["value"] == max(values)
    assert best["epoch"] == values.index(max(values))
    # The two metrics differ on this val split, so a run that picked by top-1 would record other values.
    assert any(r["val"]["top1"] != r["val"]["balanced_accuracy"] for r in records)
    assert f"best val balanced_accuracy {max(values):.4f} at epoch {best['epoch']}" in run["out"]


def test_the_run_writes_report_html_for_its_best_epoch(run):
    """train.py ends with report.html (classifier/html_report.py, tested in test_html_report.py): the page
    names the best epoch and holds its balanced accuracy, the metric this run selects by."""
    best = load_checkpoint(run["dir"] / "checkpoints" / "best.pt")["best"]
    page = (run["dir"] / "report.html").read_text()
    assert f"best epoch {best['epoch']}</h1>" in page
    assert f'data-metric="balanced_accuracy" data-value="{json.dumps(best["value"])}"' in page


def test_a_tensorboard_only_run_writes_no_trackers_file(run):
    """trackers.json keeps the W&B and MLflow runs a resume continues; with TensorBoard alone (the default
    --log) there is none, so no file is written."""
    assert (run["dir"] / "tensorboard").is_dir()
    assert not (run["dir"] / "trackers.json").exists()
