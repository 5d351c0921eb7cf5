"""Hostile files shared by the tests that prove hessq never runs code from a file."""

import os
import random


class RunsCode:
    """An object whose pickle runs ``touch <marker>`` when loaded with ``weights_only=False``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def check_bit_flips(raw: bytes, path, load, same, *, count: int = 200, seed: int = 12) -> int:
    """Write ``count`` copies of ``raw``, each with one random bit flipped, to ``path`` and load each.

    Every load must raise an :class:`hessq.ArtifactError` naming ``path``, or give content for which
    ``same(loaded)`` holds (a flip that changes nothing read, e.g. zip padding). Returns how many were refused.
    """
    from hessq import ArtifactError

    rng = random.Random(seed)
    refused = 0
    for _ in range(count):
        pos, bit = rng.randrange(len(raw)), rng.randrange(8)
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << bit
        path.write_bytes(bytes(damaged))
        try:
            loaded = load(path)
        except ArtifactError as exc:
            assert str(path) in str(exc), exc
            refused += 1
        else:
            assert same(loaded), f"flipping bit {bit} of byte {pos} (of {len(raw)}) loaded changed content"
    return refused
