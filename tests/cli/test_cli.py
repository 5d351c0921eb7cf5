import json
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch

import hessq
from hessq.cli import main


def test_quantize_then_export_with_latency_table(tmp_path, capsys):
    hq, onnx_path, table = tmp_path / "m.hq", tmp_path / "m.onnx", tmp_path / "latency.json"
    assert main(["quantize", "--bits", "8", "--calibration-batches", "2", "-o", str(hq)]) == 0
    assert main(["export", str(hq), "-o", str(onnx_path), "--latency-table", str(table), "--repeats", "3"]) == 0
    imodel = hessq.load_integer(hq)
    x = torch.randn(4, 1, 28, 28)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert (session.run(None, {"input": x.numpy()})[0] == imodel(x).numpy()).all()
    rows = json.loads(table.read_text())["layers"]
    assert set(rows) == set(hessq.quantizable_layers(hessq.models.resnet20()))
    # convs run every width 2-7 on the uint8 × int8 kernel and 8 bits on uint8 × uint8 (no 16-bit saturation), timed
    # on its own; the Linear head at <= 4 bits is MatMulNBits, timed on its own
    layers = hessq.quantizable_layers(hessq.models.resnet20())
    convs = [n for n, m in layers.items() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(rows[n]["8"] > 0 and rows[n]["4"] == rows[n]["7"] > 0 for n in convs)
    assert all(rows[n]["4"] > 0 and rows[n]["2"] == rows[n]["4"] for n in set(layers) - set(convs))
    from hessq.plan import LatencyTable

    assert len(LatencyTable.load(table)) == 22


def test_export_narrow_kernels(tmp_path):
    model = hessq.models.resnet20()
    q = hessq.quantize(model, 4, [(torch.randn(8, 1, 28, 28),) for _ in range(2)], pin_first_last=None)
    hq = tmp_path / "m.hq"
    hessq.to_integer(q).save(hq)

    def export(*flags: str) -> list[str]:
        path = tmp_path / "m.onnx"
        assert main(["export", str(hq), "-o", str(path), "--mode", "fast", *flags]) == 0
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    assert export().count("MatMulNBits") == 1  # the 4-bit Linear head; convs have no kernel of their own
    assert "MatMulNBits" not in export("--narrow-kernels", "none")
    table = tmp_path / "latency.json"
    types = export("--narrow-kernels", "measured", "--latency-table", str(table), "--repeats", "3")
    head = json.loads(table.read_text())["layers"]["fc"]
    assert types.count("MatMulNBits") == int(head["4"] < head["8"])  # the kernel the table times faster
    # the exact export has no kernels to choose: refused before measuring anything
    assert main(["export", str(hq), "-o", str(tmp_path / "e.onnx"), "--mode", "exact", "--narrow-kernels", "measured"]) == 1
    assert not (tmp_path / "e.onnx").exists()


def test_export_sibling_fusion_and_spinning_flags(tmp_path):
    from tests._bert import tiny_bert, token_batch

    q = hessq.quantize(tiny_bert(dropout=0.0), 8, [token_batch(s) for s in range(2)], pin_first_last=None)
    hq = tmp_path / "bert.hq"
    hessq.to_integer(q).save(hq)

    def matmuls(*flags: str) -> int:
        path = tmp_path / "bert.onnx"
        assert main(["export", str(hq), "-o", str(path), "--mode", "fast", *flags]) == 0
        return [n.op_type for n in onnx.load(str(path)).graph.node].count("MatMulIntegerToFloat")

    # two layers, each with its query, key and value on one kernel by default
    assert matmuls("--no-fuse-siblings") - matmuls() == 2 * 2
    table = tmp_path / "latency.json"
    matmuls("--latency-table", str(table), "--repeats", "1", "--no-spinning")
    assert json.loads(table.read_text())["meta"]["spinning"] is False


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "absent.hq")]) == 1
    assert "absent.hq: no such file" in capsys.readouterr().err
    assert main(["quantize", "--bits", "9", "-o", str(tmp_path / "x.hq")]) == 1
    assert "from 2 to 8" in capsys.readouterr().err
    assert main(["quantize", "--model", "nosuch.module:f", "-o", str(tmp_path / "x.hq")]) == 1
    assert "cannot load model factory" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_its_report(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hessq.cli", "demo", "--out", str(out), "--quick", "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["FP32", "W8A8", "W4A4", "mixed", "W4A4 QAT"]
    assert rows["FP32"]["accuracy"] > 0.9 and rows["W8A8"]["accuracy"] > 0.88
    assert rows["W4A4"]["size_bytes"] < rows["mixed"]["size_bytes"] < rows["W8A8"]["size_bytes"]
    assert results["verification"]["bit_exact"] is True
    for name in ("sensitivity.json", "plan.json", "model.hq", "model.onnx", "report.html", "results.md"):
        assert (out / name).exists(), name
    assert "| mixed |" in (out / "results.md").read_text()
    assert f"report: {out / 'report.html'}" in result.stdout
