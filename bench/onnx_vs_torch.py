"""CPU inference throughput: ONNX Runtime versus PyTorch eager, on the same exported model.

    python bench/onnx_vs_torch.py                                # random-init ResNet18 at 32 px and 224 px
    python bench/onnx_vs_torch.py runs/NAME/checkpoints/best.pt  # a trained model at its own input size

Prints images/s (the median of several repeats) at batch 1 and 64 as a Markdown table. Both runtimes
use their default thread counts; ONNX Runtime's thread spinning is off (see bench_model).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import tyro
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier import checkpoint as ckpt  # noqa: E402
from classifier import models  # noqa: E402
from classifier.models import build_model  # noqa: E402
from classifier.onnx_export import export_onnx  # noqa: E402


@dataclass(frozen=True)
class BenchArgs:
    checkpoint: tyro.conf.Positional[Path | None] = None
    """Checkpoint or run directory; without one, random-init ResNet18s at 32 px (small stem) and 224 px."""
    batch_sizes: tuple[int, ...] = (1, 64)
    """Batch sizes to time."""
    repeats: int = 7
    """Timed repeats per case; the table shows their median."""
    min_repeat_s: float = 0.3
    """Each repeat runs the batch enough times to last at least this long (timer noise at batch 1)."""


def images_per_s(runs: dict, inputs: dict, repeats: int, min_repeat_s: float) -> dict[str, float]:
    """Median images/s of each `runs[name](inputs[name])` over `repeats`. The runtimes take turns within
    every repeat, so a burst of load from other processes hits both rather than one."""
    calls = {}
    for name, run in runs.items():
        run(inputs[name])  # warm-up: allocator, thread pool, oneDNN primitive caches
        start = time.perf_counter()
        run(inputs[name])
        calls[name] = max(1, math.ceil(min_repeat_s / (time.perf_counter() - start)))
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(0.05)  # let the other runtime's spinning worker threads go idle first
            start = time.perf_counter()
            for _ in range(calls[name]):
                run(inputs[name])
            rates[name].append(len(inputs[name]) * calls[name] / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def bench_model(name: str, model: nn.Module, size: int, args: BenchArgs) -> list[str]:
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, torch.randn(2, 3, size, size), {"benchmark": name})
        options = onnxruntime.SessionOptions()
        # ORT's worker threads busy-wait between runs by default. Taking turns with PyTorch on a small CPU,
        # that spinning starves PyTorch's threads (measured: 70 -> 4 img/s on 2 cores), so it is off here;
        # waking a thread costs microseconds against runs of milliseconds.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch_size in args.batch_sizes:
            images = torch.randn(batch_size, 3, size, size)
            array = images.numpy()
            with torch.inference_mode():
                expected = model(images).numpy()
            # Timing a model that computes something else would be meaningless: check the export first.
            assert np.abs(session.run(None, {"images": array})[0] - expected).max() < 1e-3

            with torch.inference_mode():
                runs = {"torch": model, "ort": lambda x: session.run(None, {"images": x})}
                rates = images_per_s(runs, {"torch": images, "ort": array}, args.repeats, args.min_repeat_s)
            torch_rate, ort_rate = rates["torch"], rates["ort"]
            row = (
                f"| {name} | {size}x{size} | {batch_size} | {torch_rate:,.0f} | {ort_rate:,.0f} "
                f"| {ort_rate / torch_rate:.2f}x |"
            )
            print(row, flush=True)
            rows.append(row)
    return rows


def main(args: BenchArgs) -> None:
    if args.checkpoint is not None:
        state = ckpt.load_checkpoint(args.checkpoint)
        model, weights = models.model_from_checkpoint(state)
        cases = [(f"{state['model_name']} ({weights})", model, state["preprocessing"]["center_crop"])]
    else:
        cases = [
            ("resnet18, small stem", build_model("resnet18", 10, small_input_stem=True), 32),
            ("resnet18", build_model("resnet18", 1000), 224),
        ]
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, no spinning), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
        f"median of {args.repeats} repeats, fp32\n"
    )
    print("| model | input | batch | PyTorch eager img/s | ONNX Runtime img/s | ORT / PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, model, size in cases:
        bench_model(name, model, size, args)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
