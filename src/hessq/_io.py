"""Files hessq writes: never half-written (temporary name, then rename), always sealed.

Every artefact carries ``format`` (its kind), ``version`` and ``sha256``, a checksum of all the
rest. :func:`check_sealed` refuses a file that is damaged, of another kind or from another
version, naming the file and what is wrong. Torch files are read with ``weights_only=True``:
loading one never runs pickled code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from hessq._errors import ArtifactError, ConfigError

_TMP_SUFFIX = ".tmp"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed :func:`write_atomic` of ``path`` left beside it.

    Their names hold the writer's process id; a file whose writer no longer runs is stale.
    Returns the paths removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is None or (pid != os.getpid() and not pid_alive(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` as a Path, or a :class:`ConfigError` when it cannot be a file hessq writes.

    Catches, before any expensive work, a path that is a directory or lies under a regular file.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file name inside it, e.g. {path / 'out'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} lies under {parent}, which is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{what} {path}: the folder {parent} is not writable")
            break
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it onto ``path``."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- checksums --------------------------------------------------------------------------


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """A canonical walk of nested dicts, lists, tensors and JSON scalars into ``h``."""
    if isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(json.dumps(str(key)).encode())
            h.update(b":")
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
            h.update(b",")
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{list(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, float) and not math.isfinite(obj):
        h.update(repr(obj).encode())
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(json.dumps(obj).encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


def digest(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tensors and JSON scalars."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def seal(content: Mapping[str, Any]) -> dict[str, Any]:
    """``content`` (which holds ``format`` and ``version``) with its checksum added as ``sha256``."""
    out = {k: v for k, v in content.items() if k != "sha256"}
    out["sha256"] = digest(out)
    return out


def check_sealed(data: Any, *, kind: str, versions: Collection[int], source: str, what: str, remedy: str) -> dict[str, Any]:
    """``data`` without its ``sha256`` once format, version and checksum hold; an :class:`ArtifactError` otherwise.

    ``what`` names the kind for a person ("bit plan"); ``remedy`` says how to make a good file.
    """
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{source} is not a hessq {what} (it holds a {type(data).__name__}); {remedy}")
    if data.get("format") != kind:
        raise ArtifactError(f"{source} is not a hessq {what} (format {data.get('format')!r}, expected {kind!r}); {remedy}")
    version = data.get("version")
    if version not in versions:
        newest = max(versions)
        if isinstance(version, int) and not isinstance(version, bool) and version > newest:
            raise ArtifactError(f"{source} is {what} version {version}, written by a newer hessq; this one reads "
                                f"version {newest}: upgrade hessq, or {remedy}")
        raise ArtifactError(f"{source} is {what} version {version!r}; this hessq reads version {newest}: {remedy}")
    expected = data.get("sha256")
    if not isinstance(expected, str):
        raise ArtifactError(f"{source} has no checksum, so it was not written by this hessq or was edited; {remedy}")
    content = {k: v for k, v in data.items() if k != "sha256"}
    try:
        actual = digest(content)
    except TypeError as exc:
        raise ArtifactError(f"{source} is damaged ({exc}); {remedy}") from None
    if actual != expected:
        raise ArtifactError(f"{source} is damaged or was edited: its checksum does not match its contents; {remedy}")
    return content


# --- sealed JSON and torch files ---------------------------------------------------------


def dump_sealed_json(content: Mapping[str, Any]) -> str:
    return json.dumps(seal(content), indent=2)


def parse_sealed_json(text: str | bytes, *, kind: str, versions: Collection[int], source: str, what: str,
                      remedy: str) -> dict[str, Any]:
    """Parse JSON text and :func:`check_sealed` it; damaged text is an :class:`ArtifactError` naming ``source``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{source} is not valid JSON ({exc}): truncated, damaged or not a hessq {what}; {remedy}") from None
    return check_sealed(data, kind=kind, versions=versions, source=source, what=what, remedy=remedy)


def _read_bytes(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a hessq {what} file")
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"no {what} file", str(path))
    return path.read_bytes()


def save_sealed_json(path: str | os.PathLike, content: Mapping[str, Any]) -> None:
    write_text_atomic(path, dump_sealed_json(content))


def load_sealed_json(path: str | os.PathLike, *, kind: str, versions: Collection[int], what: str, remedy: str) -> dict[str, Any]:
    path = Path(path)
    return parse_sealed_json(_read_bytes(path, what), kind=kind, versions=versions, source=str(path), what=what, remedy=remedy)


def save_sealed_torch(path: str | os.PathLike, content: Mapping[str, Any]) -> None:
    """A torch file of tensors and plain values (nothing that needs pickled code to load), sealed."""
    sealed = seal(content)
    write_atomic(path, lambda tmp: torch.save(sealed, tmp))


def load_torch_safely(path: str | os.PathLike, *, what: str, remedy: str) -> Any:
    """``torch.load(path, weights_only=True)``: an :class:`ArtifactError` naming the file for anything unreadable.

    A pickle that asks for code (any object beyond tensors and plain values) is refused, never run.
    """
    path = Path(path)
    _read_bytes(path, what)  # the same clear errors for a missing file or a directory
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise ArtifactError(f"{path} is not a readable hessq {what}: it holds more than tensors and plain values, and "
                                f"such a pickle would run code when loaded, which hessq never does; {remedy}") from None
        why = f"UnpicklingError: {_first_line(exc)}"
    except Exception as exc:  # truncated zip, not a torch file, ...: many exception types
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    raise ArtifactError(f"{path} is not a readable hessq {what} (truncated or corrupt, or another kind of file; {why}); {remedy}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "no detail"


def load_sealed_torch(path: str | os.PathLike, *, kind: str, versions: Collection[int], what: str, remedy: str) -> dict[str, Any]:
    """Read with ``weights_only=True`` (no pickled code runs), then :func:`check_sealed`."""
    data = load_torch_safely(path, what=what, remedy=remedy)
    return check_sealed(data, kind=kind, versions=versions, source=str(path), what=what, remedy=remedy)


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where models trained on first use are kept: ``cache_dir``, else ``$HESSQ_CACHE_DIR``, else ``~/.cache/hessq``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HESSQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hessq"
