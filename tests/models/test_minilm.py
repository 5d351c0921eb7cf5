import json

import pytest
import torch

from hessq import ArtifactError, ConfigError
from hessq._compat import import_transformers
from hessq.data import bbc_news
from hessq.models import FinetuneRecipe, cached_finetune, classifier_accuracy, finetune_classifier, finetuned_path
from hessq.models import _minilm

RECIPE = FinetuneRecipe(epochs=1, lr=1e-3, batch_size=8, seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (conftest restores the count)


def tiny_bert(seed: int = 0):
    """A random-init 2-layer BERT classifier, 32 wide, on MiniLM's vocabulary (so real token ids fit)."""
    tr = import_transformers()
    config = tr.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=5)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tr.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def data():
    return (bbc_news("train", limit=24, batch_size=8, max_length=32, shuffle=True, seed=1),
            bbc_news("test", limit=16, batch_size=8, max_length=32))


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_schedule_warms_up_then_decays_linearly():
    factor = _minilm.linear_warmup_decay(20, 0.1)
    assert [factor(s) for s in range(0, 4)] == [0.0, 0.5, 1.0, 17 / 18]
    assert factor(11) == 9 / 18 and factor(20) == 0.0


def test_finetune_is_deterministic_and_leaves_the_global_rng(data):
    train, _ = data
    a, b = tiny_bert(), tiny_bert()
    start = {k: v.clone() for k, v in a.state_dict().items()}
    rng = torch.random.get_rng_state()
    losses_a = finetune_classifier(a, train, RECIPE, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    losses_b = finetune_classifier(b, train, RECIPE, progress=False)
    assert len(losses_a) == 3 and losses_a == losses_b
    assert _states_equal(a, b) and not a.training
    assert not torch.equal(a.classifier.weight, start["classifier.weight"])
    # dropout draws from the recipe's seed: another seed trains differently
    c = tiny_bert()
    finetune_classifier(c, train, FinetuneRecipe(epochs=1, lr=1e-3, batch_size=8, seed=4), progress=False)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_cache_saves_reloads_and_reuses(data, tmp_path, monkeypatch):
    train, test = data
    path = tmp_path / "cache" / "tiny.safetensors"
    trained = tiny_bert()
    meta = cached_finetune(path, trained, train, test, RECIPE, {"task": "tiny"}, progress=False)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temp left
    assert meta["task"] == "tiny" and meta["recipe"] == RECIPE.to_dict() and meta["hessq_version"]
    assert meta["test_accuracy"] == classifier_accuracy(trained, test)

    def no_training(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(_minilm, "finetune_classifier", no_training)
    reloaded = tiny_bert(seed=7)
    assert not _states_equal(reloaded, trained)
    again = cached_finetune(path, reloaded, train, test, RECIPE, {"task": "tiny"}, progress=False)
    assert again == meta and _states_equal(reloaded, trained)
    batch = test.take(1)[0]
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        assert torch.equal(reloaded(**inputs).logits, trained(**inputs).logits)


def test_cache_refuses_damaged_or_foreign_files(data, tmp_path):
    train, test = data
    path = tmp_path / "tiny.safetensors"
    cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "tiny"}, progress=False)
    with pytest.raises(ArtifactError, match=r"recipe with .*lr=0\.001, not the 5e-05 asked for now.*delete it"):
        cached_finetune(path, tiny_bert(), train, None, FinetuneRecipe(), {"task": "tiny"}, progress=False)
    with pytest.raises(ArtifactError, match="task='tiny'.*'other'"):
        cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "other"}, progress=False)

    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x40  # one bit of the last tensor's data
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="checksum.*delete it"):
        cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "tiny"}, progress=False)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="damaged"):
        cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "tiny"}, progress=False)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError, match="damaged"):
        cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "tiny"}, progress=False)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):  # refused before any training
        cached_finetune(blocker / "x.safetensors", tiny_bert(), iter(()), None, RECIPE, {}, progress=False)
    with pytest.raises(ConfigError, match="re-iterable with a length"):
        cached_finetune(tmp_path / "new.safetensors", tiny_bert(), iter(()), None, RECIPE, {}, progress=False)

    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path), metadata={"hessq": json.dumps({"format": "other"})})
    with pytest.raises(ArtifactError, match="not a hessq fine-tuned classifier"):
        cached_finetune(path, tiny_bert(), train, None, RECIPE, {"task": "tiny"}, progress=False)


def test_minilm_loads_quietly_seeded_and_eager(tmp_path, monkeypatch, capfd):
    model = _minilm.minilm(5, seed=0)
    out = capfd.readouterr()
    assert "LOAD REPORT" not in out.out + out.err and "MISSING" not in out.out + out.err
    assert model.config._attn_implementation == "eager" and not model.training
    assert model.classifier.out_features == 5 and model.config.hidden_size == 384 and model.config.num_hidden_layers == 6

    # minilm_finetuned reads a cache file made for its task, recipe and base checkpoint, and trains nothing
    monkeypatch.setattr(_minilm, "finetune_classifier", lambda *a, **k: pytest.fail("the cache was not reused"))
    path = finetuned_path("bbc", tmp_path)
    folder = _minilm.minilm_folder()
    spec = _minilm.TASKS["bbc"]
    meta = {"task": "bbc", "base_checkpoint": "all-MiniLM-L6-v2", "base_sha256": _minilm.file_sha256(folder / "model.safetensors"),
            "max_length": 256, "pad_to": "longest", "recipe": spec.recipe.to_dict()}
    with torch.no_grad():
        model.classifier.weight.mul_(2)
    _minilm.save_classifier(path, model, {**meta, "test_accuracy": 0.5})
    loaded = _minilm.minilm_finetuned("bbc", cache_dir=tmp_path, progress=False)
    assert _states_equal(loaded, model) and loaded.hessq_finetune["test_accuracy"] == 0.5
    assert loaded.config._attn_implementation == "eager"
    batch = bbc_news("test", limit=2, max_length=256).take(1)[0]
    with torch.no_grad():
        logits = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()

    monkeypatch.setenv("HESSQ_CACHE_DIR", str(tmp_path / "env"))
    assert finetuned_path("tweets") == tmp_path / "env" / "minilm-l6-tweets.safetensors"
    with pytest.raises(ConfigError, match="'bbc', 'tweets'"):
        finetuned_path("sst2")


def test_recipe_checks_its_fields():
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneRecipe(epochs=0)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        FinetuneRecipe(warmup_fraction=1.0)
    with pytest.raises(ConfigError, match="lr"):
        FinetuneRecipe(lr=-1.0)
