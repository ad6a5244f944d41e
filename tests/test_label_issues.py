"""classifier/label_issues.py: the ranking on hand-made logits, the files it writes, and on real data a
queue that finds labels flipped on purpose far above chance (evaluate.py --split train)."""

from __future__ import annotations

import csv
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from classifier import plots
from classifier.cli import parse_cli
from classifier.label_issues import score_labels, write_queue

FLIPPED_SHARE = 0.08  # of the training images, moved to a wrong class folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the ranking, on logits worked out by hand ----------------------------------------------------


def test_ranks_the_given_labels_probability_lowest_first():
    log = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.98, 0.01, 0.01]]).log()
    labels = torch.tensor([0, 0, 1, 0])
    scores = score_labels(log, labels, temperature=1.0)
    assert scores.p_given.tolist() == pytest.approx([0.7, 0.1, 0.4, 0.98])
    assert scores.order == [1, 2, 0, 3]
    assert scores.predicted.tolist() == [0, 2, 1, 0]
    assert scores.p_predicted.tolist() == pytest.approx([0.7, 0.8, 0.4, 0.98])
    # p_given minus the largest other class: negative when the model prefers another class.
    assert scores.margin.tolist() == pytest.approx([0.5, -0.7, 0.1, 0.97])


def test_the_temperature_calibrates_the_scores_and_can_reorder_them():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, -8.0]])
    labels = torch.tensor([0, 0])
    cold = score_labels(logits, labels, temperature=1.0)
    expected = (logits.double() / 4.0).softmax(dim=1)[:, 0]
    hot = score_labels(logits, labels, temperature=4.0)
    assert hot.p_given.tolist() == pytest.approx(expected.tolist())
    # T=1: 0.787 vs 0.500, image 1 first; T=4: 0.45 vs 0.47, image 0 first (its rivals warm up together).
    assert cold.order == [1, 0] and hot.order == [0, 1]


def test_ties_go_to_the_smaller_margin_then_to_file_order():
    # p_given underflows to 0 in all three: the margin (or the file order) decides.
    logits = torch.tensor([[-900.0, 0.0, 0.0], [-900.0, 5.0, 0.0], [-900.0, 0.0, 0.0]])
    scores = score_labels(logits, torch.zeros(3, dtype=torch.long), temperature=1.0)
    assert scores.p_given.tolist() == [0.0, 0.0, 0.0]
    assert scores.order == [1, 0, 2]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="do not match"):
        score_labels(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        score_labels(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), temperature=0.0)


def test_write_queue_writes_every_image_most_doubted_first(tmp_path):
    classes = ["7", "23"]
    samples = []
    for i in range(5):
        path = tmp_path / "images" / f"trk{i:04d}_f00.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 12, 3), 40 * i, dtype=np.uint8)).save(path)
        samples.append((str(path), i % 2))
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([label for _, label in samples])
    preprocessing = {"resize_shorter_side": 16, "center_crop": 16, "interpolation": "bilinear"}
    groups = {path: Path(path).name[:7] for path, _ in samples}
    write_queue(
        tmp_path / "out",
        samples,
        logits,
        labels,
        classes,
        temperature=1.0,
        held_out=False,
        gallery=3,
        preprocessing=preprocessing,
        groups=groups,
    )
    rows = read_csv(tmp_path / "out" / "label_issues.csv")
    assert [Path(row["path"]).name[:7] for row in rows] == [
        "trk0001",
        "trk0002",
        "trk0003",
        "trk0004",
        "trk0000",
    ]
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4", "5"]
    first = rows[0]
    assert (first["given"], first["predicted"], first["held_out"], first["group"]) == (
        "23",
        "7",
        "0",
        "trk0001",
    )
    p = 1 / (1 + np.exp(3.0))  # softmax of (0, 3) at the given class
    assert float(first["p_given"]) == pytest.approx(p, rel=1e-5)
    assert float(first["margin"]) == pytest.approx(p - (1 - p), rel=1e-5)
    with Image.open(tmp_path / "out" / "label_issues.png") as image:
        assert image.format == "PNG"


# --- on real data: labels flipped on purpose ------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_run(fmnist_root, tmp_path_factory) -> tuple[Path, set[str]]:
    """Fashion-MNIST (60 train images a class) with FLIPPED_SHARE of the training images moved into a
    wrong class folder (seeded), and 5 clean test images a class as val/; a small ResNet trained on it
    for three epochs. Returns the run directory and the flipped files' paths."""
    root = tmp_path_factory.mktemp("noisy") / "data"
    shutil.copytree(fmnist_root / "train", root / "train")
    for folder in (fmnist_root / "test").iterdir():  # val picks best.pt and fits T; 5 a class will do
        (root / "val" / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:5]:
            shutil.copy(path, root / "val" / folder.name / path.name)
    paths = sorted((root / "train").glob("*/*.png"))
    classes = sorted(folder.name for folder in (root / "train").iterdir())
    draw = random.Random(0)
    flipped = set()
    for path in draw.sample(paths, round(FLIPPED_SHARE * len(paths))):
        wrong = draw.choice([name for name in classes if name != path.parent.name])
        path.rename(root / "train" / wrong / path.name)
        flipped.add(str(root / "train" / wrong / path.name))
    args = [
        *("--model", "small_resnet", "--pretrained", "None", "--epochs", "3", "--optim.lr", "2e-3"),
        *("--data.image-size", "28", "--data.resize-size", "28", "--data.batch-size", "32"),
        *("--data.num-workers", "0", "--data.no-hflip", "--no-progress", "--log-every-steps", "1000"),
        *("--data.root", str(root), "--out-dir", str(root.parent / "runs"), "--name", "run"),
    ]
    # The per-epoch confusion matrix and curves are not under test here and cost a third of the run.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "save_epoch_pictures", lambda *args, **kwargs: None)
        run_dir = Path(train.main(parse_cli(args))["run_dir"])
    return run_dir, flipped


def test_the_queue_finds_flipped_labels_far_above_chance(noisy_run, tmp_path, capsys, monkeypatch):
    run_dir, flipped = noisy_run
    out = tmp_path / "report"
    # The confusion matrices, errors.png and reliability.png are test_evaluate.py's; they cost seconds.
    monkeypatch.setattr(evaluate, "write_pictures", lambda *args, **kwargs: None)
    evaluate.main(
        evaluate.EvalArgs(
            run_dir / "checkpoints" / "best.pt", split="train", out=out, errors=4, label_issues=12
        )
    )
    printed = capsys.readouterr().out
    assert f"label issues: {out / 'label_issues.csv'} ranks the 600 images" in printed
    assert "in-sample" in printed

    rows = read_csv(out / "label_issues.csv")
    assert len(rows) == 600 and {row["held_out"] for row in rows} == {"0"}
    p_given = [float(row["p_given"]) for row in rows]
    assert p_given == sorted(p_given)
    k = len(flipped)
    precision = sum(row["path"] in flipped for row in rows[:k]) / k
    chance = k / len(rows)
    print(f"precision@{k} {precision:.3f} (chance {chance:.3f}, {precision / chance:.1f}x)")
    assert precision >= 4 * chance, f"precision@{k} {precision:.3f}, chance {chance:.3f}"
    with Image.open(out / "label_issues.png") as image:
        assert image.format == "PNG"
