"""Bad arguments, models and data for the sensitivity API, accuracy and the integer model: each one a clear
hessq error before any work (ConfigError, ModelError or InputDataError), never a raw torch error or a silent result.

Every case here was a raw Python/torch error or silently accepted before (the KL bit widths "48" and (4.5,) became
4 and 8 bits; IntegerModel quantized NaN pixels and raw uint8 images; accuracy counted class 12 of a 10-class model
as a miss; min_samples > max_samples ran max_samples).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessq
from hessq import ConfigError, ConfigTypeError, InputDataError, ModelError
from hessq.sensitivity import hessian_sensitivity, hessian_trace, kl_sensitivity, spectral_density, top_eigenvalues

from tests._models import conv_relu_linear, digits_batches, mlp, tiny_net

FAST = dict(max_samples=2, min_samples=2, eigenvalues=False)


def _data():
    return digits_batches((10,))


def _nan_weights():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def _meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


# --- the sensitivity API: argument values -------------------------------------------------------------

BAD_SENSITIVITY_ARGS = {  # (arguments, what the message says); each was silently taken or a raw error
    "rtol<0": (dict(rtol=-0.1), "rtol must be a finite number >= 0"),
    "rtol=nan": (dict(rtol=float("nan")), "rtol must be a finite number >= 0"),
    "rtol=inf": (dict(rtol=float("inf")), "rtol must be a finite number >= 0"),
    "rtol-string": (dict(rtol="0.05"), "rtol must be a finite number"),
    "min>max": (dict(max_samples=5, min_samples=20), r"min_samples \(20\) is more than max_samples \(5\)"),
    "max_samples=2.5": (dict(max_samples=2.5), "max_samples must be an integer"),
    "min_samples=0": (dict(min_samples=0), "min_samples must be >= 1"),
    "top_k=0": (dict(top_k=0), "top_k must be >= 1"),
    "eig_max_iter=0": (dict(eig_max_iter=0), "eig_max_iter must be >= 1"),
    "eig_tol<0": (dict(eig_tol=-1e-4), "eig_tol must be a finite number >= 0"),
    "seed=-1": (dict(seed=-1), "seed must be >= 0"),
    "layers-a-string": (dict(layers="4"), r"layers must be a list of layer names.*layers=\['4'\]"),
    "layers-empty": (dict(layers=[]), "layers is empty"),
    "layers-not-names": (dict(layers=[4]), "layers must hold layer names"),
}


@pytest.mark.parametrize("case", list(BAD_SENSITIVITY_ARGS))
def test_hessian_sensitivity_refuses_bad_arguments(case):
    kwargs, message = BAD_SENSITIVITY_ARGS[case]
    with pytest.raises(ConfigError, match=message):
        hessian_sensitivity(mlp(), _data(), **kwargs)


@pytest.mark.parametrize("call, kwargs, message", [
    (hessian_trace, dict(rtol=-1.0), "rtol"),
    (hessian_trace, dict(max_samples=3, min_samples=4), "min_samples"),
    (hessian_trace, dict(params=torch.zeros(3)), "params"),
    (top_eigenvalues, dict(max_iter=0), "max_iter"),
    (top_eigenvalues, dict(tol=float("nan")), "tol"),
    (spectral_density, dict(iters=0), "iters"),
    (spectral_density, dict(n_v=0), "n_v"),
    (spectral_density, dict(layer=4), "layer must be"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_trace_eigenvalues_and_density_refuse_bad_arguments(call, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        call(mlp(), _data(), **kwargs)


@pytest.mark.parametrize("bits", ["48", 4, (4.5,)], ids=str)  # (4, 16), (1,) and () were clear errors already
def test_kl_sensitivity_refuses_bad_weight_bits(bits):
    with pytest.raises(ConfigError, match="bit width|weight_bits"):
        kl_sensitivity(conv_relu_linear(), [torch.randn(4, 1, 8, 8)], weight_bits=bits, progress=False)


# --- the sensitivity API, accuracy: models ---------------------------------------------------------------

BAD_MODELS = {"a-string": ("model", ConfigTypeError), "a-function": (lambda x: x, ConfigTypeError),
              "meta-device": (_meta_model, ModelError), "nan-weights": (_nan_weights, ModelError)}


def _model(case):
    m = BAD_MODELS[case][0]
    return m() if case in ("meta-device", "nan-weights") else m


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_hessian_api_refuses_unusable_models(case):
    expected = BAD_MODELS[case][1]
    for call, kw in [(hessian_sensitivity, FAST), (hessian_trace, dict(max_samples=2)), (top_eigenvalues, {}),
                     (spectral_density, dict(iters=2))]:
        with pytest.raises(expected, match="meta device|NaN or infinite|torch.nn.Module"):
            call(_model(case), _data(), **kw)


@pytest.mark.parametrize("case", ["a-string", "meta-device", "nan-weights"])
def test_kl_sensitivity_refuses_unusable_models(case):
    with pytest.raises(BAD_MODELS[case][1]):
        kl_sensitivity(_model(case), [torch.randn(4, 1, 8, 8, dtype=torch.float64)], progress=False)


@pytest.mark.parametrize("case", ["meta-device", "nan-weights"])
def test_accuracy_refuses_unusable_models(case):
    with pytest.raises(ModelError):
        hessq.accuracy(_model(case), _data())


def test_accuracy_refuses_what_is_not_callable():
    with pytest.raises(ConfigTypeError, match="callable"):
        hessq.accuracy("model", _data())


# --- the sensitivity API, accuracy: batches --------------------------------------------------------------

def _x():
    return _data()[0][0]


def _y():
    return _data()[0][1]


BAD_BATCHES = {
    "a-triple": lambda: [(_x(), _y(), _y())],
    "inputs-only": lambda: [_x()],
    "none": lambda: None,
    "a-tensor": lambda: _x(),
    "empty-list": lambda: [],
    "uint8-images": lambda: [((_x() * 16).to(torch.uint8), _y())],
    "float32-for-float64-model": lambda: [(_x().float(), _y())],
    "float16": lambda: [(_x().half(), _y())],
    "nan-pixels": lambda: [(_x().masked_fill(torch.arange(64).reshape(1, 1, 8, 8) == 5, float("nan")), _y())],
    "wrong-shape": lambda: [(_x()[:, :, :4, :4], _y())],
    "wrong-channels": lambda: [(_x().repeat(1, 3, 1, 1), _y())],
    "target-10-of-10": lambda: [(_x(), torch.full_like(_y(), 10))],
    "target-minus-1": lambda: [(_x(), _y() - _y().min() - 1)],
    "fewer-targets": lambda: [(_x(), _y()[:4])],
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_hessian_sensitivity_refuses_bad_batches(case):
    with pytest.raises(InputDataError) as info:
        hessian_sensitivity(mlp(), BAD_BATCHES[case](), **FAST)
    if "shape" in case or "channels" in case:
        assert "inputs of shape (10, " in str(info.value)


@pytest.mark.parametrize("case", ["a-triple", "none", "uint8-images", "nan-pixels", "wrong-shape", "target-10-of-10"])
def test_trace_and_eigenvalues_refuse_bad_batches(case):
    for call, kw in [(hessian_trace, dict(max_samples=2)), (top_eigenvalues, dict(max_iter=2))]:
        with pytest.raises(InputDataError):
            call(mlp(), BAD_BATCHES[case](), **kw)


@pytest.mark.parametrize("case", [c for c in BAD_BATCHES if c not in ("a-tensor",)])
def test_accuracy_refuses_bad_batches(case):
    with pytest.raises(InputDataError):
        hessq.accuracy(mlp(), BAD_BATCHES[case]())


@pytest.mark.parametrize("inputs", [
    [torch.randn(4, 1, 8, 8).to(torch.uint8)], [torch.randn(4, 1, 8, 8, dtype=torch.float64)],
    [torch.full((4, 1, 8, 8), float("nan"))], [torch.randn(4, 1, 5, 5)], [[1.0, 2.0]], None, [],
], ids=["uint8", "float64", "nan", "wrong-shape", "a-list", "none", "empty"])
def test_kl_sensitivity_refuses_bad_inputs(inputs):
    with pytest.raises(InputDataError):
        kl_sensitivity(conv_relu_linear(), inputs, progress=False)


# --- the integer model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def integer_model():
    g = torch.Generator().manual_seed(0)
    return hessq.to_integer(hessq.quantize(tiny_net().eval(), 8, [torch.randn(16, 1, 8, 8, generator=g)]))


@pytest.mark.parametrize("x, message", [
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    ((torch.rand(2, 1, 8, 8) * 255).to(torch.uint8), r"uint8 pixels.*x.float\(\) / 255"),
    (torch.randn(2, 1, 8, 8, dtype=torch.float64), r"x.to\(torch.float32\)"),
    (torch.randn(2, 1, 8, 8).half(), "float16"),
    (torch.randn(2, 3, 8, 8), r"\(2, 3, 8, 8\) does not match the model's \(N, 1, 8, 8\)"),
    (torch.randn(1, 8, 8), r"does not match the model's \(N, 1, 8, 8\)"),
    ([[0.0] * 8] * 8, r"float32 tensor of shape \(N, 1, 8, 8\)"),
], ids=["nan", "uint8", "float64", "float16", "channels", "no-batch-dim", "a-list"])
def test_integer_model_refuses_bad_inputs(integer_model, x, message):
    with pytest.raises(InputDataError, match=message):
        integer_model(x)


def test_to_integer_refuses_nan_weights():
    g = torch.Generator().manual_seed(0)
    q = hessq.quantize(tiny_net().eval(), 8, [torch.randn(16, 1, 8, 8, generator=g)])
    with torch.no_grad():
        next(p for p in q.parameters() if p.is_floating_point()).view(-1)[0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        hessq.to_integer(q)


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_export_onnx_refuses_unwritable_paths_before_work(integer_model, tmp_path, where, monkeypatch):
    from hessq.integer import _onnx

    def no_work(*args, **kwargs):
        raise AssertionError("the export started before the path was checked")

    monkeypatch.setattr(_onnx, "_Exporter", no_work)
    (tmp_path / "file").write_text("x")
    path = tmp_path if where == "directory" else tmp_path / "file" / "m.onnx"
    with pytest.raises(ConfigError, match="is a directory|lies under"):
        hessq.export_onnx(integer_model, path)


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_export_onnx_refuses_bad_batch_sizes(integer_model, tmp_path, size):
    with pytest.raises(ConfigError, match="batch_size"):
        hessq.export_onnx(integer_model, tmp_path / "m.onnx", batch_size=size)


# --- the bundled datasets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, message", [
    (lambda: hessq.data.TensorBatches([[0.0]] * 4, torch.zeros(4)), InputDataError, "must be tensors"),
    (lambda: hessq.data.TensorBatches(torch.zeros(4, 2), torch.zeros(4), batch_size=2.5), ConfigError, "batch_size"),
    (lambda: hessq.data.digits("test").take(0), ConfigError, "num_batches must be an integer >= 1"),
    (lambda: hessq.data.digits("test").take(-2), ConfigError, "num_batches must be an integer >= 1"),
    (lambda: hessq.data.digits("test", batch_size=100).take(50, exact=True), InputDataError, "ask for at most 4"),
    (lambda: hessq.data.digits(test_fraction=1.5), ConfigError, "test_fraction"),
    (lambda: hessq.data.digits("test", test_fraction=0), ConfigError, "test_fraction"),
], ids=["inputs-a-list", "batch_size=2.5", "take(0)", "take(-2)", "take-more-than-there-are", "test_fraction=1.5",
        "test_fraction=0"])
def test_dataset_helpers_refuse_bad_values(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_fashion_mnist_refuses_damaged_files_and_a_bad_limit(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"not gzip at all")
    with pytest.raises(InputDataError, match="not a readable gzip IDX file"):
        hessq.data.fashion_mnist("test", root=tmp_path)
    with pytest.raises(ConfigError, match="limit"):
        hessq.data.fashion_mnist("test", root=tmp_path, limit=0)


@pytest.mark.parametrize("loss_fn", ["cross_entropy", 3])
def test_a_loss_that_is_not_a_function_is_refused_before_work(loss_fn):
    for call, kw in [(hessian_sensitivity, FAST), (hessian_trace, dict(max_samples=2))]:
        with pytest.raises(ConfigTypeError, match="loss_fn must be a function"):
            call(mlp(), _data(), loss_fn, **kw)


def test_a_batch_of_no_samples_is_refused():
    x, y = _data()[0]
    with pytest.raises(InputDataError, match="hold no samples"):
        hessian_sensitivity(mlp(), [(x[:0], y[:0])], **FAST)
