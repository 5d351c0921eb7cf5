"""Distilled data: sealed files (damage, foreign kinds, versions, malicious pickles) and bad arguments.

Every bad input must be one clear hessq error raised before any optimisation step; every damaged
or foreign file must be refused whole with an ArtifactError naming it, and loading must never run
pickled code.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from hessq import ArtifactError, ConfigError, ConfigTypeError, InputDataError, ModelError
from hessq.distill import DistilledData, distill_data, statistics_loss
from hessq._io import seal
from tests._models import TinyBN, bn_features
from tests._hostile import RunsCode, check_bit_flips

SHAPE = (2, 6, 6)


@pytest.fixture(scope="module")
def distilled() -> DistilledData:
    return distill_data(TinyBN(), 6, SHAPE, steps=3, batch_size=4, progress=False, label_weight=0.5,
                        input_range=(-2.0, 2.0))


@pytest.fixture(scope="module")
def saved(distilled, tmp_path_factory) -> tuple[bytes, DistilledData]:
    path = tmp_path_factory.mktemp("saved") / "d.pt"
    distilled.save(path)
    return path.read_bytes(), distilled


def _same(a: DistilledData, b: DistilledData) -> bool:
    fields = ("loss", "initial_loss", "batch_losses", "steps", "lr", "batch_size", "seed", "seconds", "num_bn_layers")
    return (torch.equal(a.inputs, b.inputs) and a.inputs.dtype == b.inputs.dtype and a.meta == b.meta
            and all(getattr(a, f) == getattr(b, f) for f in fields))


def _refused(path) -> str:
    with pytest.raises(ArtifactError) as info:
        DistilledData.load(path)
    assert str(path) in str(info.value)
    return str(info.value)


# --- sealed files --------------------------------------------------------------------------------------------------


def test_saved_file_is_sealed_and_round_trips(saved, tmp_path):
    raw, original = saved
    path = tmp_path / "d.pt"
    path.write_bytes(raw)
    data = torch.load(path, weights_only=True)
    assert data["format"] == "hessq.distilled-data" and data["version"] == 1 and len(data["sha256"]) == 64
    loaded = DistilledData.load(path)
    assert _same(loaded, original)
    assert loaded.meta["targets"] == original.meta["targets"] and loaded.meta["input_range"] == [-2.0, 2.0]


def test_one_flipped_bit_anywhere_is_refused_or_harmless(saved, tmp_path):
    raw, original = saved
    refused = check_bit_flips(raw, tmp_path / "flipped.pt", DistilledData.load, lambda loaded: _same(loaded, original))
    assert refused >= 50  # the tensor bytes and the pickle are covered, not only padding


@pytest.mark.parametrize("cut", ["empty", "one byte", "a quarter", "a half", "all but the last byte"])
def test_truncated_file_is_refused(saved, tmp_path, cut):
    raw, _ = saved
    length = {"empty": 0, "one byte": 1, "a quarter": len(raw) // 4, "a half": len(raw) // 2,
              "all but the last byte": len(raw) - 1}[cut]
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[:length])
    _refused(path)


def test_foreign_files_are_refused(tmp_path, distilled):
    foreign = {
        "tensor.pt": lambda p: torch.save(torch.randn(4, *SHAPE), p),
        "dict.pt": lambda p: torch.save({"inputs": torch.randn(4, *SHAPE)}, p),
        "plan.json": lambda p: p.write_text(json.dumps(seal({"format": "hessq.bitplan", "version": 1,
                                                                "bits": {"conv1": 4}}))),
        "garbage.pt": lambda p: p.write_bytes(random.Random(0).randbytes(300)),
        # What DistilledData.save wrote before files were sealed: no version, no checksum.
        "unversioned.pt": lambda p: torch.save({"format": "hessq.distilled", "inputs": distilled.inputs,
                                                 "loss": 0.0}, p),
        "other-kind.pt": lambda p: torch.save(seal({"format": "hessq.sensitivity", "version": 1}), p),
    }
    for name, write in foreign.items():
        write(tmp_path / name)
        msg = _refused(tmp_path / name)
        assert "distil the inputs again" in msg, msg
    (tmp_path / "folder.pt").mkdir()
    _refused(tmp_path / "folder.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        DistilledData.load(tmp_path / "absent.pt")


def _content(distilled: DistilledData, **changes) -> dict:
    content = {"format": "hessq.distilled-data", "version": 1, "inputs": distilled.inputs, "loss": 0.1,
               "initial_loss": 1.0, "batch_losses": [0.1, 0.1], "steps": 3, "lr": 0.5, "batch_size": 4, "seed": 0,
               "seconds": 0.1, "num_bn_layers": 2, "meta": {}}
    content.update(changes)
    return content


def test_version_checksum_and_structure_are_checked(tmp_path, distilled):
    cases = {
        "future.pt": (seal(_content(distilled, version=2)), "newer hessq"),
        "version-zero.pt": (seal(_content(distilled, version=0)), "version 0"),
        "no-version.pt": (seal({k: v for k, v in _content(distilled).items() if k != "version"}), "version None"),
        "no-checksum.pt": (_content(distilled), "no checksum"),
        "edited.pt": ({**seal(_content(distilled)), "loss": 0.0}, "checksum does not match"),
        "incomplete.pt": (seal({k: v for k, v in _content(distilled).items() if k != "batch_size"}), "no batch_size"),
        "nan-inputs.pt": (seal(_content(distilled, inputs=torch.full((2, *SHAPE), math.nan))), "NaN"),
        "list-inputs.pt": (seal(_content(distilled, inputs=[[1.0, 2.0]])), "must be a tensor"),
        "zero-batch.pt": (seal(_content(distilled, batch_size=0)), "batch_size must be >= 1"),
    }
    for name, (content, expected) in cases.items():
        torch.save(content, tmp_path / name)
        msg = _refused(tmp_path / name)
        assert expected in msg, (name, msg)



def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, distilled):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    # Even a checksum over everything else cannot make it load: the pickle is never executed.
    torch.save({**_content(distilled), "meta": {"x": RunsCode(marker)}, "sha256": "0" * 64}, path)
    msg = _refused(path)
    assert "would run code" in msg
    assert not marker.exists()
    torch.save(RunsCode(marker), tmp_path / "bare.pt")
    _refused(tmp_path / "bare.pt")
    assert not marker.exists()


def test_meta_that_a_file_cannot_hold_is_refused_before_writing(tmp_path, distilled):
    data = DistilledData(distilled.inputs, loss=0.1, initial_loss=1.0, batch_losses=[0.1, 0.1], steps=3, lr=0.5,
                         batch_size=4, seed=0, seconds=0.1, num_bn_layers=2, meta={"model": nn.Linear(2, 2)})
    with pytest.raises(ConfigTypeError, match="meta cannot be saved"):
        data.save(tmp_path / "d.pt")
    assert not (tmp_path / "d.pt").exists() and not list(tmp_path.iterdir())


# --- bad arguments to distill_data -------------------------------------------------------------------------------


def _counting_model() -> tuple[nn.Module, list[int]]:
    """TinyBN that records its forward passes: a refused argument must be refused before the first one."""
    model, calls = TinyBN(), []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return model, calls


BAD_ARGUMENTS = [
    # (keyword, value, error class, words the message holds)
    ("num_samples", 0, ConfigError, "num_samples must be >= 1"),
    ("num_samples", -3, ConfigError, "num_samples must be >= 1"),
    ("num_samples", 2.5, ConfigTypeError, "num_samples must be an integer"),
    ("num_samples", "4", ConfigTypeError, "num_samples must be an integer"),
    ("num_samples", True, ConfigTypeError, "num_samples must be an integer"),
    ("steps", -1, ConfigError, "steps must be >= 0"),
    ("steps", 1.5, ConfigTypeError, "steps must be an integer"),
    ("steps", "10", ConfigTypeError, "steps must be an integer"),
    ("batch_size", 0, ConfigError, "batch_size must be >= 1"),
    ("batch_size", None, ConfigTypeError, "batch_size must be an integer"),
    ("batch_size", 2.0, ConfigTypeError, "batch_size must be an integer"),
    ("lr", 0.0, ConfigError, "lr must be a finite number > 0"),
    ("lr", -0.1, ConfigError, "lr must be a finite number > 0"),
    ("lr", math.nan, ConfigError, "lr must be a finite number > 0"),
    ("lr", math.inf, ConfigError, "lr must be a finite number > 0"),
    ("lr", "0.5", ConfigTypeError, "lr must be a finite number"),
    ("label_weight", -1.0, ConfigError, "label_weight must be a finite number >= 0"),
    ("label_weight", math.nan, ConfigError, "label_weight must be a finite number >= 0"),
    ("label_weight", math.inf, ConfigError, "label_weight must be a finite number >= 0"),
    ("label_weight", None, ConfigTypeError, "label_weight must be a finite number"),
    ("input_shape", (2, 0, 6), ConfigError, "positive sizes"),
    ("input_shape", (2, -6, 6), ConfigError, "positive sizes"),
    ("input_shape", (), ConfigTypeError, "non-empty sequence of ints"),
    ("input_shape", "2,6,6", ConfigTypeError, "sequence of ints"),
    ("input_shape", (2, 6.0, 6), ConfigTypeError, "sequence of ints"),
    ("input_shape", (2, 6.5, 6), ConfigTypeError, "sequence of ints"),
    ("input_shape", 6, ConfigTypeError, "sequence of ints"),
    ("input_shape", None, ConfigTypeError, "sequence of ints"),
    ("input_range", (1.0, 0.0), ConfigError, "low < high"),
    ("input_range", (0.5, 0.5), ConfigError, "low < high"),
    ("input_range", (math.nan, 1.0), ConfigError, "finite low < high"),
    ("input_range", (0.0, math.nan), ConfigError, "finite low < high"),
    ("input_range", (-math.inf, 1.0), ConfigError, "finite low < high"),
    ("input_range", (0.0,), ConfigTypeError, "(low, high) pair"),
    ("input_range", (0.0, 1.0, 2.0), ConfigTypeError, "(low, high) pair"),
    ("input_range", "0,1", ConfigTypeError, "(low, high) pair"),
    ("input_range", 1.0, ConfigTypeError, "(low, high) pair"),
    ("seed", 1.5, ConfigTypeError, "seed must be an integer"),
    ("seed", "0", ConfigTypeError, "seed must be an integer"),
    ("seed", 2**70, ConfigError, "seed must lie within"),
]


def test_every_bad_argument_is_refused_before_the_model_runs():
    # One test over the list (not one per case): together they take milliseconds.
    for keyword, value, error, words in BAD_ARGUMENTS:
        model, calls = _counting_model()
        kwargs = {"num_samples": 4, "input_shape": SHAPE, "steps": 2, "progress": False, keyword: value}
        with pytest.raises(error) as info:
            distill_data(model, **kwargs)
        assert words in str(info.value), (keyword, value, str(info.value))
        assert not calls, (keyword, value)


def test_unusable_models_are_refused_before_any_step():
    nan_weight = TinyBN()
    with torch.no_grad():
        nan_weight.conv1.weight[0, 0, 0, 0] = math.nan
    inf_stats = TinyBN()
    inf_stats.bn_late.running_var[0] = math.inf
    with torch.device("meta"):
        on_meta = bn_features()
    no_batchnorm = nn.Sequential(nn.Flatten(), nn.Linear(72, 3))
    cases = [
        ("a string", "resnet20", ConfigTypeError, "must be a torch.nn.Module"),
        ("None", None, ConfigTypeError, "must be a torch.nn.Module"),
        ("a state dict", TinyBN().state_dict(), ConfigTypeError, "must be a torch.nn.Module"),
        ("meta tensors", on_meta, ModelError, "meta device"),
        ("a NaN weight", nan_weight, ModelError, "NaN or infinite values in 'conv1.weight'"),
        ("an infinite running_var", inf_stats, ModelError, "'bn_late.running_var'"),
        ("no BatchNorm", no_batchnorm, ModelError, "BatchNorm"),
    ]
    for what, model, error, words in cases:
        calls = []
        if isinstance(model, nn.Module):
            model.register_forward_pre_hook(lambda module, args: calls.append(1))
        with pytest.raises(error) as info:
            distill_data(model, 4, SHAPE, steps=2, progress=False)
        assert words in str(info.value), (what, str(info.value))
        assert not calls, what


def test_a_float64_model_gets_float64_inputs():
    # The noise used to be float32 whatever the model, so a double model was told its input shape did not fit.
    d = distill_data(TinyBN().double(), 4, SHAPE, steps=3, batch_size=4, progress=False)
    assert d.inputs.dtype == torch.float64 and torch.isfinite(d.inputs).all()


# --- DistilledData built by hand, labelled, statistics_loss -----------------------------------------------------


def _fields(**changes) -> dict:
    fields = {"inputs": torch.randn(4, *SHAPE), "loss": 0.1, "initial_loss": 1.0, "batch_losses": [0.1], "steps": 3,
              "lr": 0.5, "batch_size": 4, "seed": 0, "seconds": 0.0, "num_bn_layers": 2, "meta": {}}
    fields.update(changes)
    return fields


def test_distilled_data_built_from_bad_values_is_refused():
    cases = [
        ({"inputs": [[0.0] * 4]}, ConfigTypeError, "inputs must be a tensor"),
        ({"inputs": None}, ConfigTypeError, "inputs must be a tensor"),
        ({"inputs": torch.full((4, *SHAPE), math.nan)}, InputDataError, "NaN or infinite"),
        ({"inputs": torch.full((4, *SHAPE), math.inf)}, InputDataError, "NaN or infinite"),
        ({"inputs": torch.zeros(4, *SHAPE, dtype=torch.uint8)}, InputDataError, "float tensor"),
        ({"inputs": torch.zeros(4)}, InputDataError, "float tensor of shape"),
        ({"inputs": torch.zeros(0, *SHAPE)}, InputDataError, "num_samples >= 1"),
        ({"batch_size": 0}, ConfigError, "batch_size must be >= 1"),
        ({"batch_size": "4"}, ConfigTypeError, "batch_size must be an integer"),
        ({"steps": -1}, ConfigError, "steps must be >= 0"),
        ({"lr": math.nan}, ConfigError, "lr must be a finite number > 0"),
        ({"loss": math.nan}, ConfigError, "loss must be a finite number"),
        ({"loss": "small"}, ConfigTypeError, "loss must be a finite number"),
        ({"batch_losses": 0.1}, ConfigTypeError, "batch_losses must be a list"),
        ({"meta": ["model"]}, ConfigTypeError, "meta must be a dict"),
    ]
    for changes, error, words in cases:
        with pytest.raises(error) as info:
            DistilledData(**_fields(**changes))
        assert words in str(info.value), (changes, str(info.value))


def test_labelled_with_a_model_the_inputs_do_not_fit():
    data = DistilledData(**_fields(inputs=torch.randn(4, 1, 28, 28)))
    with pytest.raises(InputDataError) as info:
        data.labelled(TinyBN())
    msg = str(info.value)
    assert "distilled inputs of shape (1, 28, 28)" in msg and "batch of shape (4, 1, 28, 28)" in msg, msg
    good = DistilledData(**_fields())
    with pytest.raises(InputDataError, match="torch.float64"):
        good.labelled(TinyBN().double())
    features = bn_features()
    with pytest.raises(ModelError, match=r"\(batch, classes\) logits.*\(4, 4, 4, 4\)"):
        good.labelled(features)
    with pytest.raises(ConfigTypeError, match="must be a torch.nn.Module"):
        good.labelled("resnet20")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        good.labelled(TinyBN(), batch_size=0)


def test_statistics_loss_of_unusable_inputs():
    model = TinyBN()
    with pytest.raises(InputDataError, match="uint8"):
        statistics_loss(model, torch.zeros(4, *SHAPE, dtype=torch.uint8))
    with pytest.raises(InputDataError, match="NaN"):
        statistics_loss(model, torch.full((4, *SHAPE), math.nan))
    with pytest.raises(InputDataError, match="one batch as a tensor"):
        statistics_loss(model, [torch.zeros(4, *SHAPE)])
