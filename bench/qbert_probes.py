"""Probes of the Q-BERT mixed plan's accuracy gap: each changes one thing on the plan tabled in
``bench/results/qbert_<task>.json`` (its per-layer bits; the README's figures were taken on the per-layer plans of
commit 57969a8, before the tables planned the word table in row tiers) and prints the test accuracy (fake quant,
as bench/qbert.py scores it).

* ``linear-clip ls|wls``: every per-channel Linear's weight scale clipped for least squared error, plain (``ls``)
  or each input column weighted by its mean squared FP32 input on the calibration batches (``wls``; a diagonal
  approximation of the layer's output error), instead of max |w|; post-training.
* ``pin-word BITS``: the plan re-solved at the same size with the word table pinned at BITS; post-training.
* ``word-grid mid|tern``: the word table rounded beforehand, per row at its least-squares clip, on 4 levels
  ±0.5s, ±1.5s (``mid``, what 2 bits can hold) or on 3 levels 0, ±s (``tern``, hessq's symmetric 2 bits), then
  kept at 8 bits in the plan; post-training.
* ``word-rows BITS N [N ...]``: the word table's rows of the N most frequent training tokens rounded beforehand at
  BITS, the other rows at 2 bits (each row at its least-squares clip), then kept at 8 bits in the plan; also the
  plan with the whole table at 8 bits (N = all); post-training, not at equal size: how much of the gap the
  frequent rows hold.
* ``row-tiers K [K ...]``: the plan re-solved at the same size with the word table in K row tiers by lookups on
  the training split (``plan_bits(row_usage=...)``); post-training.
* ``row-traces K [SECONDS]``: each of the K row tiers' Hessian trace measured on its own block
  (``hessq.hessian_row_traces`` on the sensitivity batches, rtol 0.1, at most SECONDS, default 900) against the
  table's trace shared by lookups; then the plan re-solved with the measured traces; post-training. Writes
  ``qbert_row_traces_<task>.json`` (bench/qbert.py ``--row-traces``).
* ``qat-lr LR STEPS [SEED [reversed]]``: QAT with AdamW at LR for STEPS steps (bench/qbert.py's default 2e-5) of
  the plan bench/qbert.py tables now: the word table in 4 row tiers by training lookups (``reversed``: its
  reversed-order plan).

    .venv/bin/python bench/qbert_probes.py bbc linear-clip wls
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from plan import reverse_sensitivity  # noqa: E402
from qbert import MIXED_BITS, Task, data, uniform  # noqa: E402

import hessq  # noqa: E402
from hessq.plan import evaluate_plan, lookup_counts, plan_bits, tiers_of  # noqa: E402
from hessq.quantizer import WeightQuantizer, least_squares_clip, qrange, symmetric_scale  # noqa: E402
from hessq.sensitivity import Sensitivity  # noqa: E402

WORD = "bert.embeddings.word_embeddings"


def tabled_plan(task: str) -> dict[str, int]:
    rows = json.loads((RESULTS / f"qbert_{task}.json").read_text())["results"][0]["rows"]
    return dict(next(r for r in rows if "bits" in r)["bits"])


def input_moments(t: Task) -> dict[str, torch.Tensor]:
    """Mean squared input of every column of every Linear of the FP32 model on the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(mod, inp, out):
            x = inp[0].detach().flatten(0, -2).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in t.model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        t.model.eval()
        for b in t.calib:
            t.model(**{k: v for k, v in b.items() if k != "labels"})
    for h in hooks:
        h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def weighted_clip(w: torch.Tensor, bits: int, column_weight: torch.Tensor) -> torch.Tensor:
    """Each row's clip ratio (of max |w|, 1 to 0.06 by 0.02) of least Σ_j m_j (w_ij − q_ij)²."""
    qmin, qmax = qrange(bits, True)
    absmax = w.abs().amax(1)
    best = ratio = None
    for r in (1 - k / 50 for k in range(48)):
        s = symmetric_scale(absmax * r, bits).unsqueeze(1)
        err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w).pow(2) * column_weight).sum(1)
        if best is None:
            best, ratio = err, torch.ones_like(err)
        else:
            better = err < best
            best, ratio = torch.where(better, err, best), torch.where(better, torch.full_like(err, r), ratio)
    return ratio


def linear_clip(t: Task, plan: dict[str, int], mode: str) -> float:
    moments = input_moments(t) if mode == "wls" else {}
    q = t.quantize(plan)
    for name, m in q.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if type(wq) is WeightQuantizer and wq.granularity == "channel" and m.weight.dim() == 2:
            w = m.weight.detach().float()
            ratio = weighted_clip(w, wq.bits, moments[name] if mode == "wls" else torch.ones(w.shape[1]))
            wq.scale = (lambda weight, s=symmetric_scale(w.abs().amax(1) * ratio, wq.bits): s)  # fixed: PTQ only
    return t.accuracy(q.eval())


def pin_word(t: Task, bits: int) -> float:
    sens = Sensitivity.load(RESULTS / f"qbert_sensitivity_{t.name}.json")
    limit = evaluate_plan(t.model, uniform(t.layers, 3)).size_bytes
    plan = plan_bits(t.model, sens, weight_bits=MIXED_BITS, size_limit=limit, pin_first_last=None, pins={WORD: bits})
    print(f"plan: {dict(Counter(dict(plan).values()))}, {plan.size_bytes / 1e6:.2f} MB", flush=True)
    return t.accuracy(t.quantize(dict(plan)).eval())


def word_grid(t: Task, plan: dict[str, int], mode: str) -> float:
    w = t.model.get_submodule(WORD).weight.data
    absmax = w.abs().amax(1, keepdim=True)
    best = best_q = None
    for r in (1 - k / 100 for k in range(95)):
        if mode == "tern":
            s = absmax * r
            q = torch.clamp(torch.round(w / s), -1, 1) * s
        else:  # the largest level 1.5 s at r·max|w|
            s = absmax * r / 1.5
            q = (torch.clamp(torch.floor(w / s), -2, 1) + 0.5) * s
        err = (q - w).pow(2).sum(1)
        if best is None:
            best, best_q = err, q.clone()
        else:
            better = err < best
            best, best_q[better] = torch.where(better, err, best), q[better]
    print(f"word table relative squared error {float(best.sum() / w.pow(2).sum()):.4f}", flush=True)
    w.copy_(best_q)
    return t.accuracy(t.quantize({**plan, WORD: 8}).eval())


def token_counts(t: Task) -> torch.Tensor:
    """How often each id occurs (unpadded) in the training split."""
    counts = torch.zeros(t.model.get_submodule(WORD).num_embeddings, dtype=torch.long)
    for b in data(t.name, "train", batch_size=64):
        counts += torch.bincount(b["input_ids"][b["attention_mask"].bool()], minlength=counts.numel())
    return counts


def rounded_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    absmax = w.abs().amax(1)
    s = symmetric_scale(absmax * least_squares_clip(w, absmax, bits), bits).unsqueeze(1)
    qmin, qmax = qrange(bits, True)
    return torch.clamp(torch.round(w / s), qmin, qmax) * s


def word_rows(t: Task, plan: dict[str, int], bits: int, ns: list[str]) -> list[str]:
    table = t.model.get_submodule(WORD).weight
    original = table.data.clone()
    order = token_counts(t).argsort(descending=True)
    low, high = rounded_rows(original, 2), rounded_rows(original, bits)
    out = [f"whole table at 8 bits: {100 * t.accuracy(t.quantize({**plan, WORD: 8}).eval()):.2f}%"]
    for n in map(int, ns):
        table.data.copy_(low)
        table.data[order[:n]] = high[order[:n]]
        out.append(f"top {n} rows at {bits} bits (+{n * table.shape[1] * (bits - 2) / 8e6:.3f} MB): "
                   f"{100 * t.accuracy(t.quantize({**plan, WORD: 8}).eval()):.2f}%")
        print(out[-1], flush=True)
    table.data.copy_(original)
    return out


def tiered_plan(t: Task, tiers: int, reversed_order: bool = False):
    """The plan at W3 per channel's size with the word table in ``tiers`` row tiers, as bench/qbert.py plans it
    (with the sensitivity order reversed, as its reversed row)."""
    sens = Sensitivity.load(RESULTS / f"qbert_sensitivity_{t.name}.json")
    sens = reverse_sensitivity(sens) if reversed_order else sens
    limit = evaluate_plan(t.model, uniform(t.layers, 3)).size_bytes
    usage = {WORD: lookup_counts(t.model, t.train)[WORD]}
    return plan_bits(t.model, sens, weight_bits=MIXED_BITS, size_limit=limit, pin_first_last=None,
                     row_usage=usage, row_tiers=tiers)


def row_traces(t: Task, k: int, seconds: float) -> list[str]:
    usage = lookup_counts(t.model, t.train)[WORD]
    tiers = tiers_of(usage, k)
    sens = Sensitivity.load(RESULTS / f"qbert_sensitivity_{t.name}.json")
    t0 = time.time()
    measured = hessq.hessian_row_traces(t.model, t.sens_batches, {WORD: tiers}, rtol=0.1, max_samples=200,
                                        time_budget=seconds, progress=True)[WORD]
    took = time.time() - t0
    total = float(usage.sum())
    out = [f"table Tr(H) {sens[WORD].trace:.4g} ± {sens[WORD].trace_stderr:.2g}; measured tiers sum to "
           f"{sum(m.trace for m in measured):.4g} ({took:.0f} s)"]
    for i, (rows, m) in enumerate(zip(tiers, measured)):
        share = float(usage[rows].sum()) / total
        out.append(f"tier {i}: {rows.numel()} rows, {100 * share:.1f}% of lookups: shared {sens[WORD].trace * share:.4g}, "
                   f"measured {m.trace:.4g} ± {m.stderr:.2g} ({m.samples} draws)")
    (RESULTS / f"qbert_row_traces_{t.name}.json").write_text(json.dumps({
        "table": WORD, "tiers": k, "rtol": 0.1, "seconds": took, "table_trace": sens[WORD].trace,
        "traces": [{"rows": m.rows.tolist(), "trace": m.trace, "stderr": m.stderr, "samples": m.samples,
                    "lookups": int(usage[m.rows].sum())} for m in measured]}))
    limit = evaluate_plan(t.model, uniform(t.layers, 3)).size_bytes
    for name, traces in (("shared by lookups", None), ("measured", {WORD: measured})):
        plan = plan_bits(t.model, sens, weight_bits=MIXED_BITS, size_limit=limit, pin_first_last=None,
                         row_usage={WORD: usage}, row_tiers=k, row_traces=traces)
        out.append(f"{name}: tiers {plan.layers[WORD]['row_tiers']}, layers {dict(Counter(dict(plan).values()))}, "
                   f"{plan.size_bytes / 1e6:.3f} MB: {100 * t.accuracy(t.quantize(plan).eval()):.2f}%")
        print(out[-1], flush=True)
    return out


def row_tiers(t: Task, tiers: list[str]) -> list[str]:
    out = []
    for k in map(int, tiers):
        plan = tiered_plan(t, k)
        out.append(f"{k} tiers {plan.layers[WORD]['row_tiers']}, layers {dict(Counter(dict(plan).values()))}, "
                   f"{plan.size_bytes / 1e6:.3f} MB: {100 * t.accuracy(t.quantize(plan).eval()):.2f}%")
        print(out[-1], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("bbc", "tweets"))
    ap.add_argument("probe", choices=("linear-clip", "pin-word", "word-grid", "word-rows", "row-tiers", "row-traces",
                                          "qat-lr"))
    ap.add_argument("values", nargs="+")
    a = ap.parse_args()
    qat = a.probe == "qat-lr"
    args = argparse.Namespace(calibration_batches=8, sensitivity_batches=2, test_limit=None,
                              qat_steps=int(a.values[1]) if qat else 0, qat_lr=float(a.values[0]) if qat else 0.0,
                              qat_ranges="frozen", qat_hidden_weight=0.0)
    t = Task(a.task, args)
    t0 = time.time()
    if a.probe == "linear-clip":
        acc = linear_clip(t, tabled_plan(a.task), a.values[0])
    elif a.probe == "pin-word":
        acc = pin_word(t, int(a.values[0]))
    elif a.probe == "word-rows":
        print("\n".join(word_rows(t, tabled_plan(a.task), int(a.values[0]), a.values[1:])))
        return 0
    elif a.probe == "row-tiers":
        print("\n".join(row_tiers(t, a.values)))
        return 0
    elif a.probe == "row-traces":
        print("\n".join(row_traces(t, int(a.values[0]), float(a.values[1]) if len(a.values) > 1 else 900.0)))
        return 0
    elif a.probe == "word-grid":
        acc = word_grid(t, tabled_plan(a.task), a.values[0])
    else:
        reversed_order = a.values[3:4] == ["reversed"]
        acc = t.accuracy(t.qat(t.quantize(tiered_plan(t, 4, reversed_order)),
                               seed=int(a.values[2]) if len(a.values) > 2 else 0))
    print(f"{a.task} {a.probe} {' '.join(a.values)}: {100 * acc:.2f}% ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
