import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessq
from hessq.graph import fold_batchnorm, trace
from hessq.quantizer import WeightQuantizer
from hessq.sensitivity import Sensitivity, is_kl_sensitivity, kl_omega, kl_sensitivity


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.unused = nn.Linear(3, 3)  # never called: quantizing it cannot matter
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.2, 2.0)
                bn.weight.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _brute_force_kl(model, layer, bits, x):
    """Only ``layer`` quantized, the slow obvious way: a fresh traced-and-folded copy per evaluation."""
    gm = trace(model)
    gm.eval()
    fold_batchnorm(gm)
    with torch.no_grad():
        ref = F.log_softmax(gm(x), -1)
        m = dict(gm.named_modules())[layer]
        m.weight.copy_(WeightQuantizer(bits)(m.weight))
        out = F.log_softmax(gm(x), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_kl_matches_brute_force_and_behaves():
    model = BNNet()
    x1, x2 = torch.randn(6, 1, 8, 8), torch.randn(4, 1, 8, 8)
    sens = kl_sensitivity(model, [x1, (x2, torch.zeros(4))], weight_bits=(2, 4, 8), progress=False)
    assert list(sens) == ["conv1", "conv2", "unused", "fc"]
    assert is_kl_sensitivity(sens) and sens.meta["num_samples"] == 10
    x = torch.cat([x1, x2])
    for layer in ("conv1", "conv2", "fc"):
        kl = sens[layer].extra["kl"]
        for b in (2, 4, 8):
            assert kl[str(b)] == pytest.approx(_brute_force_kl(model, layer, b, x), rel=1e-4, abs=1e-6)
        assert kl["2"] > kl["4"] > kl["8"] >= 0
        assert math.isnan(sens[layer].trace)
    assert sens["unused"].extra["kl"] == {"2": 0.0, "4": 0.0, "8": 0.0}
    assert sens["conv2"].num_params == 8 * 9
    # The model itself is untouched.
    fresh = BNNet()
    for (k, v), (_, w) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(v, w), k


def test_kl_roundtrip_and_omega(tmp_path):
    model = BNNet()
    sens = kl_sensitivity(model, [torch.randn(4, 1, 8, 8)], weight_bits=(4, 8), progress=False)
    sens.save(tmp_path / "kl.json")
    back = Sensitivity.load(tmp_path / "kl.json")
    assert is_kl_sensitivity(back)
    omega = kl_omega(back)
    assert omega["conv1"] == {4: sens["conv1"].extra["kl"]["4"], 8: sens["conv1"].extra["kl"]["8"]}
    with pytest.raises(ValueError, match="no KL sensitivity"):
        kl_omega({"conv1": hessq.LayerSensitivity(1.0, 0.1, None, 8)})
    with pytest.raises(ValueError, match="at least one batch"):
        kl_sensitivity(model, [], progress=False)


def test_planner_uses_kl_as_omega(pretrained_resnet20):
    """A data-free plan: distilled inputs -> KL sensitivity -> ILP; the most KL-sensitive layers keep 8 bits."""
    torch.set_num_threads(1)
    model = pretrained_resnet20
    d = hessq.distill_data(model, 16, (1, 28, 28), steps=20, batch_size=16, progress=False)
    sens = kl_sensitivity(model, d, weight_bits=(4, 8), progress=False)
    plan = hessq.plan_bits(model, sens, weight_bits=(4, 8), size_limit="50%")
    assert set(plan.values()) == {4, 8}
    assert plan.omega == pytest.approx(sum(sens[n].extra["kl"][str(plan[n])] for n in plan), rel=1e-9)
    # Ω handed over directly gives the same plan.
    same = hessq.plan_bits(model, None, weight_bits=(4, 8), size_limit="50%", omega=kl_omega(sens))
    assert dict(same) == dict(plan)
    # Against the same-size plan with the sensitivities reversed, the KL plan has a lower total KL.
    names = list(sens)
    order = sorted(names, key=lambda n: sens[n].extra["kl"]["4"] - sens[n].extra["kl"]["8"])
    flipped = {a: kl_omega(sens)[b] for a, b in zip(order, reversed(order))}
    worse = hessq.plan_bits(model, None, weight_bits=(4, 8), size_limit="50%", omega=flipped)
    assert plan.omega < sum(sens[n].extra["kl"][str(worse[n])] for n in names)
