"""``hessq analyze``: per-layer Hessian sensitivity of a model -> sensitivity.json.

On Fashion-MNIST batches by default; with ``--data none`` (or a ``hessq distill`` file) on ZeroQ
distilled inputs labelled by the FP32 model's own top-1 predictions, so no data is needed.
"""

from __future__ import annotations

import argparse
import time

import torch

from hessq._checks import check_int, check_number
from hessq._errors import ConfigError
from hessq._io import check_writable
from hessq.cli._common import (
    BUNDLED_INPUT_SHAPES,
    add_config_flag,
    add_data_argument,
    add_model_arguments,
    check_data_options,
    load_distilled,
    load_model,
)
from hessq.pipeline import SensitivityConfig
from hessq.sensitivity import TRACE_METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="Hessian traces and eigenvalues of every quantizable layer (writes sensitivity.json)",
        description=(
            "Estimate each Conv2d/Linear layer's Hessian trace (Hutchinson, one HVP per sample serves all "
            "layers) and top eigenvalue (power iteration) on Fashion-MNIST training batches, or data-free on "
            "ZeroQ distilled inputs whose targets are the FP32 model's own predictions (--data none). Under "
            "torchrun the batches are split across processes (gloo on CPU, nccl on GPU); give distilled data "
            "as a file (`hessq distill`) there, so every process reads the same inputs."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--random-init", action="store_true", help="use the bundled model without its trained weights (for trying things out)")
    add_data_argument(p, purpose="inputs of the Hessian")
    p.add_argument("--batches", type=int, default=None,
                   help="number of data batches the Hessian averages over (default: 1 of Fashion-MNIST, all of distilled data)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per batch (default 256; distilled data: at most all of it)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split (default train)")
    add_config_flag(p, "--rtol", SensitivityConfig, "rtol", type=float,
                    help="stop when every layer's trace stderr <= rtol*|trace|")
    add_config_flag(p, "--max-samples", SensitivityConfig, "max_samples", type=int, help="at most this many Hutchinson samples")
    add_config_flag(p, "--method", SensitivityConfig, "estimator", choices=TRACE_METHODS,
                    help="how each trace is computed: auto picks exact Gauss-Newton traces where the model allows, "
                         "per-layer Hutchinson elsewhere")
    add_config_flag(p, "--time-budget", SensitivityConfig, "time_budget", type=float,
                    help="stop sampling after this many seconds (a warning names the layers short of --rtol)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="at least this many samples (default 10, or --max-samples when smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors (default 0)")
    p.add_argument("--eigenvalues", action=argparse.BooleanOptionalAction, default=True,
                   help="also each layer's top eigenvalue by power iteration (default on)")
    p.add_argument("--top-k", type=int, default=1, help="eigenvalues per layer (default 1)")
    p.add_argument("--eig-max-iter", type=int, default=100, help="power iterations per eigenvalue at most (default 100)")
    p.add_argument("--eig-tol", type=float, default=1e-4, help="relative change that ends power iteration (default 1e-4)")
    p.add_argument("--qbert", action="store_true", help="also Q-BERT's |mean λ| + std λ over the batches")
    p.add_argument("--activations", action="store_true", help="also HAWQ-V2's trace w.r.t. each layer's input activation")
    p.add_argument("--layers", help="comma-separated layer names to analyse (default all)")
    p.add_argument("--device", default=None, help="torch device (default cpu; under torchrun with CUDA, cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", default="sensitivity.json", help="where to write the result (default sensitivity.json)")
    p.set_defaults(func=run)


def _batches(args: argparse.Namespace, model: torch.nn.Module) -> tuple[list, dict]:
    """(inputs, targets) batches for the Hessian, and what to record about them in the sensitivity's meta."""
    distilled = load_distilled(args, model, progress=not args.no_progress)
    if distilled is None:
        shape = BUNDLED_INPUT_SHAPES.get(args.model)
        if shape is not None and shape != (1, 28, 28):
            raise ConfigError(f"--model {args.model} takes inputs of shape {shape}, not Fashion-MNIST's (1, 28, 28): "
                             "use --data none (distilled data) or a file from `hessq distill`")
        from hessq.data import fashion_mnist

        num = args.batches or 1
        data = fashion_mnist(args.split, batch_size=args.batch_size, shuffle=False, limit=num * args.batch_size)
        _check_batches(num, len(data), f"fashion-mnist/{args.split}", args.batch_size)
        return data.take(num), {"dataset": f"fashion-mnist/{args.split}", "data_free": False, "targets": "labels",
                                "batch_size": args.batch_size}
    # No labels: the FP32 model's own top-1 predictions are the targets, so the loss (and its Hessian)
    # measures how far a perturbation moves the model away from what it computes now.
    size = min(args.batch_size, distilled.num_samples)
    batches = distilled.labelled(model, batch_size=size)
    if args.batches is not None:
        _check_batches(args.batches, len(batches), f"the distilled data ({distilled.num_samples} inputs)", size)
        batches = batches[: args.batches]
    summary = {k: v for k, v in distilled.summary().items() if k != "batch_losses"}
    return batches, {"dataset": "distilled", "data_free": True, "targets": "fp32-argmax", "batch_size": size,
                     "distilled": summary}


def _check_batches(asked: int, available: int, source: str, batch_size: int) -> None:
    """``--batches`` beyond what the data holds is refused, never silently cut."""
    if asked > available:
        raise ConfigError(f"--batches {asked}: {source} has only {available} batches of {batch_size}; "
                          f"give --batches {available} or fewer (or a smaller --batch-size)")


def _check_options(args: argparse.Namespace) -> None:
    """Every option and path, before any model is loaded or analysed."""
    check_int(args.batches, "--batches", low=1, allow_none=True)
    check_int(args.batch_size, "--batch-size", low=1, allow_none=True)
    check_number(args.rtol, "--rtol", low=0, allow_none=True)
    check_number(args.time_budget, "--time-budget", low=0, strict=True, allow_none=True)
    check_int(args.max_samples, "--max-samples", low=1, allow_none=True)
    check_int(args.min_samples, "--min-samples", low=1, allow_none=True)
    if args.min_samples is not None and args.min_samples > args.max_samples:
        raise ConfigError(f"--min-samples {args.min_samples} is more than --max-samples {args.max_samples}; "
                          "give at most as many as --max-samples")
    check_int(args.top_k, "--top-k", low=1, allow_none=True)
    check_int(args.eig_max_iter, "--eig-max-iter", low=1, allow_none=True)
    check_number(args.eig_tol, "--eig-tol", low=0, strict=True, allow_none=True)
    check_data_options(args)
    check_writable(args.output, "-o/--output")


def run(args: argparse.Namespace) -> int:
    import os

    from hessq.sensitivity import hessian_sensitivity, init_from_env, rank_and_world

    _check_options(args)
    device = torch.device(args.device) if args.device else (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}") if "LOCAL_RANK" in os.environ and torch.cuda.is_available() else torch.device("cpu")
    )
    started = init_from_env(device)
    try:
        torch.manual_seed(args.seed)  # the same random init on every rank and every run (--random-init)
        model = load_model(args.model, args.checkpoint, pretrained=not args.random_init).to(device)
        batches, data_meta = _batches(args, model)
        t0 = time.perf_counter()
        sens = hessian_sensitivity(
            model, batches, None,
            layers=args.layers.split(",") if args.layers else None,
            rtol=args.rtol, max_samples=args.max_samples, min_samples=args.min_samples, seed=args.seed,
            method=args.method, time_budget=args.time_budget,
            eigenvalues=args.eigenvalues, top_k=args.top_k, eig_max_iter=args.eig_max_iter, eig_tol=args.eig_tol,
            qbert=args.qbert, activations=args.activations, progress=not args.no_progress,
        )
        sens.meta.update(model=args.model, **data_meta, seconds=round(time.perf_counter() - t0, 3))
        rank, _ = rank_and_world()
        if rank == 0:
            sens.save(args.output)
            print(f"{'layer':<24} {'params':>7} {'trace':>12} {'stderr':>10} {'Tr/n':>10} {'λ_max':>10}")
            for name, r in sens.items():
                lam = f"{r.top_eigenvalue:10.4g}" if r.top_eigenvalue is not None else f"{'-':>10}"
                print(f"{name:<24} {r.num_params:>7} {r.trace:>12.5g} {r.trace_stderr:>10.3g} {r.mean_trace:>10.3g} {lam}")
            m = sens.meta
            how = ", ".join(f"{count} {kind}" for kind, count in m.get("estimators", {}).items()) or f"{m['samples']} samples"
            print(f"traces: {how} ({'converged' if m['converged'] else 'not converged'} at rtol {m['rtol']}), "
                  f"{m['num_data']} {'distilled inputs (FP32 predictions as targets)' if m['data_free'] else 'images'}, {m['seconds']} s -> {args.output}")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
