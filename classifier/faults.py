"""How the loop reacts to being stopped (SIGINT/SIGTERM) and to a NaN/inf loss.

Both are checked at optimizer-step boundaries, where the state is consistent and a checkpoint can be
resumed exactly. Nothing here saves files or exits: the loop decides, so the reader sees it happen.
"""

from __future__ import annotations

import signal
import sys

import torch

from classifier import distributed


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
        """True when any rank was signalled (under DDP a tiny all-reduce, so every rank stops at the same step)."""
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
