"""int8 static quantization of an exported ONNX graph, and the gate the int8 graph must pass to ship.

Owns the quantization recipe (format, weight and activation types, calibration method: measured, see
below), calibration with ONNX Runtime's quantize_static on the inputs it is handed, and the comparison of
the int8 graph with the fp32 one on labelled held-out images. Which images, where the files go and what
the sidecar says are export.py's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from classifier.onnx_export import INPUT_NAME, onnx_session, run_onnx

# The recipe, chosen by measuring on two small_resnets trained on Fashion-MNIST (51% and 63% val top-1;
# 150 val and 200 test images; 300 training images to calibrate on; onnxruntime 1.32, AMD EPYC, AVX2):
# - QDQ: ONNX Runtime's recommended format; its CPU kernels fuse QuantizeLinear/DequantizeLinear pairs.
# - The head (the node that writes the logits) stays float. Quantized, the logits themselves were
#   rounded to 256 levels: max |logit difference| 0.26, and the 51% model, whose margins are small, lost
#   6 of 150 val images (agreement 0.96, a 3.3-point drop). With the head in float: 0.03, and 150/150.
#   It is one small matrix product (ResNet18: 0.5M of 11.7M weights, 0.03% of the multiply-adds).
# - Activations int8 (QInt8, "S8S8"): 150/150 and 149/150 val. uint8 activations ("U8S8") agreed on
#   87% only: without VNNI, x86's u8 x s8 dot product (VPMADDUBSW) saturates at 16 bits; reduce_range
#   (7-bit weights) repairs that at a cost in precision everywhere (agreement 0.98 on the 51% model).
# - Weights int8, symmetric, one scale per output channel: convolution filters differ in range by orders
#   of magnitude, so one scale per tensor would give the small filters a few levels only.
# - MinMax calibration: Entropy gave the same numbers; Percentile (99.999%) clips the largest
#   activations and lost 1 of 150 on the 51% model. Both build histograms and need batches of one shape
#   (Entropy failed on a smaller last batch); MinMax takes any number of images.
FORMAT = "QDQ"
WEIGHTS = "int8, symmetric, per output channel; the head (last layer) float32"
ACTIVATIONS = "int8, asymmetric, per tensor, ranges from calibration; the logits float32"
CALIBRATION_METHOD = "MinMax"
QUANTIZER = f"onnxruntime {onnxruntime.__version__} quantize_static"


class CalibrationBatches(CalibrationDataReader):
    """quantize_static's source of calibration data: `inputs` (what the graph takes, stacked) in batches."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 32):
        self.batches = iter([inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_inputs: np.ndarray) -> None:
    """Write the int8 QDQ version of the graph at `fp32_path` to `int8_path`, with activation ranges
    measured on `calibration_inputs` (a batch of exactly what the graph takes). Its metadata is not
    the caller's sidecar: export.py writes that once the gate has passed."""
    with tempfile.TemporaryDirectory() as work:
        # ORT's pre-processing: symbolic shape inference and its basic graph optimizations (constant
        # folding, Conv+BatchNorm fusion). Our dynamo exports are already folded and carry shapes, and it
        # changed no measured number there; it is run because it is cheap (0.1 s) and a graph without
        # shapes or with an unfused BatchNorm would otherwise keep float islands between int8 convs.
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            CalibrationBatches(calibration_inputs),
            nodes_to_exclude=output_nodes(prepared),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def output_nodes(path: Path) -> list[str]:
    """Names of the nodes that write the graph's outputs (the head): they stay float."""
    graph = onnx.load(str(path), load_external_data=False).graph
    outputs = {value.name for value in graph.output}
    return [node.name for node in graph.node if outputs & set(node.output)]


def spread_over_classes(labels: list[int], n: int, seed: int) -> list[int]:
    """Indices of up to `n` of the samples whose labels are `labels`, the classes taking turns (each class
    in a seeded random order), so a few hundred images cover every class even when some are rare."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index in torch.randperm(len(labels), generator=generator).tolist():
        by_class.setdefault(labels[index], []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    chosen = []
    for turn in range(max(map(len, queues), default=0)):
        chosen += [queue[turn] for queue in queues if turn < len(queue)]
    return sorted(chosen[:n])


# --- the gate ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """int8 against fp32 on the same labelled images: top-1 agreement, and each one's top-1 accuracy."""

    images: int
    agree: int  # images where both graphs predict the same class
    correct_fp32: int
    correct_int8: int

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.images

    @property
    def top1_fp32(self) -> float:
        return self.correct_fp32 / self.images

    @property
    def top1_int8(self) -> float:
        return self.correct_int8 / self.images

    @property
    def accuracy_drop(self) -> float:
        return self.top1_fp32 - self.top1_int8

    def passes(self, min_agreement: float, max_accuracy_drop: float) -> bool:
        return self.top1_agreement >= min_agreement and self.accuracy_drop <= max_accuracy_drop


def compare_int8(fp32_path: Path, int8_path: Path, inputs: torch.Tensor, labels: torch.Tensor) -> GateResult:
    """Run both graphs on `inputs` (what the graphs take, stacked) and count against `labels`."""
    fp32 = torch.from_numpy(run_onnx(onnx_session(fp32_path), inputs, 32)).argmax(1)
    int8 = torch.from_numpy(run_onnx(onnx_session(int8_path), inputs, 32)).argmax(1)
    return GateResult(
        images=len(labels),
        agree=int((fp32 == int8).sum()),
        correct_fp32=int((fp32 == labels).sum()),
        correct_int8=int((int8 == labels).sum()),
    )


def gate_table(result: GateResult, split: str, min_agreement: float, max_accuracy_drop: float) -> str:
    """The gate's numbers as a small table, with the limits and the verdict."""
    verdict = "ok" if result.passes(min_agreement, max_accuracy_drop) else "FAILED"
    return "\n".join(
        [
            f"int8 gate on {result.images} {split} images | top-1 accuracy | top-1 agreement with fp32",
            f"  fp32 model.onnx      | {result.top1_fp32:.4f}         |",
            f"  int8 model.int8.onnx | {result.top1_int8:.4f}         | "
            f"{result.agree}/{result.images} = {result.top1_agreement:.4f} (min {min_agreement})",
            f"  drop                 | {result.accuracy_drop:+.4f} (max {max_accuracy_drop}) | {verdict}",
        ]
    )
