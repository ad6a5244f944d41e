"""torchrun / DDP set-up and the few rank helpers the loop needs.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process and every helper
is a no-op. NCCL on CUDA, gloo on CPU. There is no launcher of our own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {preference} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_preference: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device."""
    if "RANK" not in os.environ:
        return DistInfo(), pick_device(device_preference)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_preference, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # On GPUs: NCCL for CUDA tensors and gloo for the few CPU ones (train.py's per-class draw counts): an
    # NCCL-only group refuses a CPU tensor ("No backend type associated with device type cpu").
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a sync point); returns the tensor for chaining."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_equal(value) -> bool:
    """True when every rank holds the same (picklable) value, e.g. the class list each rank read from disk."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(other == gathered[0] for other in gathered)


def broadcast_buffers(module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at the start
    of each forward, so after the last step each rank holds statistics updated by its own last batch; at
    epoch end this makes every rank validate, and resume from, exactly the weights rank 0 saves."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def merge_dicts(part: dict) -> dict:
    """Every rank's dict merged into one, on every rank (e.g. each rank's share of a scan's findings)."""
    if not (dist.is_available() and dist.is_initialized()):
        return part
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return {k: v for d in gathered for k, v in d.items()}


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank: keeps ranks in step on a per-rank decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def gather_strided(tensors: tuple[torch.Tensor, ...], num_samples: int) -> tuple[torch.Tensor, ...]:
    """Every rank's share of an evaluation split, on every rank, in dataset order. An evaluating
    EpochSampler gives rank r the items r, r + W, r + 2W, ... and never pads (sampling.py), so
    interleaving the shares counts each item once. Shares that do not add up to `num_samples` that way
    (a padding sampler, such as torch's DistributedSampler, repeats up to W - 1 items) are refused.
    CPU tensors, pickled through all_gather_object: a sync point, meant for logits, not for images."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    shares = [None] * world
    dist.all_gather_object(shares, tensors)
    sizes = [len(share[0]) for share in shares]
    if sizes != [len(range(r, num_samples, world)) for r in range(world)]:
        raise ValueError(
            f"evaluation shares of sizes {sizes} are not an unpadded strided split of {num_samples} items"
        )
    gathered = []
    for i, first in enumerate(
        max(shares, key=lambda share: len(share[0]))
    ):  # an empty share may lack the shape
        whole = torch.empty(num_samples, *first.shape[1:], dtype=first.dtype)
        for r, share in enumerate(shares):
            if sizes[r]:
                whole[r::world] = share[i]
        gathered.append(whole)
    return tuple(gathered)
