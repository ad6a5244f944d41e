"""The model card: a document for people, written beside an export as model_card.json and MODEL_CARD.md.
It says how big the model is (parameters, FLOPs at its input size, file sizes), how fast ONNX Runtime runs
it on this machine's CPU, what data it was trained on, and how the exported weights scored on validation.

Not classifier/card.py's ModelCard: that is the sidecar, the typed facts a program needs to *use* the
weights (class order, preprocessing, architecture), carried inside every weights file. This module only
reads those facts and the source checkpoint, counts and measures, and writes a summary; nothing needs
model_card.json to run the model.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from classifier import checkpoint as ckpt
from classifier import hardware, transforms
from classifier.files import write_text

CARD_VERSION = 1
# The instruction sets that decide CPU inference speed, spelt as /proc/cpuinfo spells them.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
FLOPS_CONVENTION = (
    "torch.utils.flop_counter.FlopCounterMode on one image: 2 FLOPs per multiply-add; convolutions and "
    "matrix products only (not their bias additions, nor BatchNorm, activations, pooling or residual sums)"
)
# Timed runs per batch size stop early past this many seconds (after at least MIN_RUNS), so a big model
# at batch 32 does not hold the export for a minute; the card records how many runs each median is of.
MAX_SECONDS_PER_BATCH = 0.25
MIN_RUNS = 3
# Validation metrics the card leaves in the checkpoint: a num_classes x num_classes matrix is no summary.
NOT_IN_CARD = ("confusion",)


# --- counting ----------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Elements of every nn.Parameter, trainable or frozen. Buffers (BatchNorm's running statistics and
    its batch counter) are not parameters: they are learned by counting, not by gradient."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_side: int) -> int:
    """FLOPs of a forward pass per input_side x input_side RGB image (FLOPS_CONVENTION: 2 per
    multiply-add). The pass runs on meta tensors standing in for the weights: no arithmetic, and the model
    itself is not touched (BatchNorm in train mode updates the stand-ins, not its running statistics);
    fork_rng puts back any random state a layer might draw from, so training stays bit-identical. Two
    images, halved: BatchNorm in train mode refuses a batch of one on a 1x1 map, and every counted
    operation costs the same per image."""
    stand_ins = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    images = torch.empty(2, 3, input_side, input_side, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
        functional_call(model, stand_ins, (images,))
    return counter.get_total_flops() // 2


def short_number(n: float) -> str:
    """11181642 -> '11.2M', 3627132928 -> '3.63G'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def size_text(model: nn.Module, input_side: int) -> str:
    """train.py's start-up figures: '11.2M params, 3.63 GFLOPs at 224x224'."""
    flops = count_flops(model, input_side)
    params = short_number(count_parameters(model))
    return f"{params} params, {flops / 1e9:.3g} GFLOPs at {input_side}x{input_side}"


# --- the machine and the latency ---------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name, as lscpu prints it (hardware.cpu_model: /proc/cpuinfo's 'model name')."""
    return hardware.cpu_model()


def cpu_speed_flags() -> dict[str, bool]:
    """SPEED_FLAGS -> present. PyTorch's own reading spells some with an extra underscore ('avx512_f')."""
    flags = hardware.cpu_flags()
    return {name: name in flags or name.replace("avx512f", "avx512_f") in flags for name in SPEED_FLAGS}


def example_batch(input_spec: dict, batch_size: int) -> np.ndarray:
    """Seeded random input for the graph: what the sidecar's "input" says (float32 or uint8, NCHW or
    NHWC), `batch_size` images. The values do not change the time of a dense CNN."""
    shape = [batch_size if dim == "batch" else dim for dim in input_spec["shape"]]
    generator = np.random.default_rng(0)  # its own generator: no global random state is drawn from
    if input_spec["dtype"] == "uint8":
        return generator.integers(0, 256, size=shape, dtype=np.uint8)
    return generator.standard_normal(shape, dtype=np.float32)


def measure_onnx_latency(
    onnx_path: Path,
    input_spec: dict,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 20,
) -> dict:
    """ONNX Runtime CPU latency of the graph at `onnx_path`: per batch size, one warm-up run (it
    allocates the buffers for that shape), then `repeats` timed runs, fewer when they pass
    MAX_SECONDS_PER_BATCH (at least MIN_RUNS). Milliseconds per run (median, min, max), runs timed, and
    images per second at the median. One intra-op thread per usable core, said in "threads"."""
    threads = hardware.usable_cores()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    per_batch = {}
    for batch_size in batch_sizes:
        feed = {input_spec["name"]: example_batch(input_spec, batch_size)}
        session.run(None, feed)  # warm-up
        seconds = []
        while len(seconds) < repeats and (len(seconds) < MIN_RUNS or sum(seconds) < MAX_SECONDS_PER_BATCH):
            start = time.perf_counter()
            session.run(None, feed)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        per_batch[str(batch_size)] = {
            "median_ms": median * 1e3,
            "min_ms": min(seconds) * 1e3,
            "max_ms": max(seconds) * 1e3,
            "runs": len(seconds),
            "images_per_s": batch_size / median,
        }
    return {"threads": threads, "batch": per_batch}


# --- what the source checkpoint recorded -------------------------------------------------------------


def recorded_facts(source_path: Path) -> dict:
    """The data fingerprint, class counts and validation metrics of the exported weights, from the source
    checkpoint (read again, weights-only). Each is null with a note saying why when it is not known: a
    .safetensors records none of them; a checkpoint saved mid-epoch holds weights trained past its last
    validation. Never a number from anywhere else."""
    if source_path.suffix != ".pt":
        missing = f"not recorded in {source_path.name}"
        return {
            "trained_on": None,
            "trained_on_note": missing,
            "validation": None,
            "validation_note": missing,
        }
    state = ckpt.read_checkpoint(source_path)
    dataset = state.get("dataset")
    facts = {"trained_on": None, "trained_on_note": f"not recorded in {source_path.name}"}
    if dataset is not None:
        facts = {
            "trained_on": {
                "files_sha256": dataset["files_sha256"],
                "files_sha256_of": "the sorted (split, path, label) lines of the files the run read",
                "classes": dataset["classes"],
                "class_counts": dataset["counts"],
                "images": {split: sum(counts) for split, counts in dataset["counts"].items()},
            },
            "trained_on_note": None,
        }
    metrics, note = state.get("val_metrics"), None
    if metrics is None:
        note = f"not recorded in {source_path.name} (saved before its first validation)"
    elif state.get("batches_in_epoch", 0) > 0:
        metrics = None
        note = (
            f"{source_path.name} was saved mid-epoch: its weights were trained past its last validation, "
            "so no validation of these weights is recorded"
        )
    if metrics is None:
        return {**facts, "validation": None, "validation_note": note}
    config = state["config"]
    validation = {
        "split": "val",
        "val_fraction": config["data"]["val_fraction"],
        "seed": config["seed"],
        "epoch": state["epoch"] - 1,  # a checkpoint's "epoch" is the one a resume would start
        "weights": state["weights"],
        "metrics": {name: value for name, value in metrics.items() if name not in NOT_IN_CARD},
    }
    return {**facts, "validation": validation, "validation_note": None}


# --- the card ----------------------------------------------------------------------------------------


def write_model_card(
    out: Path,
    model: nn.Module,
    sidecar: dict,
    source_path: Path,
    *,
    latency_repeats: int,
) -> dict:
    """Count, measure and write `out`/model_card.json and `out`/MODEL_CARD.md for the export in `out`
    (its model.onnx, model.int8.onnx when there, model.safetensors), whose weights are `model` and whose
    facts are `sidecar`, read from `source_path`. latency_repeats 0: no latency measured, and the card
    says so. Returns the card."""
    if latency_repeats < 0:
        raise ValueError(f"--latency-repeats {latency_repeats}: must be 0 (measure nothing) or more")
    out = Path(out)
    side = transforms.input_side(sidecar["preprocessing"])
    flops = count_flops(model, side)
    graphs = [name for name in ("model.onnx", "model.int8.onnx") if (out / name).is_file()]
    latency, latency_note = None, "not measured (--latency-repeats 0)"
    if latency_repeats > 0:
        latency = {
            name: measure_onnx_latency(out / name, sidecar["input"], repeats=latency_repeats)
            for name in graphs
        }
        latency_note = None
    card = {
        "card_version": CARD_VERSION,
        "model": sidecar["model"],
        "num_classes": sidecar["num_classes"],
        "source_checkpoint": source_path.name,
        "weights": sidecar.get("weights"),
        "parameters": count_parameters(model),
        "parameters_are": "elements of every nn.Parameter, trainable or not; buffers counted apart",
        "buffer_elements": sum(b.numel() for b in model.buffers()),
        "input_side": side,
        "flops_per_image": flops,
        "macs_per_image": flops // 2,
        "flops_convention": FLOPS_CONVENTION,
        "file_bytes": {name: (out / name).stat().st_size for name in (*graphs, "model.safetensors")},
        "latency": latency,
        "latency_note": latency_note,
        "latency_machine": {
            "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
            "cpu": cpu_name(),
            "cpu_flags": cpu_speed_flags(),
        },
        **recorded_facts(source_path),
        "temperature": sidecar["temperature"],
        "temperature_fitted": sidecar["temperature_fitted"],
        "abstain_thresholds": sidecar.get("abstain_thresholds"),
        "preprocessing": sidecar["preprocessing"],
        "input": sidecar["input"],
    }
    write_text(out / "model_card.json", json.dumps(card, indent=2) + "\n")
    write_text(out / "MODEL_CARD.md", markdown(card))
    return card


def summary_line(card: dict) -> str:
    """export.py's line: the size figures and the latency at each batch size of model.onnx."""
    line = (
        f"model card: {short_number(card['parameters'])} params, {card['flops_per_image'] / 1e9:.3g} GFLOPs "
        f"at {card['input_side']}x{card['input_side']}"
    )
    if card["latency"] is None:
        return f"{line} | latency {card['latency_note']}"
    measured = card["latency"]["model.onnx"]
    times = ", ".join(f"batch {b} {row['median_ms']:.1f} ms" for b, row in measured["batch"].items())
    return f"{line} | onnxruntime {times} ({card['latency_machine']['cpu']}, {measured['threads']} threads)"


# --- MODEL_CARD.md -----------------------------------------------------------------------------------


def markdown(card: dict) -> str:
    """MODEL_CARD.md: the card's figures as a short page; model_card.json holds every number."""
    side = card["input_side"]
    lines = [
        f"# Model card: {card['model']}, {card['num_classes']} classes",
        "",
        f"Exported from `{card['source_checkpoint']}`, {card['weights'] or 'unknown'} weights "
        f"(EMA or raw: whichever scored better on validation). Every number is in `model_card.json`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| parameters | {card['parameters']:,} ({short_number(card['parameters'])}) |",
        f"| FLOPs per image at {side}x{side} | {card['flops_per_image']:,} "
        f"({short_number(card['macs_per_image'])} multiply-adds) |",
        *(f"| `{name}` | {size / 2**20:.1f} MiB |" for name, size in card["file_bytes"].items()),
        *latency_rows(card),
        "",
        f"FLOPs: {card['flops_convention']}.",
        "",
        *machine_lines(card),
        "## Trained on",
        "",
        *data_lines(card),
        "",
        "## Validation of the exported weights",
        "",
        *validation_lines(card),
        "",
        "## Using it",
        "",
        *usage_lines(card),
    ]
    return "\n".join(lines) + "\n"


def latency_rows(card: dict) -> list[str]:
    if card["latency"] is None:
        return [f"| ONNX Runtime CPU latency | {card['latency_note']} |"]
    rows = []
    for name, measured in card["latency"].items():
        for batch_size, row in measured["batch"].items():
            rows.append(
                f"| `{name}` latency, batch {batch_size} | {row['median_ms']:.2f} ms median (min "
                f"{row['min_ms']:.2f}, max {row['max_ms']:.2f}, {row['runs']} runs), "
                f"{row['images_per_s']:.0f} images/s |"
            )
    return rows


def machine_lines(card: dict) -> list[str]:
    if card["latency"] is None:
        return []
    machine = card["latency_machine"]
    flags = ", ".join(
        f"{name} {'yes' if present else 'no'}" for name, present in machine["cpu_flags"].items()
    )
    threads = next(iter(card["latency"].values()))["threads"]
    return [f"Latency: {machine['runtime']}, {threads} threads, on {machine['cpu']} ({flags}).", ""]


def data_lines(card: dict) -> list[str]:
    data = card["trained_on"]
    if data is None:
        return [f"Data fingerprint and class counts: {card['trained_on_note']}."]
    splits = list(data["class_counts"])
    lines = [
        f"Files fingerprint `{data['files_sha256']}`: sha256 of {data['files_sha256_of']}.",
        "Images: " + ", ".join(f"{split} {data['images'][split]}" for split in splits) + ".",
        "",
        "| class | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for i, name in enumerate(data["classes"]):
        lines.append(f"| {name} | " + " | ".join(str(data["class_counts"][s][i]) for s in splits) + " |")
    return lines


def validation_lines(card: dict) -> list[str]:
    validation = card["validation"]
    if validation is None:
        return [f"Validation metrics: {card['validation_note']}."]
    scalars = {k: v for k, v in validation["metrics"].items() if isinstance(v, (int, float))}
    return [
        f"Split `val` (val_fraction {validation['val_fraction']}, seed {validation['seed']}), epoch "
        f"{validation['epoch']}, {validation['weights']} weights:",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in scalars.items()),
    ]


def usage_lines(card: dict) -> list[str]:
    preprocessing = card["preprocessing"]
    graph_input = card["input"]
    if card["temperature_fitted"]:
        temperature = f"{card['temperature']:.4f}, fitted on val: probabilities = softmax(logits / T)"
    else:
        temperature = "none fitted: softmax(logits) is uncalibrated"
    thresholds = card["abstain_thresholds"]
    if thresholds is None:
        abstain = "none computed"
    else:
        reachable = [row for row in thresholds["targets"] if row["reachable"]]
        abstain = ", ".join(f"{row['target']}: {row['threshold']:.4f}" for row in reachable) or (
            f"no target reachable on {thresholds['images']} {thresholds['split']} images"
        )
    return [
        f"- Input `{graph_input['name']}`: {graph_input['dtype']} {graph_input['layout']} "
        f"{graph_input['shape']}.",
        f"- Preprocessing: {preprocessing.get('color', 'RGB')}; {preprocessing['resize']} "
        f"({preprocessing['interpolation']}); {preprocessing['scale']}; "
        f"mean {preprocessing['mean']}, std {preprocessing['std']}.",
        f"- Temperature: {temperature}.",
        f"- Abstain thresholds (target accuracy: top-1 probability): {abstain}.",
    ]
