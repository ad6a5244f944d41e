"""evaluate.py and classifier/report.py: the report's numbers, the files people read, the same numbers
from a checkpoint and from its ONNX export, and refusing data whose classes disagree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_script
from PIL import Image
from test_export import tiny_fallback_run, tiny_fmnist_export, tiny_fmnist_run
from test_groups import PATTERN as TRACK_PATTERN
from test_groups import tracked_copy

import evaluate
from classifier import checkpoint as ckpt
from classifier import models
from classifier.data import Splits, build_splits
from classifier.fashion_mnist import CLASSES
from classifier.group_report import group_rows, group_summary, groups_for_eval, vote_by_group
from classifier.images import load_image
from classifier.report import compute_report, confident_errors, worst_first
from classifier.transforms import eval_transform

CLASSES_SORTED = sorted(CLASSES)  # the class order a run trained on the Fashion-MNIST folders has
# Numbers that count images agree exactly; those that use probabilities may differ by float rounding.
COUNT_METRICS = ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy")
PROBABILITY_METRICS = ("macro_auroc", "ece", "loss", "nll", "ece_calibrated", "nll_calibrated", "temperature")


@pytest.fixture(scope="session")
def run_and_onnx(fmnist_small_root, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.getbasetemp()
    run_dir = tiny_fmnist_run(fmnist_small_root, base)
    out, _ = tiny_fmnist_export(run_dir, base)
    return run_dir, out / "model.onnx"


@pytest.fixture(scope="session")
def checkpoint_report(run_and_onnx, tmp_path_factory) -> Path:
    """evaluate.py as a user runs it, on best.pt, over the run's own validation split."""
    run_dir, _ = run_and_onnx
    out = tmp_path_factory.mktemp("eval") / "report"
    proc = run_script(
        ["evaluate.py", run_dir / "checkpoints" / "best.pt", "--split", "val", "--out", out], cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files(checkpoint_report):
    report = json.loads((checkpoint_report / "metrics.json").read_text())
    assert report["backend"] == "pytorch" and report["weights"] == "ema" and report["split"] == "val"
    assert report["num_images"] == 10 and report["num_classes"] == 10
    for name in (*COUNT_METRICS, *PROBABILITY_METRICS):
        assert isinstance(report[name], float), name
    assert [row["class"] for row in report["per_class"]] == sorted(CLASSES)  # training's order
    assert sum(row["support"] for row in report["per_class"]) == 10

    per_class = read_csv(checkpoint_report / "per_class.csv")
    f1 = [float(row["f1"]) for row in per_class]
    assert f1 == sorted(f1) and len(per_class) == 10  # worst first
    confusion = read_csv(checkpoint_report / "confusion_matrix.csv")
    assert [[int(row[c]) for c in sorted(CLASSES)] for row in confusion] == report["confusion"]
    predictions = read_csv(checkpoint_report / "predictions.csv")
    assert len(predictions) == 10 and all(Path(row["path"]).is_file() for row in predictions)
    assert sum(int(row["correct"]) for row in predictions) == round(report["top1"] * 10)
    pairs = read_csv(checkpoint_report / "confused_pairs.csv")
    assert sum(int(row["count"]) for row in pairs) == 10 - sum(int(row["correct"]) for row in predictions)

    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "errors.png", "reliability.png"):
        with Image.open(checkpoint_report / name) as image:
            assert image.format == "PNG"
            image.load()
            assert 300 <= min(image.size) and max(image.size) <= 2500, (name, image.size)


def test_val_is_the_split_training_validated_on(run_and_onnx, checkpoint_report):
    run_dir, _ = run_and_onnx
    trained = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt")["val_metrics"]
    report = json.loads((checkpoint_report / "metrics.json").read_text())
    assert report["confusion"] == trained["confusion"]
    assert report["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    assert report["macro_f1"] == pytest.approx(trained["macro_f1"], abs=1e-6)


def test_onnx_gives_the_checkpoints_numbers(run_and_onnx, checkpoint_report, tmp_path, capsys):
    run_dir, onnx_path = run_and_onnx
    # The export folder, linked elsewhere: the report then lands beside the link (the default --out).
    folder = tmp_path / "deploy"
    folder.mkdir()
    for name in ("model.onnx", "labels_mapping.json"):
        (folder / name).symlink_to(onnx_path.parent / name)
    # An export ships no data root: the run's, as its own labels_mapping.json records it.
    root = Path(json.loads((run_dir / "labels_mapping.json").read_text())["data"]["root"])
    onnx_report = evaluate.main(
        evaluate.EvalArgs(folder / "model.onnx", split="val", data=evaluate.EvalData(root=root))
    )
    assert onnx_report["backend"] == "onnxruntime" and "onnxruntime" in capsys.readouterr().out
    assert (folder / "model-eval-val" / "metrics.json").is_file()

    torch_report = json.loads((checkpoint_report / "metrics.json").read_text())
    for name in COUNT_METRICS:
        assert onnx_report[name] == pytest.approx(torch_report[name], abs=1e-6), name
    for name in PROBABILITY_METRICS:
        assert onnx_report[name] == pytest.approx(torch_report[name], abs=1e-4), name
    assert onnx_report["confusion"] == torch_report["confusion"]
    for onnx_row, torch_row in zip(onnx_report["per_class"], torch_report["per_class"], strict=True):
        assert (onnx_row["class"], onnx_row["support"]) == (torch_row["class"], torch_row["support"])
        for name in ("precision", "recall", "f1"):
            assert onnx_row[name] == pytest.approx(torch_row[name], abs=1e-6)
    columns = ("path", "true", "predicted")
    rows = [read_csv(d / "predictions.csv") for d in (folder / "model-eval-val", checkpoint_report)]
    assert [[r[c] for c in columns] for r in rows[0]] == [[r[c] for c in columns] for r in rows[1]]


def test_reports_calibration_with_the_checkpoints_temperature(run_and_onnx, checkpoint_report, tmp_path):
    run_dir, _ = run_and_onnx
    best = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    report = json.loads((checkpoint_report / "metrics.json").read_text())
    assert report["temperature"] == best["temperature"] and report["temperature_fitted"] is True
    # The val split with best.pt's weights: the numbers train.py measured when it fitted T.
    fit = best["temperature_fit"]
    assert report["nll"] == pytest.approx(fit["val_nll_before"], abs=1e-4) and report["nll"] == pytest.approx(
        report["loss"]
    )
    assert report["nll_calibrated"] == pytest.approx(fit["val_nll_after"], abs=1e-4)
    assert (report["ece"], report["ece_calibrated"]) == pytest.approx(
        (fit["val_ece_before"], fit["val_ece_after"]), abs=1e-4
    )

    # A checkpoint without a fitted temperature: T = 1.0, said so, and nothing changes.
    old = {k: v for k, v in best.items() if k not in ("temperature", "temperature_fit")}
    ckpt.save_checkpoint(old, tmp_path / "old.pt")
    old_report = evaluate.main(evaluate.EvalArgs(tmp_path / "old.pt", split="val"))
    assert old_report["temperature"] == 1.0 and old_report["temperature_fitted"] is False
    assert old_report["ece_calibrated"] == old_report["ece"] == pytest.approx(report["ece"], abs=1e-6)
    assert (tmp_path / "old-eval-val" / "reliability.png").is_file()
    old_predictions = read_csv(tmp_path / "old-eval-val" / "predictions.csv")
    assert all(row["confidence_calibrated"] == row["confidence"] for row in old_predictions)


def test_predictions_give_the_confidence_before_and_after_the_temperature(run_and_onnx, checkpoint_report):
    run_dir, _ = run_and_onnx
    best = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    temperature = best["temperature"]
    assert abs(temperature - 1.0) > 0.05  # else the two columns could not differ
    model, _ = models.model_from_checkpoint(best)
    data = best["config"]["data"]
    samples = build_splits(Path(data["root"]), data["val_fraction"], best["config"]["seed"]).val
    to_model = eval_transform(best["preprocessing"])
    with torch.no_grad():
        logits = model(torch.stack([to_model(load_image(path)) for path, _ in samples]))

    rows = read_csv(checkpoint_report / "predictions.csv")
    assert [row["path"] for row in rows] == [path for path, _ in samples]
    for row, image_logits in zip(rows, logits.double(), strict=True):
        for column, t in (("confidence", 1.0), ("confidence_calibrated", temperature)):
            scaled = (image_logits / t).exp()  # softmax by hand: exp(z / T) / sum(exp(z / T)), top class
            assert float(row[column]) == pytest.approx((scaled.max() / scaled.sum()).item(), abs=1e-4), column
    assert any(row["confidence"] != row["confidence_calibrated"] for row in rows)


def test_report_names_the_checkpoint_that_was_read(run_and_onnx, tmp_path_factory, capsys):
    """A run directory whose last.pt is truncated: load_checkpoint reads last.prev.pt (raw weights, no T),
    and the report says so, in its `model` and in its default folder beside that file."""
    run_dir, _ = run_and_onnx
    fallback = tiny_fallback_run(run_dir, tmp_path_factory.getbasetemp())
    report = evaluate.main(evaluate.EvalArgs(fallback, split="val", errors=4))
    previous = fallback / "checkpoints" / "last.prev.pt"
    assert f"falling back to the previous checkpoint {previous}" in capsys.readouterr().err
    assert report["model"] == str(previous.resolve())
    assert report["weights"] == "raw" and report["temperature_fitted"] is False
    written = json.loads((previous.parent / "last.prev-eval-val" / "metrics.json").read_text())
    assert written["model"] == report["model"]


def test_onnx_sidecar_without_the_temperature_flag_is_read_as_not_fitted(run_and_onnx, tmp_path):
    _, onnx_path = run_and_onnx
    sidecar = json.loads((onnx_path.parent / "labels_mapping.json").read_text())
    assert sidecar.pop("temperature_fitted") is True and sidecar["temperature"] != 1.0
    (tmp_path / "labels_mapping.json").write_text(json.dumps(sidecar))
    (tmp_path / "model.onnx").symlink_to(onnx_path)
    assert evaluate.load_classifier(tmp_path / "model.onnx", "cpu").card.temperature is None


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_refuses_data_with_other_classes(kind, run_and_onnx, tmp_path):
    run_dir, onnx_path = run_and_onnx
    root = tmp_path / "data"
    for name in [*CLASSES[:-1], "Hat"]:  # Ankle_boot missing, Hat new
        (root / "train" / name).mkdir(parents=True)
    model = run_dir / "checkpoints" / "best.pt" if kind == "checkpoint" else onnx_path
    with pytest.raises(SystemExit) as refused:
        evaluate.main(evaluate.EvalArgs(model, data=evaluate.EvalData(root=root), out=tmp_path / "report"))
    message = str(refused.value.code)
    assert "refusing" in message and "missing from the data: ['Ankle_boot']" in message
    assert "not in the checkpoint: ['Hat']" in message
    assert not (tmp_path / "report").exists()


def test_refuses_onnx_whose_sidecar_is_another_models(run_and_onnx, tmp_path):
    _, onnx_path = run_and_onnx
    sidecar = json.loads((onnx_path.parent / "labels_mapping.json").read_text())
    names = sidecar["idx_to_class"]
    names["0"], names["1"] = names["1"], names["0"]  # a class order that is not the model's
    (tmp_path / "labels_mapping.json").write_text(json.dumps(sidecar))
    (tmp_path / "model.onnx").symlink_to(onnx_path)
    with pytest.raises(ValueError, match="idx_to_class"):
        evaluate.main(evaluate.EvalArgs(tmp_path / "model.onnx", out=tmp_path / "report"))


# --- the numbers, on cases worked out by hand --------------------------------------------------------


def one_hot_logits(predicted: list[int], k: int, confidence: list[float] | None = None) -> torch.Tensor:
    logits = torch.zeros(len(predicted), k)
    for i, p in enumerate(predicted):
        logits[i, p] = 5.0 if confidence is None else confidence[i]
    return logits


def test_report_numbers_by_hand():
    classes = ["a", "b", "c", "d"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # no image of d
    predicted = [0, 1, 1, 1, 2, 3]  # an a taken for b, a c taken for d
    report = compute_report(one_hot_logits(predicted, 4), labels, classes)
    assert report["top1"] == pytest.approx(4 / 6)
    assert report["top5"] is None  # fewer than 5 classes
    # Recall a 0.5, b 1, c 0.5; d has no images and is left out (torchmetrics' macro recall gives 0.5).
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    assert report["classes_without_images"] == ["d"]
    assert 0.5 < report["macro_auroc"] <= 1.0  # a 0 for d would pull a mean of 3 good classes below 0.75
    assert report["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert report["most_confused"] == [
        {"true": "a", "predicted": "b", "count": 1, "share_of_true": 0.5},
        {"true": "c", "predicted": "d", "count": 1, "share_of_true": 0.5},
    ]
    b = report["per_class"][1]
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(2 / 3), 1.0, 2)
    assert [row["class"] for row in worst_first(report["per_class"])] == ["a", "c", "b", "d"]


def test_calibration_error():
    labels = torch.tensor([0, 1, 0, 1])
    # Always ~100% sure, right half the time: ECE 0.5. Always 50% sure and right half the time: ECE 0.
    overconfident = compute_report(one_hot_logits([0, 0, 0, 0], 2, [30.0] * 4), labels, ["x", "y"])
    assert overconfident["ece"] == pytest.approx(0.5, abs=1e-4)
    calibrated = compute_report(torch.zeros(4, 2), labels, ["x", "y"])
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-6)


def test_confident_errors_most_confident_first():
    labels = torch.tensor([0, 1, 1, 0, 1])
    logits = one_hot_logits([0, 0, 1, 1, 0], 2, [1.0, 2.0, 1.0, 4.0, 3.0])
    assert confident_errors(logits, labels, limit=10) == [3, 4, 1]
    assert confident_errors(logits, labels, limit=2) == [3, 4]


# --- label issues and groups --------------------------------------------------------------------------


def test_every_report_ranks_its_labels_held_out_on_val(checkpoint_report):
    report = json.loads((checkpoint_report / "metrics.json").read_text())
    assert report["groups"] is None and not (checkpoint_report / "groups.csv").exists()  # no groups known
    rows = read_csv(checkpoint_report / "label_issues.csv")
    assert [int(row["rank"]) for row in rows] == list(range(1, 11))
    assert {row["held_out"] for row in rows} == {"1"} and "group" not in rows[0]
    p_given = [float(row["p_given"]) for row in rows]
    assert p_given == sorted(p_given)
    predictions = {row["path"]: row for row in read_csv(checkpoint_report / "predictions.csv")}
    for row in rows:
        assert predictions[row["path"]]["predicted"] == row["predicted"]
        # The predicted class's calibrated probability, as predictions.csv gives it (to 4 decimals).
        assert float(row["p_predicted"]) == pytest.approx(
            float(predictions[row["path"]]["confidence_calibrated"]), abs=1e-4
        )
        assert (float(row["margin"]) < 0) == (row["given"] != row["predicted"])
    with Image.open(checkpoint_report / "label_issues.png") as image:
        assert image.format == "PNG"


def probabilities(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_group_vote_is_the_argmax_of_the_mean_probability():
    # Three classes, the third never seen: it stays out of the macro F1 (1/3 of it would be a 0).
    crops = [
        ("A", 0, [0.45, 0.55, 0.0]),  # A: most crops say 1, but the mean says 0 (its true label)
        ("B", 0, [0.55, 0.45, 0.0]),  # B: most crops say 0 (right), the mean says 1
        ("C", 1, [0.2, 0.8, 0.0]),
        ("A", 0, [0.45, 0.55, 0.0]),
        ("B", 0, [0.55, 0.45, 0.0]),
        ("C", 0, [0.2, 0.8, 0.0]),  # C: labels 1, 1, 0: label 1, a group with mixed labels
        ("A", 0, [0.95, 0.05, 0.0]),
        ("B", 0, [0.0, 1.0, 0.0]),
        ("C", 1, [0.2, 0.8, 0.0]),
    ]
    vote = vote_by_group(
        probabilities([p for _, _, p in crops]),
        torch.tensor([y for _, y, _ in crops]),
        [g for g, _, _ in crops],
    )
    assert vote.names == ["A", "B", "C"]
    assert vote.labels.tolist() == [0, 0, 1] and vote.predicted.tolist() == [0, 1, 1]
    assert vote.p_predicted.tolist() == pytest.approx([1.85 / 3, 1.9 / 3, 0.8])
    assert vote.images.tolist() == [3, 3, 3] and vote.mixed_labels.tolist() == [False, False, True]

    summary = group_summary(vote, num_classes=3)
    assert summary["top1"] == pytest.approx(2 / 3) and summary["num_groups"] == 3
    # class 0: precision 1, recall 1/2; class 1: precision 1/2, recall 1: F1 2/3 each.
    assert summary["macro_f1"] == pytest.approx(2 / 3)
    assert summary["mixed_labels"] == 1 and summary["num_images"] == 9

    header, rows = group_rows(vote, ["a", "b", "c"])
    assert header == ["group", "label", "predicted", "images", "p_predicted", "correct", "mixed_labels"]
    # Wrong groups first, then the right ones least confident first.
    assert [row[0] for row in rows] == ["B", "A", "C"]
    assert rows[0] == ["B", "a", "b", 3, "0.6333", 0, 0]


def test_a_tie_in_labels_goes_to_the_first_class():
    vote = vote_by_group(probabilities([[0.5, 0.5], [0.1, 0.9]]), torch.tensor([1, 0]), ["t", "t"])
    assert (
        vote.labels.tolist() == [0]
        and vote.predicted.tolist() == [1]
        and vote.mixed_labels.tolist() == [True]
    )


def test_groups_for_eval_takes_the_runs_groups_unless_overridden(tmp_path):
    paths = [str(tmp_path / "train" / "a" / f"trk{t}_f{f}.png") for t in range(2) for f in range(2)]
    column = {path: f"game{i % 2}" for i, path in enumerate(paths)}  # as a manifest's group column gives
    splits = Splits(["a"], [(path, 0) for path in paths], [], [], column)
    assert groups_for_eval(splits, tmp_path, None, None) is column
    assert groups_for_eval(splits, tmp_path, r"(trk\d)_", r"(trk\d)_") is column  # the run's own pattern
    with pytest.raises(ValueError, match="group column and --data.group-pattern"):
        groups_for_eval(splits, tmp_path / "data.csv", r"(trk\d)_", None)
    # An override of the run's pattern: the new groups, matched on paths relative to the data root.
    splits = Splits(["a"], [(path, 0) for path in paths], [], [], {path: "x" for path in paths})
    regrouped = groups_for_eval(splits, tmp_path, r"^train/a/(trk\d)_", r"(x)")
    assert regrouped == {path: Path(path).name[:4] for path in paths}
    with pytest.raises(ValueError, match="finds no group"):
        groups_for_eval(splits, tmp_path, r"(game\d)", r"(x)")


@pytest.fixture(scope="module")
def grouped_checkpoint(run_and_onnx, fmnist_small_root, tmp_path_factory) -> Path:
    """The tiny run's best.pt as if trained with --data.group-pattern on its data cut into tracks of 4
    frames (3 tracks a class in train, 1 in test): the model is not under test, the groups are."""
    run_dir, _ = run_and_onnx
    base = tmp_path_factory.mktemp("grouped")
    root = tracked_copy(fmnist_small_root, base / "tracks", frames=4)
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.pt")
    state["config"]["data"].update(root=str(root), group_pattern=TRACK_PATTERN)
    ckpt.save_checkpoint(state, base / "grouped.pt")
    return base / "grouped.pt"


def test_reports_one_vote_per_track(grouped_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "write_pictures", lambda *args, **kwargs: None)  # seconds, tested above
    report = evaluate.main(
        evaluate.EvalArgs(grouped_checkpoint, split="test", out=tmp_path, errors=4, label_issues=4)
    )
    printed = capsys.readouterr().out
    groups = report["groups"]
    assert (groups["num_groups"], groups["num_images"], groups["mixed_labels"]) == (10, 40, 0)
    assert groups["images_per_group"] == {"min": 4, "median": 4.0, "max": 4}
    assert groups["also_in_train"]["groups"] == 0 and "WARNING" not in printed
    assert "groups: 10 (40 images, median 4 a group), one vote each" in printed
    assert json.loads((tmp_path / "metrics.json").read_text())["groups"] == groups

    # The vote, recomputed from the model's logits: mean of softmax(logits / T) over each track's frames.
    state = ckpt.load_checkpoint(grouped_checkpoint)
    model, _ = models.model_from_checkpoint(state)
    data = state["config"]["data"]
    samples = build_splits(Path(data["root"]), data["val_fraction"], state["config"]["seed"]).test
    to_model = eval_transform(state["preprocessing"])
    with torch.no_grad():
        logits = model(torch.stack([to_model(load_image(path)) for path, _ in samples]))
    calibrated = (logits.double() / state["temperature"]).softmax(dim=1)
    by_track: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(samples):
        by_track.setdefault(Path(path).name.split("_")[0], []).append(i)
    rows = {row["group"]: row for row in read_csv(tmp_path / "groups.csv")}
    assert sorted(rows) == sorted(by_track)
    correct = 0
    for track, members in by_track.items():
        mean = calibrated[members].mean(dim=0)
        label = CLASSES_SORTED[samples[members[0]][1]]
        row = rows[track]
        assert (row["label"], row["images"], row["mixed_labels"]) == (label, "4", "0")
        assert row["predicted"] == CLASSES_SORTED[int(mean.argmax())]
        assert float(row["p_predicted"]) == pytest.approx(mean.max().item(), abs=1e-4)
        correct += row["predicted"] == label
    assert groups["top1"] == pytest.approx(correct / 10)
    assert {row["group"] for row in read_csv(tmp_path / "label_issues.csv")} == set(by_track)


def test_a_group_pattern_given_to_evaluate_overrides_the_runs(run_and_onnx, tmp_path, capsys, monkeypatch):
    """The tiny run knows no groups; grouping its test images by the last digit of their file names
    mixes classes, and the same digits occur in train: both are reported."""
    monkeypatch.setattr(evaluate, "write_pictures", lambda *args, **kwargs: None)  # seconds, tested above
    run_dir, _ = run_and_onnx
    args = evaluate.EvalArgs(
        run_dir / "checkpoints" / "best.pt",
        split="test",
        out=tmp_path,
        errors=4,
        label_issues=4,
        data=evaluate.EvalData(group_pattern=r"(\d)\.png$"),
    )
    groups = evaluate.main(args)["groups"]
    printed = capsys.readouterr().out
    labels_by_digit: dict[str, set[str]] = {}
    for row in read_csv(tmp_path / "predictions.csv"):
        labels_by_digit.setdefault(row["path"][-5], set()).add(row["true"])
    assert groups["num_groups"] == len(labels_by_digit) and groups["num_images"] == 40
    assert groups["mixed_labels"] == sum(len(labels) > 1 for labels in labels_by_digit.values()) > 0
    assert (
        groups["also_in_train"]["groups"] > 0 and "WARNING" in printed and "numbers are optimistic" in printed
    )
