"""Two gloo processes, batches split between them, give the single-process result."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hessq.sensitivity import hessian_sensitivity, hessian_trace

from ._models import batches, convnet

KW = dict(rtol=0.0, max_samples=6, seed=5, eig_max_iter=15, eig_tol=0.0, top_k=2, qbert=True, activations=True)


def _run():
    torch.set_num_threads(1)
    model, data = convnet(), batches((20, 10, 15))
    sens = hessian_sensitivity(model, data, **KW)
    tr = hessian_trace(model, data, rtol=0.0, max_samples=4, min_samples=4)
    return {"sens": sens.to_dict(), "trace": [tr.trace, tr.stderr]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = _run()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-12), path
    else:
        assert a == b, path


def test_two_gloo_processes_equal_single_process(tmp_path):
    single = json.loads(json.dumps(_run()))
    out = tmp_path / "dist.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    both = json.loads(out.read_text())
    assert both["sens"]["meta"].pop("world_size") == 2
    assert single["sens"]["meta"].pop("world_size") == 1
    assert single["sens"]["meta"]["num_batches"] == 3
    # per-rank HVP and backward-pass counts differ by construction (2 batches vs 1); the products do not
    for key in ("trace_hvps_per_rank", "backward_passes_per_rank"):
        both["sens"]["meta"].pop(key); single["sens"]["meta"].pop(key)
    # both estimators ran: Gauss-Newton (exact) for fc, restricted HVPs for the convs behind tanh
    assert single["sens"]["meta"]["estimators"] == {"restricted": 2, "ggn-exact": 1}
    _close(single, both)
