"""The ONNX side of export: trace a model to one self-contained .onnx file, run it with onnxruntime, and
check its logits against PyTorch's on the same images.

What the graph is fed is decided here too (float NCHW, or raw uint8 pixels with the normalization baked
in). Loading checkpoints and choosing which images to check on is export.py's job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from classifier.transforms import eval_resize_crop, eval_transform, input_side

# Opset 18 is the lowest the dynamo exporter writes natively: asking for 17 runs the ONNX version
# converter, which fails even on ResNet18 (checked on torch 2.14) and leaves the model at 18 anyway.
# Pinned rather than left to the exporter's default so a torch upgrade cannot silently raise the opset
# beyond what a consumer's older onnxruntime reads (opset 18 needs onnxruntime >= 1.14).
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class BakedPreprocessing(nn.Module):
    """uint8 RGB pixels (already resized and center-cropped) -> the model's logits. Scaling and mean/std
    normalization run inside the graph, with the same two operations as transforms.eval_transform, in the same
    order, so the float results match PyTorch's pipeline to rounding."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], channels_last_input: bool):
        super().__init__()
        self.model = model
        self.channels_last_input = channels_last_input
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW
        images = images.to(torch.float32) / 255.0
        return self.model((images - self.mean) / self.std)


def graph_module(model: nn.Module, input_kind: str, preprocessing: dict) -> nn.Module:
    """The module that gets traced: the model itself, or the model behind baked preprocessing."""
    if input_kind == "none":
        return model
    return BakedPreprocessing(
        model, preprocessing["mean"], preprocessing["std"], input_kind == "uint8-nhwc"
    ).eval()


def input_spec(input_kind: str, crop: int) -> dict:
    """What the graph's input is, for the sidecar: a consumer reads this instead of guessing."""
    if input_kind == "none":
        return {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, crop, crop]}
    nhwc = input_kind == "uint8-nhwc"
    return {
        "name": INPUT_NAME,
        "dtype": "uint8",
        "layout": "NHWC" if nhwc else "NCHW",
        "shape": ["batch", crop, crop, 3] if nhwc else ["batch", 3, crop, crop],
        "normalized_inside": "the graph divides by 255 and applies mean/std itself: do NOT normalize",
        "outside_the_model": "resize the shorter side and center-crop (see preprocessing) before feeding",
    }


def graph_input_transform(input_kind: str, preprocessing: dict):
    """Per image: uint8 CHW RGB tensor -> what the graph takes for that image (no batch axis)."""
    if input_kind == "none":
        return eval_transform(preprocessing)
    crop = eval_resize_crop(preprocessing)
    if input_kind == "uint8-nhwc":
        return lambda image: crop(image).permute(1, 2, 0).contiguous()
    return crop


# --- export ------------------------------------------------------------------------------------------


def export_onnx(module: nn.Module, path: Path, example: torch.Tensor, metadata: dict) -> None:
    """Trace `module` (eval mode) to `path` as one file with a dynamic batch axis and `metadata` in the
    file's metadata_props. Raises on any exporter or checker error: there is no fallback exporter."""
    module.eval()  # BatchNorm's running statistics and no dropout: what inference must compute
    # The example batch must not be 1: torch.export specializes size-1 dimensions to constants.
    example = example.expand(2, *example.shape[1:]).contiguous() if example.shape[0] == 1 else example
    # The dynamo exporter (torch.export + onnxscript) is torch's default and the one still maintained;
    # the TorchScript exporter is deprecated. external_data=False keeps the weights inside the .onnx
    # (its default writes a separate .onnx.data file that consumers lose); fine up to protobuf's 2 GB.
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    for key, value in encode_metadata(metadata).items():
        program.model.metadata_props[key] = value
    program.save(str(path), external_data=False)
    onnx.checker.check_model(
        str(path), full_check=True
    )  # a path, not a proto: the checker then allows > 2 GB


def encode_metadata(values: dict) -> dict[str, str]:
    """ONNX and safetensors metadata hold strings only: strings stay, everything else becomes JSON
    (the same rule as checkpoint.save_safetensors, so one decoder reads both)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def decode_metadata(values: dict[str, str]) -> dict:
    decoded = {}
    for key, value in values.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value  # a plain string such as "ema" or "resnet18"
    return decoded


def read_onnx_metadata(path: Path) -> dict:
    """The sidecar facts stored in an exported .onnx file (weights are not loaded)."""
    return onnx_metadata(onnx.load(str(path), load_external_data=False))


def onnx_metadata(proto: onnx.ModelProto) -> dict:
    return decode_metadata({p.key: p.value for p in proto.metadata_props})


def classes_sha256(classes: list[str]) -> str:
    """Hash of the class list in index order (names joined by newlines, UTF-8): one string a consumer
    can compare to catch a reordered or edited class list."""
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()


# --- run and compare ---------------------------------------------------------------------------------


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    # CPU only: verification and evaluation must give the same numbers on every machine.
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(session: onnxruntime.InferenceSession, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    """Logits for `inputs`, fed to the graph `batch_size` at a time."""
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + batch_size].numpy()})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(chunks)


@torch.no_grad()
def run_torch(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]).numpy()


def verify_onnx(
    path: Path,
    model: nn.Module,
    images: list[torch.Tensor],
    *,
    input_kind: str,
    preprocessing: dict,
    batch_sizes: tuple[int, ...],
    atol: float,
) -> bool:
    """Run the exported graph and the PyTorch pipeline (transforms.eval_transform, then the model) on the same
    uint8 images; print max |logit difference| and top-1 agreement per batch size. True when every batch
    size agrees on every top-1 and stays within `atol`."""
    reference = run_torch(model.eval(), torch.stack([eval_transform(preprocessing)(im) for im in images]), 64)
    to_graph = graph_input_transform(input_kind, preprocessing)
    graph_inputs = torch.stack([to_graph(im) for im in images])
    session = onnx_session(path)
    ok = True
    for batch_size in batch_sizes:
        logits = run_onnx(session, graph_inputs, batch_size)
        max_diff = float(np.abs(logits - reference).max())
        agree = int((logits.argmax(1) == reference.argmax(1)).sum())
        passed = agree == len(images) and max_diff <= atol
        ok &= passed
        print(
            f"verify batch {batch_size:>3}: {len(images)} images | "
            f"max |logit diff| {max_diff:.2e} (atol {atol:.0e}) | "
            f"top-1 agreement {agree}/{len(images)} ({100 * agree / len(images):.1f}%) | "
            f"{'ok' if passed else 'FAILED'}"
        )
    return ok


def read_sidecar(onnx_path: Path) -> dict:
    """The facts of an exported model: labels_mapping.json beside it, else the copy in the ONNX metadata.
    When both exist, every fact they both carry must agree; and whichever is used must describe the graph
    itself (its input's dtype and shape, its number of classes). Otherwise the model is refused."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    embedded = onnx_metadata(proto)
    beside = Path(onnx_path).parent / "labels_mapping.json"
    if beside.is_file():
        sidecar, described_by = json.loads(beside.read_text()), beside
        differ = sorted(key for key in embedded.keys() & sidecar.keys() if embedded[key] != sidecar[key])
        if differ:
            raise ValueError(
                f"{beside} disagrees with the metadata inside {onnx_path} on {differ}: is it another model's?"
            )
    elif "idx_to_class" in embedded:
        sidecar, described_by = embedded, "its own metadata"
    else:
        raise ValueError(
            f"{onnx_path}: no labels_mapping.json beside it and no class mapping in its metadata"
        )
    differ = graph_differences(proto, sidecar)
    if differ:
        raise ValueError(
            f"{onnx_path} is not the graph {described_by} describes ({'; '.join(differ)}): "
            "is it another model's?"
        )
    return sidecar


def graph_differences(proto: onnx.ModelProto, sidecar: dict) -> list[str]:
    """Where the graph disagrees with the sidecar on what it takes and returns: the input's dtype and its
    shape after the batch axis (the side and layout that `baked_preprocessing` and the resize mode make
    evaluate.py feed), and the number of classes it scores."""
    spec = input_spec(sidecar.get("baked_preprocessing", "none"), input_side(sidecar["preprocessing"]))
    classes = len(sidecar["idx_to_class"])
    expected = {"input dtype": spec["dtype"], "input shape": spec["shape"][1:], "classes": classes}
    inputs = {value.name: value.type.tensor_type for value in proto.graph.input}
    outputs = {value.name: value.type.tensor_type for value in proto.graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        return [
            f"the graph has inputs {list(inputs)} and outputs {list(outputs)}, "
            f"not {INPUT_NAME!r} and {OUTPUT_NAME!r}"
        ]
    found = {
        "input dtype": onnx.helper.tensor_dtype_to_np_dtype(inputs[INPUT_NAME].elem_type).name,
        "input shape": dims(inputs[INPUT_NAME])[1:],
        "classes": dims(outputs[OUTPUT_NAME])[-1],
    }
    return [
        f"{key}: graph {found[key]}, sidecar {expected[key]}"
        for key in expected
        if found[key] != expected[key]
    ]


def dims(tensor_type: onnx.TypeProto.Tensor) -> list[int | str]:
    """A graph value's shape: sizes, and names for the dynamic axes (such as "batch")."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]
