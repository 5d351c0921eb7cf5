"""The op registry: lookups, the normalising pass, and the quantized model's one integer program."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.data import digits
from hessq.graph import traced
from hessq.ops import QuantOp, families, family_for_kind, register, unregister


def test_every_family_executes_and_exports_the_kinds_it_declares():
    for family in families():
        if family.kinds:
            assert type(family).execute is not QuantOp.execute, family.name
            assert type(family).onnx is not QuantOp.onnx, family.name
        assert family_for_kind(family.kinds[0]) is family if family.kinds else True
    with pytest.raises(hessq.ConfigError, match="unknown integer op 'no_such_op'"):
        family_for_kind("no_such_op")


def test_a_family_name_or_kind_cannot_be_registered_twice():
    class Again(QuantOp):
        name = "relu"

    class StealsAKind(QuantOp):
        name = "steals"
        kinds = ("conv2d",)

    with pytest.raises(hessq.ConfigError, match="registered already"):
        register(Again)
    with pytest.raises(hessq.ConfigError, match="belong to another family"):
        register(StealsAKind)
    assert family_for_kind("conv2d").name == "conv2d"


class ManyForms(nn.Module):
    """The same ops written every way a user writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.act(self.conv(x))
        b = F.relu(a) + torch.relu(a).relu()
        b = torch.add(b, a.relu_())
        b = F.max_pool2d(self.pool(b), kernel_size=2)
        m = b.mean([2, 3]) + torch.mean(b, dim=(2, 3))
        return self.fc(m.view(m.size(0), -1))


def test_normalising_maps_every_form_to_one():
    torch.manual_seed(0)
    model = ManyForms().eval()
    gm = traced(model)
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    relus = [n for n in calls if "relu" in str(n.target)]
    assert len(relus) == 5 and all(n.op == "call_function" and n.target is F.relu for n in relus)
    pools = [n for n in calls if n.target is F.max_pool2d or n.target == "pool"]
    assert len(pools) == 2 and all(n.target is F.max_pool2d and n.kwargs["kernel_size"] == 2 for n in pools)
    means = [n for n in calls if n.target is torch.mean]
    assert len(means) == 2 and all(list(n.args[1]) == [2, 3] for n in means)
    adds = [n for n in calls if n.target in (operator.add, torch.add) and not isinstance(n.args[0], int)]
    assert all(n.target is operator.add for n in adds) and len(adds) == 3
    assert [n.target for n in calls if n.op == "call_module"] == ["conv", "fc"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(gm(x), model(x))


def test_eval_runs_the_integer_program_and_recompiles_when_weights_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    q = hessq.quantize(model, 8, digits("train", batch_size=32).take(2), pin_first_last=None)
    x = digits("test", batch_size=16).take(1)[0][0]
    first = q(x)
    assert torch.equal(first, hessq.to_integer(q)(x))
    ops_before = q.program()[0]
    assert q.program()[0] is ops_before  # cached while nothing changes
    with torch.no_grad():
        q.get_submodule("3").weight.mul_(-1)  # an in-place write, as an optimizer step does
    assert q.program()[0] is not ops_before
    assert torch.equal(q(x), hessq.to_integer(q)(x)) and not torch.equal(q(x), first)
    q.get_submodule("3").weight.data.mul_(-1)  # a write that bypasses the version counter
    assert torch.equal(q(x), first)
