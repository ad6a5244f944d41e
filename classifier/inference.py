"""A trained model ready to score images, from whichever file it ships in: a checkpoint (.pt) or a run
directory, a .safetensors with the model card in its metadata, or an exported model.onnx with its sidecar.

Each becomes a Classifier that turns the same images into the same logits (ONNX to float rounding), with
the card saying what the logits mean. What is done with them is the caller's: evaluate.py judges a
labelled split, predict.py writes predictions for new images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from classifier import checkpoint as ckpt
from classifier import models
from classifier.card import ModelCard, check_format_version
from classifier.onnx_export import (
    decode_metadata,
    graph_input_transform,
    onnx_session,
    read_onnx_metadata,
    read_sidecar,
    run_onnx,
)
from classifier.transforms import eval_transform


@dataclass
class Classifier:
    """A model to judge, whichever runtime it lives in: `predict` maps a batch of what `transform` makes
    of each uint8 image to float32 logits on the CPU; `card` holds its classes, preprocessing, data split,
    weights and temperature (None: none was fitted for these weights)."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable[[torch.Tensor], torch.Tensor]
    card: ModelCard
    source: Path  # the file whose weights are used (for a checkpoint: the one load_checkpoint read)
    backend: str
    # The PyTorch model behind `predict` (eval mode, on its device), for what needs gradients (Grad-CAM);
    # None for an ONNX graph.
    module: nn.Module | None = None


def load_classifier(path: Path, device: str) -> Classifier:
    """`path` by its suffix: .onnx (run by ONNX Runtime on the CPU, whatever `device` says), .safetensors,
    else a checkpoint or a run directory (its last.pt). `device`: 'auto' (CUDA when available), 'cpu' or
    'cuda', for the PyTorch ones."""
    if path.suffix == ".onnx":
        return load_onnx(path)
    if path.suffix == ".safetensors":
        model, card = read_safetensors(path)
        source = path.resolve()
    else:
        state = ckpt.load_checkpoint(path)
        model, weights = models.model_from_checkpoint(state)
        card = ModelCard.from_checkpoint(state, weights)
        source = Path(state["loaded_from"])  # last.prev.pt when last.pt was unreadable
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(device)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return model(images.to(device)).float().cpu()

    return Classifier(
        predict=predict,
        transform=eval_transform(card.preprocessing),
        card=card,
        source=source,
        backend="pytorch",
        module=model,
    )


def read_safetensors(path: Path) -> tuple[nn.Module, ModelCard]:
    """(model in eval mode, its card) from a .safetensors whose metadata holds the card, as train.py's
    best.safetensors and export.py's model.safetensors do; a file without one is refused. Their weights
    already have any logit adjustment folded into the head's bias. A card that does not say which
    weights it holds reads 'unknown'; one written by a newer format version is refused."""
    with safe_open(str(path), "pt") as f:
        meta = decode_metadata(f.metadata() or {})
    try:
        check_format_version(meta, f"{path}'s metadata")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        card = ModelCard.from_mapping(meta)
    except ValueError as err:
        raise SystemExit(f"error: {path}: {err}; use the .pt checkpoint instead") from None
    if card.weights is None:
        card = replace(card, weights="unknown")
    model = models.build_from_card(card)
    model.load_state_dict(load_file(path))  # strict: a mismatched architecture fails here, loudly
    return model.eval(), card


def load_onnx(path: Path) -> Classifier:
    """An exported graph, read with nothing but what its sidecar says (labels_mapping.json beside it, or
    the copy in its metadata): the class order, the preprocessing and what the graph takes (float NCHW,
    or uint8 pixels with the normalization inside), and the temperature. A sidecar of a newer format
    version is refused before anything else is read from it."""
    beside = path.parent / "labels_mapping.json"
    described = [(read_onnx_metadata(path), f"{path}'s metadata")]
    if beside.is_file():
        described.append((json.loads(beside.read_text()), beside))
    for mapping, where in described:
        try:
            check_format_version(mapping, where)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    sidecar = read_sidecar(path)
    try:
        card = ModelCard.from_mapping(sidecar)
    except ValueError as err:
        raise SystemExit(f"error: {path}'s sidecar: {err} (export it with export.py)") from None
    if card.weights is None:  # a sidecar that does not say which weights it holds
        card = replace(card, weights="unknown")
    session = onnx_session(path)
    return Classifier(
        predict=lambda images: torch.from_numpy(run_onnx(session, images, len(images))),
        transform=graph_input_transform(sidecar.get("baked_preprocessing", "none"), sidecar["preprocessing"]),
        card=card,
        source=path,
        backend="onnxruntime",
    )
