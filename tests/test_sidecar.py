"""labels_mapping.json is unambiguous: every document the project writes under that name (the run's, the
metadata of best.safetensors, and what export.py ships in every mode) passes
schemas/labels_mapping.schema.json under the reference validator; the schema can fail; nothing shipped
holds a path of the training machine; alpha is dropped as the sidecar says; and the README's consumer,
reading only model.onnx and the sidecar, gives predict.py's answers on real images, tall ones with an odd
size difference included."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from helpers import REPO_ROOT
from PIL import Image
from test_export import safetensors_metadata, tiny_fmnist_export, tiny_fmnist_run

import evaluate
import export
import predict
from classifier.card import FORMAT_VERSION, ModelCard, check_format_version
from classifier.config import DataConfig, TrainConfig
from classifier.images import load_image
from classifier.inference import load_classifier
from classifier.onnx_export import read_onnx_metadata
from classifier.transforms import eval_resize_crop, preprocessing_spec

SCHEMA = json.loads((REPO_ROOT / "schemas" / "labels_mapping.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
KINDS = ("none", "uint8-nchw", "uint8-nhwc")
# How close the README consumer's probabilities must be to predict.py's: Pillow's resize and torchvision's
# differ by at most 1 in a few pixel values (README); measured 4e-8 on the tiny run's images.
CONSUMER_ATOL = 1e-4
MODES = ("crop", "pad", "stretch")


def errors(document: dict) -> list[str]:
    """The schema's complaints about `document`, one line each (empty: it is valid)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


@pytest.fixture(scope="session")
def run_and_export(fmnist_small_root, tmp_path_factory) -> tuple[Path, Path]:
    """The memoized tiny run of test_export.py (crop mode, float input) and its export folder."""
    base = tmp_path_factory.getbasetemp()
    run_dir = tiny_fmnist_run(fmnist_small_root, base)
    return run_dir, tiny_fmnist_export(run_dir, base)[0]


def card_for(mode: str, logit_adjustment: str = "none") -> ModelCard:
    """A trained model's card in `mode`, built as train.py builds it (no training: the sidecar's shape is
    under test, not the weights)."""
    data = DataConfig(root=Path("/home/trainer/data/jerseys"), resize_mode=mode)
    config = TrainConfig(model="resnet18", logit_adjustment=logit_adjustment, data=data)
    preprocessing = preprocessing_spec(
        image_size=32,
        resize_size=36,
        mean=data.mean,
        std=data.std,
        interpolation="bilinear",
        resize_mode=mode,
    )
    card = ModelCard.for_run(config, ["2", "7", "10"], preprocessing)
    return dataclasses.replace(card.chosen(weights="ema", epoch=3), temperature=1.3)


# --- every document validates -------------------------------------------------------------------------


def test_the_schema_is_valid_and_describes_every_key():
    """Every key a document can hold has a description; the constraints that only narrow an already
    described key (if/then/else, allOf) are not declarations and are skipped."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    undescribed = []

    def walk(node, where):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                if isinstance(sub, dict) and sub and "description" not in sub and "$ref" not in sub:
                    undescribed.append(f"{where}/{name}")
            for key, sub in node.items():
                if key not in ("if", "then", "else", "allOf"):
                    walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}/{i}")

    walk(SCHEMA, "")
    assert undescribed == []


def test_what_a_run_writes_validates(run_and_export):
    run_dir, _ = run_and_export
    run_mapping = json.loads((run_dir / "labels_mapping.json").read_text())
    best = safetensors_metadata(run_dir / "best.safetensors")
    assert "input" not in run_mapping and best["temperature_fitted"] is True
    assert errors(run_mapping) == [] and errors(best) == []
    assert run_mapping["format_version"] == best["format_version"] == FORMAT_VERSION


def test_what_export_py_writes_validates_in_all_three_places(run_and_export):
    _, out = run_and_export
    sidecar = json.loads((out / "labels_mapping.json").read_text())
    assert errors(sidecar) == []
    assert (
        read_onnx_metadata(out / "model.onnx") == sidecar == safetensors_metadata(out / "model.safetensors")
    )
    assert sidecar["source_checkpoint"] == "best.pt" and sidecar["data"]["root"] is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_input_kind_validates(mode, kind):
    sidecar = json.loads(
        json.dumps(export.build_sidecar(export.Source(card_for(mode), Path("/r/best.pt")), kind))
    )
    assert errors(sidecar) == []
    preprocessing = sidecar["preprocessing"]
    assert preprocessing["normalize_in_graph"] is (kind != "none")
    last_step = (
        "normalize" if kind == "none" else {"crop": "center_crop", "pad": "pad", "stretch": "resize"}[mode]
    )
    assert preprocessing["order"][-1] == last_step
    assert errors(card_for(mode).to_mapping()) == []


def test_logit_adjustment_says_it_is_already_in_the_graph():
    for adjustment, folded in (("none", False), ("balanced", True)):
        sidecar = export.build_sidecar(
            export.Source(card_for("crop", adjustment), Path("/r/best.pt")), "none"
        )
        assert (sidecar["logit_adjustment"], sidecar["logit_adjustment_folded"]) == (adjustment, folded)
        assert errors(json.loads(json.dumps(sidecar))) == []


def test_an_old_checkpoints_spec_gets_every_rule():
    """A checkpoint from before the rules were written down exports them as this code applies them."""
    full = card_for("crop").preprocessing
    old_keys = ("color", "resize_mode", "resize", "resize_shorter_side", "center_crop", "interpolation",
                "scale", "mean", "std", "layout", "dtype")  # fmt: skip
    old = dataclasses.replace(card_for("crop"), preprocessing={k: full[k] for k in old_keys})
    sidecar = export.build_sidecar(export.Source(old, Path("/r/best.pt")), "none")
    assert sidecar["preprocessing"] == full and errors(json.loads(json.dumps(sidecar))) == []


# --- the schema can fail --------------------------------------------------------------------------------


def broken_copies(sidecar: dict) -> dict[str, dict]:
    """Sidecars the schema must refuse, by what is wrong with them."""
    cases = {}

    def case(name, change):
        broken = copy.deepcopy(sidecar)
        change(broken)
        cases[name] = broken

    case("absolute source_checkpoint", lambda s: s.update(source_checkpoint="/home/trainer/runs/r/best.pt"))
    case("windows source_checkpoint", lambda s: s.update(source_checkpoint="C:\\runs\\best.pt"))
    case("data root shipped", lambda s: s["data"].update(root="/home/trainer/data"))
    case("no temperature", lambda s: s.pop("temperature"))
    case("no preprocessing rule", lambda s: s["preprocessing"].pop("crop_offset_rounding"))
    case("a typo", lambda s: s.update(temprature=1.0))
    case("a typo in preprocessing", lambda s: s["preprocessing"].update(antialias=True))
    case("newer format", lambda s: s.update(format_version=FORMAT_VERSION + 1))
    case(
        "rounded long side in crop mode",
        lambda s: s["preprocessing"].update(longer_side_rounding="half_to_even"),
    )
    case("another mode's key", lambda s: s["preprocessing"].update(pad_fill=[0, 0, 0]))
    case("mean as a sentence", lambda s: s["preprocessing"].update(mean="ImageNet's"))
    case("int8 without its gate", lambda s: s.update(int8={"file": "model.int8.onnx", "format": "QDQ"}))
    return cases


def test_the_schema_refuses_what_it_must(run_and_export):
    _, out = run_and_export
    sidecar = json.loads((out / "labels_mapping.json").read_text())
    for name, broken in broken_copies(sidecar).items():
        assert errors(broken), f"the schema accepted a sidecar with {name}"
    # The optional int8 key: absent, null or the full object are all fine.
    gate = {"split": "val", "images": 10, "top1_agreement": 0.99, "top1_fp32": 0.9, "top1_int8": 0.89,
            "min_agreement": 0.98, "max_accuracy_drop": 0.01}  # fmt: skip
    calibration = {"split": "train", "images": 64, "seed": 0, "method": "MinMax"}
    int8 = {"file": "model.int8.onnx", "format": "QDQ", "weights": "per-channel int8",
            "activations": "per-tensor uint8", "quantizer": "onnxruntime 1.32.0 quantize_static",
            "calibration": calibration, "gate": gate}  # fmt: skip
    assert errors({**sidecar, "int8": None}) == [] and errors({**sidecar, "int8": int8}) == []


def test_readers_refuse_a_newer_format_naming_the_file(run_and_export, tmp_path):
    _, out = run_and_export
    check_format_version({}, "old.json")  # no version: written before the key, read as 1
    sidecar = json.loads((out / "labels_mapping.json").read_text())
    (tmp_path / "model.onnx").symlink_to(out / "model.onnx")
    (tmp_path / "labels_mapping.json").write_text(
        json.dumps({**sidecar, "format_version": FORMAT_VERSION + 1})
    )
    with pytest.raises(SystemExit) as refused:
        load_classifier(tmp_path / "model.onnx", "cpu")
    assert str(tmp_path / "labels_mapping.json") in str(refused.value.code)
    assert f"format_version {FORMAT_VERSION + 1} is newer than this code reads" in str(refused.value.code)
    (tmp_path / "labels_mapping.json").write_text(
        json.dumps({k: v for k, v in sidecar.items() if k != "format_version"})
    )
    assert load_classifier(tmp_path / "model.onnx", "cpu").card.classes  # an old export still loads


# --- nothing of the training machine ships --------------------------------------------------------------


def test_no_shipped_sidecar_holds_a_path_of_the_training_machine(
    run_and_export, fmnist_small_root, tmp_path_factory
):
    run_dir, out = run_and_export
    # The run's own files keep the data root (evaluate.py on a checkpoint reads it), so the search can hit.
    assert str(fmnist_small_root) in (run_dir / "labels_mapping.json").read_text()
    shipped = {
        "labels_mapping.json": (out / "labels_mapping.json").read_text(),
        "model.onnx metadata": json.dumps(read_onnx_metadata(out / "model.onnx")),
        "model.safetensors metadata": json.dumps(safetensors_metadata(out / "model.safetensors")),
    }
    machine = [str(fmnist_small_root), str(run_dir), str(tmp_path_factory.getbasetemp()), str(Path.home())]
    for name, text in shipped.items():
        found = [path for path in machine if path in text or path.replace("/", "\\/") in text]
        assert found == [], f"{name} holds {found}"


def test_evaluate_asks_for_the_data_root_an_export_does_not_ship(run_and_export, tmp_path):
    _, out = run_and_export
    with pytest.raises(SystemExit) as refused:
        evaluate.main(evaluate.EvalArgs(out / "model.onnx", out=tmp_path / "report"))
    assert "names no data root" in str(refused.value.code) and "--data.root" in str(refused.value.code)
    assert not (tmp_path / "report").exists()


# --- alpha ----------------------------------------------------------------------------------------------


def test_alpha_is_dropped_not_composited(tmp_path):
    """The sidecar's "alpha": "dropped": a transparent pixel keeps the colour stored under it."""
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = [200, 30, 90]  # transparent, but coloured
    rgba[0, 0] = [10, 20, 30, 255]  # one opaque pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    la = np.stack([np.full((3, 3), 77, np.uint8), np.zeros((3, 3), np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 250, 120, 40] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=1)  # colour 1 is transparent

    image = load_image(str(tmp_path / "rgba.png"))
    assert image.shape == (3, 4, 6)
    assert image[:, 1, 1].tolist() == [200, 30, 90]  # neither black nor white: not composited
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert load_image(str(tmp_path / "la.png"))[:, 1, 1].tolist() == [77, 77, 77]
    assert load_image(str(tmp_path / "palette.png"))[:, 0, 0].tolist() == [250, 120, 40]


# --- the README's consumer ------------------------------------------------------------------------------


def readme_consumer() -> str:
    """The fenced Python block after the <!-- consumer-snippet --> marker in README.md."""
    readme = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"<!-- consumer-snippet -->\s*```python\n(.*?)```", readme, re.DOTALL)
    assert found, "README.md has no ```python block after <!-- consumer-snippet -->"
    return found.group(1)


def consumer(**overrides) -> dict:
    """The README snippet's functions, run with nothing of classifier/ imported by it. `overrides` replace
    builtins it uses, to show a wrong rule changes its answers."""
    code = readme_consumer()
    assert "classifier" not in code and "torch" not in code
    namespace = {"__builtins__": {**__builtins__, **overrides} if isinstance(__builtins__, dict) else
                 {**vars(__builtins__), **overrides}}  # fmt: skip
    exec(compile(code, "README.md consumer-snippet", "exec"), namespace)
    return namespace


@pytest.fixture(scope="session")
def consumer_images(fmnist_small_root, tmp_path_factory) -> list[Path]:
    """The Fashion-MNIST test images (28x28: the model's resize upsamples them to 32), and real ones on
    non-square canvases whose crop offsets need the sidecar's rules: 28x31 (long side 35.4 -> 35, offset
    (35 - 32) / 2 = 1.5 -> 2, where floor gives 1), 28x33 (37.7 -> 37, where rounding gives 38), 33x28
    (wide), and an RGBA one whose transparent border is coloured."""
    folder = tmp_path_factory.mktemp("consumer")
    tests = sorted((fmnist_small_root / "test").rglob("*.png"))
    made = []
    for i, (width, height) in enumerate([(28, 31), (28, 33), (33, 28), (29, 35)]):
        canvas = Image.new("L", (width, height))
        canvas.paste(Image.open(tests[5 * i + 1]), ((width - 28) // 2, (height - 28) // 2))
        canvas.save(folder / f"canvas{width}x{height}.png")
        made.append(folder / f"canvas{width}x{height}.png")
    rgba = np.zeros((33, 28, 4), np.uint8)
    rgba[..., :3] = 40  # the transparent border's stored colour: what the model gets
    rgba[2:30, :, :3] = np.asarray(Image.open(tests[7]))[..., None]
    rgba[2:30, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    return [*tests, *made, folder / "rgba.png"]


def predict_py(onnx: Path, images: list[Path], tmp_path: Path) -> list[tuple[str, float]]:
    rows = predict.main(
        predict.PredictArgs(onnx, tuple(map(str, images)), out=tmp_path / "p.jsonl", top_k=1, progress=False)
    )
    return [(row["classes"][0], row["probabilities"][0]) for row in rows]


def test_readme_consumer_gives_predict_pys_answers(run_and_export, consumer_images, tmp_path):
    _, out = run_and_export
    expected = predict_py(out / "model.onnx", consumer_images, tmp_path)
    got = consumer()["classify"](str(out), [str(p) for p in consumer_images])
    assert [name for name, _ in got] == [name for name, _ in expected]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=CONSUMER_ATOL, rtol=0)


@pytest.mark.parametrize(
    "wrong",
    [
        {"round": math.floor},  # the crop offset floored instead of rounded half to even
        {"int": round},  # the longer side rounded instead of floored
    ],
    ids=["offset-floored", "long-side-rounded"],
)
def test_the_consumer_check_sees_a_wrong_rule(wrong, run_and_export, consumer_images):
    """The comparison above can fail: the same consumer with one rule wrong moves the tall images'
    probabilities far beyond its tolerance (by 2.4e-3 and 2.7e-3 on the tiny run, against 1e-4)."""
    _, out = run_and_export
    tall = [str(p) for p in consumer_images if p.name.startswith("canvas")]
    right = np.array([p for _, p in consumer()["classify"](str(out), tall)])
    off = np.array([p for _, p in consumer(**wrong)["classify"](str(out), tall)])
    assert np.abs(right - off).max() > 10 * CONSUMER_ATOL


@pytest.mark.parametrize("kind", ["uint8-nchw", "uint8-nhwc"])
@pytest.mark.parametrize("mode", MODES)
def test_readme_consumer_geometry_is_the_trainers_in_every_mode(mode, kind, consumer_images):
    """For graphs that take uint8 pixels, the consumer's pixels are eval_resize_crop's in every resize mode,
    to the kernels' rounding: Pillow's resize and torchvision's differ by at most 1 in a few values, while
    a size or an offset one pixel off moves the garment's edges by far more."""
    sidecar = export.build_sidecar(export.Source(card_for(mode), Path("/r/best.pt")), kind)
    model_input = consumer()["model_input"]
    for path in consumer_images[-5:]:
        expected = eval_resize_crop(sidecar["preprocessing"])(load_image(str(path)))
        got = torch.from_numpy(np.array(model_input(str(path), sidecar["preprocessing"])))
        got = got.permute(2, 0, 1) if kind == "uint8-nhwc" else got
        assert got.shape == expected.shape, (mode, path.name)
        difference = (got.int() - expected.int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.2, (mode, path.name)
