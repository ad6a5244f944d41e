"""What the hardware does fast, and the defaults that follow from it: the autocast precision, the memory
format and the number of DataLoader workers (for validation, and for training, which can differ). Every
choice comes with the reason, which train.py prints in its start-up line and writes to config.json, so a
speed figure can be traced to its machine.

Why precision cannot be fixed in a preset: bf16 autocast on a CPU is fast only where the CPU has native
bf16 instructions (avx512_bf16 or AMX). Elsewhere PyTorch emulates bf16, and training is slower than in
fp32: about 2x where the CPU has AVX-512, about 12x where it has AVX2 only. Measured with
bench/precision.py (the fashion-mnist preset: small_resnet, 28 px, batch 128, channels_last; training
step with EMA, median of rounds, fp32 and bf16 taking turns in one run), 2-core machines:
- Intel Xeon @ 2.60GHz, AVX-512 without avx512_bf16/AMX: 314 img/s fp32, 145 bf16 (0.46x);
- the same Xeon capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): 235 fp32, 20 bf16
  (0.085x), as a 2-core AMD EPYC with AVX2 only measured by hand (212-261 fp32, 20-22 bf16);
- an Intel Xeon with AMX: 717-959 img/s bf16 against 349-446 fp32 (2.1x the other way).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from classifier.config import TrainConfig

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
EMULATED_BF16_COST = (
    "slower than fp32: measured with the fashion-mnist preset on 2 cores, about 2x on a CPU with AVX-512 "
    "(145 vs 314 img/s) and 12x with AVX2 only (20 vs 235 img/s)"
)


@dataclass(frozen=True)
class Choice:
    """A resolved setting and the reason for it, both recorded in config.json."""

    value: object
    reason: str
    warn: bool = False  # a choice the user asked for that is known to be slow here

    def line(self, name: str) -> str:
        """The start-up line: 'precision fp32: ...', with 'warning: ' first for a slow choice."""
        return f"{'warning: ' if self.warn else ''}{name} {self.value}: {self.reason}"

    def record(self) -> dict:
        """config.json's entry: what was used and why."""
        return {"value": self.value, "reason": self.reason}


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags, lower case: PyTorch's own reading (torch.cpu.get_capabilities,
    in recent releases) where it exists, else the `flags` line of /proc/cpuinfo (Linux), else none."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return {name.lower() for name, present in get_capabilities().items() if present is True}
    if CPUINFO.exists():
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def onednn_bf16_enabled() -> bool:
    """Whether oneDNN will run bf16 kernels on this CPU. False when ONEDNN_MAX_CPU_ISA caps it below
    AVX-512 (then even a CPU with AMX runs bf16 the slow way) or when PyTorch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_native_bf16() -> Choice:
    """Choice(True/False, why): does this CPU run bf16 autocast natively?"""
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()]
    if not native:
        return Choice(False, "the CPU has no avx512_bf16 or amx_bf16, so bf16 would be emulated")
    if not onednn_bf16_enabled():
        return Choice(
            False,
            f"the CPU has {'/'.join(native)} but oneDNN's bf16 kernels are off (ONEDNN_MAX_CPU_ISA?)",
        )
    return Choice(True, f"the CPU has native bf16 ({'/'.join(native)})")


def resolve_precision(requested: str, device: torch.device) -> Choice:
    """The autocast precision to train with. 'auto': on CUDA, bf16 from compute capability 8.0 (Ampere)
    on, else fp16 with the GradScaler; on a CPU, bf16 where it is native, else fp32; fp32 elsewhere.
    An explicit precision is kept as asked, with its cost in the reason when it is known to be slow."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        has_bf16 = major >= 8
        if requested == "auto":
            if has_bf16:
                return Choice("bf16", f"auto: CUDA compute capability {major}.{minor} >= 8.0 runs bf16")
            return Choice("fp16", f"auto: CUDA compute capability {major}.{minor} < 8.0: no fast bf16")
        if requested == "bf16" and not has_bf16:
            return Choice(
                "bf16",
                f"asked, but compute capability {major}.{minor} < 8.0 emulates bf16 (slow); use fp16",
                warn=True,
            )
        return Choice(requested, "asked")
    if device.type == "cpu":
        native = cpu_native_bf16()
        if requested == "auto":
            return Choice("bf16" if native.value else "fp32", f"auto: {native.reason}")
        if requested == "bf16" and not native.value:
            return Choice(
                "bf16",
                f"asked, but {native.reason}: {EMULATED_BF16_COST}; use --precision auto or fp32",
                warn=True,
            )
        return Choice(requested, "asked")
    if requested == "auto":
        return Choice("fp32", f"auto: fp32 on {device.type}")
    return Choice(requested, "asked")


def resolve_channels_last(requested: str, device: torch.device, precision: str) -> Choice:
    """channels_last (True/False) for the model and the images, from 'on', 'off' or 'auto': on for CPUs,
    where oneDNN's convolutions prefer it in fp32 and bf16 alike (measured, 2-core CPUs, training step,
    batch 128: small_resnet 28 px 1.14x in fp32 on both AVX2 and AMX, 1.43x in bf16 on AMX; never slower),
    and on CUDA with fp16/bf16, where tensor cores want it; off for CUDA fp32, where PyTorch's own guidance
    sees no consistent gain."""
    if requested != "auto":
        return Choice(requested == "on", "asked")
    if device.type == "cpu":
        return Choice(True, "auto: oneDNN's CPU convolutions are faster in channels_last")
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return Choice(True, f"auto: CUDA {precision} convolutions use tensor cores in channels_last")
    return Choice(False, f"auto: {device.type} {precision} gains nothing measured from channels_last")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def core_share(processes_per_node: int) -> int:
    """The usable cores of this process: the node's divided among its processes, at least one."""
    return max(1, usable_cores() // max(1, processes_per_node))


def resolve_num_workers(requested: int | str, processes_per_node: int) -> Choice:
    """DataLoader workers per process, from a number or 'auto': this process's share of the usable cores,
    at most 4 (past that, workers mostly wait on the training step) and at least 1, so decoding never runs
    in the training process. More workers than cores only makes the processes take turns."""
    cores = usable_cores()
    share = core_share(processes_per_node)
    if requested == "auto":
        return Choice(
            min(4, share),
            f"auto: {cores} usable cores / {processes_per_node} process(es) on this node, at most 4",
        )
    if requested > share:
        return Choice(
            requested,
            f"asked; more than the {share} cores this process has, so they take turns",
            warn=True,
        )
    return Choice(requested, "asked")


def resolve_train_loader_workers(
    requested: int | str, num_workers: Choice, device: torch.device, processes_per_node: int
) -> Choice:
    """Workers of the training loader: num_workers, except for 'auto' on a CPU with two cores or fewer
    for this process, all of them running the training step's threads. There a worker has no free core:
    it runs in place of one of the step's threads and stalls the step until it yields, so loading the
    next batch in this process, between steps, costs less. Measured with bench/throughput.py on a 2-core
    AMD EPYC (AVX2; fp32, channels_last, ResNet18 at 32 px), 0 and 2 workers taking turns in four runs:
    0.86-0.92 of the bare loop with 0, 0.83-0.87 with 2, never behind (median gain 0.035). Validation
    keeps num_workers: its step is several times cheaper than a training step, so loading in between
    costs more than the stalls (bench/eval_speed.py with a second, 0-worker pass added, same machine, one
    run: 0.59 of the bare pass with 2 workers, 0.52 with 0)."""
    share = core_share(processes_per_node)
    threads = torch.get_num_threads()
    if requested == "auto" and device.type == "cpu" and share <= 2 and threads >= share:
        return Choice(
            0,
            f"auto: the training step's {threads} threads fill this process's {share} CPU cores, so a "
            "worker would stall it; batches load between steps (validation: num_workers)",
        )
    return Choice(num_workers.value, "as num_workers")


def describe() -> dict:
    """The machine in one dict for config.json: CPU model, cores, native-bf16 flags, GPUs."""
    flags = cpu_flags()
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "cpu_native_bf16_flags": [flag for flag in NATIVE_BF16_FLAGS if flag in flags],
        "onednn_bf16": onednn_bf16_enabled(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "gpus": gpus,
    }


def cpu_model() -> str:
    """The CPU's model name ('model name' in /proc/cpuinfo on Linux), or what the platform module says."""
    if CPUINFO.exists():
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_settings(cfg: TrainConfig, device: torch.device) -> dict[str, Choice]:
    """Every hardware-dependent setting of `cfg` resolved for this machine, by name: precision,
    channels_last, num_workers (this process's share of the node's cores, under torchrun) and the
    training loader's workers."""
    precision = resolve_precision(cfg.precision, device)
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_workers = resolve_num_workers(cfg.data.num_workers, processes_per_node)
    return {
        "precision": precision,
        "channels_last": resolve_channels_last(cfg.channels_last, device, precision.value),
        "num_workers": num_workers,
        "train_loader_workers": resolve_train_loader_workers(
            cfg.data.num_workers, num_workers, device, processes_per_node
        ),
    }


def settings_record(cfg: TrainConfig, choices: dict[str, Choice]) -> dict:
    """config.json's "resolved": for each setting, the flag as given, the value used and why."""
    requested = {
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "num_workers": cfg.data.num_workers,
        "train_loader_workers": cfg.data.num_workers,
    }
    return {name: {"requested": requested[name], **choice.record()} for name, choice in choices.items()}
