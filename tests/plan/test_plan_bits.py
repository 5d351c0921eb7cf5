"""plan_bits on a small residual model: costs, Ω, ties, pins, limits, errors."""

import itertools
import json

import numpy as np
import pytest
import torch

from tests._models import SHAPE, TinyResNet, make_sensitivity
from hessq.graph import quantizable_layers
from hessq.plan import (
    BitPlan,
    InfeasibleLimitsError,
    LatencyTable,
    Relative,
    evaluate_plan,
    graph_facts,
    layer_costs,
    perturbations,
    plan_bits,
)
from hessq.quantizer._functional import quantization_error

NAMES = ["conv1", "c1", "c2", "shortcut.0", "fc"]


def test_names_and_residual_ties_found_by_fx(tiny):
    assert list(quantizable_layers(tiny)) == NAMES
    facts = graph_facts(tiny)
    assert facts.ties == [["c2", "shortcut.0"]]
    assert facts.bn_followed == {"conv1", "c1", "c2", "shortcut.0"}


def test_resnet20_ties_are_the_shortcut_convs_with_their_blocks():
    from hessq.models import resnet20

    assert graph_facts(resnet20()).ties == [
        ["layer2.0.conv2", "layer2.0.shortcut.0"],
        ["layer3.0.conv2", "layer3.0.shortcut.0"],
    ]


def test_cost_model(tiny):
    costs = layer_costs(tiny, input_shape=SHAPE, bias_layers=graph_facts(tiny).bn_followed)
    c = costs["conv1"]  # 4×1×3×3 weights, output 4×8×8, BN folded → int32 bias
    assert (c.num_params, c.out_channels, c.macs, c.has_bias) == (36, 4, 4 * 64 * 9, True)
    assert c.size_bytes(4) == 18 + 4 * 4 + 4 * 4
    assert c.size_bytes(3) == 14 + 32  # 108 bits round up to 14 bytes
    assert c.bops(4, 8) == 4 * 64 * 9 * 32
    assert costs["c1"].macs == 8 * 16 * 36  # stride 2: 4×4 outputs
    assert costs["fc"].macs == 24 and costs["fc"].has_bias
    # an example input with a batch gives per-example MACs
    batch = layer_costs(tiny, example_input=torch.zeros(5, *SHAPE))
    assert batch["c1"].macs == costs["c1"].macs
    with pytest.raises(ValueError, match="input_shape"):
        layer_costs(tiny, input_shape=(3, 8, 8))


def test_perturbation_is_mean_trace_times_quantization_error(tiny, tiny_sens):
    om = perturbations(tiny, tiny_sens, (2, 4, 8))
    for name, m in quantizable_layers(tiny).items():
        for b in (2, 4, 8):
            assert om[name][b] == pytest.approx(tiny_sens[name].mean_trace * quantization_error(m.weight, b))
        assert om[name][2] > om[name][4] > om[name][8]
    sens = make_sensitivity(tiny, eigen=True)
    eig = perturbations(tiny, sens, (4,), variant="eigenvalue")
    for name, m in quantizable_layers(tiny).items():
        lam = sens[name].top_eigenvalue / sens[name].num_params
        assert eig[name][4] == pytest.approx(lam * quantization_error(m.weight, 4))
    with pytest.raises(ValueError, match="no top eigenvalue"):
        perturbations(tiny, tiny_sens, (4,), variant="eigenvalue")


class _Table(torch.nn.Module):
    """A word table and a linear head: Ω of a table uses the table's own (row-clipped) quantizer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = torch.nn.Embedding(40, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.words(ids.long()).mean(1))


def test_perturbation_of_a_table_uses_its_row_clip():
    from hessq.ops.embedding import RowQuantizer

    model = _Table()
    sens = make_sensitivity(model, signature=False)
    om = perturbations(model, sens, (2, 4))
    w = model.words.weight.detach()
    for b in (2, 4):
        clipped = RowQuantizer(b).squared_error(w)
        assert om["words"][b] == pytest.approx(sens["words"].mean_trace * clipped)
        assert clipped <= quantization_error(w, b)  # the clip never rounds a row worse than max |w|
        assert om["head"][b] == pytest.approx(sens["head"].mean_trace * quantization_error(model.head.weight, b))
    assert RowQuantizer(2).squared_error(w) < 0.8 * quantization_error(w, 2)


def test_bert_embedding_tables_are_not_tied():
    # the word, position and token-type lookups meet at an add, each on its own grid: each keeps its own bits
    from tests._bert import tiny_bert

    model = tiny_bert()
    assert graph_facts(model).ties == []
    sens = make_sensitivity(model, signature=False)
    tables = [n for n in quantizable_layers(model) if "embeddings" in n]
    plan = plan_bits(model, sens, weight_bits=(2, 8), pins={tables[0]: 2}, pin_first_last=None)
    assert plan[tables[0]] == 2 and any(plan[t] == 8 for t in tables[1:])  # no limit: the free tables get 8


def test_stderr_margin_plans_on_an_upper_bound_of_each_trace(tiny):
    # c1's trace is estimated below zero, but within two standard errors of a large one: not "least sensitive"
    from hessq.sensitivity import LayerSensitivity, Sensitivity

    base = make_sensitivity(tiny)
    layers = {n: LayerSensitivity(trace=r.trace, trace_stderr=0.05 * abs(r.trace), top_eigenvalue=None,
                                  num_params=r.num_params) for n, r in base.items()}
    big = max(r.trace / r.num_params for r in base.values())
    n_c1 = layers["c1"].num_params
    layers["c1"] = LayerSensitivity(trace=-0.1 * big * n_c1, trace_stderr=big * n_c1, top_eigenvalue=None, num_params=n_c1)
    sens = Sensitivity(layers, base.signature, {})
    w = quantizable_layers(tiny)["c1"].weight
    with pytest.warns(UserWarning, match="non-positive trace"):  # at margin 0 the estimate itself is used
        om0 = perturbations(tiny, sens, (4,), stderr_margin=0)
    om2 = perturbations(tiny, sens, (4,))  # the default margin: 2 standard errors
    assert om2["c1"][4] == pytest.approx(1.9 * big * quantization_error(w, 4))
    assert om0["c1"][4] < om2["c1"][4]
    for name, r in layers.items():
        if name != "c1":
            m = quantizable_layers(tiny)[name]
            assert om2[name][4] == pytest.approx(1.1 * r.trace / r.num_params * quantization_error(m.weight, 4))
    # room for all at 8 bits but c1 at 2: the estimate gives c1 the 2 bits, the upper bound gives them elsewhere
    limit = evaluate_plan(tiny, {n: 2 if n == "c1" else 8 for n in layers}).size_bytes
    with pytest.warns(UserWarning, match="non-positive trace"):
        low = plan_bits(tiny, sens, weight_bits=(2, 8), size_limit=limit, pin_first_last=None, auto_ties=False,
                        stderr_margin=0)
    high = plan_bits(tiny, sens, weight_bits=(2, 8), size_limit=limit, pin_first_last=None, auto_ties=False)
    assert low["c1"] == 2 and high["c1"] == 8 and high.meta["stderr_margin"] == 2.0
    with pytest.raises(ValueError, match="stderr_margin"):
        plan_bits(tiny, sens, weight_bits=(2, 8), stderr_margin=-1)


def brute_best(tiny, sens, bits, pins, ties, limits, act_bits=8, latency_table=None):
    """The least-Ω assignment meeting the limits, by enumerating evaluate_plan over all of them."""
    best = None
    for combo in itertools.product(bits, repeat=len(NAMES)):
        assign = dict(zip(NAMES, combo))
        if any(assign[n] != b for n, b in pins.items()):
            continue
        if any(len({assign[n] for n in t}) > 1 for t in ties):
            continue
        p = evaluate_plan(tiny, assign, sens, act_bits=act_bits, input_shape=SHAPE, latency_table=latency_table)
        totals = {"size": p.size_bytes, "bops": p.bops, "latency": p.latency}
        if all(totals[k] <= v for k, v in limits.items()) and (best is None or p.omega < best.omega):
            best = p
    return best


def test_plan_bits_equals_brute_force_with_ties_pins_and_three_limits(tiny):
    lat = LatencyTable({n: {b: 1e-6 * (i + 1) * (1 + b / 4) for b in (2, 4, 8)} for i, n in enumerate(NAMES)})
    rng = np.random.default_rng(0)
    for seed in range(4):
        sens = make_sensitivity(tiny, seed=seed)
        fractions = rng.uniform(0.2, 0.9, 3)
        plan = plan_bits(tiny, sens, weight_bits=(2, 4, 8), size_limit=Relative(fractions[0]),
                         bops_limit=Relative(fractions[1]), latency_limit=Relative(fractions[2]),
                         latency_table=lat, input_shape=SHAPE)
        size, bops, latency = plan.limits["size"], plan.limits["bops"], plan.limits["latency"]
        best = brute_best(tiny, sens, (2, 4, 8), {"conv1": 8, "fc": 8}, [["c2", "shortcut.0"]],
                          {"size": size, "bops": bops, "latency": latency}, latency_table=lat)
        assert best is not None
        assert plan.omega == pytest.approx(best.omega, rel=1e-9)
        assert plan.size_bytes <= size and plan.bops <= bops and plan.latency <= latency
        assert plan["c2"] == plan["shortcut.0"]
        assert plan["conv1"] == plan["fc"] == 8


def test_default_pins_and_configurable_pins(tiny, tiny_sens):
    tight = plan_bits(tiny, tiny_sens, weight_bits=(2, 3), size_limit="100%", input_shape=SHAPE)
    assert tight["conv1"] == tight["fc"] == 8  # pinned even though 8 is not a candidate
    assert all(tight[n] == 3 for n in ("c1", "c2", "shortcut.0"))
    free = plan_bits(tiny, tiny_sens, weight_bits=(2, 3), pin_first_last=None, input_shape=SHAPE)
    assert set(free.values()) == {3}
    four = plan_bits(tiny, tiny_sens, weight_bits=(2, 8), pin_first_last=4, pins={"c1": 2}, input_shape=SHAPE)
    assert (four["conv1"], four["fc"], four["c1"]) == (4, 4, 2)
    # a user pin on a tied layer moves its partner too
    tied = plan_bits(tiny, tiny_sens, weight_bits=(2, 8), pins={"shortcut.0": 2}, input_shape=SHAPE)
    assert tied["c2"] == tied["shortcut.0"] == 2
    with pytest.raises(ValueError, match="pinned to different bit widths"):
        plan_bits(tiny, tiny_sens, pins={"c2": 4, "shortcut.0": 8}, input_shape=SHAPE)


def test_user_ties_and_auto_ties_off(tiny, tiny_sens):
    # sizes such that c1 and c2 want different widths without a tie
    limit = "40%"
    untied = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 8), size_limit=limit, auto_ties=False, input_shape=SHAPE)
    tied = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 8), size_limit=limit, ties=[["c1", "fc"]],
                     pin_first_last=None, input_shape=SHAPE)
    assert tied["c1"] == tied["fc"] and tied["c2"] == tied["shortcut.0"]
    assert untied.omega <= tied.omega + 1e-12
    assert tied.meta["ties"] == [["c2", "shortcut.0"], ["c1", "fc"]]


def test_relative_limits_lie_between_all_lowest_and_all_highest(tiny, tiny_sens):
    low = evaluate_plan(tiny, {"conv1": 8, "c1": 2, "c2": 2, "shortcut.0": 2, "fc": 8}, input_shape=SHAPE)
    high = evaluate_plan(tiny, {"conv1": 8, "c1": 6, "c2": 6, "shortcut.0": 6, "fc": 8}, input_shape=SHAPE)
    for f in (0.25, 0.5, 0.75):
        plan = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 6), size_limit=Relative(f), input_shape=SHAPE)
        expected = low.size_bytes + f * (high.size_bytes - low.size_bytes)
        assert plan.limits["size"] == pytest.approx(expected)
        assert plan.size_bytes <= expected
        same = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 6), size_limit=f"{f * 100}%", input_shape=SHAPE)
        assert dict(same) == dict(plan)
    full = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 6), size_limit=Relative(1.0), bops_limit="100%",
                     input_shape=SHAPE)
    assert dict(full) == dict(high)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            Relative(bad)
    with pytest.raises(ValueError, match=r"percentage in \(0%, 100%\]"):
        plan_bits(tiny, tiny_sens, size_limit="150%", input_shape=SHAPE)
    with pytest.raises(ValueError, match="percentage"):
        plan_bits(tiny, tiny_sens, size_limit="half", input_shape=SHAPE)


def test_infeasible_limits_name_the_smallest_reachable_value(tiny, tiny_sens):
    low = evaluate_plan(tiny, {"conv1": 8, "c1": 4, "c2": 4, "shortcut.0": 4, "fc": 8}, input_shape=SHAPE)
    with pytest.raises(InfeasibleLimitsError) as info:
        plan_bits(tiny, tiny_sens, weight_bits=(4, 8), size_limit=low.size_bytes - 1, input_shape=SHAPE)
    assert info.value.minimum["size"] == low.size_bytes
    assert f"smallest reachable {low.size_bytes:,.0f} bytes" in str(info.value)
    assert isinstance(info.value, ValueError)
    # exactly the minimum is feasible
    at_min = plan_bits(tiny, tiny_sens, weight_bits=(4, 8), size_limit=low.size_bytes, input_shape=SHAPE)
    assert dict(at_min) == dict(low)
    with pytest.raises(InfeasibleLimitsError, match="BOPs") as info:
        plan_bits(tiny, tiny_sens, weight_bits=(4, 8), size_limit=1e9, bops_limit=10, input_shape=SHAPE)
    assert info.value.minimum["bops"] == low.bops


def test_unknown_names_and_bad_bits_are_clear_errors(tiny, tiny_sens):
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) in ties: 'shortcut.1' \(did you mean 'shortcut.0'"):
        plan_bits(tiny, tiny_sens, ties=[["c1", "shortcut.1"]], input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) in pins: 'layer9'"):
        plan_bits(tiny, tiny_sens, pins={"layer9": 4}, input_shape=SHAPE)
    with pytest.raises(TypeError, match="list of layer names"):
        plan_bits(tiny, tiny_sens, ties=["c1"], input_shape=SHAPE)
    for bad in ((1, 4), (4, 9), (4.0,), ("4",), ()):
        with pytest.raises(ValueError, match="bit width"):
            plan_bits(tiny, tiny_sens, weight_bits=bad, input_shape=SHAPE)
    with pytest.raises(ValueError, match="from 2 to 8"):
        plan_bits(tiny, tiny_sens, pins={"c1": 12}, input_shape=SHAPE)
    with pytest.raises(ValueError, match="from 2 to 8"):
        plan_bits(tiny, tiny_sens, pin_first_last=1, input_shape=SHAPE)
    with pytest.raises(ValueError, match="activation bit width"):
        plan_bits(tiny, tiny_sens, act_bits=6, input_shape=SHAPE)
    with pytest.raises(ValueError, match="latency_table"):
        plan_bits(tiny, tiny_sens, latency_limit=1.0, input_shape=SHAPE)
    partial = LatencyTable({n: {4: 1e-6} for n in NAMES})
    with pytest.raises(ValueError, match="no time for layer 'conv1' at 8 bits"):
        plan_bits(tiny, tiny_sens, weight_bits=(4, 8), latency_table=partial, input_shape=SHAPE)


def test_sensitivity_of_another_model_is_refused(tiny):
    from hessq.models import resnet20

    other = make_sensitivity(resnet20())
    with pytest.raises(ValueError, match="another model"):
        plan_bits(tiny, other, input_shape=SHAPE)
    # without a signature: the layer names/sizes still give it away
    unsigned = make_sensitivity(TinyResNet(), signature=False)
    wider = TinyResNet()
    wider.fc = torch.nn.Linear(8, 5)
    with pytest.raises(ValueError, match="another model"):
        plan_bits(wider, unsigned, input_shape=SHAPE)


def test_plan_is_deterministic_and_a_mapping_for_quantize(tiny, tiny_sens):
    a = plan_bits(tiny, tiny_sens, weight_bits=range(2, 9), size_limit="30%", bops_limit="60%", input_shape=SHAPE)
    b = plan_bits(tiny, tiny_sens, weight_bits=range(2, 9), size_limit="30%", bops_limit="60%", input_shape=SHAPE)
    assert a == b and a.to_json() != "" and list(a) == NAMES
    assert isinstance(a, BitPlan) and a.act_bits == 8
    from hessq.fakequant import quantize

    q = quantize(tiny, a, [torch.randn(4, *SHAPE)])
    assert torch.isfinite(q(torch.randn(2, *SHAPE))).all()
    applied = getattr(q, "layer_bits", None) or getattr(q, "hessq_layer_bits")
    assert {n: w for n, (w, _) in applied.items()} == dict(a)


def test_negative_traces_are_least_sensitive_with_a_warning(tiny):
    from hessq.sensitivity import LayerSensitivity, Sensitivity

    base = make_sensitivity(tiny)
    recs = dict(base)
    n = recs["c1"].num_params
    recs["c1"] = LayerSensitivity(-5.0 * n, 1.0, None, n)
    sens = Sensitivity(recs, base.signature)
    with pytest.warns(UserWarning, match=r"non-positive trace \(\['c1'\]\)"):
        om = perturbations(tiny, sens, (2, 4))
    assert 0 < om["c1"][4] < om["c1"][2] < min(om[k][4] for k in om if k != "c1")


def test_magnitude_curvature_takes_a_negative_trace_by_its_size(tiny):
    # c1 is measured strongly negative (ten times the largest positive per-weight trace, well beyond its error):
    # HAWQ's signed Ω makes it least sensitive; curvature="magnitude" plans on |Tr| + 2σ instead
    from hessq.sensitivity import LayerSensitivity, Sensitivity

    base = make_sensitivity(tiny)
    recs = dict(base)
    big = max(r.trace / r.num_params for r in base.values())
    n = recs["c1"].num_params
    recs["c1"] = LayerSensitivity(-10.0 * big * n, 0.5 * big * n, None, n)
    sens = Sensitivity(recs, base.signature)
    w = quantizable_layers(tiny)["c1"].weight
    with pytest.warns(UserWarning, match="non-positive trace"):
        signed = perturbations(tiny, sens, (2, 4))
    magnitude = perturbations(tiny, sens, (2, 4), curvature="magnitude")
    for b in (2, 4):
        assert magnitude["c1"][b] == pytest.approx((10.0 + 2 * 0.5) * big * quantization_error(w, b), rel=1e-9)
        assert signed["c1"][b] < magnitude["c1"][b]
        for other in NAMES[:1] + NAMES[2:]:  # positive traces: the magnitude is the trace, Ω unchanged
            assert magnitude[other][b] == signed[other][b]
    # room for all at 8 bits but one layer at 2: signed sends c1 there, magnitude keeps c1 at 8
    limit = evaluate_plan(tiny, {k: 2 if k == "c1" else 8 for k in NAMES}).size_bytes
    common = dict(weight_bits=(2, 8), size_limit=limit, pin_first_last=None, auto_ties=False)
    with pytest.warns(UserWarning, match="non-positive trace"):
        low = plan_bits(tiny, sens, **common)
    high = plan_bits(tiny, sens, **common, curvature="magnitude")
    assert low["c1"] == 2 and high["c1"] == 8
    assert high.meta["curvature"] == "magnitude" and "curvature" not in low.meta
    assert BitPlan.from_json(high.to_json()).meta["curvature"] == "magnitude"
    with pytest.raises(ValueError, match="curvature must be one of 'signed', 'magnitude'"):
        plan_bits(tiny, sens, **common, curvature="abs")


def test_magnitude_curvature_reaches_the_eigenvalue_variant(tiny):
    from hessq.sensitivity import LayerSensitivity, Sensitivity

    base = make_sensitivity(tiny)
    recs = {k: LayerSensitivity(r.trace, r.trace_stderr, r.trace / r.num_params, r.num_params) for k, r in base.items()}
    n = recs["c1"].num_params
    recs["c1"] = LayerSensitivity(recs["c1"].trace, 0.0, -3.0, n)
    sens = Sensitivity(recs, base.signature)
    w = quantizable_layers(tiny)["c1"].weight
    om = perturbations(tiny, sens, (4,), variant="eigenvalue", curvature="magnitude")
    assert om["c1"][4] == pytest.approx(3.0 / n * quantization_error(w, 4), rel=1e-9)
