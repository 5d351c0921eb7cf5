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
