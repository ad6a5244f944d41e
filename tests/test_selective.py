"""classifier/selective.py and where its thresholds go: the risk-coverage curve and the threshold per
target on hand-made inputs (ties kept or dropped together, too few images, float32 neighbours); then a
real run whose stored val thresholds reproduce from evaluate.py's predictions.csv, travel into the
export's sidecar, and make predict.py --target-accuracy abstain on exactly the images under them."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SCORED_RUN_TARGETS
from PIL import Image

import evaluate
import predict
from classifier import checkpoint as ckpt
from classifier import selective
from classifier.onnx_export import read_onnx_metadata


def curve_of(confidence: list[float], correct: list[int]) -> selective.Curve:
    return selective.risk_coverage(torch.tensor(confidence), torch.tensor(correct, dtype=torch.bool))


def test_curve_has_one_point_per_distinct_confidence():
    curve = curve_of([0.6, 0.9, 0.8, 0.5, 0.8], [1, 1, 0, 0, 1])
    # Most confident first: 0.9 (right), the tie 0.8 (one right, one wrong), 0.6 (right), 0.5 (wrong).
    assert (curve.kept, curve.correct, curve.images) == ([1, 3, 4, 5], [1, 2, 3, 3], 5)
    assert [curve.coverage(i) for i in range(4)] == [0.2, 0.6, 0.8, 1.0]
    assert [curve.accuracy(i) for i in range(4)] == [1.0, 2 / 3, 0.75, 0.6]
    # Each threshold lies between the lowest confidence it keeps and the highest it drops; the last keeps all.
    kept_and_dropped = [(0.9, 0.8), (0.8, 0.6), (0.6, 0.5)]
    for threshold, (kept, dropped) in zip(curve.threshold[:3], kept_and_dropped, strict=True):
        assert np.float32(dropped) < threshold <= np.float32(kept)
    assert curve.threshold[-1] == 0.0


def test_the_lowest_threshold_that_reaches_the_target_with_enough_images():
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    correct = [0, 1, 1, 1, 0, 0, 1, 0]  # accuracy of the top k: 0, .5, .67, .75, .6, .5, .57, .5
    curve = curve_of(confidence, correct)
    rows = {row["target"]: row for row in selective.thresholds_for(curve, (0.5, 0.6, 0.75, 0.8))}
    assert {t: (row["kept"], row["accuracy"]) for t, row in rows.items()} == {
        0.5: (8, 0.5),  # every image: accuracy 0.5 reaches 0.5, threshold 0.0
        0.6: (5, 0.6),  # not the top 6 (0.5) nor the top 7 (0.57), though the top 3 and 4 reach it too
        0.75: (4, 0.75),
        0.8: (None, None),  # no kept set of >= 5 images reaches 0.8
    }
    assert rows[0.5]["threshold"] == 0.0 and rows[0.5]["coverage"] == 1.0
    assert np.float32(0.4) < rows[0.6]["threshold"] <= np.float32(0.5) and rows[0.6]["coverage"] == 5 / 8
    assert rows[0.8] == {
        "target": 0.8,
        "reachable": False,
        "min_kept": 5,
        "threshold": None,
        "coverage": None,
        "accuracy": None,
        "kept": None,
    }
    # Three perfect images cannot vouch for 0.9: a threshold for it needs at least 10 kept images.
    perfect_top = curve_of([0.9, 0.8, 0.7, 0.6], [1, 1, 1, 0])
    assert selective.thresholds_for(perfect_top, (0.9,))[0]["reachable"] is False


def test_ties_are_kept_or_dropped_together_in_any_order():
    # Keeping the top 3 would reach 0.6 (2 of 3 right), but "keep when >= 0.8" keeps all four 0.8s.
    confidence, correct = [0.9, 0.8, 0.8, 0.8, 0.8], [1, 1, 0, 0, 0]
    curve = curve_of(confidence, correct)
    assert curve.kept == [1, 5]
    assert selective.thresholds_for(curve, (0.6,))[0]["reachable"] is False
    # The same images in any order give the same curve: the sort decides nothing inside a tie.
    order = list(range(5))
    for seed in range(5):
        random.Random(seed).shuffle(order)
        shuffled = curve_of([confidence[i] for i in order], [correct[i] for i in order])
        assert shuffled == curve


def test_stored_numbers_reproduce_by_keeping_confidence_at_or_above_the_threshold():
    """Random confidences on a coarse grid (many ties), random correctness: for every target, keeping
    the images with confidence >= its threshold gives exactly its kept count, coverage and accuracy."""
    generator = torch.Generator().manual_seed(0)
    confidence = torch.randint(1, 40, (500,), generator=generator) / 40  # 39 distinct values
    correct = torch.rand(500, generator=generator) < confidence  # the confident ones are more often right
    targets = (0.6, 0.7, 0.8, 0.9, 0.95)
    rows = selective.abstain_thresholds(confidence, correct, split="val", temperature=1.0, targets=targets)
    assert rows["images"] == 500 and rows["split"] == "val"
    reachable = [row for row in rows["targets"] if row["reachable"]]
    assert len(reachable) >= 3
    for row in reachable:
        kept = confidence >= row["threshold"]
        assert int(kept.sum()) == row["kept"] >= selective.min_kept(row["target"])
        assert row["coverage"] == row["kept"] / 500
        assert row["accuracy"] == int(correct[kept].sum()) / row["kept"] >= row["target"]
        applied = selective.apply_threshold(confidence, correct, row["threshold"])
        assert (applied["kept"], applied["coverage"], applied["accuracy"]) == (
            row["kept"],
            row["coverage"],
            row["accuracy"],
        )


def test_a_threshold_between_float32_neighbours_is_a_float32_that_splits_them():
    kept = np.float32(1.0)
    dropped = np.nextafter(kept, np.float32(0))  # the largest float32 below 1
    threshold = selective.cut_between(float(kept), float(dropped))
    assert float(dropped) < threshold <= float(kept) and float(np.float32(threshold)) == threshold
    # numpy compares float32 arrays with a Python float in float32: the same answer as in doubles.
    assert (np.array([kept, dropped]) >= threshold).tolist() == [True, False]
    assert (torch.tensor([float(kept), float(dropped)]) >= threshold).tolist() == [True, False]


def test_min_kept_and_bad_targets():
    assert [selective.min_kept(t) for t in (0.5, 0.95, 0.99, 0.995)] == [2, 20, 100, 200]
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"got {bad}"):
            selective.min_kept(bad)
    with pytest.raises(ValueError, match="no images"):
        curve_of([], [])


def test_stored_threshold_names_what_there_is():
    curve = curve_of([0.9, 0.8, 0.7, 0.6], [1, 1, 1, 0])
    stored = {"split": "val", "images": 4, "targets": selective.thresholds_for(curve, (0.5, 0.9))}
    assert selective.stored_threshold(stored, 0.5)["kept"] == 4
    with pytest.raises(ValueError, match=r"0.9 was not reachable on its val split \(4 images\).*\[0.5\]"):
        selective.stored_threshold(stored, 0.9)
    with pytest.raises(ValueError, match=r"no threshold stored for 0.99; stored targets: \[0.5, 0.9\]"):
        selective.stored_threshold(stored, 0.99)
    with pytest.raises(ValueError, match="no abstain thresholds are stored"):
        selective.stored_threshold(None, 0.99)


def test_stored_thresholds_apply_only_to_confidences_at_their_temperature():
    confidence, correct = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, True, True, False])
    stored = selective.abstain_thresholds(confidence, correct, split="val", temperature=1.5, targets=(0.7,))
    applied = selective.at_stored_thresholds(confidence, correct, stored, 1.5)
    assert [(row["target"], row["kept"], row["accuracy"]) for row in applied["targets"]] == [(0.7, 4, 0.75)]
    elsewhere = selective.at_stored_thresholds(confidence, correct, stored, 1.0)
    assert elsewhere["targets"] == [] and "temperature 1.5" in elsewhere["not_applied"]
    assert "not applied on test" in selective.stored_line(elsewhere, "test")
    assert selective.at_stored_thresholds(confidence, correct, None, 1.5) is None


# --- a real run ----------------------------------------------------------------------------------------

TARGETS = SCORED_RUN_TARGETS


@pytest.fixture(scope="module")
def run(scored_run, tmp_path_factory) -> dict:
    """The shared run's best.pt with its stored thresholds, evaluate.py's report on val, and the export."""
    out = tmp_path_factory.mktemp("selective") / "eval-val"
    best = scored_run["checkpoint"]
    report = evaluate.main(evaluate.EvalArgs(best, split="val", out=out, errors=0, label_issues=0))
    return {
        "best": best,
        "stored": ckpt.load_checkpoint(best)["abstain_thresholds"],
        "report": report,
        "eval_dir": out,
        "export_dir": scored_run["export_dir"],
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stored_val_thresholds_reproduce_from_evaluates_predictions(run):
    stored = run["stored"]
    predictions = read_csv(run["eval_dir"] / "predictions.csv")
    assert len(predictions) == 60 and (stored["split"], stored["images"]) == ("val", 60)
    assert stored["temperature"] == ckpt.load_checkpoint(run["best"])["temperature"]
    assert [row["target"] for row in stored["targets"]] == list(TARGETS)
    reachable = [row for row in stored["targets"] if row["reachable"]]
    assert any(0 < row["kept"] < 60 for row in reachable), "no stored threshold keeps part of the split"
    assert stored["targets"][-1]["reachable"] is False  # 0.999
    for row in reachable:
        kept = [p for p in predictions if float(p["confidence_calibrated"]) >= row["threshold"]]
        assert len(kept) == row["kept"]
        assert len(kept) / len(predictions) == row["coverage"]
        assert sum(int(p["correct"]) for p in kept) / len(kept) == row["accuracy"] >= row["target"]

    # evaluate.py applies the model's thresholds to the split it judges: on val, the stored numbers.
    applied = run["report"]["selective"]["stored"]
    assert (applied["from_split"], applied["from_images"]) == ("val", 60)
    for row, again in zip(reachable, applied["targets"], strict=True):
        assert {k: again[k] for k in ("target", "kept", "coverage", "accuracy")} == {
            k: row[k] for k in ("target", "kept", "coverage", "accuracy")
        }


def test_evaluate_writes_the_selective_block_and_the_figure(run):
    block = json.loads((run["eval_dir"] / "metrics.json").read_text())["selective"]
    assert (block["split"], block["images"]) == ("val", 60)
    assert [row["target"] for row in block["targets"]] == list(selective.TARGETS)
    with Image.open(run["eval_dir"] / "risk_coverage.png") as image:
        assert image.format == "PNG" and 300 <= min(image.size)


def test_the_export_carries_the_thresholds(run):
    sidecar = json.loads((run["export_dir"] / "labels_mapping.json").read_text())
    assert sidecar["abstain_thresholds"] == run["stored"]
    # The same ones in the ONNX metadata: read_sidecar refuses a model whose two copies differ.
    assert read_onnx_metadata(run["export_dir"] / "model.onnx")["abstain_thresholds"] == run["stored"]


def test_predict_abstains_below_the_stored_threshold(run, tmp_path, capsys):
    """predict.py on the ONNX export (its sidecar is all it reads) over the val images: it abstains on
    exactly the images whose calibrated confidence is under the stored threshold."""
    row = next(r for r in run["stored"]["targets"] if r["reachable"] and r["kept"] < 60)
    predictions = {p["path"]: p for p in read_csv(run["eval_dir"] / "predictions.csv")}
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{path}\n" for path in predictions))
    out = tmp_path / "p.jsonl"
    args = predict.PredictArgs(
        run["export_dir"] / "model.onnx",
        (str(listing),),
        out=out,
        progress=False,
        target_accuracy=row["target"],
    )
    predict.main(args)
    said = capsys.readouterr().out
    assert f"abstain: below {row['threshold']:.6f}" in said and "on its val split it kept" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 60
    for predicted in rows:
        expected = predictions[predicted["path"]]
        assert predicted["abstained"] is (float(expected["confidence_calibrated"]) < row["threshold"])
    kept = [predictions[p["path"]] for p in rows if not p["abstained"]]
    assert len(kept) == row["kept"]
    assert sum(int(p["correct"]) for p in kept) / len(kept) == row["accuracy"]


def test_predict_refuses_what_it_cannot_use(run, tmp_path):
    image = next(iter(read_csv(run["eval_dir"] / "predictions.csv")))["path"]

    def predict_with(model=run["best"], **flags):
        args = predict.PredictArgs(model, (image,), out=tmp_path / "p.csv", progress=False, **flags)
        with pytest.raises(SystemExit) as stop:
            predict.main(args)
        return str(stop.value)

    assert "not both" in predict_with(min_confidence=0.5, target_accuracy=0.4)
    message = predict_with(target_accuracy=0.99)
    assert "no threshold stored for 0.99" in message and "[0.2, 0.4, 0.6, 0.999]" in message
    assert "0.999 was not reachable on its val split (60 images)" in predict_with(target_accuracy=0.999)
    # Thresholds cut on calibrated confidences are no use on a checkpoint that lost its temperature.
    state = ckpt.load_checkpoint(run["best"])
    ckpt.save_checkpoint({k: v for k, v in state.items() if k != "temperature"}, tmp_path / "no-t.pt")
    assert "computed with temperature" in predict_with(tmp_path / "no-t.pt", target_accuracy=0.4)
    assert not (tmp_path / "p.csv").exists()
