"""predict.py and classifier/inference.py: on real images, a checkpoint, its best.safetensors and its ONNX
export each predict what evaluate.py reports for the same files (class and calibrated probability);
abstention follows --min-confidence; unreadable files are listed with their error and the rest predicted;
inputs that do not exist stop the command before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO_ROOT, run_script

import evaluate
import predict

KINDS = ("checkpoint", "safetensors", "onnx")
# evaluate.py and predict.py both write probabilities with 6 decimals: the same number read back from
# both can differ by one rounding step, 1e-6, and ONNX adds float rounding (~1e-7).
CSV_ROUNDING = 2e-6


@pytest.fixture(scope="module")
def model_files(scored_run) -> dict[str, Path]:
    """One small run's best weights in the three forms predict.py reads (conftest.py trains it)."""
    return {kind: scored_run[kind] for kind in KINDS}


@pytest.fixture(scope="module")
def crops(fmnist_small_root, tmp_path_factory) -> Path:
    """The Fashion-MNIST test images (in class folders, as a pipeline's crops may be), a truncated PNG, a
    text file saved as .jpg, and a notes file without an image extension."""
    folder = tmp_path_factory.mktemp("crops") / "crops"
    shutil.copytree(fmnist_small_root / "test", folder)
    good = sorted(folder.rglob("*.png"))[0].read_bytes()
    (folder / "bad").mkdir()
    (folder / "bad" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "bad" / "page.jpg").write_text("<html>not an image</html>\n")
    (folder / "notes.md").write_text("not a crop\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(model_files, tmp_path_factory) -> dict[str, dict]:
    """evaluate.py's predictions.csv for the checkpoint on the test split, keyed by class/file name."""
    out = tmp_path_factory.mktemp("eval") / "report"
    # The pictures (confusion matrices, errors.png, reliability.png) are test_evaluate.py's; seconds.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "write_pictures", lambda *args, **kwargs: None)
        evaluate.main(evaluate.EvalArgs(model_files["checkpoint"], split="test", out=out, label_issues=0))
    return {relative(row["path"]): row for row in read_csv(out / "predictions.csv")}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def relative(path: str) -> str:
    """class/file.png: the part of an image's path that the data root and the copy share."""
    return "/".join(Path(path).parts[-2:])


def run_predict(model: Path, inputs: list[Path | str], out: Path, **flags) -> list[dict]:
    args = predict.PredictArgs(model, tuple(map(str, inputs)), out=out, progress=False, **flags)
    predict.main(args)
    return (
        read_csv(out) if out.suffix == ".csv" else [json.loads(line) for line in out.read_text().splitlines()]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_each_model_form_predicts_what_evaluate_reports(
    kind, model_files, crops, evaluated, tmp_path, capsys
):
    rows = run_predict(model_files[kind], [crops], tmp_path / "predictions.csv", top_k=3)
    assert "calibration: softmax(logits / " in capsys.readouterr().out  # the run's fitted T, said once

    good = [row for row in rows if not row["error"]]
    assert sorted(relative(row["path"]) for row in good) == sorted(evaluated)
    calibration_moved = 0
    for row in good:
        expected = evaluated[relative(row["path"])]
        assert row["top1_class"] == expected["predicted"], row["path"]
        probability = float(row["top1_probability"])
        assert probability == pytest.approx(float(expected["confidence_calibrated"]), abs=CSV_ROUNDING)
        top3 = [float(row[f"top{r}_probability"]) for r in (1, 2, 3)]
        assert top3 == sorted(top3, reverse=True) and sum(top3) <= 1 + 1e-6
        assert row["abstained"] == "false"  # no --min-confidence: never
        calibration_moved += abs(probability - float(expected["confidence"])) > 2 * CSV_ROUNDING
    assert calibration_moved > 0  # so the comparison above is of the calibrated probabilities

    # The two bad files are rows with their error and nothing else; notes.md is not an input at all.
    bad = {Path(row["path"]).name: row for row in rows if row["error"]}
    assert sorted(bad) == ["page.jpg", "truncated.png"]
    assert "cannot identify image file" in bad["page.jpg"]["error"]
    assert "truncated" in bad["truncated.png"]["error"]
    for row in bad.values():
        assert row["top1_class"] == "" and row["top1_probability"] == "" and row["abstained"] == "true"
    assert len(rows) == len(evaluated) + 2


def test_abstains_below_min_confidence_and_writes_jsonl(model_files, crops, tmp_path):
    first = run_predict(model_files["checkpoint"], [crops], tmp_path / "all.jsonl")
    top1 = sorted(row["top_k"][0]["probability"] for row in first if not row["error"])
    # Halfway between two neighbouring probabilities near the median: no row sits on the threshold.
    gaps = [(top1[i + 1] - top1[i], i) for i in range(len(top1) // 4, 3 * len(top1) // 4)]
    _, i = max(gaps)
    threshold = (top1[i] + top1[i + 1]) / 2

    rows = run_predict(model_files["checkpoint"], [crops], tmp_path / "kept.jsonl", min_confidence=threshold)
    assert [row["path"] for row in rows] == [row["path"] for row in first]
    read = [row for row in rows if row["error"] is None]
    below = [row["abstained"] for row in read if row["top_k"][0]["probability"] < threshold]
    above = [row["abstained"] for row in read if row["top_k"][0]["probability"] > threshold]
    assert below and all(below)
    assert above and not any(above)
    assert all(len(row["top_k"]) == 5 for row in read)  # the default --top-k, names from the model
    assert all(row["top_k"][0]["class"] in {p.name for p in crops.iterdir()} for row in read)


def test_a_missing_input_stops_before_anything_is_written(model_files, crops, tmp_path):
    out = tmp_path / "predictions.csv"
    missing = tmp_path / "no-such-crop.png"
    proc = run_script(["predict.py", model_files["onnx"], crops, missing, "--out", out], cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert f"input {missing} does not exist" in proc.stderr
    assert not out.exists()


def test_finds_folders_globs_and_lists(tmp_path):
    """Which files an INPUT means: folders recursively (image extensions only, sorted), globs, and .txt
    lists relative to their own folder; each file once; every missing input named."""
    for name in ("b/2.png", "b/1.JPG", "a/3.png", "a/skip.md", "lists/paths.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "lists" / "paths.txt").write_text("# crops of track 7\n../b/2.png\n\n../a/3.png\n")

    paths, skipped = predict.find_images((str(tmp_path), str(tmp_path / "b" / "*.png")))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/3.png", "b/1.JPG", "b/2.png"]
    assert skipped == 2  # a/skip.md, lists/paths.txt

    paths, _ = predict.find_images((str(tmp_path / "lists" / "paths.txt"),))
    assert [p.resolve() for p in paths] == [tmp_path / "b" / "2.png", tmp_path / "a" / "3.png"]

    (tmp_path / "lists" / "paths.txt").write_text("../b/2.png\n../b/gone.png\n")
    with pytest.raises(SystemExit) as stop:
        predict.find_images((str(tmp_path / "lists" / "paths.txt"), str(tmp_path / "c"), "x/*.png"))
    message = str(stop.value)
    assert "paths.txt:2" in message and "gone.png" in message
    assert f"input {tmp_path / 'c'} does not exist" in message and "'x/*.png' matches no file" in message
