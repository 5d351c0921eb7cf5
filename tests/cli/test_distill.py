import torch

from hessq.cli import main
from hessq.distill import DistilledData
from hessq.sensitivity import Sensitivity, is_kl_sensitivity


def test_hessq_distill_writes_inputs_and_kl_sensitivity(tmp_path, capsys):
    torch.set_num_threads(1)
    out, sens_path = tmp_path / "d.pt", tmp_path / "kl.json"
    rc = main(["distill", "--model", "resnet20", "-n", "6", "--batch-size", "3", "--steps", "3", "--no-progress",
               "--label-weight", "0.5", "-o", str(out), "--sensitivity", str(sens_path), "--weight-bits", "4,8"])
    assert rc == 0
    d = DistilledData.load(out)
    assert d.inputs.shape == (6, 1, 28, 28) and d.steps == 3 and d.meta["model"] == "resnet20"
    assert d.meta["label_weight"] == 0.5 and len(d.meta["targets"]) == 6
    sens = Sensitivity.load(sens_path)
    assert is_kl_sensitivity(sens) and len(sens) == 22
    assert set(sens["conv1"].extra["kl"]) == {"4", "8"}
    assert "statistics loss" in capsys.readouterr().out


def test_hessq_distill_bad_shape_is_a_clear_error(tmp_path, capsys):
    rc = main(["distill", "--model", "resnet20", "--input-shape", "3,28,28", "--steps", "1", "--no-progress",
               "-o", str(tmp_path / "d.pt")])
    assert rc == 1
    assert "does not fit" in capsys.readouterr().err
