"""Atomic file writes: a temp file in the target's folder, then a rename, so a crash or a bad input
never leaves a half-written file where a good one was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, FILE_MODE)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` with `atomic_write_bytes`."""
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))
