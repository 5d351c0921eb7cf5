"""`hessq compress` on a Hugging Face model folder (a tiny random-init BERT) and dict batches."""

from __future__ import annotations

import json

import pytest

from hessq.cli import main
from tests._bert import tiny_bert, tiny_encoder


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


@pytest.mark.parametrize("family, data, layers", [
    # other module names (q_lin, ffn.lin1, sa_layer_norm), another head, no token types
    ("distilbert", "tiny_text_data", ["distilbert.transformer.layer.1.attention.q_lin", "pre_classifier"]),
    # layers shared across depth (each group runs twice), an embedding projection
    ("albert", "tiny_text_data", ["albert.encoder.albert_layer_groups.1.albert_layers.0.attention.query",
                                  "albert.encoder.embedding_hidden_mapping_in"]),
    # a relative-position attention bias in every layer, padding with id 1
    ("mpnet", "tiny_text_data_padded_with_1", ["mpnet.encoder.layer.1.attention.attn.q",
                                               "mpnet.encoder.relative_attention_bias"]),
])
def test_compress_takes_a_folder_of_another_bert_family(tmp_path, family, data, layers):
    folder = tmp_path / family
    tiny_encoder(family).save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["compress", "--model", f"hf:{folder}", "--data", f"tests._bert:{data}", "--size-limit", "50%",
                 "--weight-bits", "4,8", "--pin-first-last", "none", "--no-latency", "--pareto-points", "2",
                 "--max-samples", "4", "--baselines", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    names = list(json.loads((out / "plan.json").read_text())["bits"])
    assert all(name in names for name in layers)
    assert json.loads((out / "results.json").read_text())["verification"]["bit_exact"] is True


def test_bundled_text_data_tokenizes_with_the_folders_tokenizer_and_checks_the_model_against_it(tmp_path, capsys):
    from hessq.models._minilm import minilm_folder

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)  # 100 ids, 3 labels, pad 0; no tokenizer saved
    args = ["compress", "--model", f"hf:{folder}", "--data", "tweets", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) != 0
    assert "has no tokenizer.json" in capsys.readouterr().err
    (folder / "tokenizer.json").write_bytes((minilm_folder() / "tokenizer.json").read_bytes())
    assert main(args) != 0
    assert "classifies 3 labels; tweets has 2 classes" in capsys.readouterr().err
    model = tiny_bert(labels=2)
    model.config.pad_token_id = 5
    model.save_pretrained(folder)
    assert main(args) != 0
    assert "pads with id 0 but its model's pad_token_id is 5" in capsys.readouterr().err
