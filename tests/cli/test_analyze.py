"""`hessq analyze` writes a sensitivity.json that loads back."""

from __future__ import annotations

import pytest

from hessq.cli import main
from hessq.sensitivity import Sensitivity


@pytest.mark.slow  # loads Fashion-MNIST and runs ResNet-20's backward passes: tens of seconds on a shared CPU
def test_analyze_writes_sensitivity(tmp_path, capsys):
    out = tmp_path / "sensitivity.json"
    code = main(["analyze", "--batches", "2", "--batch-size", "4", "--max-samples", "2", "--min-samples", "2",
                 "--no-eigenvalues", "--no-progress", "--seed", "3", "-o", str(out)])
    assert code == 0
    sens = Sensitivity.load(out)
    assert len(sens) == 22 and sens.meta["num_data"] == 8 and sens.meta["seed"] == 3
    # ResNet-20 is piecewise linear: every trace is the exact Gauss-Newton one, converged whatever max_samples
    assert sens.meta["estimators"] == {"ggn-exact": 22} and sens.meta["converged"] and sens.meta["samples"] == 0
    assert all(r.top_eigenvalue is None for r in sens.values())
    assert "layer1.0.conv1" in capsys.readouterr().out


def test_analyze_bad_layer_is_a_clear_error(tmp_path, capsys):
    code = main(["analyze", "--random-init", "--batch-size", "2", "--layers", "nope", "--no-progress", "-o", str(tmp_path / "s.json")])
    assert code == 1
    assert "no quantizable layer named ['nope']" in capsys.readouterr().err
