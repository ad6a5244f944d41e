"""classifier/card.py: a ModelCard survives its mapping (labels_mapping.json, safetensors metadata), says
only what is known, reads a checkpoint's facts, and export.py's sidecar is the card plus the export's own
facts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import export
from classifier.card import MAPPING_KEYS, DataSplit, ModelCard
from classifier.config import DataConfig, TrainConfig, to_dict
from classifier.transforms import preprocessing_spec

# Numeric class names: their order as trained is not their order as text.
CLASSES = ["2", "7", "10"]
PREPROCESSING = preprocessing_spec(
    image_size=32, resize_size=36, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear"
)
CONFIG = TrainConfig(
    model="resnet18",
    small_input_stem=True,
    stem_stride=2,
    logit_adjustment="frequency",
    seed=3,
    data=DataConfig(root=Path("/data/jerseys"), val_fraction=0.2),
)


def json_round_trip(mapping: dict) -> dict:
    """What a reader of labels_mapping.json gets back."""
    return json.loads(json.dumps(mapping))


def run_card() -> ModelCard:
    return ModelCard.for_run(CONFIG, CLASSES, PREPROCESSING)


def test_for_run_takes_the_config_facts():
    card = run_card()
    assert card.classes == ("2", "7", "10") and card.preprocessing == PREPROCESSING
    assert (card.model, card.small_input_stem, card.stem_stride) == ("resnet18", True, 2)
    assert card.logit_adjustment == "frequency"
    assert card.data == DataSplit(root="/data/jerseys", val_fraction=0.2, seed=3)
    assert (card.weights, card.epoch, card.temperature, card.abstain_thresholds) == (None, None, None, None)


# selective.abstain_thresholds' shape, as train.py stores it with best.pt.
THRESHOLDS = {
    "split": "val",
    "images": 120,
    "temperature": 1.37,
    "rule": "abstain when the top-1 probability softmax(logits / temperature) is below the threshold",
    "targets": [
        {"target": 0.95, "reachable": True, "min_kept": 20, "threshold": 0.625, "coverage": 0.75,
         "accuracy": 0.9555555555555556, "kept": 90},
        {"target": 0.99, "reachable": False, "min_kept": 100, "threshold": None, "coverage": None,
         "accuracy": None, "kept": None},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    "known",
    [
        {},
        {"weights": "ema", "epoch": 4},
        {"weights": "raw", "epoch": 0, "temperature": 1.37},
        {"weights": "raw", "epoch": 0, "temperature": 1.37, "abstain_thresholds": THRESHOLDS},
    ],
    ids=["before-training", "chosen", "calibrated", "with-thresholds"],
)
def test_mapping_round_trip_gives_the_same_card(known):
    card = dataclasses.replace(run_card(), **known)
    mapping = card.to_mapping()
    assert ModelCard.from_mapping(json_round_trip(mapping)) == card
    assert mapping["idx_to_class"] == {"0": "2", "1": "7", "2": "10"}
    assert mapping["class_to_idx"] == {"2": 0, "7": 1, "10": 2}
    assert mapping["data"] == {"root": "/data/jerseys", "val_fraction": 0.2, "seed": 3, "group_pattern": None}


def test_a_mapping_without_a_group_pattern_reads_as_no_groups():
    mapping = run_card().to_mapping()
    del mapping["data"]["group_pattern"]
    assert ModelCard.from_mapping(mapping).data.group_pattern is None


def test_to_mapping_leaves_out_what_is_not_known():
    mapping = run_card().to_mapping()
    assert list(mapping) == ["format_version", *MAPPING_KEYS[:2], "class_to_idx", *MAPPING_KEYS[2:]]
    for key in ("weights", "epoch", "temperature", "temperature_fitted", "abstain_thresholds"):
        assert key not in mapping
    chosen = run_card().chosen(weights="ema", epoch=2).to_mapping()
    assert (chosen["weights"], chosen["epoch"]) == ("ema", 2) and "temperature" not in chosen
    calibrated = dataclasses.replace(run_card(), temperature=0.8).to_mapping()
    assert (calibrated["temperature"], calibrated["temperature_fitted"]) == (0.8, True)
    assert "weights" not in calibrated and "epoch" not in calibrated


@pytest.mark.parametrize("flag", [False, None], ids=["fitted-false", "no-flag"])
def test_a_temperature_not_marked_fitted_is_read_as_none(flag):
    mapping = dataclasses.replace(run_card(), temperature=1.5).to_mapping()
    if flag is None:
        del mapping["temperature_fitted"]
    else:
        mapping["temperature_fitted"] = flag
    card = ModelCard.from_mapping(mapping)
    assert card.temperature is None
    assert card == run_card()


def test_from_mapping_names_the_keys_it_lacks():
    mapping = run_card().to_mapping()
    del mapping["data"], mapping["stem_stride"]
    with pytest.raises(ValueError, match=r"\['stem_stride', 'data'\]"):
        ModelCard.from_mapping(mapping)


def checkpoint_like(**extra) -> dict:
    """The facts of a checkpoint as checkpoint.save_checkpoint writes them (no weights: the card needs
    none). Its "epoch" is the one a resume would start, not the weights'."""
    return {
        "config": to_dict(CONFIG),
        "classes": CLASSES,
        "preprocessing": PREPROCESSING,
        "model_name": CONFIG.model,
        "epoch": 7,
        **extra,
    }


def test_from_checkpoint_reads_the_config_the_temperature_and_the_thresholds():
    card = ModelCard.from_checkpoint(checkpoint_like(temperature=1.25), "raw")
    assert card == dataclasses.replace(run_card(), weights="raw", temperature=1.25)
    stored = ModelCard.from_checkpoint(
        checkpoint_like(temperature=1.37, abstain_thresholds=THRESHOLDS), "raw"
    )
    assert stored.abstain_thresholds == THRESHOLDS
    assert card.epoch is None  # the checkpoint's "epoch" is not the weights'
    uncalibrated = ModelCard.from_checkpoint(checkpoint_like(), "ema")
    assert uncalibrated == dataclasses.replace(run_card(), weights="ema")
    assert ModelCard.from_mapping(json_round_trip(uncalibrated.to_mapping())) == uncalibrated


# The 22 keys export.py's labels_mapping.json holds: the card's, less its epoch, and the export's own.
# abstain_thresholds is always there, null when none were stored: a consumer never guesses.
SIDECAR_KEYS = {
    "format_version",
    *MAPPING_KEYS,
    "class_to_idx",
    "weights",
    "temperature",
    "temperature_fitted",
    "temperature_note",
    "abstain_thresholds",
    "logit_adjustment_folded",
    "classes_sha256",
    "source_checkpoint",
    "baked_preprocessing",
    "input",
    "output",
    "exporter",
}


@pytest.mark.parametrize(
    ("temperature", "thresholds"),
    [(None, None), (1.37, None), (1.37, THRESHOLDS)],
    ids=["none", "T", "T+thresholds"],
)
def test_export_sidecar_is_the_card_plus_the_exports_facts(temperature, thresholds):
    card = ModelCard.for_run(CONFIG, CLASSES, PREPROCESSING).chosen(weights="ema", epoch=4)
    card = dataclasses.replace(card, temperature=temperature, abstain_thresholds=thresholds)
    sidecar = export.build_sidecar(export.Source(card, Path("/runs/r/best.safetensors")), "uint8-nhwc")
    assert set(sidecar) == SIDECAR_KEYS and len(SIDECAR_KEYS) == 22
    assert sidecar["abstain_thresholds"] == thresholds
    assert sidecar["source_checkpoint"] == "best.safetensors" and sidecar["weights"] == "ema"
    assert sidecar["temperature"] == (1.0 if temperature is None else temperature)
    assert sidecar["temperature_fitted"] is (temperature is not None)
    assert sidecar["preprocessing"]["layout"] == "NHWC" and card.preprocessing["layout"] == "NCHW"
    # An export's sidecar is itself a card: the same one, less the epoch and the data root (no path of the
    # training machine ships), with the baked layout.
    again = ModelCard.from_mapping(json_round_trip(sidecar))
    shipped_data = dataclasses.replace(card.data, root=None)
    assert again == dataclasses.replace(
        card, epoch=None, preprocessing=sidecar["preprocessing"], data=shipped_data
    )
