"""torch.distributed glue the stages share: ranks, reductions and gathers across ranks, a rank's part of a
global batch, and the switch that makes activation ranges follow the global batch during QAT.

Every function here is a no-op (or the identity) in a single process, so code reads the same with or
without ``torchrun``. ``group`` is a process group (None: the default one) or :data:`LOCAL` (this rank alone).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: A ``group`` meaning "this rank alone": no collective calls (e.g. per-batch Q-BERT eigenvalues).
LOCAL = object()


def is_distributed(group: Any = None) -> bool:
    if group is LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: Any = None) -> tuple[int, int]:
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``t`` over ranks in place (nccl wants CUDA tensors)."""
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


def all_gather_rows(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``t`` (same shape on every rank) of every rank, stacked in rank order: shape (world, *t.shape)."""
    if not is_distributed(group):
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def broadcast_state(module: nn.Module, group: Any = None) -> None:
    """Every parameter and buffer of ``module`` set to the first rank's, in place (bool buffers included)."""
    if not is_distributed(group):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            wire = t.view(torch.uint8) if t.dtype == torch.bool else t.data  # gloo has no bool
            dist.broadcast(wire, group=group, group_src=0)


def extremes(lo: torch.Tensor, hi: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min of ``lo``, max of ``hi``) over ranks: one MAX all-reduce of (−lo, hi), exact."""
    if not is_distributed(group):
        return lo, hi
    both = torch.stack([-lo, hi])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return -both[0], both[1]


def gather_strided(flat: torch.Tensor, max_samples: int, group: Any = None) -> torch.Tensor:
    """``cat(every rank's flat)[::stride]``, the stride keeping at most ``max_samples`` values
    (``N // max_samples + 1`` when the total ``N`` exceeds it): each rank sends only the values it owns.

    With ranks holding consecutive pieces of one tensor in rank order, this is exactly what one
    process holding the whole tensor subsamples, so a quantile of it is the whole batch's quantile.
    """
    if not is_distributed(group):
        # a copy, not a strided view: a view would keep the whole tensor alive in whatever holds the sample
        # (calibrating a BERT at T=256 kept every attention tensor of every batch: 1.8 GB a batch)
        return flat[:: flat.numel() // max_samples + 1].clone() if flat.numel() > max_samples else flat.clone()
    rank, world = rank_and_world(group)
    sizes = all_gather_rows(torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device), group)[:, 0].tolist()
    total = sum(sizes)
    stride = total // max_samples + 1 if total > max_samples else 1
    offsets = [sum(sizes[:r]) for r in range(world)]
    counts = [len(range((-o) % stride, n, stride)) for o, n in zip(offsets, sizes)]
    mine = flat[(-offsets[rank]) % stride :: stride]
    padded = torch.zeros(max(counts), dtype=flat.dtype, device=flat.device)
    padded[: mine.numel()] = mine
    rows = all_gather_rows(padded, group)
    return torch.cat([rows[r, : counts[r]] for r in range(world)])


def gather_top_magnitudes(flat: torch.Tensor, k: int, group: Any = None) -> tuple[torch.Tensor, int]:
    """The (at most) ``k`` values of largest magnitude in ``cat(every rank's flat)``, and that whole's length.

    The whole's top k lie among the ranks' own top k, so each rank sends only those: every rank gets the
    values one process holding the whole tensor would (ties of equal magnitude aside)."""
    local = flat[flat.abs().topk(min(k, flat.numel())).indices]
    if not is_distributed(group):
        return local.clone(), flat.numel()
    counts = all_gather_rows(torch.tensor([local.numel(), flat.numel()], dtype=torch.int64, device=flat.device), group)
    padded = torch.zeros(k, dtype=flat.dtype, device=flat.device)
    padded[: local.numel()] = local
    rows = all_gather_rows(padded, group)
    union = torch.cat([rows[r, : int(counts[r, 0])] for r in range(rows.shape[0])])
    return union[union.abs().topk(min(k, union.numel())).indices], int(counts[:, 1].sum())


# --- a rank's part of a global batch ------------------------------------------------------------------------


def shard_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s consecutive rows among ``rows``: the first ``rows % world`` ranks take
    one row more (``torch.tensor_split``'s rule)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def batch_rows(batch: Any) -> int | None:
    """The number of rows (dim 0) every tensor in ``batch`` shares (tuples, lists and dicts walked);
    None when it holds no tensor. Tensors of different lengths raise ValueError."""
    lengths: set[int] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            lengths.add(int(obj.shape[0]) if obj.ndim else -1)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o)
        elif isinstance(obj, Mapping):
            for o in obj.values():
                walk(o)

    walk(batch)
    if len(lengths) > 1 or -1 in lengths:
        raise ValueError(f"its tensors do not share one batch dimension (lengths {sorted(lengths)}; -1 is a scalar)")
    return lengths.pop() if lengths else None


def slice_rows(batch: Any, start: int, stop: int) -> Any:
    """``batch`` with every tensor cut to rows [start, stop) along dim 0 (tuples, lists and dicts rebuilt)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_rows(b, start, stop) for b in batch)
    if isinstance(batch, Mapping):
        return {k: slice_rows(v, start, stop) for k, v in batch.items()}
    return batch


def checksum(batch: Any) -> float:
    """A float64 sum over every tensor in ``batch``: equal on ranks that hold the same batch."""
    if isinstance(batch, torch.Tensor):
        return float(batch.detach().double().sum()) if batch.numel() else 0.0
    if isinstance(batch, (list, tuple)):
        return sum(checksum(b) for b in batch)
    if isinstance(batch, Mapping):
        return sum(checksum(v) for v in batch.values())
    return 0.0


# --- activation ranges that follow the global batch -----------------------------------------------------------

_RANGE_GROUP: list[Any] = [LOCAL]


@contextlib.contextmanager
def synced_ranges(group: Any = None) -> Iterator[None]:
    """Inside the block, activation quantizers and observers take each batch's range over every rank's
    part of it (min/max all-reduced, percentiles over the gathered values), so all ranks keep one range."""
    _RANGE_GROUP.append(group if is_distributed(group) else LOCAL)
    try:
        yield
    finally:
        _RANGE_GROUP.pop()


def range_group() -> Any:
    """The group activation ranges are synced over now; :data:`LOCAL` outside :func:`synced_ranges`."""
    return _RANGE_GROUP[-1]
