"""A model.hq that is not one this hessq wrote is refused with an ArtifactError naming it, running no code."""

from __future__ import annotations


import pytest
import torch

import hessq
from hessq import ArtifactError

from tests.pipeline._tiny import tiny_net
from tests._hostile import RunsCode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    q = hessq.quantize(tiny_net().eval(), 8, [torch.randn(16, 1, 8, 8, generator=g)])
    path = tmp_path_factory.mktemp("hq") / "model.hq"
    hessq.to_integer(q).save(path)
    return path



def test_a_pickle_that_asks_for_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.hq"
    torch.save({"header": "{}", "tensors": {}, "sha256": "", "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ArtifactError, match=r"evil\.hq.*would run code"):
        hessq.load_integer(path)
    assert not marker.exists()


def test_directory_empty_truncated_and_foreign_files_are_artifact_errors(saved, tmp_path):
    blob = saved.read_bytes()
    cases = {
        "empty.hq": b"",
        "half.hq": blob[: len(blob) // 2],
        "tail.hq": blob[len(blob) // 3:],
        "text.hq": b"not a torch file",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.hq")
    torch.save({"header": "[1]", "tensors": {}, "sha256": ""}, tmp_path / "header-list.hq")
    torch.save({"header": "{}", "tensors": {}}, tmp_path / "no-checksum.hq")
    (tmp_path / "folder.hq").mkdir()
    for name in [*cases, "list.hq", "header-list.hq", "no-checksum.hq", "folder.hq"]:
        with pytest.raises(ArtifactError, match=name.replace(".", r"\.")):
            hessq.load_integer(tmp_path / name)


def test_a_sealed_program_of_the_wrong_structure_is_an_artifact_error(saved, tmp_path):
    import json

    from hessq.integer import IntegerModel

    data = torch.load(saved, weights_only=True)
    header = json.loads(data["header"])
    del header["program"][0]["output"]
    data["header"] = json.dumps(header)
    data["sha256"] = IntegerModel._digest(header, data["tensors"])  # a valid checksum over a broken program
    torch.save(data, tmp_path / "broken.hq")
    with pytest.raises(ArtifactError, match=r"broken\.hq holds an integer program of the wrong structure"):
        hessq.load_integer(tmp_path / "broken.hq")


def test_repeated_multipliers_are_stored_once_and_load_bit_exact(tmp_path):
    # a BERT's per-channel multipliers laid out over heads × tokens repeat along the tokens: stored once (version 2)
    from tests._bert import tiny_bert, token_batch
    from hessq.integer._model import FORMAT, IntegerModel

    model = tiny_bert()
    q = hessq.quantize(model, 8, [token_batch(i, length=16) for i in range(2)], pin_first_last=None)
    im = hessq.to_integer(q, input_shape=(16,))
    header, tensors = im._payload()
    expanded = [ref for entry in header["program"] for ref in entry["tensors"].values() if "expand" in ref]
    assert expanded  # at least the attention layout's multipliers
    for ref in expanded:
        full = torch.Size(ref["expand"])
        assert tensors[ref["name"]].numel() < full.numel()
    im.save(tmp_path / "m.hq")
    back = hessq.load_integer(tmp_path / "m.hq")
    ids = token_batch(9, length=16)["input_ids"]
    assert torch.equal(back(ids), im(ids))
    for a, b in zip(im.ops, back.ops):
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # a version-1 file (every tensor in full) still loads; a later version is refused by name
    for entry in header["program"]:
        for key, ref in entry["tensors"].items():
            if "expand" in ref:
                tensors[ref["name"]] = tensors[ref["name"]].expand(ref["expand"]).contiguous()
                entry["tensors"][key] = {"name": ref["name"]}
    for version in (1, 3):
        header["version"] = version
        blob = {"header": __import__("json").dumps(header), "tensors": tensors,
                "sha256": IntegerModel._digest(header, tensors)}
        torch.save(blob, tmp_path / f"v{version}.hq")
    assert header["format"] == FORMAT
    assert torch.equal(hessq.load_integer(tmp_path / "v1.hq")(ids), im(ids))
    with pytest.raises(ArtifactError, match="version 3"):
        hessq.load_integer(tmp_path / "v3.hq")
