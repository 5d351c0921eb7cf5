"""torchvision's CNN zoo (and its VisionTransformer at a small size), integer-only end to end (issue 14).

Each model: random init (seeded), BatchNorm statistics warmed by 20 train-mode passes, 3×64×64 inputs;
``quantize(model, 8, calib)`` with no float fallback; ``to_integer`` bit for bit the quantized model's eval mode;
the exact ONNX export bit for bit in ONNX Runtime; the fast export run by ONNX Runtime (its agreement with the
integer model is not a guarantee: ONNX Runtime requantizes with float32 multipliers and rounds half to even, so a
code can move by a step and a lookup table after it can move further; bench/zoo.py states it per model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessq
from tests.zoo._torchvision import torchvision

ort = pytest.importorskip("onnxruntime")

SHAPE = (3, 64, 64)
FAST = ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_y_400mf", "mnasnet0_5",
        "mobilenet_v2", "squeezenet1_0", "googlenet", "resnet18", "vit"]
SLOW = ["densenet121", "convnext_tiny"]  # about 10 s or more each on one core


def warmed(name: str) -> torch.nn.Module:
    """The model at random init (seed 0), its BatchNorm statistics warmed by 20 train-mode passes."""
    tv = torchvision()
    torch.manual_seed(0)
    if name == "vit":
        # torchvision's VisionTransformer class at a small size (the code of vit_b_16); its head starts at zero
        # (all logits 0), so it is drawn at random here
        model = tv.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                            mlp_dim=128)
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = getattr(tv.models, name)(**kwargs)
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(2, *SHAPE, generator=g))
    return model.eval()


def end_to_end(name: str, tmp_path) -> None:
    # one thread: on a busy 2-core machine two threads wait on each other (the conftest restores the count)
    torch.set_num_threads(1)
    model = warmed(name)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, *SHAPE, generator=g),)]
    x = torch.randn(2, *SHAPE, generator=g)
    q = hessq.quantize(model, 8, calib)  # unsupported="error": no float fallback
    assert q.integer_eval and not q.float_ops
    imodel = hessq.to_integer(q)
    y = imodel(x)
    assert torch.equal(q(x), y)
    with torch.no_grad():
        assert (y - model(x)).abs().max() < model(x).abs().max()  # a sanity bound: integer inference tracks FP32
    for mode in ("exact", "fast"):
        path = tmp_path / f"{name}_{mode}.onnx"
        hessq.export_onnx(imodel, path, mode=mode)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x.numpy()})[0]
        if mode == "exact":
            assert np.array_equal(out, y.numpy())
        else:
            assert out.shape == tuple(y.shape) and np.isfinite(out).all()


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_integer_only_end_to_end(name, tmp_path):
    end_to_end(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_large_model_integer_only_end_to_end(name, tmp_path):
    end_to_end(name, tmp_path)
