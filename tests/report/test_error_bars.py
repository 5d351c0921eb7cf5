"""The report draws each layer's trace with its standard-error bar and lists the precision reached."""

from __future__ import annotations

import pytest

from hessq.sensitivity import LayerSensitivity, Sensitivity

pytest.importorskip("matplotlib")

from hessq.report import _plots  # noqa: E402
from hessq.report._html import render_report  # noqa: E402


def _sens(converged: bool) -> Sensitivity:
    recs = {
        "conv1": LayerSensitivity(12.0, 0.0, None, 144, {"estimator": "ggn-exact", "samples": 0}),
        "conv2": LayerSensitivity(3.0, 0.5 if not converged else 0.1, None, 2304, {"estimator": "restricted", "samples": 40}),
        "fc": LayerSensitivity(0.02, 0.0, None, 640, {"estimator": "ggn-exact", "samples": 0}),
    }
    meta = {"method": "auto", "rtol": 0.05, "converged": converged, "short_layers": [] if converged else ["conv2"]}
    return Sensitivity(recs, None, meta)


def test_lower_bar_stays_above_zero_on_a_log_axis():
    lower, upper = _plots.error_bar_limits([10.0, 1.0], [2.0, 3.0], log=True)
    assert upper == [2.0, 3.0] and lower[0] == 2.0 and 0 < 1.0 - lower[1]
    assert _plots.error_bar_limits([1.0], [3.0], log=False) == [[3.0], [3.0]]


def test_each_layer_shows_its_error_bar_and_the_precision_reached():
    page = render_report(title="t", rows=[], sensitivity=_sens(converged=True))
    assert "id=sensitivity" in page and "data:image/png;base64," in page
    assert "± 1 standard error" in page and "2 of 3 layers exact" in page and "every layer reached it" in page
    for name, trace, err in (("conv1", "12", "0"), ("conv2", "3", "0.1"), ("fc", "0.02", "0")):
        assert f"<td>{name}</td>" in page and f"<td class=num>{trace}</td><td class=num>{err}</td>" in page
    short = render_report(title="t", rows=[], sensitivity=_sens(converged=False))
    assert "<b>not reached</b> by conv2" in short and "16.7%" in short
