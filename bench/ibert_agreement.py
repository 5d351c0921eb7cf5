"""Where the integer MiniLM and its float fake-quant twin part: op by op, the fraction of codes that agree.

The integer model (``hessq.to_integer``, which the quantized model's eval mode equals bit for bit) and the
fake-quantized model's float forward compute the same quantized network. Each nonlinear op's integer form is within
a code of its float function (LayerNorm's integer square root and division, softmax's 2^-16 exponential table), so
**alone**, fed the integer model's own input codes, the fake-quant op gives the same codes almost everywhere. Run
**chained**, end to end on the same texts, the two drift apart layer by layer: one code that differs anywhere in a
token's 384-wide vector moves every query, key and value of that token, and one step of the 8-bit attention scores
is a factor of about 2 in exp(). ``--float64`` runs the fake-quant twin in float64 on the same grids, to show
whether float32 rounding is the cause.

* **chained**: every compared value's codes in the two models, run end to end;
* **alone**: each LayerNorm, GELU, tanh and softmax of the fake-quant model fed the integer model's input codes.

Counts cover real tokens only (padding query rows are excluded; they never reach the logits).

    .venv/bin/python bench/ibert_agreement.py [--task tweets] [--texts 64]

Writes ibert_agreement_TASK.json and .md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import hessq
from hessq.data._metrics import split_batch
from hessq.graph import quantizable_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, git_commit, log, machine, write_results  # noqa: E402

LENGTH = {"tweets": 64, "bbc": 256}
#: what each compared value is, by its name
KINDS = ((r"quant_layer_norm_\d+$", "LayerNorm output"), (r"quant_softmax_\d+$", "softmax output"),
         (r"quant_gelu_\d+$", "GELU output (table)"), (r"quant_tanh_\d+$", "pooler tanh (table)"),
         (r"dense_input_quantizer$", "attention context (attention·V, requantized)"))


class _Record(fx.Interpreter):
    """Runs the fake-quant graph, keeping every node's tensor output by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _real_rows(d: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``d`` restricted to real tokens: (B, T, ...) by its token axis, (B, H, T, ...) by its query axis."""
    B, T = real.shape
    if d.dim() >= 2 and tuple(d.shape[:2]) == (B, T):
        return d[real]
    if d.dim() == 4 and d.shape[0] == B and d.shape[2] == T:
        return d.permute(0, 2, 1, 3)[real]
    return d.reshape(-1)


def _stats(codes_fake: torch.Tensor, codes_int: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    d = _real_rows((codes_fake - codes_int).abs(), real)
    return {"equal": float((d < 0.5).double().mean()), "max_diff": float(d.max()), "mean_diff": float(d.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=tuple(LENGTH), default="tweets")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--float64", action="store_true", help="run the fake-quant twin in float64 (the same grids)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    length = LENGTH[args.task]
    load = hessq.data.tweets if args.task == "tweets" else hessq.data.bbc_news
    model = hessq.models.minilm_finetuned(args.task)
    batch = 32 if args.task == "tweets" else 16
    calib = [b for _, b in zip(range(args.calibration_batches), load("train", batch_size=batch, shuffle=False))]
    q = hessq.quantize(model, {n: 8 for n in quantizable_layers(model)}, calib, pin_first_last=None)
    q.eval()
    x, _ = split_batch(next(iter(load("test", batch_size=args.texts))))
    x = torch.nn.functional.pad(x, (0, length - x.shape[1]), value=q.pad_token_id)
    real = x != q.pad_token_id
    integer = hessq.to_integer(q, input_shape=(length,))
    log("integer program")
    env = integer.run(x, keep=True)
    log("fake-quant graph")
    gm = q.graph_module
    if args.float64:
        gm = copy.deepcopy(gm).double()  # the same scales (float32 values are float64 values), float64 arithmetic
    rec = _Record(gm)
    with torch.no_grad():
        logits_fake = rec.run(x).float()
    ops = {op.output: op for op in integer.ops}
    modules = dict(gm.named_modules())
    dtype = torch.float64 if args.float64 else torch.float32
    rows: list[dict[str, Any]] = []
    for op in integer.ops:
        kind = next((k for pattern, k in KINDS if re.search(pattern, op.output)), None)
        if kind is None:
            continue
        if op.output not in rec.values or op.scale is None:
            continue
        scale = op.scale.double()
        chained = _stats(rec.values[op.output].double() / scale, env[op.output].double(), real)
        row = {"value": op.output, "kind": kind, **{f"chained_{k}": v for k, v in chained.items()}}
        # alone: the fake-quant module on the integer model's input codes
        node = next((n for n in gm.graph.nodes if n.name == op.output and n.op == "call_module"), None)
        if node is not None and isinstance(node.args[0], fx.Node) and node.args[0].name in ops and len(node.args) <= 2:
            src = ops[node.args[0].name]
            inputs = [env[src.output].double() * src.scale.double()]
            if len(node.args) == 2:
                keep = node.args[1]
                inputs.append(rec.values[keep.name] if isinstance(keep, fx.Node) else keep)
            with torch.no_grad():
                alone = modules[node.target](inputs[0].to(dtype), *inputs[1:])
            row.update({f"alone_{k}": v for k, v in _stats(alone.double() / scale, env[op.output].double(), real).items()})
        rows.append(row)
    logits_int = env[integer.output_name].float()
    top1 = float((logits_fake.argmax(-1) == logits_int.argmax(-1)).double().mean())
    res = {"command": command_line(), "machine": machine(), "commit": git_commit(), "task": args.task,
           "float64": bool(args.float64),
           "texts": int(x.shape[0]), "top1_agreement": top1,
           "max_logit_diff": float((logits_fake - logits_int).abs().max()), "rows": rows}
    lines = [f"# Integer MiniLM against its fake-quant twin, op by op ({args.task}, W8A8)", "",
             f"`{res['command']}` on {res['machine']} (commit {res['commit']}); {res['texts']} test texts at "
             f"T={length}, real tokens only. Top-1 agreement of the logits: {100 * top1:.1f}%, max |Δlogit| "
             f"{res['max_logit_diff']:.3f}." + (" The fake-quant twin runs in float64." if args.float64 else ""), "",
             "*chained*: the two models run end to end; *alone*: the fake-quant op fed the integer model's input codes.",
             "", "| value | op | chained: codes equal | chained: max Δcode | alone: codes equal | alone: max Δcode |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        alone = (f"{100 * r['alone_equal']:.2f}% | {r['alone_max_diff']:.0f}" if "alone_equal" in r else "- | -")
        lines.append(f"| {r['value']} | {r['kind']} | {100 * r['chained_equal']:.2f}% | {r['chained_max_diff']:.0f} | "
                     f"{alone} |")
    write_results(args.out / f"ibert_agreement_{args.task}{'_float64' if args.float64 else ''}.json", res, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
