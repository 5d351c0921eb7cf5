"""torch.distributed glue of the sensitivity stage: which batches a rank owns; the rest is :mod:`hessq._distributed`.

Every function is a no-op in a single process, so the engine reads the same with or without ``torchrun``.
Sums are taken in float64 so that the split of the batches over ranks changes the result only at the level
of float64 rounding.
"""

from __future__ import annotations

from hessq._distributed import LOCAL, all_reduce_sum, init_from_env, is_distributed, rank_and_world

__all__ = ["LOCAL", "all_reduce_sum", "init_from_env", "is_distributed", "owns", "rank_and_world"]


def owns(batch_index: int, group=None) -> bool:
    """Batch ``b`` belongs to rank ``b % world_size`` (round robin)."""
    rank, world = rank_and_world(group)
    return batch_index % world == rank
