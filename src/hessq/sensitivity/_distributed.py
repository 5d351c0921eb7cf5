"""torch.distributed glue: which batches a rank owns, and summing figures across ranks.

Every function here is a no-op in a single process, so the engine reads the same with
or without ``torchrun``. Sums are taken in float64 so that the split of the batches over
ranks changes the result only at the level of float64 rounding.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


#: A ``group`` meaning "this rank alone": no collective calls (e.g. per-batch Q-BERT eigenvalues).
LOCAL = object()


def is_distributed(group=None) -> bool:
    if group is LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def owns(batch_index: int, group=None) -> bool:
    """Batch ``b`` belongs to rank ``b % world_size`` (round robin)."""
    rank, world = rank_and_world(group)
    return batch_index % world == rank


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 on the tensor's device; nccl wants CUDA tensors)."""
    if is_distributed(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def init_from_env(device: torch.device | None = None) -> bool:
    """Start the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA. Returns True when this call started it (so the caller
    should destroy it when done).
    """
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True
