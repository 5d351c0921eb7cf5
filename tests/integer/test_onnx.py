import numpy as np
import onnxruntime as ort
import pytest
import torch

import hessq

from .test_integer import CASES, _data, _quantized


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", list(CASES))
def test_exact_export_matches_the_integer_model_bit_for_bit(case, tmp_path):
    _, q, shape = _quantized(case)
    imodel = hessq.to_integer(q)
    hessq.export_onnx(imodel, tmp_path / "m.onnx")
    session = _session(tmp_path / "m.onnx")
    for x in _data(shape, n=2, batch=32, seed=11):
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.array_equal(got, imodel(x).numpy())


@pytest.mark.parametrize("case", ["resnet20-w8a8", "concat-w4a4"])
def test_fast_export_uses_fused_int8_kernels_and_agrees_on_top1(case, tmp_path):
    _, q, shape = _quantized(case)
    imodel = hessq.to_integer(q)
    hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast")
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "fast.onnx").graph.node}
    assert "QLinearConv" in ops
    if case.startswith("resnet20"):
        # every conv on the fused int8 kernel, residual adds and the global pool on int8 codes
        assert "ConvInteger" not in ops and {"QLinearAdd", "QLinearGlobalAveragePool"} <= ops
    x = _data(shape, n=1, batch=64, seed=12)[0]
    got = _session(tmp_path / "fast.onnx").run(None, {"input": x.numpy()})[0]
    ref = imodel(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()


def test_exact_export_holds_a_bias_at_the_int32_limit(tmp_path):
    # A bias large against S_w·S_in sits at the int32 limit; ONNX Runtime's int32 sum with the products
    # would wrap, so the export adds it after widening (found on an untrained EfficientNet-Lite0's classifier).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
    with torch.no_grad():
        model[3].bias.copy_(torch.tensor([1e6, -1e6, 0.0]))
    imodel = hessq.to_integer(hessq.quantize(model, 8, _data((1, 8, 8)), pin_first_last=None))
    assert max(abs(int(b)) for b in imodel.ops[-2].tensors["bias"]) == 2**31 - 1
    hessq.export_onnx(imodel, tmp_path / "m.onnx")
    for x in _data((1, 8, 8), n=2, seed=3):
        assert np.array_equal(_session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0], imodel(x).numpy())


def test_export_errors(tmp_path):
    with pytest.raises(TypeError, match="IntegerModel"):
        hessq.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    _, q, _ = _quantized("concat-w8a8")
    with pytest.raises(ValueError, match="mode"):
        hessq.export_onnx(hessq.to_integer(q), tmp_path / "x.onnx", mode="turbo")
    assert not (tmp_path / "x.onnx").exists()


def test_exact_export_is_exact_where_int8_kernels_saturate(tmp_path):
    # Codes at the grid's ends: 255 × 127 + 255 × 127 = 64,770 overflows the 16-bit pair sums of ONNX Runtime's
    # uint8 × int8 kernels on AVX2 CPUs without VNNI (VPMADDUBSW). The exact export must not use them there.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(72, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.copy_(torch.stack([torch.ones(72), -torch.ones(72)]))
    extremes = [torch.ones(4, 1, 8, 8), torch.zeros(4, 1, 8, 8)]  # calibrated so that all-ones sits on the grids' ends
    imodel = hessq.to_integer(hessq.quantize(model, 8, extremes, pin_first_last=None))
    hessq.export_onnx(imodel, tmp_path / "m.onnx")
    x = torch.ones(2, 1, 8, 8)
    codes = imodel.run(x, keep=True)
    for op in (op for op in imodel.ops if op.kind in ("conv2d", "linear")):  # every product at the extremes
        assert int(codes[op.inputs[0]].min()) == 255 and int(op.tensors["weight"].abs().min()) == 127
    assert np.array_equal(_session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0], imodel(x).numpy())


@pytest.mark.parametrize("bits, dtype", [(8, np.uint8), (5, np.int8)])  # (at 4 bits a Linear runs on MatMulNBits)
def test_fast_export_runs_8_bit_weights_on_kernels_that_cannot_saturate(bits, dtype, tmp_path):
    # 8-bit codes reach ±127, where uint8 × int8 pair sums can leave 16 bits: they go as uint8 around 128; codes
    # within ±64 (7 bits and fewer) keep the faster uint8 × int8 kernels
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(64, 3)).eval()
    imodel = hessq.to_integer(hessq.quantize(model, bits, _data((1, 8, 8)), pin_first_last=None))
    hessq.export_onnx(imodel, tmp_path / "fast.onnx", mode="fast")
    graph = onnx.load(tmp_path / "fast.onnx").graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_input = {"QLinearConv": 3, "ConvInteger": 1, "MatMulIntegerToFloat": 1, "MatMulInteger": 1}
    weights = [arrays[n.input[weight_input[n.op_type]]] for n in graph.node if n.op_type in weight_input]
    assert len(weights) == 3 and all(w.dtype == dtype for w in weights)
    x = _data((1, 8, 8), n=1, seed=4)[0]
    got = _session(tmp_path / "fast.onnx").run(None, {"input": x.numpy()})[0]
    assert np.isfinite(got).all() and got.shape == imodel(x).shape


def test_layers_reading_16_bit_codes_export_exactly_and_fast_within_their_steps(tmp_path):
    # 16-bit activations into convs (an unsigned grid after a ReLU, a signed one without) and a Linear: no ONNX
    # integer kernel takes 16-bit codes. The exact export splits them into byte planes (ConvInteger and MatMulInteger
    # on each): bit for bit. The fast export keeps 16-bit grids real and runs float kernels.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(512, 4)).eval()
    x = torch.randn(16, 3, 8, 8)
    q = hessq.quantize(model, {"0": (8, 8), "2": (8, 16), "3": (8, 16), "6": (8, 16)},
                       [(x, torch.zeros(16, dtype=torch.long))], pin_first_last=None)
    imodel = hessq.to_integer(q)
    first = next(op for op in imodel.ops if op.kind == "quantize")
    x = torch.round(x / first.scale) * first.scale  # inputs on the first grid: no rounding tie to break either way
    grids = [(op.attrs["qmin"], op.attrs["qmax"]) for op in imodel.ops if op.kind == "requantize"]
    assert (0, 65535) in grids and (-32767, 32767) in grids
    y = imodel(x).numpy()
    outputs = {}
    for mode in ("exact", "fast"):
        hessq.export_onnx(imodel, tmp_path / f"{mode}.onnx", mode=mode)
        session = ort.InferenceSession(str(tmp_path / f"{mode}.onnx"), providers=["CPUExecutionProvider"])
        outputs[mode] = session.run(None, {"input": x.numpy()})[0]
    assert np.array_equal(outputs["exact"], y)
    # fast: each layer's input may sit up to one step of its grid from the integer model's codes (a rounding left
    # out, or a tie rounded the other way), and a layer moves a deviation by at most its largest row of |weights|
    # (the first layer reads the input's codes, the same in both)
    by_output = {op.output: op for op in imodel.ops}
    layers = [op for op in imodel.ops if op.kind in ("conv2d", "linear")]
    deviation = 0.0
    for i, op in enumerate(layers):
        step = float(by_output[op.inputs[0]].scale)
        rows = (op.tensors["weight"].double().flatten(1).abs().sum(1) * op.scale.double().reshape(-1) / step).max()
        deviation = float(rows) * (deviation + (step if i else 0.0))
    assert 0 < deviation < 0.1 * np.abs(y).max()  # a bound that says something (a saturated grid moves them all)
    assert (np.abs(outputs["fast"] - y) <= deviation).all()
