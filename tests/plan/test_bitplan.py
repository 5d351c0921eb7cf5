"""BitPlan JSON, the Pareto frontier, and the `hessq plan` command."""

import json

import pytest

from tests._models import SHAPE, make_sensitivity
from hessq.plan import BitPlan, ParetoFrontier, pareto_frontier, plan_bits


def test_json_round_trip(tiny, tiny_sens, tmp_path):
    plan = plan_bits(tiny, tiny_sens, weight_bits=(2, 4, 8), size_limit="50%", input_shape=SHAPE)
    back = BitPlan.from_json(plan.to_json())
    assert back == plan and list(back) == list(plan)
    assert back.totals() == pytest.approx(plan.totals())
    assert back.limits == plan.limits and back.signature == plan.signature and back.act_bits == 8
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    loaded = BitPlan.load(path)
    assert loaded == plan and loaded.layers == plan.layers
    assert not list(path.parent.glob(".*.tmp"))
    loaded.check_model(tiny)
    from hessq.models import resnet20

    with pytest.raises(ValueError, match="another model"):
        loaded.check_model(resnet20())
    # plain bits, no figures: totals unknown
    bare = BitPlan({"a": 4, "b": 8}, act_bits=4)
    assert bare.size_bytes is None and bare.average_bits is None
    assert BitPlan.from_json(bare.to_json()) == bare
    with pytest.raises(ValueError, match="not a hessq bit plan"):
        BitPlan.from_json(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="from 2 to 8"):
        BitPlan({"a": 9})
    (tmp_path / "bad.json").write_text('{"format": "hessq.bit')
    with pytest.raises(ValueError, match="not valid JSON"):
        BitPlan.load(tmp_path / "bad.json")
    table = plan.table()
    assert table.count("\n") == len(plan) + 3 and "| c2 |" in table


def test_average_bits_weights_by_parameters(tiny, tiny_sens):
    plan = plan_bits(tiny, tiny_sens, weight_bits=(2, 8), size_limit="50%", input_shape=SHAPE)
    n = {k: d["num_params"] for k, d in plan.layers.items()}
    assert plan.average_bits == pytest.approx(sum(plan[k] * n[k] for k in plan) / sum(n.values()))


def test_pareto_frontier(tiny, tiny_sens, tmp_path):
    front = pareto_frontier(tiny, tiny_sens, weight_bits=(2, 3, 4, 8), num_points=30, input_shape=SHAPE)
    sizes = [p.size_bytes for p in front]
    omegas = [p.omega for p in front]
    assert len(front) >= 3
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(omegas, omegas[1:]))
    for p in front:
        assert p.size_bytes <= p.size_limit + 1e-9
        again = plan_bits(tiny, tiny_sens, weight_bits=(2, 3, 4, 8), size_limit=p.size_limit, input_shape=SHAPE)
        assert again.omega == pytest.approx(p.omega)
    # ends: all-lowest and all-highest (first/last pinned at 8)
    assert set(front[0].plan[n] for n in ("c1", "c2", "shortcut.0")) == {2}
    assert set(front[-1].plan.values()) == {8}
    assert front.best_under(front[2].size_bytes).omega == front[2].omega
    front.save(tmp_path / "front.json")
    back = ParetoFrontier.load(tmp_path / "front.json")
    assert [p.plan for p in back] == [p.plan for p in front]
    with pytest.raises(ValueError, match="num_points"):
        pareto_frontier(tiny, tiny_sens, num_points=1, input_shape=SHAPE)


def test_cli_plan_writes_plan_and_table(tmp_path, capsys):
    from hessq.cli import main
    from hessq.models import resnet20

    import torch

    model = resnet20()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    make_sensitivity(model).save(tmp_path / "sens.json")
    out, table = tmp_path / "plan.json", tmp_path / "plan.md"
    args = ["plan", str(tmp_path / "sens.json"), "--model", "hessq.models:resnet20", "--checkpoint",
            str(tmp_path / "w.pt"), "--weight-bits", "2,4,8", "--size-limit", "50%", "--pin", "layer1.0.conv1=2",
            "--tie", "layer1.1.conv1,layer1.2.conv1", "-o", str(out), "--table", str(table)]
    assert main(args) == 0
    plan = BitPlan.load(out)
    assert plan["layer1.0.conv1"] == 2 and plan["layer1.1.conv1"] == plan["layer1.2.conv1"]
    assert plan["conv1"] == plan["fc"] == 8
    assert plan.size_bytes <= plan.limits["size"]
    assert table.read_text().startswith("| layer | bits |")
    assert "wrote" in capsys.readouterr().out
    # errors come back as exit code 1 with a message
    assert main(args[:6] + ["--size-limit", "10", "-o", str(out)]) == 1
    assert "smallest reachable" in capsys.readouterr().err
    other = make_sensitivity(resnet20(num_classes=5))
    other.save(tmp_path / "other.json")
    assert main(["plan", str(tmp_path / "other.json"), "--model", "hessq.models:resnet20", "-o", str(out)]) == 1
    assert "another model" in capsys.readouterr().err
