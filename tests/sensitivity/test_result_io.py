"""A Hessian sensitivity saves to JSON and loads back unchanged."""

from __future__ import annotations

from hessq.sensitivity import Sensitivity, hessian_sensitivity

from ._models import batches, mlp


def test_json_round_trip(tmp_path):
    model = mlp()
    sens = hessian_sensitivity(model, batches((20,)), rtol=1.0, max_samples=4, top_k=2, eig_max_iter=5, activations=True)
    path = tmp_path / "sens.json"
    sens.save(path)
    back = Sensitivity.load(path)
    assert back.to_dict() == sens.to_dict()
    assert list(back) == list(sens)
    for name, rec in sens.items():
        got = back[name]
        assert (got.trace, got.trace_stderr, got.top_eigenvalue, got.num_params) == (rec.trace, rec.trace_stderr, rec.top_eigenvalue, rec.num_params)
        assert got.mean_trace == rec.mean_trace
        assert len(got.extra["top_eigenvalues"]) == 2 and "activation_trace" in got.extra
    back.check_model(model)
    assert back.meta["samples"] == 4 and back.meta["seed"] == 0


# --- the file is sealed: format, version, checksum; a wrong structure is an ArtifactError ------------

import json  # noqa: E402

import pytest  # noqa: E402

from hessq import ArtifactError  # noqa: E402
from hessq._io import dump_sealed_json  # noqa: E402
from tests._hostile import check_bit_flips


def _saved(tmp_path):
    sens = hessian_sensitivity(mlp(), batches((20,)), rtol=1.0, max_samples=3, top_k=2, eig_max_iter=4)
    path = tmp_path / "sensitivity.json"
    sens.save(path)
    return sens, path


def test_single_bit_flips_are_refused_or_change_nothing(tmp_path):
    sens, path = _saved(tmp_path)
    refused = check_bit_flips(path.read_bytes(), tmp_path / "flipped.json", Sensitivity.load,
                              lambda back: back.to_dict() == sens.to_dict())  # e.g. 1e-05 -> 1E-05: the same numbers
    assert refused >= 150  # only flips like e <-> E in an exponent keep the numbers


def _resealed(tmp_path, name, edit):
    """The saved file's content, edited by ``edit`` and sealed again (a valid checksum)."""
    content = json.loads((tmp_path / "sensitivity.json").read_text())
    content.pop("sha256")
    content = edit(content)
    path = tmp_path / name
    path.write_text(dump_sealed_json(content) if isinstance(content, dict) and "format" in content else json.dumps(content))
    return path


def _set(key, value):
    def edit(c):
        c[key] = value
        return c
    return edit


def _first_layer(change):
    def edit(c):
        change(next(iter(c["layers"].values())))
        return c
    return edit


WRONG = {
    "future-version": (_set("version", 99), "version 99, written by a newer hessq"),
    "version-1": (_set("version", 1), "version 1"),
    "foreign-kind": (_set("format", "hessq.bitplan"), "not a hessq sensitivity"),
    "checksum-less": (None, "no checksum"),  # the content as the previous hessq wrote it
    "a-list": (lambda c: [c], "holds a list"),
    "no-layers": (lambda c: {k: v for k, v in c.items() if k != "layers"}, "has no 'layers'"),
    "layers-a-list": (_set("layers", [1, 2]), "'layers' of type list"),
    "empty-layers": (_set("layers", {}), "no layer records"),
    "record-missing-trace": (_first_layer(lambda r: r.pop("trace")), r"lacks \['trace'\]"),
    "string-trace": (_first_layer(lambda r: r.update(trace="12.5")), "trace '12.5', not a number"),
    "record-a-number": (lambda c: dict(c, layers={"2": 3.0}), "is a float, not an object"),
    "unknown-field": (_first_layer(lambda r: r.update(bogus=1)), r"unknown fields \['bogus'\]"),
    "num-params-zero": (_first_layer(lambda r: r.update(num_params=0)), "num_params 0"),
    "extra-a-list": (_first_layer(lambda r: r.update(extra=[])), "extra list"),
    "signature-strings": (_set("signature", {"2": "12x16"}), "'signature' must map"),
    "meta-a-list": (_set("meta", []), "'meta' is a list"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_structure_or_version_is_an_artifact_error_naming_the_file(tmp_path, case):
    _saved(tmp_path)
    edit, message = WRONG[case]
    if edit is None:
        path = tmp_path / "bare.json"
        content = json.loads((tmp_path / "sensitivity.json").read_text())
        content.pop("sha256")
        path.write_text(json.dumps(content))
    else:
        path = _resealed(tmp_path, f"{case}.json", edit)
    with pytest.raises(ArtifactError, match=message) as info:
        Sensitivity.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b'{"format": "hessq.sensitivity", "ver', b"\xff\xfe{}", b"[]", b"null"])
def test_empty_truncated_or_garbage_files_are_artifact_errors(tmp_path, content):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match="s.json"):
        Sensitivity.load(path)


def test_a_directory_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="is a directory"):
        Sensitivity.load(tmp_path)
