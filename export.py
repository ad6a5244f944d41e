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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from classifier import checkpoint as ckpt
from classifier import models
from classifier.data import build_splits
from classifier.images import load_image
from classifier.models import build_model
from classifier.onnx_export import (
    OPSET,
    OUTPUT_NAME,
    classes_from_mapping,
    classes_sha256,
    decode_metadata,
    export_onnx,
    graph_input_transform,
    graph_module,
    input_spec,
    verify_onnx,
)


@dataclass(frozen=True)
class ExportArgs:
    checkpoint: tyro.conf.Positional[Path]
    """A checkpoint (.pt), a run directory (its checkpoints/last.pt) or a .safetensors with our metadata."""
    out: Path | None = None
    """Folder for model.onnx, labels_mapping.json and model.safetensors. Default: <stem>-export/ beside the
    checkpoint actually read (last.prev-export/ when last.pt was unreadable and last.prev.pt was used)."""
    bake_preprocessing: Literal["none", "uint8-nchw", "uint8-nhwc"] = "none"
    """'none': the graph takes normalized float32 NCHW. 'uint8-*': it takes resized, center-cropped uint8 RGB
    pixels in that layout and normalizes inside."""
    data_root: Path | None = None
    """Images to verify on (its validation split). Default: the data root the run trained on."""
    batch_size: int = 32
    """Verification runs at batch 1 and at this batch size, over this many images."""
    atol: float = 1e-3
    """Largest |logit difference| between ONNX Runtime and PyTorch accepted. ORT matches ResNet18 to ~2e-6
    (DESIGN.md); any real export bug (wrong weights, train-mode BatchNorm, wrong normalization) moves
    logits by far more than 1e-3."""


# --- what is exported --------------------------------------------------------------------------------


def load_source(path: Path) -> tuple[nn.Module, dict]:
    """(model in eval mode with the validated weights, the facts the sidecar records) from a checkpoint,
    a run directory or a .safetensors file."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = ckpt.load_checkpoint(path)
    model, weights = models.model_from_checkpoint(state)
    cfg = state["config"]
    facts = dict(
        classes=list(state["classes"]),
        preprocessing=state["preprocessing"],
        model_name=state["model_name"],
        small_input_stem=cfg["small_input_stem"],
        stem_stride=cfg.get("stem_stride", 1),
        logit_adjustment=cfg.get("logit_adjustment", "none"),
        weights=weights,
        source=state["loaded_from"],  # the file read: last.prev.pt when last.pt was unreadable
        data=dict(root=cfg["data"]["root"], val_fraction=cfg["data"]["val_fraction"], seed=cfg["seed"]),
        temperature=state.get(
            "temperature"
        ),  # None: trained before calibration, or last.pt past best's epoch
    )
    return model, facts


def load_safetensors(path: Path) -> tuple[nn.Module, dict]:
    """Class order and preprocessing come from the file's metadata. The architecture flag and the data
    split come from there too when we exported the file, else from the run's config.json beside it
    (train.py's best.safetensors)."""
    with safe_open(str(path), "pt") as f:
        meta = decode_metadata(f.metadata() or {})
    missing = [key for key in ("idx_to_class", "num_classes", "preprocessing", "model") if key not in meta]
    if missing:
        raise SystemExit(
            f"error: {path} lacks the metadata keys {missing}; export from the .pt checkpoint instead"
        )
    if "small_input_stem" not in meta or "data" not in meta:
        config_path = path.parent / "config.json"
        if not config_path.is_file():
            raise SystemExit(f"error: {path} does not say its architecture and no {config_path} is beside it")
        cfg = json.loads(config_path.read_text())
        meta.setdefault("small_input_stem", cfg["small_input_stem"])
        meta.setdefault(
            "data", dict(root=cfg["data"]["root"], val_fraction=cfg["data"]["val_fraction"], seed=cfg["seed"])
        )
    classes = classes_from_mapping(meta)
    fitted = meta.get("temperature_fitted", False)  # a file that does not say is read as not fitted
    meta.setdefault("stem_stride", 1)  # files written before the option existed
    model = build_model(
        meta["model"],
        len(classes),
        small_input_stem=meta["small_input_stem"],
        stem_stride=meta["stem_stride"],
    )
    model.load_state_dict(load_file(path))  # strict: a mismatched architecture fails here, loudly
    facts = dict(
        classes=classes,
        preprocessing=meta["preprocessing"],
        model_name=meta["model"],
        small_input_stem=meta["small_input_stem"],
        stem_stride=meta["stem_stride"],
        logit_adjustment=meta.get("logit_adjustment", "none"),
        weights=meta.get("weights", "unknown"),
        source=str(path.resolve()),
        data=meta["data"],
        temperature=meta.get("temperature") if fitted else None,
    )
    return model.eval(), facts


def build_sidecar(facts: dict, input_kind: str) -> dict:
    """labels_mapping.json: class order as trained, preprocessing, what the graph takes and returns, and
    where it came from. The same dict goes into the ONNX and safetensors metadata."""
    preprocessing, crop = dict(facts["preprocessing"]), facts["preprocessing"]["center_crop"]
    graph_input = input_spec(input_kind, crop)
    if input_kind != "none":  # describe what the consumer does, so nobody normalizes twice
        preprocessing.update(
            layout=graph_input["layout"], dtype="uint8", scale=graph_input["normalized_inside"]
        )
    return ckpt.labels_mapping(
        facts["classes"],
        preprocessing,
        facts["model_name"],
        classes_sha256=classes_sha256(facts["classes"]),
        weights=facts["weights"],
        small_input_stem=facts["small_input_stem"],
        stem_stride=facts["stem_stride"],
        logit_adjustment=facts["logit_adjustment"],  # already folded into the head's bias: nothing to do
        source_checkpoint=facts["source"],
        baked_preprocessing=input_kind,
        input=graph_input,
        output={
            "name": OUTPUT_NAME,
            "shape": ["batch", len(facts["classes"])],
            "meaning": "raw logits; probabilities = softmax(logits / temperature)",
        },
        data=facts["data"],
        **temperature_facts(facts.get("temperature")),
        exporter=f"torch {torch.__version__} dynamo exporter, ONNX opset {OPSET}",
    )


def temperature_facts(temperature: float | None) -> dict:
    """The sidecar's temperature and a line on how to use it. The graph's logits are never divided by
    it (argmax, and so every accuracy number, is the same either way); a source without one gets 1.0."""
    if temperature is None:
        note = (
            "no temperature was fitted for these weights (a checkpoint from before calibration, or not best.pt): "
            "1.0, probabilities = softmax(logits) are uncalibrated"
        )
        return {"temperature": 1.0, "temperature_fitted": False, "temperature_note": note}
    note = (
        "probabilities = softmax(logits / temperature), temperature fitted on the validation split; the "
        "exported logits are NOT divided by it (argmax unchanged)"
    )
    return {"temperature": float(temperature), "temperature_fitted": True, "temperature_note": note}


# --- which images to verify on -----------------------------------------------------------------------


def verification_images(
    root: Path, classes: list[str], val_fraction: float, seed: int, n: int, size: int, *, root_given: bool
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
    if not root.is_dir():
        raise SystemExit(f"error: {where} {root} is not a folder; nothing was exported")
    try:
        splits = build_splits(root, val_fraction, seed, classes=classes)
    except (FileNotFoundError, ValueError) as err:
        message = f"error: refusing to verify the export on {where} {root}; nothing was exported:\n{err}"
        raise SystemExit(message) from None
    samples = splits.val or splits.test or splits.train
    samples = samples[:: max(1, len(samples) // n)][:n]  # a stride, so the first classes do not take all
    return [load_image(p) for p, _ in samples], f"verifying on {len(samples)} real images from {root}"


# --- main --------------------------------------------------------------------------------------------


def main(args: ExportArgs) -> Path:
    model, facts = load_source(args.checkpoint)
    source = Path(facts["source"])
    out = args.out or source.parent / f"{source.stem}-export"
    preprocessing, data = facts["preprocessing"], facts["data"]
    images, note = verification_images(
        args.data_root or Path(data["root"]),
        facts["classes"],
        data["val_fraction"],
        data["seed"],
        args.batch_size,
        preprocessing["resize_shorter_side"],
        root_given=args.data_root is not None,
    )
    synthetic = note.startswith("NOTE")
    print(note, file=sys.stderr if synthetic else sys.stdout)
    sidecar = build_sidecar(facts, args.bake_preprocessing)
    module = graph_module(model, args.bake_preprocessing, preprocessing)
    to_graph = graph_input_transform(args.bake_preprocessing, preprocessing)
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
            preprocessing=preprocessing,
            batch_sizes=(1, min(args.batch_size, len(images))),
            atol=args.atol,
        )
        if not passed:
            raise SystemExit(
                f"error: ONNX Runtime disagrees with PyTorch on {source}'s export (see above); "
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
        f"wrote {out}/model.onnx ({size_mb:.1f} MB), labels_mapping.json, model.safetensors | {facts['weights']} weights | "
        f"{graph_input['name']} {graph_input['dtype']} {graph_input['layout']} {graph_input['shape']} -> "
        f"{OUTPUT_NAME} {sidecar['output']['shape']} | {len(facts['classes'])} classes | temperature {sidecar['temperature']:.3f}"
        + ("" if sidecar["temperature_fitted"] else " (none fitted: uncalibrated)")
    )
    return out


if __name__ == "__main__":
    main(tyro.cli(ExportArgs, description=__doc__))
