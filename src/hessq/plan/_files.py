"""One save/load path for the planner's files (plan.json, pareto.json, latency.json): sealed JSON.

A file carries ``format``, ``version`` and ``sha256`` (:mod:`hessq._io`); one that is damaged,
of another kind, checksum-less, from another version, or sealed around the wrong structure is
refused whole with an :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from hessq._errors import ArtifactError, ConfigError, ConfigTypeError
from hessq._io import check_sealed, dump_sealed_json, load_sealed_json, parse_sealed_json, save_sealed_json

T = TypeVar("T", bound="SealedJSONFile")


class SealedJSONFile:
    """Mixin: ``to_json/from_json`` and ``save/load`` as sealed JSON, from ``to_dict/from_dict``.

    A subclass sets ``FORMAT``, ``VERSION``, ``WHAT`` (the kind, for a person) and ``REMEDY`` (how to
    make a good file), and implements ``to_dict`` (holding ``format`` and ``version``) and
    ``from_dict``, which raises :class:`ConfigError` for content of the wrong structure.
    """

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]
    REMEDY: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        raise NotImplementedError

    @classmethod
    def check_kind(cls, data: Any) -> Mapping[str, Any]:
        """``data`` when it is a mapping of this kind and version (for in-memory dicts; files go through the seal).

        A dict that carries a checksum must match it.
        """
        if not isinstance(data, Mapping):
            raise ConfigTypeError(f"a hessq {cls.WHAT} must be a mapping, got {type(data).__name__}")
        if data.get("format") != cls.FORMAT:
            raise ConfigError(f"not a hessq {cls.WHAT} (format {data.get('format')!r}, expected {cls.FORMAT!r})")
        if data.get("version") != cls.VERSION:
            raise ConfigError(f"{cls.WHAT} version {data.get('version')!r} is not supported (this hessq reads "
                              f"version {cls.VERSION}); {cls.REMEDY}")
        if "sha256" in data:
            try:
                data = check_sealed(data, kind=cls.FORMAT, versions=(cls.VERSION,), source=f"this {cls.WHAT}",
                                    what=cls.WHAT, remedy=cls.REMEDY)
            except ArtifactError as exc:
                raise ConfigError(str(exc)) from None
        return data

    @classmethod
    def _decode(cls: type[T], content: Mapping[str, Any], source: str) -> T:
        try:
            return cls.from_dict(content)
        except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{source} is sealed but does not hold a valid {cls.WHAT} ({exc}); {cls.REMEDY}") from None

    def to_json(self) -> str:
        """Sealed JSON text: ``format``, ``version`` and a ``sha256`` of the rest."""
        return dump_sealed_json(self.to_dict())

    @classmethod
    def from_json(cls: type[T], text: str | bytes, source: str = "the JSON text") -> T:
        """Parse sealed JSON text; anything damaged, foreign, unsealed or of another version is an ArtifactError."""
        content = parse_sealed_json(text, kind=cls.FORMAT, versions=(cls.VERSION,), source=source, what=cls.WHAT,
                                    remedy=cls.REMEDY)
        return cls._decode(content, source)

    def save(self, path: str | os.PathLike) -> None:
        """Write sealed JSON to a temporary file beside ``path`` and rename it onto ``path``."""
        save_sealed_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        """Read a file :meth:`save` wrote; refuse (ArtifactError naming it) one that is damaged, foreign or unsealed."""
        content = load_sealed_json(path, kind=cls.FORMAT, versions=(cls.VERSION,), what=cls.WHAT, remedy=cls.REMEDY)
        return cls._decode(content, str(path))


# --- structure checks shared by the three kinds --------------------------------------------


def mapping_or_empty(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` when it is a mapping, {} for None; a ConfigError otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__} {_short(value)}")
    return value


def required(data: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in data:
        raise ConfigError(f"{what} has no {key!r} entry")
    return data[key]


def real_number(value: Any, what: str, *, allow_none: bool = False, finite: bool = True) -> float | None:
    """``value`` as a float when it is a real number (not a bool, not NaN unless ``finite`` is False)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a number, got {type(value).__name__} {_short(value)}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return v


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
