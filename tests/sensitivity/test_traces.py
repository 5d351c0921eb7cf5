"""Every layer's trace to a stated precision: the Gauss-Newton route where the output is linear in the
layer (exact, or sampled), restricted Hutchinson elsewhere, all against exact Hessian blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import hessq
from hessq.sensitivity import hessian_sensitivity
from hessq.sensitivity._ggn import per_sample_sq_norms
from hessq.sensitivity._linearity import linear_in

from ._models import batches, convnet, exact_block_hessians, mlp, resnet_tiny, silu_net

MODELS = {"mlp": mlp, "convnet": convnet, "resnet_tiny": resnet_tiny, "silu_net": silu_net}
#: the layers each model's output is linear in (their Hessian block is the Gauss-Newton block)
LINEAR = {"mlp": {"4", "6"}, "convnet": {"fc"}, "resnet_tiny": {"conv1", "conv2", "conv3", "fc"}, "silu_net": {"6"}}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model, data = MODELS[request.param](), batches((20, 10))
    return request.param, model, data, {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data).items()}


def _check(sens, exact, name, rtol=0.1):
    """Exact records equal the exact trace within 1e-4; sampled ones lie within 3 of their standard errors."""
    for layer, truth in exact.items():
        rec = sens[layer]
        if rec.extra["estimator"] in ("ggn-exact", "exact"):
            assert rec.trace_stderr == 0 and rec.trace == pytest.approx(truth, rel=1e-4, abs=1e-12), (name, layer, rec, truth)
        else:
            # unbiased: within 3 standard errors (plus float rounding: the sampled Gauss-Newton trace of
            # a last Linear layer is the same on every draw, ‖a_n‖²·Tr(H_n), so its spread is rounding)
            assert abs(rec.trace - truth) <= 3 * rec.trace_stderr + 1e-9 * abs(truth), (name, layer, rec, truth)
            assert rec.trace_stderr <= rtol * abs(rec.trace), (name, layer, rec)  # the precision asked for


def test_linearity_is_read_off_the_graph(case):
    name, model, data, _ = case
    layers = hessq.quantizable_layers(model)
    out = model(data[0][0])
    got = {n for n, ok in zip(layers, linear_in(out, [m.weight for m in layers.values()])) if ok}
    assert got == LINEAR[name]


def test_a_weight_used_twice_is_not_linear():
    lin = nn.Linear(5, 5).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert linear_in(lin(torch.relu(lin(x))), [lin.weight]) == [False]
    assert linear_in(lin(x) * 2.0, [lin.weight]) == [True]
    assert linear_in(lin(x) / lin(x).norm(), [lin.weight]) == [False]


def test_auto_every_layer_to_its_precision(case):
    """auto: exact Gauss-Newton traces where the block equals it, restricted Hutchinson to rtol elsewhere."""
    name, model, data, exact = case
    sens = hessian_sensitivity(model, data, rtol=0.1, max_samples=1000, eigenvalues=False, seed=0)
    assert {n for n, r in sens.items() if r.extra["estimator"] == "ggn-exact"} == LINEAR[name]
    # the others: restricted Hutchinson, or their exact trace where that takes fewer products
    assert all(r.extra["estimator"] in ("restricted", "exact") for n, r in sens.items() if n not in LINEAR[name])
    assert sens.meta["converged"] and not sens.meta["short_layers"]
    assert all(r.trace_stderr <= 0.1 * abs(r.trace) for r in sens.values())
    _check(sens, exact, name)


def test_sampled_gauss_newton_within_three_stderr():
    model, data = resnet_tiny(), batches((20, 10))
    exact = {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data).items()}
    sens = hessian_sensitivity(model, data, method="ggn", rtol=0.2, max_samples=200, eigenvalues=False, seed=1)
    assert {r.extra["estimator"] for r in sens.values()} == {"ggn"} and sens.meta["converged"]
    assert sens.meta["trace_hvps_per_rank"] == 0  # plain backward passes only
    _check(sens, exact, "resnet_tiny", rtol=0.2)


def test_restricted_every_layer_within_three_stderr():
    model, data = convnet(), batches((20, 10))
    exact = {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data).items()}
    sens = hessian_sensitivity(model, data, method="restricted", rtol=0.1, max_samples=400, eigenvalues=False, seed=2)
    assert set(sens.meta["estimators"]) <= {"restricted", "exact"} and sens.meta["converged"]
    _check(sens, exact, "convnet")
    # each layer stops on its own precision: not all take the same number of draws
    assert len({r.extra["samples"] for r in sens.values()}) > 1


def test_in_place_activation_after_a_layer():
    """conv → ReLU(inplace=True): the layer's own output gradient is used, not the ReLU's."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(108, 10), nn.ReLU(inplace=True),
                          nn.Linear(10, 10)).double().eval()
    data = batches((20,))
    exact = {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data).items()}
    sens = hessian_sensitivity(model, data, method="exact", eigenvalues=False)
    _check(sens, exact, "in-place")


def test_exact_refuses_layers_it_does_not_hold_for():
    with pytest.raises(hessq.ConfigError, match=r"method='exact'.*layers \['0', '4'\].*method='auto'"):
        hessian_sensitivity(silu_net(), batches((10,)), method="exact", eigenvalues=False)


def test_non_convex_and_coupled_losses():
    model, data = resnet_tiny(), batches((25,))

    def wavy(out, y):  # an indefinite output Hessian: negative eigenvalues get their own, subtracted, direction
        return torch.cos(out).mean() + nn.functional.cross_entropy(out, y)

    exact = {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data, wavy).items()}
    sens = hessian_sensitivity(model, data, wavy, method="exact", eigenvalues=False)
    _check(sens, exact, "wavy")

    def coupled(out, y):  # the batch's samples interact: the Gauss-Newton route does not apply
        return nn.functional.cross_entropy(out, y) + out.mean(0).pow(2).sum()

    exact = {n: float(torch.trace(h)) for n, h in exact_block_hessians(model, data, coupled).items() if n in ("conv1", "fc")}
    sens = hessian_sensitivity(model, data, coupled, layers=["conv1", "fc"], rtol=0.1, max_samples=400, eigenvalues=False)
    assert "couples the samples" in sens.meta["ggn_unavailable"]
    assert set(sens.meta["estimators"]) <= {"restricted", "exact"}
    _check(sens, exact, "coupled")


def test_short_layers_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"stopped at max_samples before 2 of 3 layers reached rtol=0.001.*'?conv1'? \d"):
        sens = hessian_sensitivity(convnet(), batches((20,)), rtol=0.001, max_samples=4, eigenvalues=False)
    assert not sens.meta["converged"] and sens.meta["short_layers"] == ["conv1", "conv2"]
    assert sens.meta["stopped_by"] == "max_samples" and sens["fc"].trace_stderr == 0
    with pytest.warns(UserWarning, match="stopped at time_budget"):
        sens = hessian_sensitivity(convnet(), batches((20,)), rtol=0.001, max_samples=50, time_budget=1e-6, eigenvalues=False)
    assert sens.meta["stopped_by"] == "time_budget" and sens.meta["samples"] < 50


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False),
    lambda: nn.Conv2d(3, 2, (3, 2), padding=(1, 2), padding_mode="reflect"),
    lambda: nn.Conv2d(3, 5, 1),
    lambda: nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding="valid", dilation=(1, 2)),
    lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    lambda: nn.Linear(7, 3),
])
def test_per_sample_gradient_norms_match_torch_func(make):
    """‖J_nᵀu_n‖² from the layer's input and output gradient equals torch.func's per-sample gradient."""
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(5, 7, dtype=torch.float64) if isinstance(m, nn.Linear) else torch.randn(5, m.in_channels, 9, 8, dtype=torch.float64)
    u = torch.randn_like(m(x))
    params = dict(m.named_parameters())

    def f(w, xn, un):
        return (functional_call(m, {**params, "weight": w}, (xn[None],))[0] * un).sum()

    want = vmap(grad(f), in_dims=(None, 0, 0))(m.weight, x, u).pow(2).flatten(1).sum(1)
    for reuse in (1, 50):  # the per-sample gradients, or the Gram form where it is cheaper
        got = per_sample_sq_norms(m, x, torch.stack([u, 2 * u]), {}, reuse)  # two directions at once
        assert torch.allclose(got[0], want, rtol=1e-10) and torch.allclose(got[1], 4 * want, rtol=1e-10)
    tokens = nn.Linear(4, 3).double()  # a Linear over a sequence: Σ_t δ_t a_tᵀ per sample
    xt, ut = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    want = torch.stack([torch.einsum("to,ti->oi", ut[n], xt[n]).pow(2).sum() for n in range(2)])
    assert torch.allclose(per_sample_sq_norms(tokens, xt, ut.unsqueeze(0), {})[0], want)


def test_spectral_density_reports_its_trace_and_precision():
    """SLQ's first moment is a Hutchinson sample per run: dim·Σwλ, with its standard error over runs."""
    from hessq.sensitivity import spectral_density

    model, data = mlp(), batches((30,))
    truth = float(torch.trace(exact_block_hessians(model, data)["4"]))
    dens = spectral_density(model, data, layer="4", iters=8, n_v=30, seed=0)
    trace, stderr = dens.trace()
    assert dens.dim == 96 and 0 < stderr <= 0.3 * abs(truth) and abs(trace - truth) <= 3 * stderr
