"""Export a trained classifier to ONNX with its sidecar, and verify it before calling it done.

    python export.py runs/NAME/checkpoints/best.pt                  # -> runs/NAME/checkpoints/best-export/
    python export.py runs/NAME --out deploy/                         # a run directory means its last.pt
    python export.py runs/NAME/best.safetensors --bake-preprocessing uint8-nhwc
    python export.py runs/NAME/checkpoints/best.pt --quantize int8          # + model.int8.onnx

Writes model.onnx (one file, dynamic batch, input `images`, output `logits`), labels_mapping.json and
model.safetensors, all carrying the same facts. ONNX Runtime is checked against PyTorch on real validation
images first; on any disagreement the command exits 1 and the new files are not left behind. With
--quantize int8 it also writes model.int8.onnx (classifier/quantize.py: static int8, calibrated on training
images), only if it agrees with model.onnx on the validation images and loses little accuracy there;
otherwise the whole export fails and nothing new is written, model.onnx included. Data whose
classes disagree with the model's, or a --data-root that cannot be read, stops the export before anything
is written; only when no data is known at all (the run's data root is not on this machine, or a shipped
model.safetensors names none, and no --data-root is given) does it verify on random images, and it says so
on stderr and beside its last line. labels_mapping.json holds no path of the training machine.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import onnx
import torch
import tyro
from torch import nn

from classifier import checkpoint as ckpt
from classifier import model_card, models, quantize
from classifier.card import ModelCard
from classifier.data import build_splits
from classifier.images import load_image
from classifier.inference import read_safetensors
from classifier.onnx_export import (
    OPSET,
    OUTPUT_NAME,
    classes_sha256,
    encode_metadata,
    export_onnx,
    graph_input_transform,
    graph_module,
    input_spec,
    verify_onnx,
)
from classifier.transforms import input_side, preprocessing_spec, resize_mode


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
    quantize: Literal["none", "int8"] = "none"
    """'int8': also write model.int8.onnx, ONNX Runtime static int8 (QDQ, per-channel weights) calibrated
    on training images, kept only when it passes the gate below on validation images. Needs the data."""
    calibration_images: int = 300
    """int8: training images to measure activation ranges on (seeded by the run's data seed, the classes
    taking turns)."""
    gate_images: int = 300
    """int8: validation images (at most; spread over the split) on which int8 is compared with fp32."""
    min_agreement: float = 0.99
    """int8: the smallest share of gate images on which int8 and fp32 must predict the same class."""
    max_accuracy_drop: float = 0.01
    """int8: the most top-1 accuracy (a fraction: 0.01 is one point) int8 may lose to fp32 on the gate."""
    latency_repeats: int = 20
    """Timed ONNX Runtime CPU runs per batch size (1 and 32) for model_card.json and MODEL_CARD.md, fewer
    when they pass a quarter second (classifier/model_card.py); 0 measures nothing and the card says so."""


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
    """labels_mapping.json: the card (format version, class order as trained, preprocessing, architecture,
    weights, the logit adjustment already folded into the head's bias, the data split), and what the
    export adds: what the graph takes and returns, where it came from, the temperature with how to use
    it, and the abstain thresholds (null when none were computed for these weights, so a consumer never
    guesses). The same dict goes into the ONNX and safetensors metadata. It ships, so it holds no path
    of the training machine: no data root, and the source checkpoint by its file name only
    (schemas/labels_mapping.schema.json describes every key)."""
    card = source.card
    preprocessing = with_every_rule(card.preprocessing)
    graph_input = input_spec(input_kind, input_side(preprocessing))
    if input_kind != "none":  # describe what the consumer does, so nobody normalizes twice
        preprocessing.update(
            layout=graph_input["layout"],
            dtype="uint8",
            scale=graph_input["normalized_inside"],
            normalize_in_graph=True,
            order=preprocessing["order"][:-2],  # to_float and normalize happen inside the graph
        )
        graph_input["outside_the_model"] = (
            f"{preprocessing['resize']} (preprocessing), then feed the uint8 pixels"
        )
    # No epoch: a checkpoint does not record the one its weights finished, so the sidecar of a .pt and of
    # a .safetensors source hold the same keys.
    shipped = replace(card, preprocessing=preprocessing, epoch=None, data=replace(card.data, root=None))
    return {
        **shipped.to_mapping(),
        # Nothing to add to the logits: a logit adjustment, when trained with one, is in the head's bias.
        "logit_adjustment_folded": card.logit_adjustment != "none",
        "classes_sha256": classes_sha256(list(card.classes)),
        # The file name only: a path (even one relative to the export folder) points nowhere once the
        # folder is shipped, and the name says which save was exported (best.pt, last.prev.pt, ...).
        "source_checkpoint": source.path.name,
        "baked_preprocessing": input_kind,
        "input": graph_input,
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", len(card.classes)],
            "meaning": "raw logits; probabilities = softmax(logits / temperature)",
            "class_order": "logit i is the class idx_to_class[str(i)]",
        },
        **temperature_facts(card.temperature),
        "abstain_thresholds": card.abstain_thresholds,
        "exporter": f"torch {torch.__version__} dynamo exporter, ONNX opset {OPSET}",
    }


def with_every_rule(preprocessing: dict) -> dict:
    """A copy of the checkpoint's preprocessing with every rule transforms.preprocessing_spec writes down;
    a checkpoint from before some were recorded gets them as this code applies them (the export is
    verified against transforms.eval_transform), its own values kept."""
    rules = preprocessing_spec(
        image_size=input_side(preprocessing),
        resize_size=preprocessing.get("resize_shorter_side"),  # the crop mode's; the others have none
        mean=preprocessing["mean"],
        std=preprocessing["std"],
        interpolation=preprocessing["interpolation"],
        resize_mode=resize_mode(preprocessing),
    )
    return {**rules, **preprocessing}


def temperature_facts(temperature: float | None) -> dict:
    """The sidecar's temperature and a line on how to use it. The graph's logits are never divided by
    it (argmax, and so every accuracy number, is the same either way); a source without one gets 1.0,
    which softmax(logits / temperature) then leaves as softmax(logits)."""
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
    root: Path | str | None,
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
    was never checked against its data. Only when no data is known at all (`root_given` is False and the
    run's root is not on this machine, or is None: a shipped model.safetensors names none): seeded random
    images, and a line starting with NOTE that asks for --data-root."""
    root = None if root is None else Path(root)
    if not root_given and (root is None or not root.exists()):
        unknown = (
            "the model names no data root (an export ships none)"
            if root is None
            else f"the run's data root {root} is not on this machine"
        )
        generator = torch.Generator().manual_seed(0)
        images = [
            torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(n)
        ]
        return images, (
            f"NOTE: {unknown} and no --data-root was given; verifying on {n} SYNTHETIC random "
            "images only, real-image parity NOT checked (give --data-root to check it)"
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


# --- int8 --------------------------------------------------------------------------------------------

INT8_NAME = "model.int8.onnx"


@dataclass(frozen=True)
class Int8Images:
    """What --quantize int8 runs on, as uint8 CHW images: the training images to calibrate on, and the
    labelled held-out images of the gate (the val split; the test split when there is no val)."""

    calibration: list[torch.Tensor]
    gate: list[torch.Tensor]
    gate_labels: torch.Tensor
    gate_split: str


def int8_images(
    root: Path,
    classes: list[str],
    val_fraction: float,
    seed: int,
    *,
    calibration_count: int,
    gate_count: int,
    group_pattern: str | None,
) -> Int8Images:
    """The run's own split of `root` (verification_images has already built it once, so it can be
    built): up to `calibration_count` training images and `gate_count` val images, each spread over the
    classes with the run's data seed."""
    splits = build_splits(root, val_fraction, seed, classes=classes, group_pattern=group_pattern)
    gate_split = "val" if splits.val else "test"
    held_out = splits.val or splits.test
    if not splits.train or not held_out:
        raise SystemExit(
            f"error: --quantize int8 needs training images to calibrate on and val or test images to "
            f"gate on; {root} has {len(splits.train)} and {len(held_out)}; nothing was exported"
        )
    picked = quantize.spread_over_classes([label for _, label in held_out], gate_count, seed)
    return Int8Images(
        calibration=calibration_images(splits.train, calibration_count, seed),
        gate=[load_image(held_out[i][0]) for i in picked],
        gate_labels=torch.tensor([held_out[i][1] for i in picked]),
        gate_split=gate_split,
    )


def calibration_images(samples: list, count: int, seed: int) -> list[torch.Tensor]:
    """Up to `count` of the (path, label) training `samples`, spread over the classes, decoded."""
    picked = quantize.spread_over_classes([label for _, label in samples], count, seed)
    return [load_image(samples[i][0]) for i in picked]


def quantize_and_gate(
    fp32_path: Path,
    int8_path: Path,
    images: Int8Images,
    to_graph,
    seed: int,
    args: ExportArgs,
    out: Path,
) -> tuple[dict, quantize.GateResult]:
    """Write the int8 graph of `fp32_path` to `int8_path` and compare the two on the gate images; (the
    sidecar's "int8" block, the gate's numbers), or SystemExit naming them when the gate fails."""
    calibration = torch.stack([to_graph(image) for image in images.calibration]).numpy()
    quantize.quantize_int8(fp32_path, int8_path, calibration)
    gate_inputs = torch.stack([to_graph(image) for image in images.gate])
    result = quantize.compare_int8(fp32_path, int8_path, gate_inputs, images.gate_labels)
    print(quantize.gate_table(result, images.gate_split, args.min_agreement, args.max_accuracy_drop))
    if not result.passes(args.min_agreement, args.max_accuracy_drop):
        raise SystemExit(
            f"error: the int8 model failed its gate on {result.images} {images.gate_split} images: top-1 "
            f"agreement with fp32 {result.top1_agreement:.4f} (--min-agreement {args.min_agreement}), "
            f"top-1 accuracy {result.top1_fp32:.4f} -> {result.top1_int8:.4f}, a drop of "
            f"{result.accuracy_drop:.4f} (--max-accuracy-drop {args.max_accuracy_drop}); the whole export "
            f"was discarded, nothing new in {out}"
        )
    block = {
        "file": INT8_NAME,
        "format": quantize.FORMAT,
        "weights": quantize.WEIGHTS,
        "activations": quantize.ACTIVATIONS,
        "quantizer": quantize.QUANTIZER,
        "calibration": {
            "split": "train",
            "images": len(images.calibration),
            "seed": seed,
            "method": quantize.CALIBRATION_METHOD,
        },
        "gate": {
            "split": images.gate_split,
            "images": result.images,
            "top1_agreement": result.top1_agreement,
            "top1_fp32": result.top1_fp32,
            "top1_int8": result.top1_int8,
            "min_agreement": args.min_agreement,
            "max_accuracy_drop": args.max_accuracy_drop,
        },
    }
    return block, result


def write_onnx_metadata(path: Path, metadata: dict) -> None:
    """Replace the metadata of the .onnx file at `path` with `metadata`; the graph is left as it is."""
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, encode_metadata(metadata))  # clears the old entries first
    onnx.save(proto, str(path))


def int8_text(out: Path, gate: quantize.GateResult, split: str) -> str:
    """For the last line, after done_line: the int8 file, its size and its agreement with model.onnx."""
    size_mb = (out / INT8_NAME).stat().st_size / 2**20
    return (
        f"{INT8_NAME} ({size_mb:.1f} MB), top-1 agreement {gate.top1_agreement:.4f} with model.onnx "
        f"on {gate.images} {split} images"
    )


def int8_data_for(args: ExportArgs, card: ModelCard, data_root: Path | str, synthetic: bool) -> Int8Images:
    """The images --quantize int8 calibrates on and gates with, from the run's data; refused when no real
    data is known (verification_images fell back to synthetic images)."""
    if synthetic:
        raise SystemExit(
            "error: --quantize int8 needs real images (training images to calibrate on, labelled val "
            "images for its gate) and no data is known here (see the NOTE above): give --data-root "
            "DIR, or export without --quantize; nothing was exported"
        )
    return int8_images(
        Path(data_root),
        list(card.classes),
        card.data.val_fraction,
        card.data.seed,
        calibration_count=args.calibration_images,
        gate_count=args.gate_images,
        group_pattern=card.data.group_pattern,
    )


def done_line(out: Path, sidecar: dict, card: ModelCard) -> str:
    """What was written and what a consumer must know: the files, the weights, the graph's input and
    output, the classes, the temperature and the abstain thresholds."""
    size_mb = (out / "model.onnx").stat().st_size / 2**20
    graph_input = sidecar["input"]
    return (
        f"wrote {out}/model.onnx ({size_mb:.1f} MB), labels_mapping.json, model.safetensors | "
        f"{sidecar['weights']} weights | "
        f"{graph_input['name']} {graph_input['dtype']} {graph_input['layout']} {graph_input['shape']} -> "
        f"{OUTPUT_NAME} {sidecar['output']['shape']} | {len(card.classes)} classes | "
        f"temperature {sidecar['temperature']:.3f}"
        + ("" if sidecar["temperature_fitted"] else " (none fitted: uncalibrated)")
        + f" | {thresholds_text(card.abstain_thresholds)}"
    )


def check_args(args: ExportArgs) -> None:
    """Refuse flag values that cannot work, before anything is loaded."""
    if args.calibration_images < 1 or args.gate_images < 1:
        raise SystemExit(
            f"error: --calibration-images ({args.calibration_images}) and --gate-images "
            f"({args.gate_images}) must be at least 1"
        )
    if not 0.0 <= args.min_agreement <= 1.0 or not 0.0 <= args.max_accuracy_drop <= 1.0:
        raise SystemExit(
            f"error: --min-agreement ({args.min_agreement}) and --max-accuracy-drop "
            f"({args.max_accuracy_drop}) must be in [0, 1]"
        )


# --- main --------------------------------------------------------------------------------------------


def main(args: ExportArgs) -> Path:
    check_args(args)
    model, source = load_source(args.checkpoint)
    card = source.card
    out = args.out or source.path.parent / f"{source.path.stem}-export"
    data_root = args.data_root or card.data.root
    images, note = verification_images(
        data_root,
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
    int8_data = int8_data_for(args, card, data_root, synthetic) if args.quantize == "int8" else None
    # "int8" is null until a quantized model has passed its gate; then every file carries its block.
    sidecar = {**build_sidecar(source, args.bake_preprocessing), "int8": None}
    module = graph_module(model, args.bake_preprocessing, card.preprocessing)
    to_graph = graph_input_transform(args.bake_preprocessing, card.preprocessing)
    example = torch.stack([to_graph(image) for image in images[:2]])

    # Everything is written under temporary names and renamed only after verification passed, so a failed
    # export never leaves a model.onnx that looks good. model.onnx is renamed last: when it is new, its
    # sidecar is too. A failed int8 gate fails the whole export, so a folder never holds a new model.onnx
    # whose sidecar says "int8": null only because its int8 model was refused.
    out.mkdir(parents=True, exist_ok=True)
    names = ("model.safetensors", "labels_mapping.json", *([INT8_NAME] if int8_data else []), "model.onnx")
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
        if int8_data is not None:
            int8_block, gate = quantize_and_gate(
                temp["model.onnx"], temp[INT8_NAME], int8_data, to_graph, card.data.seed, args, out
            )
            # model.onnx got the sidecar with "int8": null when it was traced; both graphs now get the
            # final one, so each file's metadata equals labels_mapping.json (evaluate.py checks that).
            sidecar = {**sidecar, "int8": int8_block}
            for name in ("model.onnx", INT8_NAME):
                write_onnx_metadata(temp[name], sidecar)
        temp["labels_mapping.json"].write_text(json.dumps(sidecar, indent=2) + "\n")
        ckpt.save_safetensors(model.state_dict(), temp["model.safetensors"], sidecar)
        for name in names:
            os.replace(temp[name], out / name)
    finally:
        for path in temp.values():
            path.unlink(missing_ok=True)
    stale = out / INT8_NAME
    if int8_data is None and stale.exists():  # an earlier export's, which the new sidecar does not describe
        stale.unlink()
        print(f"removed {stale}: an earlier export's int8 model, not this one's")

    # model_card.json and MODEL_CARD.md, for people: sizes, FLOPs, CPU latency, data, val metrics.
    figures = model_card.write_model_card(
        out,
        model,
        sidecar,
        source.path,
        latency_repeats=args.latency_repeats,
    )
    print(model_card.summary_line(figures))
    if synthetic:
        print(note)  # again, beside the success line: easy to miss above the verification table
    line = done_line(out, sidecar, card)
    if int8_data is not None:
        line += " | " + int8_text(out, gate, int8_data.gate_split)
    print(line)
    return out


if __name__ == "__main__":
    main(tyro.cli(ExportArgs, description=__doc__))
