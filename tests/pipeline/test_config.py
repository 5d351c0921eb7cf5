"""compress's config objects: checked when made, frozen, versioned, round-tripping through plain dicts;
the old flat keywords still work with a DeprecationWarning and give the same result."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import types
import warnings

import pytest
import torch

import hessq
from hessq.pipeline import CONFIG_ARGUMENTS, FLAT_OPTIONS, config_from_dict
from hessq.plan import LatencyTable, Relative
from tests.pipeline._tiny import digits_data, tiny_net

pytestmark = pytest.mark.filterwarnings("ignore:.*non-positive trace")

CONFIGS = [
    hessq.SensitivityConfig(method="kl", batches=2, rtol=0.1, max_samples=50, min_samples=5),
    hessq.PlanConfig(weight_bits=[2, 4, 8], act_bits=4, size_limit="40%", bops_limit=Relative(0.3), latency_limit=1e-3,
                     pin_first_last=None, pareto_points=0, latency_table=LatencyTable({"conv1": {4: 1e-5, 8: 2e-5}}),
                     measure_latency=False, latency_repeats=5, curvature="magnitude"),
    hessq.QuantizeConfig(calibration_batches=3, baselines=(8, (4, 4))),
    hessq.DistillConfig(num_samples=8, steps=10, lr=0.1, batch_size=4, input_range=(-1, 1), label_weight=0.5),
    hessq.FinetuneConfig(epochs=0.5, lr=0.001, max_steps=20, distill=False, checkpoint=False, resume=False),
    hessq.FinetuneConfig(optimizer="adamw", track_ranges=False, hidden_weight=2.5),
    hessq.ExportConfig(onnx_mode="fast", report=False),
]


@pytest.mark.parametrize("config", CONFIGS + [cls() for cls in CONFIG_ARGUMENTS.values()],
                         ids=lambda c: f"{type(c).__name__}")
def test_a_config_round_trips_through_a_json_dict(config):
    data = config.to_dict()
    assert data["kind"] == config.KIND and data["version"] == config.VERSION == 1
    again = json.loads(json.dumps(data))  # plain JSON: no tuples, no objects
    assert type(config).from_dict(again) == config
    assert config_from_dict(again) == config


def test_hidden_state_distillation_needs_the_teacher():
    with pytest.raises(hessq.ConfigError, match="distill is False: set distill=True, or hidden_weight=0"):
        hessq.FinetuneConfig(hidden_weight=1.0, distill=False)
    with pytest.raises(hessq.ConfigError, match="FinetuneConfig.hidden_weight must be a finite number >= 0"):
        hessq.FinetuneConfig(hidden_weight=-1)
    assert hessq.FinetuneConfig(hidden_weight=1).hidden_weight == 1.0


def test_values_are_normalised_when_a_config_is_made():
    plan = hessq.PlanConfig(weight_bits=[8, 4])
    assert plan.weight_bits == (4, 8)  # sorted tuple, as plan_bits takes it
    assert hessq.DistillConfig(input_range=[-1, 1]).input_range == (-1.0, 1.0)
    assert hessq.QuantizeConfig(baselines=[8, [4, 4]]).pairs(act_bits=8) == [(8, 8), (4, 4)]
    assert hessq.PlanConfig().limits == {"size_limit": "50%"}  # no limit: half way, the documented default
    assert hessq.PlanConfig(bops_limit="20%").limits == {"bops_limit": "20%"}


def test_a_config_is_frozen_and_replace_checks_its_changes():
    plan = hessq.PlanConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.act_bits = 4  # type: ignore[misc]
    assert plan.replace(act_bits=4).act_bits == 4 and plan.act_bits == 8
    with pytest.raises(hessq.ConfigError, match="PlanConfig.act_bits"):
        plan.replace(act_bits=5)
    with pytest.raises(hessq.ConfigError, match="'act_bit' \\(did you mean 'act_bits'\\?\\)"):
        plan.replace(act_bit=4)


@pytest.mark.parametrize("data, words", [
    ({"kind": "plan", "version": 1, "size_limt": "50%"}, "unknown key 'size_limt' (did you mean 'size_limit'?)"),
    ({"kind": "plan", "version": 2}, "version 2; this hessq reads version 1"),
    ({"kind": "distill", "version": 1}, "kind 'distill', not 'plan'"),
    ({"pareto_points": "40"}, "PlanConfig.pareto_points must be an integer >= 0, got str '40'"),
    ({"weight_bits": "48"}, "PlanConfig.weight_bits must be bit widths like (4, 8)"),
    ({"measure_latency": 1}, "PlanConfig.measure_latency must be True or False"),
    ({"curvature": "abs"}, "PlanConfig.curvature must be one of 'signed', 'magnitude', got 'abs'"),
    ({"size_limit": {"relative": 2.0}}, "relative limit must be a fraction in (0, 1]"),
    ([("act_bits", 8)], "takes a dict"),
])
def test_from_dict_refuses_what_it_cannot_read_naming_the_key(data, words):
    with pytest.raises(hessq.ConfigError) as err:
        hessq.PlanConfig.from_dict(data)
    assert words in str(err.value)


def test_config_from_dict_needs_a_known_kind():
    with pytest.raises(hessq.ConfigError, match="kind 'qat'; the kinds are sensitivity, plan"):
        config_from_dict({"kind": "qat", "version": 1})


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_the_configs_defaults_are_the_stage_functions_defaults():
    # The configs hold the pipeline's defaults; where a stage function has the same knob, they agree.
    distill = _defaults(hessq.distill_data)
    assert {k: distill[k] for k in ("steps", "lr", "batch_size", "label_weight", "input_range")} == {
        k: v for k, v in hessq.DistillConfig.defaults().items() if k != "num_samples"}
    hessian = _defaults(hessq.hessian_sensitivity)
    s = hessq.SensitivityConfig()
    assert (hessian["rtol"], hessian["max_samples"], hessian["min_samples"]) == (s.rtol, s.max_samples, s.min_samples)
    plan, p = _defaults(hessq.plan_bits), hessq.PlanConfig()
    assert (tuple(plan["weight_bits"]), plan["act_bits"], plan["pin_first_last"]) == (p.weight_bits, p.act_bits,
                                                                                     p.pin_first_last)
    assert _defaults(hessq.quantize)["pin_first_last"] == p.pin_first_last


def test_the_flat_keywords_map_to_real_config_fields():
    for old, (name, field) in FLAT_OPTIONS.items():
        assert field in CONFIG_ARGUMENTS[name].defaults(), old


# --- the old flat keywords: a DeprecationWarning, and the same run -------------------------------------


def _batches(n: int = 2) -> list:
    train = iter(digits_data()[0])
    return [next(train) for _ in range(n)]


def _same_run(a: hessq.CompressResult, b: hessq.CompressResult) -> None:
    assert dict(a.plan) == dict(b.plan)
    # repr: a KL sensitivity has NaN traces (nan != nan), its KL per bit width is in extra
    assert {n: (repr(r.trace), r.extra) for n, r in a.sensitivity.items()} == {
        n: (repr(r.trace), r.extra) for n, r in b.sensitivity.items()}
    x = _batches(1)[0][0]
    assert torch.equal(a.imodel(x), b.imodel(x))
    assert a.rows == b.rows
    assert a.configs == b.configs


def test_the_old_keywords_warn_with_the_new_spelling_and_give_the_same_result():
    model = tiny_net().eval()
    new = hessq.compress(
        model, _batches(), sensitivity=hessq.SensitivityConfig(max_samples=3, batches=2),
        plan=hessq.PlanConfig(size_limit="60%", weight_bits=(2, 4, 8), measure_latency=False, pareto_points=3),
        quantize=hessq.QuantizeConfig(calibration_batches=2, baselines=(4,)),
        finetune=hessq.FinetuneConfig(epochs=1, max_steps=2), progress=False)
    with pytest.warns(DeprecationWarning) as caught:
        old = hessq.compress(model, _batches(), max_samples=3, sensitivity_batches=2, size_limit="60%",
                             weight_bits=(2, 4, 8), measure_latency=False, pareto_points=3, calibration_batches=2,
                             baselines=(4,), finetune=hessq.FinetuneConfig(epochs=1, max_steps=2), progress=False)
    message = str(caught[0].message)
    assert "plan=PlanConfig(size_limit=..., weight_bits=..., measure_latency=..., pareto_points=...)" in message
    assert "sensitivity=SensitivityConfig(max_samples=..., batches=...)" in message
    assert "quantize=QuantizeConfig(calibration_batches=..., baselines=...)" in message
    assert caught[0].filename == __file__  # points at the caller's line
    _same_run(new, old)


def test_the_old_sensitivity_and_finetune_spellings_warn_and_still_work():
    model = tiny_net().eval()
    fast = dict(plan=hessq.PlanConfig(measure_latency=False, pareto_points=0),
                quantize=hessq.QuantizeConfig(baselines=(), calibration_batches=2), progress=False)
    new = hessq.compress(model, _batches(), sensitivity=hessq.SensitivityConfig(method="kl"), **fast)
    with pytest.warns(DeprecationWarning, match=r"sensitivity=SensitivityConfig\(method='kl'\)"):
        old = hessq.compress(model, _batches(), sensitivity="kl", finetune=False, **fast)
    _same_run(new, old)
    with pytest.warns(DeprecationWarning, match=r"finetune=FinetuneConfig\(\)"):
        hessq.pipeline.check_options(finetune=True)


def test_the_new_form_gives_no_warning_and_a_precomputed_sensitivity_is_used_as_it_is():
    model = tiny_net().eval()
    sens = hessq.hessian_sensitivity(model, _batches(1), max_samples=3, eigenvalues=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        result = hessq.compress(model, _batches(), sensitivity=sens, plan=hessq.PlanConfig(measure_latency=False),
                                quantize=hessq.QuantizeConfig(baselines=()), progress=False)
    assert result.sensitivity is sens and result.configs["sensitivity"] is None
    assert result.meta["sensitivity"] == "given (precomputed)"
    with pytest.raises(hessq.ConfigError, match="max_samples= set how a sensitivity is computed"):
        hessq.compress(model, _batches(), sensitivity=sens, max_samples=3)


# --- the public API ------------------------------------------------------------------------------------


def test_the_public_api_is_listed_and_no_name_shadows_a_sub_package():
    assert all(hasattr(hessq, name) for name in hessq.__all__)
    public = {n for n in dir(hessq) if not n.startswith("_") and not isinstance(getattr(hessq, n), types.ModuleType)}
    assert public <= set(hessq.__all__)
    for info in pkgutil.iter_modules(hessq.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"hessq.{info.name}")
        assert getattr(hessq, info.name) is module, f"hessq.{info.name} is not the sub-package"
    import hessq.fakequant as q

    assert isinstance(q, types.ModuleType) and q.quantize is hessq.quantize
