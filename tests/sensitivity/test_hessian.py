"""hessian_sensitivity against exact Hessians of small models (MLP and a conv net)."""

from __future__ import annotations

import pytest
import torch

import hessq
from hessq.sensitivity import hessian_sensitivity, hessian_trace, spectral_density, top_eigenvalues

from ._models import batches, convnet, exact_block_hessians, mlp

MODELS = {"mlp": mlp, "convnet": convnet}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model = MODELS[request.param]()
    data = batches()
    return request.param, model, data, exact_block_hessians(model, data)


def _full_hvp(model, data, v):
    """Exact H v over all analysed weights for the mean loss over all of ``data``."""
    from torch.func import functional_call

    x = torch.cat([b[0] for b in data]); y = torch.cat([b[1] for b in data])
    layers = hessq.quantizable_layers(model)
    keys = [f"{n}.weight" for n in layers]
    params = dict(model.named_parameters())

    def f(*ws):
        return torch.nn.functional.cross_entropy(functional_call(model, {**params, **dict(zip(keys, ws))}, (x,)), y)

    _, hv = torch.autograd.functional.hvp(f, tuple(params[k].detach() for k in keys), tuple(v))
    return hv


def test_one_hvp_gives_every_layers_product_exactly(case):
    """products(v) = v_i . (H v)_i for every layer at once, H of the size-weighted mean loss."""
    from hessq.sensitivity._hvp import HessianOperator

    name, model, data, _ = case
    layers = hessq.quantizable_layers(model)
    params = [m.weight for m in layers.values()]
    op = HessianOperator(model, list(enumerate(data)), torch.nn.functional.cross_entropy, params, list(layers))
    gen = torch.Generator().manual_seed(0)
    v = [torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1 for p in params]
    dots, _ = op.products(v)
    hv = _full_hvp(model, data, v)
    for i in range(len(params)):
        assert float(dots[i]) == pytest.approx(float((v[i] * hv[i]).sum()), rel=1e-9, abs=1e-12)
    assert op.hvp_count == len(data)  # one double-backward per batch serves all layers
    # the diagonal block product, for power iteration
    exact = exact_block_hessians(model, data)
    for i, n in enumerate(layers):
        got = op.block_hvp(i, v[i].reshape(-1))
        assert torch.allclose(got, exact[n] @ v[i].reshape(-1), rtol=1e-9, atol=1e-12)


def test_traces_within_three_stderr_of_exact(case):
    name, model, data, exact = case
    # the former engine, kept as method="hutchinson": one shared vector per HVP read per layer
    sens = hessian_sensitivity(model, data[:1], method="hutchinson", rtol=0.1, max_samples=300, seed=0, eigenvalues=False, cache=True)
    exact = exact_block_hessians(model, data[:1])
    assert list(sens) == list(exact)
    for layer, h in exact.items():
        truth = float(torch.trace(h))
        rec = sens[layer]
        assert rec.num_params == h.shape[0]
        # a real estimate, not noise (the small first conv's coupling to the others makes it the noisiest;
        # test_one_hvp_gives_every_layers_product_exactly checks each sample exactly)
        assert rec.trace_stderr <= abs(truth), (name, layer, rec, truth)
        assert abs(rec.trace - truth) <= 3 * rec.trace_stderr, (name, layer, rec.trace, rec.trace_stderr, truth)
    # One HVP per sample and batch serves every layer: never one pass per layer.
    assert sens.meta["trace_hvps_per_rank"] == sens.meta["samples"]


def test_top_eigenvalue_matches_eigvalsh(case):
    name, model, data, exact = case
    tops = top_eigenvalues(model, data, k=2, max_iter=3000, tol=1e-10, cache=True)
    for layer, h in exact.items():
        ev = torch.linalg.eigvalsh(h)
        assert tops[layer][0] == pytest.approx(float(ev[-1]), rel=1e-3), (name, layer)
        assert abs(tops[layer][1]) <= abs(tops[layer][0]) * (1 + 1e-6)


def test_sensitivity_record_has_eigenvalue_and_mean_trace(case):
    name, model, data, exact = case
    sens = hessian_sensitivity(model, data[:1], rtol=0.5, max_samples=20, eig_max_iter=3000, eig_tol=1e-10, seed=3)
    one = exact_block_hessians(model, data[:1])
    for layer, h in one.items():
        assert sens[layer].top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-3)
        assert sens[layer].mean_trace == sens[layer].trace / h.shape[0]


def test_negative_dominant_eigenvalue_gives_algebraic_max():
    from hessq.sensitivity._eigen import power_iteration

    a = torch.diag(torch.tensor([-5.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    h = q @ a @ q.T
    vals, _ = power_iteration(lambda v: h @ v, 4, max_iter=2000, tol=1e-12, generator=torch.Generator().manual_seed(1))
    assert vals[0] == pytest.approx(2.0, rel=1e-6)


def test_deterministic_given_seed_and_differs_with_seed():
    model, data = mlp(), batches()
    kw = dict(rtol=0.0, max_samples=6, eig_max_iter=5, eig_tol=0.0)
    a = hessian_sensitivity(model, data, seed=7, **kw)
    b = hessian_sensitivity(model, data, seed=7, **kw)
    c = hessian_sensitivity(model, data, seed=8, **kw)
    assert a.to_dict() == b.to_dict()
    assert [r.trace for r in a.values()] != [r.trace for r in c.values()]


def test_stops_on_rtol_and_at_max_samples():
    model, data = mlp(), batches()[:1]
    loose = hessian_sensitivity(model, data, rtol=0.5, max_samples=300, min_samples=5, eigenvalues=False)
    assert loose.meta["converged"] and loose.meta["samples"] < 500
    assert all(r.trace_stderr <= 0.5 * abs(r.trace) for r in loose.values())
    capped = hessian_sensitivity(model, data, rtol=1e-6, max_samples=7, eigenvalues=False)
    assert capped.meta["samples"] == 7 and not capped.meta["converged"]


def test_layers_argument_restricts_analysis(case):
    name, model, data, exact = case
    first = list(exact)[0]
    sens = hessian_sensitivity(model, data, layers=[first], rtol=1.0, max_samples=5, eigenvalues=False)
    assert list(sens) == [first]
    assert list(sens.signature) == list(exact)
    sens.check_model(model)


def test_whole_model_trace_matches_exact():
    model, data = mlp(), batches()
    from torch.func import functional_call

    x = torch.cat([b[0] for b in data]); y = torch.cat([b[1] for b in data])
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def f(w):
        ps = dict(zip(names, [t.reshape(s) for t, s in zip(w.split([s.numel() for s in shapes]), shapes)]))
        return torch.nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    truth = float(torch.trace(torch.autograd.functional.hessian(f, flat, vectorize=True)))
    est = hessian_trace(model, data, rtol=0.05, max_samples=400, cache=True)
    assert est.stderr <= 0.1 * abs(truth)
    assert abs(est.trace - truth) <= 3 * est.stderr


def test_activation_trace_matches_exact():
    """HAWQ-V2: Tr of the Hessian w.r.t. a layer's input = mean over samples of the per-sample trace."""
    model, data = mlp(), batches((30,))
    x, y = data[0]
    sens = hessian_sensitivity(model, data, rtol=0.1, max_samples=400, eigenvalues=False, activations=True)
    # exact: the loss as a function of the last Linear's input
    head = model[:6]
    a = head(x).detach()

    def g(a_):
        return torch.nn.functional.cross_entropy(model[6](a_), y)

    h = torch.autograd.functional.hessian(g, a, vectorize=True).reshape(a.numel(), a.numel())
    truth = float(torch.trace(h))
    rec = sens["6"].extra
    assert rec["activation_numel"] == 8
    assert abs(rec["activation_trace"] - truth) <= 3 * rec["activation_trace_stderr"]
    assert rec["activation_trace_stderr"] <= 0.25 * abs(truth)
    # the first layer's input is the (pooled) data itself
    assert "activation_trace" in sens["2"].extra and sens["2"].extra["activation_numel"] == 16


def test_qbert_mean_plus_std_over_batches():
    model, data = convnet(), batches((30, 30))
    sens = hessian_sensitivity(model, data, rtol=0.5, max_samples=10, eigenvalues=False, qbert=True, eig_max_iter=3000, eig_tol=1e-10)
    for i, (x, y) in enumerate(data):
        exact = exact_block_hessians(model, [(x, y)])
        for layer, h in exact.items():
            assert sens[layer].extra["qbert_eigenvalues"][i] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-3)
    for rec in sens.values():
        lam = torch.tensor(rec.extra["qbert_eigenvalues"])
        assert rec.extra["qbert"] == pytest.approx(float(lam.mean().abs() + lam.std(unbiased=False)))


def test_spectral_density_matches_spectrum():
    model, data = mlp(), batches((60,))
    h = exact_block_hessians(model, data)["4"]
    ev = torch.linalg.eigvalsh(h)
    dens = spectral_density(model, data, layer="4", iters=h.shape[0], n_v=1)
    # full Lanczos on a 192-dim block: Ritz values are the eigenvalues (extremes exactly)
    assert max(dens.eigenvalues[0]) == pytest.approx(float(ev[-1]), rel=1e-6)
    assert min(dens.eigenvalues[0]) == pytest.approx(float(ev[0]), rel=1e-4, abs=1e-8 * float(ev.abs().max()))
    assert sum(dens.weights[0]) == pytest.approx(1.0)
    grid, d = dens.density()
    assert float((d[:-1] * (grid[1:] - grid[:-1])).sum()) == pytest.approx(1.0, rel=0.05)
    # whole-model SLQ: its extreme Ritz value bounds the largest block eigenvalue from above
    whole = spectral_density(model, data, iters=30)
    assert max(whole.eigenvalues[0]) >= float(ev[-1]) * (1 - 1e-6)


def test_public_api_names():
    for name in ("hessian_sensitivity", "hessian_trace", "top_eigenvalues", "spectral_density"):
        assert callable(getattr(hessq, name))


def test_restores_training_mode_and_leaves_no_grads():
    model, data = mlp(), batches((20,))
    model.train()
    hessian_sensitivity(model, data, rtol=1.0, max_samples=3, eig_max_iter=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
