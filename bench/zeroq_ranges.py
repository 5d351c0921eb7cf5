"""Where distilled calibration loses to photos on EfficientNet-Lite0 W8A8 (issue 6 diagnosis).

For each calibration set (32 photo crops, and each ``--distilled`` file written by
`hessq distill` or `bench/zeroq.py --save-distilled`): every activation quantizer's range
relative to the photo-calibrated one, and the top-1 agreement with FP32 on ``--eval-crops``
held-out crops with the classifier's input (the global average of the head's ReLU6) quantized
three ways: as calibrated (99.99th percentile, ``activation_bounds=False``), at the calibration
set's max, and at its provable bound [0, 6] (what `hessq.quantize` does by default since this
diagnosis). The pooled features are computed once per set, so the three scorings cost one pass.
``--photo-seeds`` and ``--noise-seeds`` add more draws of photo crops and N(0,1) noise, scored
on the same held-out crops.

    .venv/bin/hessq distill --model efficientnet_lite0 --label-weight 1 -o d_lw1.pt   # or on a GPU
    .venv/bin/python bench/zeroq_ranges.py --distilled lw1=d_lw1.pt   # writes bench/results/zeroq_ranges.{json,md}
    .venv/bin/python bench/zeroq_ranges.py --photo-seeds 2000 2001 2002 --noise-seeds 3 --distilled ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hessq  # noqa: E402
from hessq.distill import DistilledData  # noqa: E402
from hessq.graph import act_quantizers  # noqa: E402
from _common import RESULTS, fake_quant, log, predictions, write_results  # noqa: E402

POOLED = "fc.input_quantizer"  # quantizes the pooled features the classifier reads
RELU6_BOUND = 6.0


@torch.no_grad()
def score(model, calib: torch.Tensor, eval_x: torch.Tensor, ref: torch.Tensor) -> tuple[dict, dict]:
    """(scales of every activation quantizer, agreement per way of quantizing the pooled features)."""
    q = fake_quant(hessq.quantize(model, (8, 8), [calib], activation_bounds=False))
    quantizers = act_quantizers(q)
    pooled_q = quantizers[POOLED]
    seen: list[torch.Tensor] = []
    hook = pooled_q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        q(calib)
        calib_max = float(seen.pop().max())
        for i in range(0, len(eval_x), 32):
            q(eval_x[i : i + 32])
    finally:
        hook.remove()
    features = torch.cat(seen)
    qmax = float(pooled_q.qmax)
    calibrated = pooled_q.scale.clone()
    out = {}
    # The classifier's bias grid follows its input scale, so setting the quantizer's scale changes both.
    for name, scale in (("calibrated (percentile)", calibrated), ("calibration max", calib_max / qmax), ("bound [0, 6]", RELU6_BOUND / qmax)):
        pooled_q.scale.copy_(torch.as_tensor(scale))
        out[name] = float((q.fc(pooled_q(features)).argmax(1) == ref).float().mean())
    pooled_q.scale.copy_(calibrated)
    scales = {n: float(m.scale) for n, m in quantizers.items()}
    return scales, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distilled", action="append", default=[], metavar="NAME=FILE", help="distilled data to compare (repeatable)")
    p.add_argument("--photo-seeds", type=int, nargs="+", default=[2000], help="photo-crop draws to calibrate on (the first is the reference)")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[], help="N(0,1) noise draws to calibrate on")
    p.add_argument("--eval-crops", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hessq.data import photo_crops
    from hessq.models import efficientnet_lite0, preprocess_lite

    sets, sources = {}, {}
    for seed in args.photo_seeds:
        sets[f"photos {seed}"] = preprocess_lite(photo_crops(32, seed=seed))
        sources[f"photos {seed}"] = f"32 crops of scikit-image's photos (seed {seed})"
    for seed in args.noise_seeds:
        sets[f"noise {seed}"] = torch.randn((32, 3, 224, 224), generator=torch.Generator().manual_seed(seed))
        sources[f"noise {seed}"] = f"32 images of N(0,1) noise (seed {seed})"
    for spec in args.distilled:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--distilled wants NAME=FILE, got {spec!r}")
        data = DistilledData.load(path)
        sets[name] = data.inputs
        sources[name] = (f"{path}: {data.steps} steps, label weight {data.meta.get('label_weight', 0.0):g}, statistics loss "
                         f"{data.loss:.3g}" + (f", {data.meta['source']}" if "source" in data.meta else ""))
    model = efficientnet_lite0(pretrained=True)
    eval_x = preprocess_lite(photo_crops(args.eval_crops, seed=1000))
    ref = predictions(model, eval_x)
    res: dict = {"eval_crops": len(eval_x), "torch": torch.__version__, "sources": sources, "sets": {}}
    for name, x in sets.items():
        scales, agree = score(model, x, eval_x, ref)
        res["sets"][name] = {"scales": scales, "agreement": agree}
        log(f"{name} {({k: f'{100 * v:.2f}%' for k, v in agree.items()})}")
    write_results(RESULTS / "zeroq_ranges.json", res, markdown(res), indent=1)
    print(markdown(res))


def markdown(res: dict) -> str:
    names = list(res["sets"])
    ways = list(res["sets"][names[0]]["agreement"])
    lines = [f"# EfficientNet-Lite0 W8A8: where distilled calibration differs from photos (torch {res['torch']})", "",
             f"Top-1 agreement with FP32 on {res['eval_crops']} held-out crops, the pooled features before the classifier quantized three ways "
             "(the bound [0, 6] is what `hessq.quantize` does by default, `activation_bounds=True`):", "",
             "| calibration | " + " | ".join(ways) + " |", "|---|" + "---:|" * len(ways)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{100 * res['sets'][n]['agreement'][w]:.2f}" for w in ways) + " |")
    groups: dict[str, list[str]] = {}
    for n in names:  # "photos 2000", "photos 2001" -> "photos": one row of means per source
        head, _, tail = n.rpartition(" ")
        groups.setdefault(head if tail.isdigit() and head else n, []).append(n)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Means over the draws of each source:", "", "| source | draws | " + " | ".join(ways) + " |",
                  "|---|---:|" + "---:|" * len(ways)]
        for head, members in groups.items():
            means = [statistics.mean(100 * res["sets"][n]["agreement"][w] for n in members) for w in ways]
            lines.append(f"| {head} | {len(members)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    lines += ["", *(f"- {n}: {src}" for n, src in res.get("sources", {}).items())]
    photos = res["sets"][names[0]]["scales"]
    others = [n for n in names[1:] if not n.startswith("noise")]  # noise differs almost everywhere
    lines += ["", f"Activation ranges differing from those calibrated on {names[0]} by more than 5% (ratio of scales; the rest are "
              "equal, mostly ReLU6 outputs saturated at 6/255):", "", "| quantizer | " + " | ".join(others) + " |",
              "|---|" + "---:|" * len(others)]
    for q, s in photos.items():
        ratios = [res["sets"][n]["scales"][q] / s for n in others]
        if any(abs(r - 1) > 0.05 for r in ratios):
            lines.append(f"| {q} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
