"""EfficientNet-Lite0 W8A8 calibrated on distilled data kept in the valid pixel range (input_range=(-127/128, 1)),
60 Adam steps, 32 images; agreement with FP32 on the same 200 held-out crops as bench/zeroq.py (seed 1000).
Writes bench/results/zeroq_clamped.json. Run: OMP_NUM_THREADS=1 .venv/bin/python bench/zeroq_clamped.py"""
import torch, time, hessq, json
torch.set_num_threads(1)
from hessq.models import efficientnet_lite0, preprocess_lite
from hessq.data import photo_crops
m = efficientnet_lite0(pretrained=True)
eval_x = preprocess_lite(photo_crops(200, seed=1000))
with torch.no_grad(): ref = torch.cat([m(eval_x[i:i+32]).argmax(1) for i in range(0, 200, 32)])
d = hessq.distill_data(m, 32, (3,224,224), steps=60, batch_size=32, progress=False, input_range=(-127/128, 1.0))
print('clamped distill', d.seconds, d.initial_loss, d.loss, flush=True)
q = hessq.quantize(m, (8,8), [d.inputs]); q.integer_eval=False
with torch.no_grad(): p = torch.cat([q(eval_x[i:i+32]).argmax(1) for i in range(0, 200, 32)])
a = float((p==ref).float().mean()); print('W8A8 clamped-distilled agreement', a, flush=True)
json.dump({"steps": 60, "images": 32, "seconds": d.seconds, "initial_loss": d.initial_loss, "loss": d.loss, "w8a8_agreement": a, "eval_crops": 200}, open(__import__('pathlib').Path(__file__).resolve().parent / 'results' / 'zeroq_clamped.json', 'w'))
