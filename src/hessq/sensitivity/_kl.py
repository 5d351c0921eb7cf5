"""ZeroQ's sensitivity: Ω_i(b) = mean over inputs of KL(M(x) ‖ M_{i,b}(x)), only layer i quantized to b bits.

The model is traced and its BatchNorms folded once (as :func:`hessq.quantize` does, so the
weights quantized here are the ones the quantized model will hold); then, for each layer and
bit width, that layer's weight is swapped in place for its fake-quantized value, the batches
are run, and the weight is restored. No re-tracing per layer. As in ZeroQ, only the weights
are quantized (activations stay in floating point), so the figure isolates the weight bit
choice that the planner makes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hessq._checks import check_inputs, check_model
from hessq._utils import batch_inputs, pad_token_id_of
from hessq._errors import ConfigError, ConfigTypeError, InputDataError
from hessq.graph import capture, fold_batchnorm, quantizable_layers, trace
from hessq.ops import family_of_module
from hessq.quantizer import WeightQuantizer, check_weight_bits
from hessq.quantizer._functional import Granularity
from hessq.sensitivity._engine import first_forward
from hessq.sensitivity._result import LayerSensitivity, Sensitivity, model_signature

METHOD = "zeroq-kl"


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over samples of KL(p_ref ‖ softmax(logits)) along the last dimension."""
    logq = F.log_softmax(logits.float().flatten(1) if logits.dim() > 2 else logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logq)).sum()


@torch.no_grad()
def kl_sensitivity(
    model: nn.Module,
    batches: Iterable,
    *,
    weight_bits: Iterable[int] = (2, 4, 6, 8),
    weight_granularity: Granularity = "channel",
    num_groups: int = 1,
    leaf_modules: Iterable[str] = (),
    progress: bool = True,
) -> Sensitivity:
    """ZeroQ KL sensitivity of every quantizable layer at every bit width in ``weight_bits``.

    ``batches``: inputs (tensors or (inputs, targets) tuples; targets are ignored), typically
    distilled data (``hessq.distill_data(...)``) — no labels are needed. The model's outputs
    are taken as logits over the last dimension. Weights are quantized per output channel by
    default (``weight_granularity``), after BatchNorm folding.

    Returns a :class:`Sensitivity` whose records hold ``extra["kl"] = {"<bits>": mean KL}``
    (nats per input); ``trace`` and ``trace_stderr`` are NaN (no Hessian was computed) and
    ``meta["method"] == "zeroq-kl"``. :func:`kl_omega` turns it into the planner's Ω table
    (``hessq.plan_bits(model, sens)`` uses it automatically).

    ``batches`` is read once and kept in memory (a generator or one-shot iterator is fine). The
    bit widths, the model and every batch's inputs (a tensor in the model's float dtype, no NaN)
    are checked before any work.
    """
    if isinstance(weight_bits, (str, bytes)) or not isinstance(weight_bits, Iterable):
        raise ConfigTypeError(f"weight_bits must be a list of bit widths such as (2, 4, 6, 8), got {weight_bits!r}")
    bits = sorted({check_weight_bits(int(b) if isinstance(b, np.integer) else b) for b in weight_bits})
    if not bits:
        raise ConfigError("weight_bits is empty; give at least one bit width")
    model = capture(check_model(model))
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise InputDataError(f"batches must be an iterable of input batches (a list, a DataLoader, "
                             f"hessq.distill_data(...)), got {type(batches).__name__}")
    inputs = [batch_inputs(b, pad_token_id_of(model)) for b in batches]
    if not inputs:
        raise InputDataError("kl_sensitivity needs at least one batch of inputs (e.g. hessq.distill_data(model, 32, input_shape))")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise InputDataError(f"batch {i}'s inputs must be a tensor, got {type(x).__name__}")
        check_inputs(x, model, where=f"batch {i}'s inputs")
    layers = quantizable_layers(model)
    names = list(layers)
    start = time.perf_counter()
    gm = trace(model, leaf_modules)
    gm.eval()
    fold_batchnorm(gm)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    inputs = [x.to(device) for x in inputs]
    num_samples = sum(len(x) for x in inputs)
    refs = []
    for i, x in enumerate(inputs):
        out = first_forward(gm, x, f"batch {i}")
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"kl_sensitivity needs a model that returns one tensor of logits; {type(model).__name__} returns {type(out).__name__}")
        refs.append(F.log_softmax(out.float().flatten(1) if out.dim() > 2 else out.float(), dim=-1))
    modules = dict(gm.named_modules())
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    records: dict[str, LayerSensitivity] = {}
    bar = tqdm(total=len(names) * len(bits), desc="KL sensitivity", disable=not progress, leave=False)
    for name in names:
        layer = modules.get(name)
        kl: dict[str, float] = {}
        if layer is None or name not in called:
            # Never called by the forward pass: quantizing it cannot change the outputs.
            kl = {str(b): 0.0 for b in bits}
            bar.update(len(bits))
        else:
            original = layer.weight.data
            family = family_of_module(layer)  # the family's own quantizer (an embedding table's rows are clipped)

            def quantizer(b: int) -> WeightQuantizer:
                return family.weight_quantizer(b, weight_granularity, num_groups)

            try:
                for b in bits:
                    layer.weight.data = quantizer(b)(original)
                    total = sum(float(_kl(ref, gm(x))) for ref, x in zip(refs, inputs))
                    kl[str(b)] = max(total / num_samples, 0.0)
                    bar.update(1)
            finally:
                layer.weight.data = original
        records[name] = LayerSensitivity(
            trace=float("nan"),
            trace_stderr=float("nan"),
            top_eigenvalue=None,
            num_params=int(layers[name].weight.numel()),
            extra={"kl": kl},
        )
    bar.close()
    meta = {
        "method": METHOD,
        "weight_bits": bits,
        "weight_granularity": weight_granularity,
        "num_samples": num_samples,
        "seconds": time.perf_counter() - start,
    }
    return Sensitivity(records, model_signature(model), meta)


def kl_omega(sens: Mapping[str, LayerSensitivity]) -> dict[str, dict[int, float]]:
    """Layer name -> {bits: KL} from a :func:`kl_sensitivity` result: the planner's Ω in ZeroQ's form."""
    out: dict[str, dict[int, float]] = {}
    for name, rec in sens.items():
        table = rec.extra.get("kl") if isinstance(rec.extra, Mapping) else None
        if not table:
            raise ConfigError(
                f"layer {name!r} has no KL sensitivity (extra['kl']); compute it with hessq.kl_sensitivity(model, batches)"
            )
        out[name] = {int(b): float(v) for b, v in table.items()}
    return out


def is_kl_sensitivity(sens: Any) -> bool:
    """Whether ``sens`` came from :func:`kl_sensitivity` (its Ω is the KL table, not trace × error)."""
    return getattr(sens, "meta", {}).get("method") == METHOD
