"""A Hessian sensitivity saves to JSON and loads back unchanged."""

from __future__ import annotations

from hessq.sensitivity import Sensitivity, hessian_sensitivity

from ._models import batches, mlp


def test_json_round_trip(tmp_path):
    model = mlp()
    sens = hessian_sensitivity(model, batches((20,)), rtol=1.0, max_samples=4, top_k=2, eig_max_iter=5, activations=True)
    path = tmp_path / "sens.json"
    sens.save(path)
    back = Sensitivity.load(path)
    assert back.to_dict() == sens.to_dict()
    assert list(back) == list(sens)
    for name, rec in sens.items():
        got = back[name]
        assert (got.trace, got.trace_stderr, got.top_eigenvalue, got.num_params) == (rec.trace, rec.trace_stderr, rec.top_eigenvalue, rec.num_params)
        assert got.mean_trace == rec.mean_trace
        assert len(got.extra["top_eigenvalues"]) == 2 and "activation_trace" in got.extra
    back.check_model(model)
    assert back.meta["samples"] == 4 and back.meta["seed"] == 0
