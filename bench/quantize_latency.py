"""CPU latency of ONNX Runtime: the fp32 export against its int8 version from classifier/quantize.py.

    python bench/quantize_latency.py                  # ResNet18 at 224 px and at the jersey preset's size
    python bench/quantize_latency.py --threads 4 --repeats 15

The models are randomly initialised: latency depends on the graph and the shapes, not on the weights'
values. Each is exported as export.py does it and quantized with the same quantize.quantize_int8, calibrated
on random images (ranges, not accuracy, are what a latency needs; accuracy is export.py's gate). Prints the
median milliseconds per batch over the repeats with their interquartile range, fp32 and int8 taking turns
in every repeat so a burst of load from other processes hits both. The CPU is named with the flags that
decide int8 speed: avx2 (u8 x s8 dot products in 16-bit steps), avx512_vnni / avx_vnni (one instruction
per 4 int8 products, 32-bit sums) and amx (int8 matrix tiles).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `classifier` without installing the repo

from classifier import quantize  # noqa: E402
from classifier.models import build_model  # noqa: E402
from classifier.onnx_export import export_onnx  # noqa: E402
from configs.jersey import CONFIG as JERSEY  # noqa: E402

INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class BenchArgs:
    batch_sizes: tuple[int, ...] = (1, 32)
    """Batch sizes to time."""
    repeats: int = 9
    """Timed repeats per case; the table shows their median and interquartile range."""
    min_repeat_s: float = 0.2
    """Each repeat runs the batch enough times to last at least this long (timer noise at batch 1)."""
    threads: int = 2
    """ONNX Runtime intra-op threads (2: the box this was written on is shared)."""
    calibration_images: int = 32
    """Random images to calibrate on."""


def cpu_line() -> str:
    """The CPU's model name and which of the int8 instruction sets it has."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    flags = Path("/proc/cpuinfo").read_text().split()
    return f"{name}; " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in INT8_FLAGS)


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's workers busy-wait between runs by default; fp32 and int8 take turns here, and a spinning
    # pool of one would steal the cores of the other (bench/onnx_vs_torch.py measured such starvation).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def milliseconds(sessions: dict, inputs: np.ndarray, repeats: int, min_repeat_s: float) -> dict[str, list]:
    """Milliseconds per batch of each session on `inputs`, one value per repeat (each the mean over
    enough runs to last `min_repeat_s`), the sessions taking turns within every repeat."""
    calls = {}
    for name, s in sessions.items():
        s.run(None, {"images": inputs})  # warm-up: memory arena, kernels' packed weights
        start = time.perf_counter()
        s.run(None, {"images": inputs})
        calls[name] = max(1, round(min_repeat_s / (time.perf_counter() - start)))
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                s.run(None, {"images": inputs})
            times[name].append(1000 * (time.perf_counter() - start) / calls[name])
    return times


def summary(values: list[float]) -> str:
    """median [first quartile - third quartile]."""
    q1, median, q3 = statistics.quantiles(values, n=4)
    return f"{median:.1f} [{q1:.1f}-{q3:.1f}]"


def bench_model(label: str, name: str, size: int, num_classes: int, args: BenchArgs) -> None:
    model = build_model(name, num_classes, log=lambda line: None).eval()
    generator = torch.Generator().manual_seed(0)
    # Random pixels normalized as ImageNet's statistics do: the value range real inputs have.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = torch.rand(args.calibration_images, 3, size, size, generator=generator)
    calibration = ((pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1)).numpy()
    with tempfile.TemporaryDirectory() as folder:
        fp32_path, int8_path = Path(folder) / "model.onnx", Path(folder) / "model.int8.onnx"
        export_onnx(model, fp32_path, torch.from_numpy(calibration[:2]), {"benchmark": name})
        quantize.quantize_int8(fp32_path, int8_path, calibration)
        sessions = {"fp32": session(fp32_path, args.threads), "int8": session(int8_path, args.threads)}
        for batch_size in args.batch_sizes:
            inputs = np.ascontiguousarray(np.resize(calibration, (batch_size, 3, size, size)))
            times = milliseconds(sessions, inputs, args.repeats, args.min_repeat_s)
            speedup = statistics.median(times["fp32"]) / statistics.median(times["int8"])
            print(
                f"| {label} | {size}x{size} | {batch_size} | {summary(times['fp32'])} | "
                f"{summary(times['int8'])} | {speedup:.2f}x |",
                flush=True,
            )


def main(args: BenchArgs) -> None:
    print(
        f"CPU: {cpu_line()}\nonnxruntime {onnxruntime.__version__}, CPUExecutionProvider, "
        f"{args.threads} intra-op threads, no spinning; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start; int8: {quantize.FORMAT}, weights {quantize.WEIGHTS}, "
        f"activations {quantize.ACTIVATIONS}; ms per batch, median [IQR] of {args.repeats} repeats\n"
    )
    print("| model | input | batch | fp32 ms | int8 ms | fp32 / int8 |")
    print("|---|---|---|---|---|---|")
    bench_model("resnet18", "resnet18", 224, 1000, args)  # ImageNet's size and head
    # The jersey preset's model at its input size; 100 classes: the numbers 0-99 a shirt can carry.
    bench_model(f"{JERSEY.model} (jersey preset)", JERSEY.model, JERSEY.data.image_size, 100, args)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs, description=__doc__))
