"""Export a trained classifier to ONNX with its sidecar, and verify it before calling it done.

    python export.py runs/NAME/checkpoints/best.pt                  # -> runs/NAME/checkpoints/best-export/
    python export.py runs/NAME --out deploy/                         # a run directory means its last.pt
    python export.py runs/NAME/best.safetensors --bake-preprocessing uint8-nhwc

Writes model.onnx (one file, dynamic batch, input `images`, output `logits`), labels_mapping.json and
model.safetensors, all carrying the same facts. ONNX Runtime is checked against PyTorch on real validation
images first; on any disagreement the command exits 1 and the new files are not left behind. Data whose
classes disagree with the model's, or a --data-root that cannot be read, stops the export before anything
is written; only when no data is known at all (the run's data root is not on this machine and no
--data-root is given) does it verify on random images, and it says so on stderr and beside its last line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro
from torch import nn

from classifier import checkpoint as ckpt
from classifier import models
from classifier.card import ModelCard
from classifier.data import build_splits
from classifier.images import load_image
from classifier.inference import read_safetensors
from classifier.onnx_export import (
    OPSET,
    OUTPUT_NAME,
    classes_sha256,
    export_onnx,
    graph_input_transform,
    graph_module,
    input_spec,
    verify_onnx,
)
from classifier.transforms import input_side


@dataclass(frozen=True)
class ExportArgs:
    checkpoint: tyro.conf.Positional[Path]
    """A checkpoint (.pt), a run directory (its checkpoints/last.pt) or a .safetensors with our metadata."""
    out: Path | None = None
    """Folder for model.onnx, labels_mapping.json and model.safetensors. Default: <stem>-export/ beside the
    checkpoint actually read (last.prev-export/ when last.pt was unreadable and last.prev.pt was used)."""
    bake_preprocessing: Literal["none", "uint8-nchw", "uint8-nhwc"] = "none"
    """'none': the graph takes normalized float32 NCHW. 'uint8-*': it takes uint8 RGB pixels already brought
    to the model's square as the sidecar's preprocessing says (its resize_mode), in that layout, and
    normalizes inside."""
    data_root: Path | None = None
    """Images to verify on (its validation split): an ImageFolder root or a manifest. Default: the data
    root the run trained on."""
    batch_size: int = 32
    """Verification runs at batch 1 and at this batch size, over this many images."""
    atol: float = 1e-3
    """Largest |logit difference| between ONNX Runtime and PyTorch accepted. Float rounding alone stays
    orders of magnitude below it (the export prints the difference it measured); a real export bug
    (wrong weights, train-mode BatchNorm, wrong normalization) moves logits by far more than 1e-3."""


# --- what is exported --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What is exported: the model's card, and the file its weights were read from (for a run directory,
    the one load_checkpoint read: last.prev.pt when last.pt was unreadable)."""

    card: ModelCard
    path: Path


def load_source(path: Path) -> tuple[nn.Module, Source]:
    """(model in eval mode with the validated weights, its card and file) from a checkpoint, a run
    directory or a .safetensors file."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = ckpt.load_checkpoint(path)
    model, weights = models.model_from_checkpoint(state)
    return model, Source(ModelCard.from_checkpoint(state, weights), Path(state["loaded_from"]))


def load_safetensors(path: Path) -> tuple[nn.Module, Source]:
    """The model and the card from the file's metadata, as train.py's best.safetensors and our
    model.safetensors carry it (classifier/inference.py reads it); a file without one is refused."""
    model, card = read_safetensors(path)
    return model, Source(card, path.resolve())


def build_sidecar(source: Source, input_kind: str) -> dict:
    """labels_mapping.json: the card (class order as trained, preprocessing, architecture, weights, the
    logit adjustment already folded into the head's bias, the data split), and what the export adds: what
    the graph takes and returns, where it came from, the temperature with how to use it, and the abstain
    thresholds (null when none were computed for these weights, so a consumer never guesses). The same
    dict goes into the ONNX and safetensors metadata."""
    card = source.card
    preprocessing = dict(card.preprocessing)
    graph_input = input_spec(input_kind, input_side(preprocessing))
    if input_kind != "none":  # describe what the consumer does, so nobody normalizes twice
        preprocessing.update(
            layout=graph_input["layout"], dtype="uint8", scale=graph_input["normalized_inside"]
        )
    # No epoch: a checkpoint does not record the one its weights finished, so the sidecar of a .pt and of
    # a .safetensors source hold the same keys.
    sidecar = replace(card, preprocessing=preprocessing, epoch=None).to_mapping()
    return {
        **sidecar,
        "classes_sha256": classes_sha256(list(card.classes)),
        "source_checkpoint": str(source.path),
        "baked_preprocessing": input_kind,
        "input": graph_input,
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(card.classes)],
            "meaning": "raw logits; probabilities = softmax(logits / temperature)",
        },
        **temperature_facts(card.temperature),
        "abstain_thresholds": card.abstain_thresholds,
        "exporter": f"torch {torch.__version__} dynamo exporter, ONNX opset {OPSET}",
    }


def temperature_facts(temperature: float | None) -> dict:
    """The sidecar's temperature and a line on how to use it. The graph's logits are never divided by
    it (argmax, and so every accuracy number, is the same either way); a source without one gets 1.0."""
    if temperature is None:
        note = (
            "no temperature was fitted for these weights (a checkpoint from before calibration, "
            "or not best.pt): 1.0, probabilities = softmax(logits) are uncalibrated"
        )
        return {"temperature": 1.0, "temperature_fitted": False, "temperature_note": note}
    note = (
        "probabilities = softmax(logits / temperature), temperature fitted on the validation split; the "
        "exported logits are NOT divided by it (argmax unchanged)"
    )
    return {"temperature": float(temperature), "temperature_fitted": True, "temperature_note": note}


def thresholds_text(thresholds: dict | None) -> str:
    """For the last line: which target accuracies have a stored abstain threshold, and from where."""
    if thresholds is None:
        return "no abstain thresholds"
    reachable = [row["target"] for row in thresholds["targets"] if row["reachable"]]
    return (
        f"abstain thresholds for {reachable or 'no target'} "
        f"({thresholds['split']}, {thresholds['images']} images)"
    )


# --- which images to verify on -----------------------------------------------------------------------


def verification_images(
    root: Path,
    classes: list[str],
    val_fraction: float,
    seed: int,
    n: int,
    size: int,
    *,
    root_given: bool,
    group_pattern: str | None = None,
):
    """(up to `n` real validation images as uint8 CHW, spread over the classes; a line saying what they
    are). Data that is there but does not fit the model (other classes, no images) or a --data-root that
    cannot be read stops the export, as it stops evaluate.py: random images would let an export pass that
    was never checked against its data. Only when no data is known at all (the run's root is not on this
    machine and `root_given` is False): seeded random images, and a line starting with NOTE."""
    if not root_given and not root.exists():
        generator = torch.Generator().manual_seed(0)
        images = [
            torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(n)
        ]
        return images, (
            f"NOTE: the run's data root {root} is not on this machine and no --data-root "
            f"was given; verifying on {n} SYNTHETIC random images only, real-image parity NOT "
            "checked"
        )
    where = "--data-root" if root_given else "the run's data root"
    if not root.exists():
        raise SystemExit(f"error: {where} {root} does not exist; nothing was exported")
    try:
        splits = build_splits(root, val_fraction, seed, classes=classes, group_pattern=group_pattern)
    except (FileNotFoundError, ValueError) as err:
        message = f"error: refusing to verify the export on {where} {root}; nothing was exported:\n{err}"
        raise SystemExit(message) from None
    samples = splits.val or splits.test or splits.train
    samples = samples[:: max(1, len(samples) // n)][:n]  # a stride, so the first classes do not take all
    return [load_image(p) for p, _ in samples], f"verifying on {len(samples)} real images from {root}"


# --- main --------------------------------------------------------------------------------------------


def main(args: ExportArgs) -> Path:
    model, source = load_source(args.checkpoint)
    card = source.card
    out = args.out or source.path.parent / f"{source.path.stem}-export"
    images, note = verification_images(
        args.data_root or Path(card.data.root),
        list(card.classes),
        card.data.val_fraction,
        card.data.seed,
        args.batch_size,
        input_side(card.preprocessing),
        root_given=args.data_root is not None,
        group_pattern=card.data.group_pattern,
    )
    synthetic = note.startswith("NOTE")
    print(note, file=sys.stderr if synthetic else sys.stdout)
    sidecar = build_sidecar(source, args.bake_preprocessing)
    module = graph_module(model, args.bake_preprocessing, card.preprocessing)
    to_graph = graph_input_transform(args.bake_preprocessing, card.preprocessing)
    example = torch.stack([to_graph(image) for image in images[:2]])

    # Everything is written under temporary names and renamed only after verification passed, so a failed
    # export never leaves a model.onnx that looks good. model.onnx is renamed last: when it is new, its
    # sidecar is too.
    out.mkdir(parents=True, exist_ok=True)
    names = ("model.safetensors", "labels_mapping.json", "model.onnx")
    temp = {name: out / f".{name}.{os.getpid()}.tmp" for name in names}
    try:
        try:
            export_onnx(module, temp["model.onnx"], example, sidecar)
        except Exception:
            print("error: ONNX export failed (traceback below); nothing was written", file=sys.stderr)
            raise
        passed = verify_onnx(
            temp["model.onnx"],
            model,
            images,
            input_kind=args.bake_preprocessing,
            preprocessing=card.preprocessing,
            batch_sizes=(1, min(args.batch_size, len(images))),
            atol=args.atol,
        )
        if not passed:
            raise SystemExit(
                f"error: ONNX Runtime disagrees with PyTorch on {source.path}'s export (see above); "
                f"the export was discarded, nothing new in {out}"
            )
        temp["labels_mapping.json"].write_text(json.dumps(sidecar, indent=2) + "\n")
        ckpt.save_safetensors(model.state_dict(), temp["model.safetensors"], sidecar)
        for name in names:
            os.replace(temp[name], out / name)
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)

    if synthetic:
        print(note)  # again, beside the success line: easy to miss above the verification table
    size_mb = (out / "model.onnx").stat().st_size / 2**20
    graph_input = sidecar["input"]
    print(
        f"wrote {out}/model.onnx ({size_mb:.1f} MB), labels_mapping.json, model.safetensors | "
        f"{sidecar['weights']} weights | "
        f"{graph_input['name']} {graph_input['dtype']} {graph_input['layout']} {graph_input['shape']} -> "
        f"{OUTPUT_NAME} {sidecar['output']['shape']} | {len(card.classes)} classes | "
        f"temperature {sidecar['temperature']:.3f}"
        + ("" if sidecar["temperature_fitted"] else " (none fitted: uncalibrated)")
        + f" | {thresholds_text(card.abstain_thresholds)}"
    )
    return out


if __name__ == "__main__":
    main(tyro.cli(ExportArgs, description=__doc__))
