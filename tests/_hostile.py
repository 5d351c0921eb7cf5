"""Hostile files shared by the tests that prove hessq never runs code from a file."""

import os


class RunsCode:
    """An object whose pickle runs ``touch <marker>`` when loaded with ``weights_only=False``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
