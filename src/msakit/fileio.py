"""Atomic file writes (a temp file in the target's folder, then a rename, so a crash or a bad input
never leaves a half-written file where a good one was), strict JSON and safe YAML."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from msakit.errors import MsakitError


def _read_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it,
    which briefly gives other threads a umask of 0, so this runs once, at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; written files get the mode open() would give
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(file_object)` on a temp file beside `path`, then rename it over `path`.

    The file gets mode 0o666 minus the umask and is flushed to disk before the rename. If `write`
    raises, `path` keeps its old content and the temp file is removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MsakitError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, FILE_MODE)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # a full disk or a lost permission is the machine's state, not a bug: one line (torch.save
        # reports a failed write as a RuntimeError of its stream writer)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "PytorchStreamWriter" in str(exc)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
            raise MsakitError(f"cannot write {path}: {' '.join(reason.split())}") from None
        raise


def check_output(path: str | os.PathLike[str], *, folder: bool = True) -> Path:
    """`path` as a Path, after a one-line MsakitError if it cannot be written (checked before any
    work starts): a folder that is a file (or a file that is a folder), a place below a file, or a
    place without write permission. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise MsakitError(f"output {path} is a {'file' if folder else 'folder'}, not a "
                          f"{'folder' if folder else 'file'}")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MsakitError(f"output {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MsakitError(f"output {path}: {existing} is not writable")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` with `atomic_write_bytes`."""
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def strict_json(document: Any, reasons: dict[str, str] | None = None) -> str:
    """`document` as strict JSON (RFC 8259: no NaN or Infinity tokens, which strict parsers reject).

    A non-finite number becomes null; inside a mapping a sibling key `<key>_null` then says why:
    `reasons[key]` when given (e.g. why a metric is undefined), else "NaN" or "infinite".
    """
    reasons = reasons or {}

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                out[key] = clean(item)
                if isinstance(item, float) and not math.isfinite(item):
                    out[f"{key}_null"] = reasons.get(key, "NaN" if math.isnan(item) else "infinite")
            return out
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps(clean(document), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: Path, document: Any, reasons: dict[str, str] | None = None) -> None:
    """`strict_json(document, reasons)` written atomically to `path`."""
    atomic_write_text(path, strict_json(document, reasons))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `5e-4`, `1E3` and `.5` are numbers (YAML 1.1
    reads the first two as strings, so `--set training.lr=5e-4` was refused)."""


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely (plain data only, never objects), numbers as YAML 1.2 reads them;
    invalid YAML is a one-line MsakitError naming `source`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise MsakitError(f"{source} is not valid YAML ({' '.join(str(exc).split())})") from None
