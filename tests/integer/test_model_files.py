"""A model.hq that is not one this hessq wrote is refused with an ArtifactError naming it, running no code."""

from __future__ import annotations


import pytest
import torch

import hessq
from hessq import ArtifactError
from hessq.integer import IntegerConversionError

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
    from hessq.integer._model import FORMAT, IntegerModel, _restore

    model = tiny_bert()
    q = hessq.quantize(model, 8, [token_batch(i, length=16) for i in range(2)], pin_first_last=None)
    im = hessq.to_integer(q, input_shape=(16,))
    header, tensors = im._payload()
    refs = [ref for entry in header["program"] for ref in [*entry["tensors"].values(), entry.get("scale", {})]]
    expanded = [ref for ref in refs if "expand" in ref]
    assert expanded  # at least the attention layout's multipliers and output scales
    assert any("expand" in entry.get("scale", {}) for entry in header["program"])
    narrowed = [ref for ref in refs if "widen" in ref]  # int64 multipliers b < 2^31 and shifts c < 63
    assert narrowed and all(tensors[ref["name"]].dtype in (torch.int8, torch.int16, torch.int32) for ref in narrowed)
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
    # a version-1 file (every tensor in full, scales named by a string) still loads; a later version is refused by name
    for entry in header["program"]:
        for key, ref in entry["tensors"].items():
            tensors[ref["name"]] = _restore(tensors[ref["name"]], ref)
            entry["tensors"][key] = {"name": ref["name"]}
        if "scale" in entry:
            tensors[entry["scale"]["name"]] = _restore(tensors[entry["scale"]["name"]], entry["scale"])
            entry["scale"] = entry["scale"]["name"]
    for version in (1, 5):
        header["version"] = version
        blob = {"header": __import__("json").dumps(header), "tensors": tensors,
                "sha256": IntegerModel._digest(header, tensors)}
        torch.save(blob, tmp_path / f"v{version}.hq")
    assert header["format"] == FORMAT
    assert torch.equal(hessq.load_integer(tmp_path / "v1.hq")(ids), im(ids))
    with pytest.raises(ArtifactError, match="version 5"):
        hessq.load_integer(tmp_path / "v5.hq")


@pytest.mark.parametrize("bits", range(1, 8))
def test_bit_packing_round_trips_every_code_and_refuses_codes_out_of_range(bits):
    from hessq.integer._model import _pack_bits, _unpack_bits

    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (7, 13), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    codes[0, :2] = torch.tensor([low, high])  # both ends of the range
    packed = _pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(_unpack_bits(packed, bits, [7, 13]), codes)
    with pytest.raises(IntegerConversionError, match=f"outside the {bits}-bit range"):
        _pack_bits(torch.tensor([high + 1]), bits)
    with pytest.raises(IntegerConversionError, match=f"outside the {bits}-bit range"):
        _pack_bits(torch.tensor([low - 1]), bits)


def test_narrow_weights_are_stored_at_their_width_and_version_2_nibbles_still_load(tmp_path):
    from tests._bert import tiny_bert, token_batch
    from hessq.integer._model import IntegerModel

    def nibbles(codes):  # how versions 1 and 2 stored weights of at most 4 bits
        flat = codes.flatten().to(torch.int16) & 0xF
        flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
        return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)

    model = tiny_bert()
    layers = list(hessq.quantizable_layers(model))
    widths = [2, 3, 5, 4, 8, 6]
    plan = {n: (widths[i % len(widths)], 8) for i, n in enumerate(layers)}
    q = hessq.quantize(model, plan, [token_batch(i, length=16) for i in range(2)], pin_first_last=None)
    im = hessq.to_integer(q, input_shape=(16,))
    header, tensors = im._payload()
    seen = set()
    for op, entry in zip(im.ops, header["program"]):
        if "w_bits" not in op.attrs:  # a LayerNorm's weight is not a code tensor
            continue
        w, bits = op.tensors["weight"], op.attrs["w_bits"]
        stored = tensors[entry["tensors"]["weight"]["name"]]
        assert stored.numel() * stored.element_size() == (-(-w.numel() * bits // 8) if bits < 8 else w.numel())
        seen.add(bits)
    assert {2, 3, 4, 5, 6, 8} <= seen
    im.save(tmp_path / "m.hq")
    ids = token_batch(9, length=16)["input_ids"]
    assert torch.equal(hessq.load_integer(tmp_path / "m.hq")(ids), im(ids))
    # a version-2 file: weights of at most 4 bits as nibbles, wider ones as int8
    for op, entry in zip(im.ops, header["program"]):
        if "w_bits" in op.attrs:
            ref = entry["tensors"]["weight"]
            w, bits = op.tensors["weight"], op.attrs["w_bits"]
            tensors[ref["name"]] = nibbles(w) if bits <= 4 else w.to(torch.int8)
            entry["tensors"]["weight"] = {"name": ref["name"], "packed4": list(w.shape)} if bits <= 4 else {"name": ref["name"]}
    header["version"] = 2
    blob = {"header": __import__("json").dumps(header), "tensors": tensors, "sha256": IntegerModel._digest(header, tensors)}
    torch.save(blob, tmp_path / "v2.hq")
    assert torch.equal(hessq.load_integer(tmp_path / "v2.hq")(ids), im(ids))
