"""Each error names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hessq import InputDataError
from hessq.sensitivity import hessian_sensitivity

from ._models import batches, mlp


class OnceSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Square(nn.Module):
    def forward(self, x):
        return OnceSquare.apply(x)


class Cdist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(5, 12, dtype=torch.float64))

    def forward(self, x):
        return torch.cdist(x, self.centres)


def _net(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 12), middle, nn.Linear(12 if not isinstance(middle, Cdist) else 5, 10)).double()


def test_no_layer_with_gradients():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no quantizable layer with gradients.*requires_grad_\(True\)"):
        hessian_sensitivity(model, batches((10,)))


def test_unknown_layer_name():
    with pytest.raises(ValueError, match=r"no quantizable layer named \['nope'\]; the model has"):
        hessian_sensitivity(mlp(), batches((10,)), layers=["nope"])


def test_loss_independent_of_parameters():
    with pytest.raises(ValueError, match=r"does not depend on the model's parameters.*torch.no_grad\(\)"):
        hessian_sensitivity(mlp(), batches((10,)), lambda out, y: out.detach().sum())


def test_unused_layer_is_named():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(64, 10).double()
            self.unused = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.used(x.flatten(1))

    with pytest.raises(ValueError, match=r"does not depend on the weights of \['unused'\].*layers=\['used'\]"):
        hessian_sensitivity(Skip(), batches((10,)))


def test_nan_loss():
    with pytest.raises(ValueError, match=r"the loss is nan on batch 0.*NaN/inf"):
        hessian_sensitivity(mlp(), batches((10,)), lambda out, y: nn.functional.cross_entropy(out, y) * float("nan"))


def test_nan_input_is_refused_before_any_product():
    (x, y), = batches((10,))
    x = x.clone()
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputDataError, match=r"batch 0's inputs hold NaN or infinite values \(1 of 640\)"):
        hessian_sensitivity(mlp(), (x, y))


def test_inf_loss():
    def loss_fn(out, y):  # finite on the first batch (10 images), inf on the second (7)
        loss = nn.functional.cross_entropy(out, y)
        return loss - torch.log(torch.zeros((), dtype=out.dtype)) if len(y) == 7 else loss

    with pytest.raises(ValueError, match=r"the loss is inf on batch 1.*NaN/inf"):
        hessian_sensitivity(mlp(), batches((10, 7)), loss_fn)


def test_inf_input_is_refused_before_any_product():
    # tanh(inf) would keep the loss finite and make the products inf: refused up front instead
    data = batches((10, 10))
    x = data[1][0].clone()
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(InputDataError, match=r"batch 1's inputs hold NaN or infinite"):
        hessian_sensitivity(mlp(), [data[0], (x, data[1][1])])


def test_non_scalar_loss():
    with pytest.raises(ValueError, match=r"scalar tensor.*\.mean\(\)"):
        hessian_sensitivity(mlp(), batches((10,)), lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))


def test_once_differentiable_op_names_function_module_and_fix():
    model = _net(Square())
    with pytest.raises(ValueError) as info:
        hessian_sensitivity(model, batches((10,)))
    msg = str(info.value)
    assert "OnceSquare" in msg and "module '3'" in msg and "no double backward" in msg
    assert "layers ['2']" in msg and "layers=['4']" in msg
    # the fix it names works
    sens = hessian_sensitivity(model, batches((10,)), layers=["4"], rtol=1.0, max_samples=3, eig_max_iter=3)
    assert list(sens) == ["4"]


def test_op_without_double_backward_names_op_module_and_fix():
    model = _net(Cdist())
    with pytest.raises(ValueError) as info:
        hessian_sensitivity(model, batches((10,)), eigenvalues=False, max_samples=2)
    msg = str(info.value)
    assert "_cdist_backward" in msg and "module '3'" in msg
    assert "layers ['2']" in msg and "layers=['4']" in msg
    sens = hessian_sensitivity(model, batches((10,)), layers=["4"], rtol=1.0, max_samples=3, eig_max_iter=3)
    assert list(sens) == ["4"]


def test_empty_batches():
    with pytest.raises(ValueError, match="no data"):
        hessian_sensitivity(mlp(), [])
