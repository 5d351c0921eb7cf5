"""plan.json, pareto.json and latency.json are sealed; bad bits, limits, plans and calibration data are clear errors.

Every file test writes a real file (a plan from plan_bits on a tiny model, a frontier, a latency
table) and damages it; every value test hands in one mistake a user can make.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import hessq
from hessq import ArtifactError, ConfigError, InputDataError, ModelError
from hessq._io import save_sealed_json
from hessq.plan import BitPlan, LatencyTable, ParetoFrontier, pareto_frontier, plan_bits
from tests._models import SHAPE, TinyResNet, make_sensitivity
from tests._hostile import check_bit_flips

NAMES = ["conv1", "c1", "c2", "shortcut.0", "fc"]
KINDS = ("plan", "pareto", "latency")
CLASSES = {"plan": BitPlan, "pareto": ParetoFrontier, "latency": LatencyTable}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.fixture(scope="module")
def artefacts(tiny):
    """One real object of each kind."""
    sens = make_sensitivity(tiny)
    table = LatencyTable({n: {b: 1e-6 * (i + 1) * (1 + b / 4) for b in (2, 4, 8)} for i, n in enumerate(NAMES)},
                         {"runtime": "made up for the test"})
    return {
        "plan": plan_bits(tiny, sens, weight_bits=(2, 4, 8), size_limit="50%", latency_table=table, input_shape=SHAPE),
        "pareto": pareto_frontier(tiny, sens, weight_bits=(2, 4, 8), num_points=6, input_shape=SHAPE),
        "latency": table,
    }


def canonical(obj) -> str:
    return json.dumps(obj.to_dict(), sort_keys=True)


def save(obj, path):
    obj.save(path)
    return path


# --- sealed files ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_content(kind, artefacts, tmp_path):
    obj = artefacts[kind]
    back = CLASSES[kind].load(save(obj, tmp_path / f"{kind}.json"))
    assert canonical(back) == canonical(obj)
    assert canonical(CLASSES[kind].from_json(obj.to_json())) == canonical(obj)
    saved = json.loads((tmp_path / f"{kind}.json").read_text())
    assert saved["format"] == CLASSES[kind].FORMAT and saved["version"] == CLASSES[kind].VERSION
    assert len(saved["sha256"]) == 64


@pytest.mark.parametrize("kind", KINDS)
def test_one_flipped_bit_is_refused_or_harmless(kind, artefacts, tmp_path):
    """Before sealing, 67 (plan), 55 (pareto) and 103 (latency) of 200 flips loaded with changed content."""
    obj = artefacts[kind]
    good = save(obj, tmp_path / f"{kind}.json").read_bytes()
    expected = canonical(obj)
    refused = check_bit_flips(good, tmp_path / f"flipped-{kind}.json", CLASSES[kind].load,
                              lambda loaded: canonical(loaded) == expected)
    assert refused > 0


@pytest.mark.parametrize("kind", KINDS)
def test_future_and_older_versions_are_refused(kind, artefacts, tmp_path):
    cls = CLASSES[kind]
    content = artefacts[kind].to_dict()
    path = tmp_path / f"{kind}.json"
    save_sealed_json(path, {**content, "version": cls.VERSION + 1})
    with pytest.raises(ArtifactError, match=f"version {cls.VERSION + 1}, written by a newer hessq") as info:
        cls.load(path)
    assert str(path) in str(info.value) and "upgrade hessq" in str(info.value)
    # the unsealed layout of the hessq before this one (plan/pareto version 1, latency without a version)
    old = {k: v for k, v in content.items() if k != "version"}
    if kind != "latency":
        old["version"] = 1
    path.write_text(json.dumps(old))
    with pytest.raises(ArtifactError, match="version") as info:
        cls.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind, other", [(k, o) for k in KINDS for o in KINDS + ("sensitivity",) if o != k])
def test_a_file_of_another_kind_is_refused(kind, other, artefacts, tmp_path, tiny):
    path = tmp_path / f"{other}.json"
    if other == "sensitivity":
        make_sensitivity(tiny).save(path)
    else:
        artefacts[other].save(path)
    with pytest.raises(ArtifactError, match=f"not a hessq {CLASSES[kind].WHAT}") as info:
        CLASSES[kind].load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_without_checksum_is_refused(kind, artefacts, tmp_path):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(artefacts[kind].to_dict(), indent=2))  # format and version right, no sha256
    with pytest.raises(ArtifactError, match="no checksum") as info:
        CLASSES[kind].load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ArtifactError, match="no checksum"):
        CLASSES[kind].from_json(path.read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_unreadable_files_are_refused(kind, artefacts, tmp_path):
    good = save(artefacts[kind], tmp_path / "good.json").read_bytes()
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "garbage": bytes(range(256)),
        "a list": b"[1, 2, 3]",
        "a number": b"42",
        "edited": good.replace(b'"format"', b'"format" ', 1).replace(b"e-0", b"e-1", 1).replace(b": 8", b": 4", 1),
    }
    for label, data in cases.items():
        path = tmp_path / f"{label}.json"
        path.write_bytes(data)
        with pytest.raises(ArtifactError) as info:
            CLASSES[kind].load(path)
        assert str(path) in str(info.value), label
    with pytest.raises(ArtifactError, match="directory"):
        CLASSES[kind].load(tmp_path)
    with pytest.raises(FileNotFoundError):
        CLASSES[kind].load(tmp_path / "missing.json")


WRONG_STRUCTURE = {
    "plan": [
        ("no bits", lambda c: {k: v for k, v in c.items() if k != "bits"}),
        ("bits a list", lambda c: {**c, "bits": [4, 8]}),
        ("bits as strings", lambda c: {**c, "bits": {n: str(b) for n, b in c["bits"].items()}}),
        ("fractional bits", lambda c: {**c, "bits": {**c["bits"], "c1": 4.5}}),
        ("bool bits", lambda c: {**c, "bits": {**c["bits"], "c1": True}}),
        ("act_bits a string", lambda c: {**c, "act_bits": "8"}),
        ("a layer row not a mapping", lambda c: {**c, "layers": {**c["layers"], "c1": 5}}),
        ("layers a list", lambda c: {**c, "layers": [1, 2]}),
        ("a figure a string", lambda c: {**c, "layers": {**c["layers"], "c1": {**c["layers"]["c1"], "size_bytes": "x"}}}),
        ("a shape a string", lambda c: {**c, "signature": {**c["signature"], "c1": "8x4x3x3"}}),
        ("limits a list", lambda c: {**c, "limits": [1.0]}),
        ("a limit a string", lambda c: {**c, "limits": {"size": "big"}}),
        ("meta a list", lambda c: {**c, "meta": [1]}),
    ],
    "pareto": [
        ("no points", lambda c: {k: v for k, v in c.items() if k != "points"}),
        ("points a mapping", lambda c: {**c, "points": {"0": c["points"][0]}}),
        ("a point a number", lambda c: {**c, "points": [3] + c["points"][1:]}),
        ("a point without its plan", lambda c: {**c, "points": [{k: v for k, v in c["points"][0].items() if k != "plan"}]}),
        ("omega a string", lambda c: {**c, "points": [{**c["points"][0], "omega": "small"}]}),
        ("a point's plan with bad bits", lambda c: {**c, "points": [
            {**c["points"][0], "plan": {**c["points"][0]["plan"], "bits": {"c1": "four"}}}]}),
        ("meta a string", lambda c: {**c, "meta": "x"}),
    ],
    "latency": [
        ("no layers", lambda c: {k: v for k, v in c.items() if k != "layers"}),
        ("layers a list", lambda c: {**c, "layers": [1.0]}),
        ("a row not a mapping", lambda c: {**c, "layers": {**c["layers"], "c1": 1e-6}}),
        ("bits not a number", lambda c: {**c, "layers": {**c["layers"], "c1": {"four": 1e-6}}}),
        ("fractional bits", lambda c: {**c, "layers": {**c["layers"], "c1": {"4.5": 1e-6}}}),
        ("seconds a string", lambda c: {**c, "layers": {**c["layers"], "c1": {"4": "fast"}}}),
        ("negative seconds", lambda c: {**c, "layers": {**c["layers"], "c1": {"4": -1e-6}}}),
        ("seconds a bool", lambda c: {**c, "layers": {**c["layers"], "c1": {"4": True}}}),
        ("meta a list", lambda c: {**c, "meta": []}),
    ],
}


@pytest.mark.parametrize("kind", KINDS)
def test_sealed_json_of_the_wrong_structure_is_an_artifact_error_naming_the_file(kind, artefacts, tmp_path):
    content = artefacts[kind].to_dict()
    for label, edit in WRONG_STRUCTURE[kind]:
        path = tmp_path / f"{label}.json"
        save_sealed_json(path, edit(content))  # a correct seal around wrong content
        with pytest.raises(ArtifactError) as info:
            CLASSES[kind].load(path)
        assert str(path) in str(info.value), label


def test_in_memory_dicts_and_plain_latency_mappings(artefacts, tiny):
    table = artefacts["latency"]
    bare = {n: dict(table[n]) for n in table}
    assert LatencyTable(bare, table.meta) == LatencyTable.from_dict(table.to_dict())
    with pytest.raises(ConfigError, match="not a hessq latency table"):
        LatencyTable.from_dict(bare)  # a bare mapping is not the file form
    with pytest.raises(ConfigError, match="version 0 is not supported"):
        LatencyTable.from_dict({**table.to_dict(), "version": 0})
    # a plain mapping still works as latency_table=, and gives the same plan as the table
    sens = make_sensitivity(tiny)
    kw = dict(weight_bits=(2, 4, 8), latency_limit="50%", input_shape=SHAPE)
    assert dict(plan_bits(tiny, sens, latency_table=bare, **kw)) == dict(plan_bits(tiny, sens, latency_table=table, **kw))
    # from_dict of a dict that carries a checksum checks it
    sealed = json.loads(artefacts["plan"].to_json())
    assert BitPlan.from_dict(sealed) == artefacts["plan"]
    sealed["bits"]["c1"] = 2 if sealed["bits"]["c1"] != 2 else 4
    with pytest.raises(ConfigError, match="checksum"):
        BitPlan.from_dict(sealed)
    with pytest.raises(ConfigError, match="no 'bits'"):
        BitPlan.from_dict({"format": "hessq.bitplan", "version": BitPlan.VERSION})
    for bad in ({"c1": {4: "x"}}, {"c1": {4.5: 1e-6}}, {"c1": {4: float("nan")}}, {"c1": [1e-6]}, [("c1", {4: 1.0})]):
        with pytest.raises(ConfigError):
            LatencyTable(bad)


def test_an_unsealed_latency_file_given_to_the_planner_is_refused(artefacts, tiny, tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({n: {str(b): s for b, s in artefacts["latency"][n].items()} for n in NAMES}))
    with pytest.raises(ArtifactError, match=re.escape(str(path))):
        plan_bits(tiny, make_sensitivity(tiny), latency_table=str(path), latency_limit="50%", input_shape=SHAPE)
    artefacts["latency"].save(path)
    plan = plan_bits(tiny, make_sensitivity(tiny), latency_table=path, latency_limit="50%", input_shape=SHAPE)
    assert plan.latency <= plan.limits["latency"]


# --- bit values --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4.5, 4.0, True, False, "4", float("nan"), math.inf, 1, 9, 0, -4, 16, [4], (4, 8)])
def test_bitplan_refuses_bits_that_are_not_2_to_8(bits):
    with pytest.raises(ConfigError, match="'conv1': weight bits must be an integer from 2 to 8"):
        BitPlan({"conv1": bits, "fc": 8})


@pytest.mark.parametrize("act_bits", [6, 2, 32, 8.0, True, "8", None, -8])
def test_bitplan_refuses_activation_bits_not_4_8_16(act_bits):
    with pytest.raises(ConfigError, match="bit plan act_bits: activation bit width"):
        BitPlan({"conv1": 8}, act_bits=act_bits)


def test_bitplan_none_keeps_a_layer_float_and_refuses_non_mappings(tiny):
    plan = BitPlan({"conv1": 8, "c1": None, "c2": 4, "shortcut.0": 4, "fc": 8})
    assert plan["c1"] is None and BitPlan.from_json(plan.to_json()) == plan
    q = hessq.quantize(tiny, plan, [torch.randn(4, *SHAPE)])
    assert q.layer_bits["c1"] is None and q.layer_bits["c2"] == (4, 8)
    assert "| c1 | float |" in plan.table()
    with pytest.raises(ConfigError, match="must map layer names"):
        BitPlan([("conv1", 8)])
    with pytest.raises(ConfigError, match="must map layer names"):
        BitPlan(None)


# --- a plan for another model -------------------------------------------------------------


class Wider(TinyResNet):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 8, 5, stride=2, padding=2, bias=False)  # 5×5 instead of 3×3
        self.fc = nn.Linear(8, 10)


class Shorter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(torch.relu(self.conv1(x))), 1))


def test_a_plan_for_another_model_is_refused_naming_the_layers(tiny):
    calib = [torch.randn(4, *SHAPE)]
    wider = Wider().eval()
    plan = plan_bits(wider, make_sensitivity(wider), weight_bits=(4, 8), size_limit="50%", input_shape=SHAPE)
    with pytest.raises(ModelError, match=r"other weight shapes \(c1: plan \[8, 4, 5, 5\], model \[8, 4, 3, 3\], "
                                         r"fc: plan \[10, 8\], model \[3, 8\]\)") as info:
        hessq.quantize(tiny, plan, calib)
    assert "Re-plan for this model" in str(info.value)
    # another set of layers: the message names those missing and those extra
    with pytest.raises(ModelError, match=r"model does not have \['head'\].*the plan lacks \['c1', 'c2', 'shortcut.0', 'fc'\]"):
        hessq.quantize(tiny, plan_bits(Shorter(), make_sensitivity(Shorter()), input_shape=SHAPE), calib)
    # a plan saved, loaded and applied to the wrong model: the same
    with pytest.raises(ModelError, match="made for another model"):
        BitPlan.from_json(plan.to_json()).check_model(tiny)
    # a hand-written mapping naming layers the model does not have
    with pytest.raises(ModelError, match=r"names 1 layer\(s\) the model does not have: \['head'\].*re-plan"):
        hessq.quantize(tiny, {**{n: 8 for n in NAMES}, "head": 4}, calib)
    with pytest.raises(ModelError, match="does not have"):
        hessq.quantize(tiny, BitPlan({**{n: 8 for n in NAMES}, "layer9": 4}), calib)
    # the right model passes
    right = plan_bits(tiny, make_sensitivity(tiny), weight_bits=(4, 8), size_limit="50%", input_shape=SHAPE)
    assert hessq.quantize(tiny, right, calib).layer_bits["c1"][0] == right["c1"]


# --- plan_bits and pareto_frontier arguments ----------------------------------------------


BAD_WEIGHT_BITS = [
    ((), "empty"),
    ((4, 4, 8), "lists 4 more than once"),
    ([8, 2, 8, 2], "lists 2, 8 more than once"),
    ((1, 4), "from 2 to 8"),
    ((4, 9), "from 2 to 8"),
    ((4, 16), "from 2 to 8"),
    ((4.0, 8), "from 2 to 8"),
    (("4", "8"), "from 2 to 8"),
    ((True, 4), "from 2 to 8"),
    ("48", "got the string '48'"),
    (None, "bit width or a list"),
]


def test_bad_weight_bits(tiny):
    sens = make_sensitivity(tiny)
    for weight_bits, message in BAD_WEIGHT_BITS:
        with pytest.raises(ConfigError, match=message):
            plan_bits(tiny, sens, weight_bits=weight_bits, input_shape=SHAPE)
        with pytest.raises(ConfigError, match=message):
            pareto_frontier(tiny, sens, weight_bits=weight_bits, num_points=3, input_shape=SHAPE)


BAD_LIMITS = [
    (-5, "must not be negative"),
    (-0.5, "must not be negative"),
    ("-1e3", "must not be negative"),
    (float("nan"), "must be finite"),
    (math.inf, "must be finite"),
    ("nan", "must be finite"),
    ("150%", r"percentage in \(0%, 100%\]"),
    ("-5%", r"percentage in \(0%, 100%\]"),
    ("0%", r"percentage in \(0%, 100%\]"),
    ("abc", "percentage like '50%'"),
    ("%", "percentage like '50%'"),
    ("50 %%", "percentage like '50%'"),
    (True, "must be a number"),
    ([100], "must be a number"),
]


def test_bad_limits_and_num_points(tiny):
    sens = make_sensitivity(tiny)
    for limit, message in BAD_LIMITS:
        with pytest.raises(ConfigError, match=f"size_limit.*{message}"):
            plan_bits(tiny, sens, size_limit=limit, input_shape=SHAPE)
        with pytest.raises(ConfigError, match=f"bops_limit.*{message}"):
            pareto_frontier(tiny, sens, bops_limit=limit, num_points=3, input_shape=SHAPE)
    for num_points in (0, 1, -4, 2.5, True, "10", None):
        with pytest.raises(ConfigError, match="num_points must be an integer"):
            pareto_frontier(tiny, sens, num_points=num_points, input_shape=SHAPE)


def test_bad_pins_ties_models_and_sensitivities(tiny):
    sens = make_sensitivity(tiny)
    for kw, message in [
        (dict(pins={"shortcut.1": 4}), r"unknown layer name\(s\) in pins: 'shortcut.1' \(did you mean 'shortcut.0'"),
        (dict(pins={"c1": 4.5}), "from 2 to 8"),
        (dict(pins={"c1": True}), "from 2 to 8"),
        (dict(pins=[("c1", 4)]), "pins must map layer names"),
        (dict(ties=[["c1", "fc9"]]), r"unknown layer name\(s\) in ties: 'fc9'"),
        (dict(ties=["c1"]), "list of layer names"),
        (dict(pin_first_last=True), "from 2 to 8"),
        (dict(act_bits=6), "activation bit width"),
    ]:
        for planner in (plan_bits, pareto_frontier):
            with pytest.raises(ConfigError, match=message):
                planner(tiny, sens, input_shape=SHAPE, **kw)
    from hessq.models import resnet20

    with pytest.raises(ModelError, match="another model"):
        plan_bits(tiny, make_sensitivity(resnet20()), input_shape=SHAPE)
    with pytest.raises(ModelError, match="another model"):
        pareto_frontier(tiny, make_sensitivity(Wider()), num_points=3, input_shape=SHAPE)
    with pytest.raises(ConfigError, match="must be a torch.nn.Module"):
        plan_bits("tiny", sens, input_shape=SHAPE)
    broken = TinyResNet()
    with torch.no_grad():
        broken.c2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN or infinite values in 'c2.weight'"):
        plan_bits(broken, make_sensitivity(broken), input_shape=SHAPE)


# --- quantize: model and calibration data --------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_quantize_refuses_unusable_models(tiny):
    calib = [torch.randn(4, *SHAPE)]
    with pytest.raises(ConfigError, match="must be a torch.nn.Module, got str"):
        hessq.quantize("resnet20", 8, calib)
    with pytest.raises(ConfigError, match="must be a torch.nn.Module, got OrderedDict"):
        hessq.quantize(tiny.state_dict(), 8, calib)
    with torch.device("meta"):
        meta = TinyResNet()
    with pytest.raises(ModelError, match="meta device"):
        hessq.quantize(meta, 8, calib)
    broken = TinyResNet()
    with torch.no_grad():
        broken.bn1.running_var[0] = float("inf")
    with pytest.raises(ModelError, match="NaN or infinite values in 'bn1.running_var'"):
        hessq.quantize(broken, 8, calib)


def test_quantize_refuses_one_shot_and_empty_calibration_data(tiny):
    batches = [torch.randn(4, *SHAPE) for _ in range(2)]
    for one_shot in (iter(batches), (b for b in batches), map(lambda b: b, batches)):
        with pytest.raises(InputDataError, match="one-shot iterator.*list"):
            hessq.quantize(tiny, 8, one_shot)
    for empty in ([], (), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, *SHAPE)))):
        with pytest.raises(InputDataError, match="at least one batch"):
            hessq.quantize(tiny, 8, empty)
    with pytest.raises(InputDataError, match="iterable of batches"):
        hessq.quantize(tiny, 8, 5)
    # a DataLoader (re-iterable) is fine
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, *SHAPE)), batch_size=4)
    assert hessq.quantize(tiny, 8, loader).input_shape == SHAPE


@pytest.mark.parametrize("x, message", [
    (torch.zeros(4, *SHAPE, dtype=torch.uint8), "raw uint8 pixels"),
    (torch.zeros(4, *SHAPE, dtype=torch.float64), r"torch.float64.*x.to\(torch.float32\)"),
    (torch.zeros(4, *SHAPE, dtype=torch.float16), r"torch.float16.*x.to\(torch.float32\)"),
    (torch.zeros(4, *SHAPE, dtype=torch.bool), "torch.bool"),
    (torch.full((4, *SHAPE), float("nan")), r"NaN or infinite values \(256 of 256\)"),
    (torch.randn(4, *SHAPE).index_fill_(0, torch.tensor([2]), float("inf")), r"NaN or infinite values \(64 of 256\)"),
    ("not a tensor", "must be a tensor"),
])
def test_quantize_refuses_calibration_inputs_of_the_wrong_dtype_or_values(x, message, tiny):
    with pytest.raises(InputDataError, match=f"calibration batch 1 inputs .*{message}"):
        hessq.quantize(tiny, 8, [torch.randn(4, *SHAPE), (x, torch.zeros(4))])


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 8, 8), (4, 1, 2, 2, 2)])
def test_quantize_names_the_shape_given_and_expected_for_a_conv_net(shape, tiny):
    with pytest.raises(InputDataError, match=rf"inputs of shape \({', '.join(map(str, shape))}\); its first layer "
                                             r"'conv1' takes \(batch, 1, H, W\)"):
        hessq.quantize(tiny, 8, [torch.randn(*shape)])


@pytest.mark.parametrize("shape", [(4, 10), (4, 1, 28, 28)])
def test_quantize_names_the_shape_given_and_expected_for_an_mlp(shape):
    with pytest.raises(InputDataError, match=rf"inputs of shape \({', '.join(map(str, shape))}\); its first layer "
                                             r"'fc1' takes \(batch, \.\.\., 16\)"):
        hessq.quantize(MLP(), 8, [(torch.randn(*shape), torch.zeros(4))])
