"""EfficientNet-Lite0 W8A8 calibrated on distilled data kept in the valid pixel range (input_range=(-127/128, 1)),
60 Adam steps, 32 images; agreement with FP32 on the same 200 held-out crops as bench/zeroq.py (seed 1000).
Writes bench/results/zeroq_clamped.json. Run: OMP_NUM_THREADS=1 .venv/bin/python bench/zeroq_clamped.py"""

import sys
from pathlib import Path

import torch

import hessq
from hessq.data import photo_crops
from hessq.models import efficientnet_lite0, preprocess_lite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, agreement, fake_quant, log, predictions, write_results  # noqa: E402

torch.set_num_threads(1)
m = efficientnet_lite0(pretrained=True)
eval_x = preprocess_lite(photo_crops(200, seed=1000))
ref = predictions(m, eval_x)
d = hessq.distill_data(m, 32, (3, 224, 224), steps=60, batch_size=32, progress=False, input_range=(-127 / 128, 1.0))
log(f"clamped distill {d.seconds} {d.initial_loss} {d.loss}")
a = agreement(fake_quant(hessq.quantize(m, (8, 8), [d.inputs])), eval_x, ref)
log(f"W8A8 clamped-distilled agreement {a}")
write_results(RESULTS / "zeroq_clamped.json", {"steps": 60, "images": 32, "seconds": d.seconds, "initial_loss": d.initial_loss,
                                              "loss": d.loss, "w8a8_agreement": a, "eval_crops": 200}, indent=None)
