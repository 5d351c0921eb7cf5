"""QAT under torch.distributed: what one rank (or a single process) trains, for tests/fakequant/test_ddp.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fakequant/_ddp_worker.py SETUP OUT [global]
    python tests/fakequant/_ddp_worker.py SETUP OUT [global]      # the one-process reference

writes, per rank, ``OUT/rank{r}.safetensors`` (the trained models' states, keys ``run/tensor``) and
``OUT/rank{r}.json`` (histories, errors met, checkpoint writes). In a single process (``WORLD_SIZE`` unset)
:func:`run` gives the reference. ``global`` runs the first run only. Runs:

- ``global``: every rank passes the same global batches; hessq slices each rank's part.
- ``resumed``: the same, stopped after a few steps with a checkpoint, then resumed in a fresh model.
- ``sharded``: each rank passes its own, uneven part of every global batch (ranks > 1 only).

SETUP names a model, plan and data (:data:`SETUPS`); add one there for another architecture.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import hessq
import hessq.fakequant._finetune as finetune_module
from hessq import _distributed as D
from hessq.data import TensorBatches, digits
from hessq.quantizer import percentile_bounds

#: Rows of every global batch rank 0 reads in the ``sharded`` run (the rest go to rank 1): an uneven split.
SHARDED_FIRST_ROWS = 20


@dataclass
class Setup:
    model: nn.Module  # the float model: the teacher, and what is quantized
    plan: Any
    calibration: list
    train: TensorBatches  # global batches, shuffled per epoch from a seed
    epochs: int
    lr: float


def _seeded_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine terms (drawn, not trained: no thread-dependent float training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def resnet8_digits() -> Setup:
    """ResNet-20's blocks, one per stage (16/32/64 channels, 1×1-conv shortcuts), BN folded, on 8×8 digits."""
    torch.manual_seed(0)
    model = _seeded_batchnorm(hessq.models.ResNet((1, 1, 1)), seed=1)
    data = digits("train", batch_size=32, shuffle=False)
    x, y = data.inputs[:320], data.targets[:320]
    return Setup(model, (4, 8), data.take(2), TensorBatches(x, y, batch_size=32, shuffle=True, seed=3), epochs=2, lr=0.01)


def resnet20_fashion() -> Setup:
    """The bundled pretrained ResNet-20 on Fashion-MNIST, W4A8 (first/last 8 bits), 10 batches of 64, 2 epochs."""
    from hessq.data import fashion_mnist

    model = hessq.models.resnet20(pretrained=True).eval()
    data = fashion_mnist("train", batch_size=64, shuffle=False)
    x, y = data.inputs[:640], data.targets[:640]
    return Setup(model, (4, 8), data.take(4), TensorBatches(x, y, batch_size=64, shuffle=True, seed=3), epochs=2, lr=0.01)


def tiny_bert_tokens() -> Setup:
    """A 2-layer random-init Hugging Face BERT, W4A8 with 8-bit embeddings, on padded token ids, 2 epochs of 10 batches."""
    from tests._bert import tiny_bert, token_batch

    # no dropout: each rank would draw its own masks for its rows, which no run with other ranks can repeat
    model = tiny_bert(layers=2, hidden=32, heads=4, labels=3, init_std=0.2, dropout=0.0)
    batches = [token_batch(s, batch=32, length=12) for s in range(10)]
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    names = list(hessq.graph.quantizable_layers(model))
    plan = {n: 8 if "embeddings" in n else 4 for n in names}
    calibration = [(ids[:32], labels[:32]), (ids[32:64], labels[32:64])]
    return Setup(model, plan, calibration, TensorBatches(ids, labels, batch_size=32, shuffle=True, seed=3), epochs=2,
                 lr=0.01)


def in_float64(make: Callable[[], Setup]) -> Callable[[], Setup]:
    """``make``'s setup in float64. Two ranks sum their gradients in another order than one process does, so now
    and then a weight ends one last bit apart. In float32 that moves activations by 1e-7 of their value, and over
    20 steps one of the many values near a rounding boundary of its grid may cross it: a jump of one code that then
    grows (whether it happens depends on the data, the split and the CPU's summation order). In float64 the
    difference is 1e-16, and no crossing happens: what is left is the distribution's own error."""

    def setup() -> Setup:
        s = make()
        as64 = lambda x: x.double() if x.is_floating_point() else x  # noqa: E731 — token ids stay integers
        s.model = s.model.double()
        s.calibration = [(as64(x), y) for x, y in s.calibration]
        s.train = TensorBatches(as64(s.train.inputs), s.train.targets, batch_size=s.train.batch_size, shuffle=True,
                                seed=3)
        return s

    return setup


SETUPS: dict[str, Callable[[], Setup]] = {"resnet8": resnet8_digits, "resnet20": resnet20_fashion,
                                          "bert": tiny_bert_tokens, "resnet8-f64": in_float64(resnet8_digits),
                                          "resnet20-f64": in_float64(resnet20_fashion),
                                          "bert-f64": in_float64(tiny_bert_tokens)}


class RankPart:
    """Rows [start, stop) of every batch of ``data``: one rank's own part, as a DistributedSampler would give."""

    def __init__(self, data: TensorBatches, start: int, stop: int) -> None:
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.data:
            yield x[self.start : self.stop], y[self.start : self.stop]


def _quantized(setup: Setup) -> nn.Module:
    return hessq.quantize(setup.model, setup.plan, setup.calibration)


def _train(setup: Setup, data: Any, q: nn.Module | None = None, **kw: Any) -> tuple[nn.Module, dict]:
    q = _quantized(setup) if q is None else q
    history = hessq.finetune(q, data, teacher=setup.model, distill_weight=0.5, epochs=setup.epochs, lr=setup.lr,
                             seed=7, progress=False, **kw)
    return q, history


def _error(fn: Callable[[], Any]) -> list[str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads the type and the message
        return [type(exc).__name__, str(exc)]
    return ["none", ""]


def _range_checks(rank: int, world: int) -> dict[str, bool]:
    """Synced ranges of a tensor split unevenly over the ranks equal those of the whole, bit for bit."""
    whole = torch.randn(7, 5, 9, generator=torch.Generator().manual_seed(11))
    start, stop = (0, 4) if rank == 0 else (4, 7)
    mine = whole[start:stop]
    out = {}
    for max_samples in (10**6, 50, 7):  # no subsampling, then strides 7 and 46
        ours = percentile_bounds(mine, 99.0, max_samples, group=None)
        ref = percentile_bounds(whole, 99.0, max_samples)
        out[f"percentile_{max_samples}"] = all(torch.equal(a, b) for a, b in zip(ours, ref))
    for k in (5, 1000):  # the mse observer's extremes: fewer than one rank holds, then more than all hold
        top, total = D.gather_top_magnitudes(mine.reshape(-1), k, group=None)
        ref_top, ref_total = D.gather_top_magnitudes(whole.reshape(-1), k, group=D.LOCAL)
        out[f"top_{k}"] = torch.equal(top, ref_top) and total == ref_total == whole.numel()
    lo, hi = D.extremes(mine.amin(), mine.amax())
    out["extremes"] = bool(lo == whole.amin()) and bool(hi == whole.amax())
    return out


def run(name: str, out: Path, world_expected: int | None = None, only_global: bool = False) -> dict[str, Any]:
    """Every run of :data:`SETUPS`[name] on this rank; its states saved under ``out``, its report returned."""
    torch.set_num_threads(1)
    rank, world = D.rank_and_world()
    if world_expected is not None and world != world_expected:
        raise RuntimeError(f"expected {world_expected} ranks, got {world}")
    writes: list[str] = []
    save = finetune_module.save_sealed_torch

    def counted_save(path: Any, content: Any) -> None:
        writes.append(Path(path).name)
        save(path, content)

    finetune_module.save_sealed_torch = counted_save
    try:
        return _runs(name, out, rank, world, writes, only_global)
    finally:
        finetune_module.save_sealed_torch = save


def _runs(name: str, out: Path, rank: int, world: int, writes: list[str], only_global: bool = False) -> dict[str, Any]:
    setup = SETUPS[name]()
    states: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"rank": rank, "world": world, "seconds": {}}

    def keep(run_name: str, q: nn.Module, history: dict | None = None) -> None:
        states.update({f"{run_name}/{k}": v.detach().clone().contiguous() for k, v in q.state_dict().items()})
        if history is not None:
            report[run_name] = {k: v for k, v in history.items() if k != "running"}

    q = _quantized(setup)
    keep("calibrated", q)
    t = time.perf_counter()
    keep("global", *_train(setup, setup.train, q))
    report["seconds"]["global"] = time.perf_counter() - t
    if world > 1 and not only_global:
        ckpt = out / "qat.ckpt"
        t = time.perf_counter()
        _train(setup, setup.train, checkpoint=ckpt, max_steps=7)
        report["writes_before_resume"] = list(writes)
        keep("resumed", *_train(setup, setup.train, checkpoint=ckpt))
        report["seconds"]["resumed"] = time.perf_counter() - t
        start, stop = (0, SHARDED_FIRST_ROWS) if rank == 0 else (SHARDED_FIRST_ROWS, setup.train.batch_size)
        t = time.perf_counter()
        keep("sharded", *_train(setup, RankPart(setup.train, start, stop), distributed_batches="sharded"))
        report["seconds"]["sharded"] = time.perf_counter() - t
        report["writes"] = writes
        report["ranges"] = _range_checks(rank, world)
        few = setup.train.take(2 if rank == 0 else 1)
        q = _quantized(setup)  # every mistake below stops before a training step, leaving it as it was
        report["errors"] = {
            # rank 1 holds fewer batches: both ranks stop before training, each saying why
            "batch_counts": _error(lambda: _train(setup, few, q)),
            # each rank reads other data in 'global' mode
            "different_batches": _error(lambda: _train(setup, RankPart(setup.train, rank, rank + 8), q)),
            # one row cannot be split over two ranks
            "one_row": _error(lambda: _train(setup, [(x[:1], y[:1]) for x, y in setup.train.take(1)], q)),
            # a bad label on rank 1's half only
            "bad_label": _error(lambda: _train(setup, [(x, torch.where(torch.arange(len(y)) == len(y) - 1, 99, y))
                                                       for x, y in setup.train.take(1)], q)),
        }
        report["untouched_by_errors"] = all(torch.equal(v, states[f"calibrated/{k}"]) for k, v in q.state_dict().items())
    save_file(states, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return report


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    started = D.init_from_env()
    try:
        run(name, out, world_expected=int(os.environ.get("WORLD_SIZE", "1")), only_global="global" in sys.argv[3:])
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
