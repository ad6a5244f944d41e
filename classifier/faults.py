"""How the run notices that something is wrong: a request to stop (SIGINT/SIGTERM; data-loader workers
ignore it), a NaN/inf loss or NaN/inf weights, and, under `--debug`, a model that cannot overfit one batch.

Signals and non-finite losses are checked at optimizer-step boundaries, where the state is consistent and
a checkpoint can be resumed exactly. The checks here raise SystemExit with a message naming the cause
and the fix; saving a checkpoint before a stop is the loop's job, so the reader sees it happen. A model
that cannot drive the loss of one fixed batch towards zero has a bug upstream of the optimizer (labels
shuffled against images, a frozen layer, a wrong loss); `overfit_one_batch` trains a copy, so the real
run is untouched.
"""

from __future__ import annotations

import copy
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from classifier import checkpoint, distributed
from classifier.files import write_text
from classifier.sampling import EpochSampler


class StopRequest:
    """The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) asks the loop to stop after the
    current step; a second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def install(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping at once")
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, device: torch.device) -> bool:
        """True when any rank was signalled. Under DDP a tiny all-reduce on every call, so that every rank
        stops at the same step."""
        return distributed.any_true(self.signum is not None, device)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class NonFiniteWatch:
    """Remembers, on the device, the first (epoch, batch) whose loss was NaN or inf. Updating it costs no
    host sync; `first()` syncs and is called only at log steps, before every checkpoint and at epoch end,
    so no NaN weights are ever saved and the run stops within log_every_steps steps of the fault."""

    def __init__(self, device: torch.device):
        self.epoch = torch.full((), -1, dtype=torch.long, device=device)
        self.batch = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        fresh = ~torch.isfinite(loss.detach()) & (self.epoch < 0)
        # Python ints enter torch.where as scalars: no host-to-device copy in the step.
        self.epoch = torch.where(fresh, epoch, self.epoch)
        self.batch = torch.where(fresh, batch, self.batch)

    def first(self) -> tuple[int, int] | None:
        epoch, batch = distributed.all_reduce_max(torch.stack([self.epoch, self.batch])).tolist()
        return None if epoch < 0 else (epoch, batch)


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, but only the main process should
    react; a worker that dies of it would turn a clean stop into a 'worker exited unexpectedly' crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_workers(loader) -> None:
    """Stop a DataLoader's persistent worker processes now rather than at garbage collection. Needed
    because the workers ignore SIGTERM (above): at interpreter exit, multiprocessing terminates and then
    joins them, and a worker that ignores the termination is waited for forever. PyTorch has no public
    call for this: a persistent loader keeps its live iterator in `_iterator`, whose `_shutdown_workers`
    is what the iterator's own __del__ runs. A loader without workers (or not yet iterated) has none."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def overfit_one_batch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 30, lr: float = 1e-3
) -> tuple[float, float]:
    """Train a copy of `model` on one batch for `steps` Adam steps; return (first loss, last loss)."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def check_overfits(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, on_failure: str, log
) -> None:
    """--debug's check: can a copy of `model` fit one fixed batch? Logs the verdict; a failure stops the
    run with `on_failure` 'stop' (--debug-overfit-failure) and is only reported with 'continue'."""
    first, last = overfit_one_batch(model, images, labels)
    fitted = last < 0.5 * first
    verdict = "ok" if fitted else "FAILED: the model cannot fit one batch, look for a bug upstream"
    log(f"debug: overfit one batch: loss {first:.3f} -> {last:.3f} in 30 steps: {verdict}")
    if not fitted and on_failure == "stop":
        raise SystemExit(
            "error: --debug's overfit-one-batch check failed (above); fix the model or the data, "
            "or pass --debug-overfit-failure continue to train anyway"
        )


class BufferSnapshot:
    """A copy of a model's buffers (BatchNorm's running statistics), to put back after a forward that
    --nonfinite-loss skip leaves out: a NaN batch poisons the statistics even without a backward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = [buffer.clone() for buffer in model.buffers()]

    def restore(self) -> None:
        torch._foreach_copy_(list(self.model.buffers()), self.saved)


def nonfinite_on_any_rank(loss: torch.Tensor, device: torch.device) -> bool:
    """True when this rank's loss, or any other rank's, is NaN/inf. A host sync on every call."""
    return distributed.any_true(not torch.isfinite(loss).item(), device)


def raise_if_nonfinite(
    watch: NonFiniteWatch,
    *,
    step: int,
    modules: list[nn.Module],
    sampler: EpochSampler,
    samples: list,
    batch_size: int,
    report: Path,
    write_report: bool,
) -> None:
    """Stop the run with a message naming the cause, when the watch saw a NaN/inf loss (its batch's files
    are written to `report` when `write_report`) or when `modules` (the model, the EMA) hold NaN/inf: a
    finite loss followed by an exploding step, say. A sync point; the loop calls it before every save,
    so NaN weights never reach a checkpoint."""
    bad = watch.first()
    if bad is None:
        broken = checkpoint.nonfinite_tensors(*(module.state_dict() for module in modules))
        if broken:
            raise SystemExit(
                f"error: after step {step} the weights hold NaN/inf ({', '.join(broken[:5])}"
                f"{', ...' if len(broken) > 5 else ''}); they were not saved, the last checkpoint is "
                "from before. Lower --optim.lr or set --optim.clip-grad-norm."
            )
        return
    bad_epoch, bad_batch = bad
    ranks = range(sampler.world_size)
    paths = [samples[i][0] for r in ranks for i in sampler.batch_indices(bad_batch, batch_size, rank=r)]
    if write_report:
        write_text(report, "\n".join(paths) + "\n")
    raise SystemExit(
        f"error: the loss became NaN/inf in epoch {bad_epoch}, batch {bad_batch} (near step {step}); "
        f"its files are listed in {report}. The last checkpoint is from before it. Lower --optim.lr, "
        "check those images, or pass --nonfinite-loss skip."
    )
