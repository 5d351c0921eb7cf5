"""hessq._io: atomic writes that tidy up after killed writers, sealed artefacts, loads that never run code."""

import math
import os
import subprocess
import sys

import pytest
import torch

from hessq import ArtifactError, ConfigError
from hessq._io import (
    check_writable,
    load_sealed_json,
    load_sealed_torch,
    load_torch_safely,
    remove_stale_temps,
    save_sealed_json,
    save_sealed_torch,
    write_text_atomic,
)
from tests._hostile import RunsCode

KIND = dict(kind="hessq.test", versions={1}, what="test file", remedy="make it again")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "plan.json"
    dead = tmp_path / f".plan.json.{_dead_pid()}.abc123.tmp"  # what a writer killed mid-save leaves
    live = tmp_path / f".plan.json.{os.getppid()}.def456.tmp"  # a writer that still runs: not ours to delete
    other = tmp_path / f".model.hq.{_dead_pid()}.x.tmp"  # another file's temp: left for that file's next write
    for p in (dead, live, other):
        p.write_text("half")
    write_text_atomic(path, "whole")
    assert path.read_text() == "whole"
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "model.hq") == [other]


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.json"
    write_text_atomic(path, "old")

    def interrupted(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("new, half")
        raise KeyboardInterrupt

    from hessq._io import write_atomic

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("make", ["directory", "under a file"])
def test_paths_that_cannot_be_files_are_refused(tmp_path, make):
    (tmp_path / "f").write_text("x")
    path = tmp_path if make == "directory" else tmp_path / "f" / "out.json"
    with pytest.raises(ConfigError, match="is a directory" if make == "directory" else "which is a file"):
        check_writable(path)


def test_sealed_json_round_trips_and_refuses_every_edit(tmp_path):
    path = tmp_path / "s.json"
    content = {"format": "hessq.test", "version": 1, "x": [1.5, 2, None, math.inf], "y": {"b": "t"}}
    save_sealed_json(path, content)
    assert load_sealed_json(path, **KIND) == content
    text = path.read_text()
    edits = {
        "value": text.replace("1.5", "1.25"),
        "future version": text.replace('"version": 1', '"version": 2'),
        "kind": text.replace("hessq.test", "hessq.other"),
        "no checksum": text.replace('"sha256"', '"sha_256"'),
        "truncated": text[: len(text) // 2],
    }
    for name, edited in edits.items():
        path.write_text(edited)
        with pytest.raises(ArtifactError, match=str(path)):
            load_sealed_json(path, **KIND)
    path.write_text(edits["future version"])
    with pytest.raises(ArtifactError, match="newer hessq"):
        load_sealed_json(path, **KIND)


def test_sealed_torch_files_check_tensors_bit_for_bit(tmp_path):
    path = tmp_path / "t.pt"
    w = torch.arange(6, dtype=torch.float32)
    save_sealed_torch(path, {"format": "hessq.test", "version": 1, "w": w, "meta": {"n": 3}})
    back = load_sealed_torch(path, **KIND)
    assert torch.equal(back["w"], w) and back["meta"] == {"n": 3}
    w2 = w.clone()
    w2[3] = torch.nextafter(w2[3], torch.tensor(10.0))  # one ulp
    torch.save({"format": "hessq.test", "version": 1, "w": w2, "meta": {"n": 3}, "sha256": torch.load(path)["sha256"]}, path)
    with pytest.raises(ArtifactError, match="checksum does not match"):
        load_sealed_torch(path, **KIND)


def test_a_pickle_that_asks_for_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "hessq.test", "version": 1, "x": RunsCode(marker)}, path)
    for load in (lambda: load_sealed_torch(path, **KIND), lambda: load_torch_safely(path, what="x", remedy="r")):
        with pytest.raises(ArtifactError, match="would run code"):
            load()
    assert not marker.exists()
