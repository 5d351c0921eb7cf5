"""A small conv net on scikit-learn's 8×8 digits: the whole pipeline in seconds."""

from __future__ import annotations

import base64
import re

from tests._models import TinyNet, digits_data, tiny_net, trained_tiny_net  # noqa: F401  (CLI targets: tests.pipeline._tiny:tiny_net)


def not_a_model() -> str:
    return "a string"


#: What a compress run with an output folder writes (besides pareto.json and latency.json), and the report's plots.
FILES = ("sensitivity.json", "plan.json", "model.hq", "model.onnx", "results.json", "results.md", "report.html")
PLOTS = ("accuracy-size", "sensitivity", "pareto", "bits")


def plots(html: str) -> dict[str, bytes]:
    """The report's embedded PNG plots by id."""
    found = re.findall(r"<img id=([\w-]+) alt='[^']*' src='data:image/png;base64,([^']+)'", html)
    return {name: base64.b64decode(data) for name, data in found}
