"""EpochSampler: which images each process sees in each epoch, in what order, with which augmentation seed.

Everything is a pure function of (seed, epoch, position), so a resumed run continues with exactly the
batches it would have seen, and results do not depend on the number of data workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """One sampler for every case: shuffled or weighted (with replacement) training draws, in-order
    evaluation, one process or a shard per DDP rank.

    Each epoch's draw is a function of (seed, epoch) alone, so every rank computes the same global draw
    and keeps its own disjoint share `draw[rank::world]` (PyTorch has no distributed weighted sampler).
    Training yields (index, sample_seed) keys so augmentation is reproducible too. `set_epoch(epoch,
    start)` skips the first `start` keys of this rank's share: how a mid-epoch resume continues exactly.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.weights = None if weights is None else weights.double()
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _per_rank(self) -> int:
        # Training pads the draw to a multiple of the world size (every rank must step equally often);
        # evaluation never pads, so no image is counted twice.
        if self.shuffle:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return self._per_rank() - self.start

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's global (indices, sample seeds), identical on every rank."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            indices = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        else:
            indices = torch.randperm(self.num_samples, generator=generator)
        total = self._per_rank() * self.world_size
        indices = torch.cat([indices, indices[: total - len(indices)]])  # pad by wrapping around
        seeds = torch.randint(0, 2**62, (total,), generator=generator)
        return indices, seeds

    def __iter__(self) -> Iterator:
        if not self.shuffle:
            yield from range(self.rank + self.start * self.world_size, self.num_samples, self.world_size)
            return
        indices, seeds = self.draw()
        mine = slice(self.rank + self.start * self.world_size, None, self.world_size)
        yield from zip(indices[mine].tolist(), seeds[mine].tolist(), strict=True)

    def batch_indices(self, batch: int, batch_size: int, rank: int | None = None) -> list[int]:
        """Dataset indices of batch number `batch` (counted from the epoch's start) of `rank`'s share of this
        epoch (default: this rank): how the trainer names the files of a batch that produced a NaN loss."""
        rank = self.rank if rank is None else rank
        if self.shuffle:
            share = self.draw()[0][rank :: self.world_size].tolist()
        else:
            share = list(range(rank, self.num_samples, self.world_size))
        return share[batch * batch_size : (batch + 1) * batch_size]
