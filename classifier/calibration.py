"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation logits, such that
softmax(logits / T) gives honest probabilities. Dividing by T never changes the argmax, so accuracy is
untouched. This module fits T, collects the logits (gathered over DDP ranks) and, when training ends,
stores T with the best checkpoint together with the abstain thresholds fitted on the same logits
(selective.py computes those); the ECE and the reliability-diagram numbers come from report.py.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from classifier import checkpoint as ckpt
from classifier import distributed, models, selective
from classifier.report import calibration_summary
from classifier.sampling import EpochSampler
from classifier.validation import batch_logits

T_MIN, T_MAX = 0.05, 20.0  # beyond these a "temperature" says the val set is degenerate, not the model
NO_TEMPERATURE = 1.0  # weights with no fitted temperature: softmax(logits) as is


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimizing the mean NLL of softmax(logits / T), in float64.

    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search over log T finds the
    minimum without gradients or line searches that can fail: deterministic, and a perfectly separated
    set (NLL falling as T -> 0) simply ends at T_MIN. When no T does better than 1, T is 1."""
    if len(targets) == 0:
        raise ValueError("fit_temperature: no logits to fit a temperature on")
    z, y = logits.detach().double().cpu(), targets.long().cpu()
    if not torch.isfinite(z).all():
        raise ValueError("fit_temperature: the logits hold NaN or inf")

    def nll(log_t: float) -> float:
        return F.cross_entropy(z / math.exp(log_t), y).item()

    ratio = (math.sqrt(5) - 1) / 2
    a, b = math.log(T_MIN), math.log(T_MAX)
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-7:  # ~37 evaluations: T to a relative 1e-7
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    log_t = (a + b) / 2
    if nll(log_t) >= nll(0.0):  # flat (e.g. all logits equal) or no gain: leave the model as it is
        return NO_TEMPERATURE
    return min(max(math.exp(log_t), T_MIN), T_MAX)


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    autocast: AbstractContextManager,
    channels_last: bool = False,
    logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) on the CPU for every image of `loader`, as validation.validate computes them
    (fp32 after autocast, plus `logit_bias`). Under DDP every rank gets the whole split, in dataset order."""
    bias = None if logit_bias is None else torch.as_tensor(logit_bias, dtype=torch.float32, device=device)
    chunks, targets = [], []
    for logits, labels in batch_logits(
        model, loader, device=device, autocast=autocast, channels_last=channels_last, logit_bias=bias
    ):
        chunks.append(logits.cpu())
        targets.append(labels.cpu().long())
    logits = torch.cat(chunks) if chunks else torch.zeros(0, 0)  # a rank may hold no val images at all
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    sampler = getattr(loader, "sampler", None)  # ours tells the split's size; any other: trust the shares
    num_samples = sampler.num_samples if isinstance(sampler, EpochSampler) and not sampler.shuffle else None
    if num_samples is None:
        num_samples = int(distributed.all_reduce_sum(torch.tensor(len(targets), device=device)))
    return distributed.gather_strided((logits, targets), num_samples)


def best_logits(
    run_dir: Path,
    loader,
    *,
    device: torch.device,
    autocast: AbstractContextManager,
    channels_last: bool,
) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """(best.pt's state, its inference weights' logits over `loader`, the labels); None without best.pt.
    Every rank must call it (the logits are gathered). Training's RNG streams are left exactly as they
    were: building the model draws a random init before the weights are loaded."""
    best_path = Path(run_dir) / "checkpoints" / "best.pt"
    if not best_path.is_file():
        return None
    state = ckpt.read_checkpoint(best_path)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # model_from_checkpoint folds state["logit_bias"] into the head: these are the adjusted logits
        # that evaluate.py and the ONNX export give, so the bias must not be added a second time here.
        model, _ = models.model_from_checkpoint(state)
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        logits, targets = collect_logits(
            model, loader, device=device, autocast=autocast, channels_last=channels_last
        )
    return state, logits, targets


def calibrate_best(
    run_dir: Path,
    val_loader,
    *,
    device: torch.device,
    channels_last: bool,
    log,
    targets: tuple[float, ...] = selective.TARGETS,
) -> float | None:
    """Fit T on the validation split with best.pt's inference weights, then the abstain thresholds for
    `targets` on the calibrated confidences (selective.py), and store both with best.pt in one rewrite
    (checkpoint.add_to_best: best.pt, last.pt when it is the same save, best.safetensors). Returns T; None
    without best.pt or val images. Every rank must call it (the logits are gathered); rank 0 writes.

    The logits are float32 without autocast, whatever the training precision: the numbers evaluate.py and
    the exports give, so T and the thresholds reproduce there."""
    found = best_logits(
        run_dir, val_loader, device=device, autocast=nullcontext(), channels_last=channels_last
    )
    if found is None:
        return None
    state, logits, labels = found
    if len(labels) == 0:
        log.print("calibration skipped: the validation split is empty")
        return None
    temperature = fit_temperature(logits, labels)
    s = calibration_summary(logits, labels, temperature)
    fit = {
        "val_nll_before": s["nll"],
        "val_nll_after": s["nll_calibrated"],
        "val_ece_before": s["ece"],
        "val_ece_after": s["ece_calibrated"],
    }
    confidence, correct = selective.top1_confidence(logits, labels, temperature)
    thresholds = selective.abstain_thresholds(
        confidence, correct, split="val", temperature=temperature, targets=targets
    )
    if distributed.is_main():
        ckpt.add_to_best(
            Path(run_dir),
            state,
            {"temperature": temperature, "temperature_fit": fit, "abstain_thresholds": thresholds},
            {"temperature": temperature, "temperature_fitted": True, "abstain_thresholds": thresholds},
        )
    distributed.barrier()  # no rank leaves (and no reader looks) before the files hold T
    log.print(
        f"calibration: temperature {temperature:.3f} on {len(labels)} val images (best.pt, epoch "
        f"{state['best']['epoch']}) | ECE {s['ece']:.4f} -> {s['ece_calibrated']:.4f} | "
        f"NLL {s['nll']:.4f} -> {s['nll_calibrated']:.4f}"
    )
    log.print(selective.summary_line(thresholds))
    return temperature
