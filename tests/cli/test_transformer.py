"""`hessq compress` on a Hugging Face model folder (a tiny random-init BERT) and dict batches."""

from __future__ import annotations

import json

from hessq.cli import main
from tests._bert import tiny_bert


def test_compress_takes_a_hugging_face_folder_plans_row_tiers_and_reports_bits_per_encoder_layer(tmp_path, capsys):
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["compress", "--model", f"hf:{folder}", "--data", "tests._bert:tiny_text_data", "--size-limit", "50%",
                 "--weight-bits", "2,4,8", "--pin-first-last", "none", "--no-latency", "--pareto-points", "4",
                 "--max-samples", "4", "--baselines", "8", "--row-tiers", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    names = list(plan["bits"])
    assert "bert.encoder.layer.1.attention.self.query" in names and "bert.embeddings.word_embeddings" in names
    # each table planned in row tiers by its lookups in the data: the tiers cover every row once
    tiers = plan["layers"]["bert.embeddings.word_embeddings"]["row_tiers"]
    assert plan["meta"]["row_tiers"]["bert.embeddings.word_embeddings"] == len(tiers) == 3
    assert sum(t["rows"] for t in tiers) == 100
    page = (out / "report.html").read_text()
    assert "id=block-bits" in page
    results = json.loads((out / "results.json").read_text())
    assert results["verification"]["bit_exact"] is True
    assert "| mixed |" in capsys.readouterr().out


def test_compress_of_a_text_model_plans_under_a_latency_limit_and_times_every_row(tmp_path):
    # token ids are int64: the latency table, every integer row and the FP32 row are timed on ids, not floats
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["compress", "--model", f"hf:{folder}", "--data", "tests._bert:tiny_text_data", "--latency-limit", "90%",
                 "--weight-bits", "4,8", "--pin-first-last", "none", "--latency-repeats", "2", "--pareto-points", "2",
                 "--max-samples", "4", "--baselines", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    table = json.loads((out / "latency.json").read_text())["layers"]
    assert "bert.encoder.layer.0.attention.self.query" in table
    assert all(v == 0.0 for v in table["bert.embeddings.position_embeddings"].values())  # folded into a constant
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows][:2] == ["FP32", "W8A8"]
    for row in rows:
        assert row["latency_ms"] is not None and row["latency_ms"] > 0, row["name"]
    plan = json.loads((out / "plan.json").read_text())
    assert 0 < plan["totals"]["latency"] <= plan["limits"]["latency"]
