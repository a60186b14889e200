"""Atomic writes: the normal file mode, the new content or the old one, never a temp file left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from msakit.fileio import atomic_write_bytes, atomic_write_text


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "result.json"
    atomic_write_text(target, "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    reference = tmp_path / "plain.json"
    reference.write_text("{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_text_is_written_as_utf8_and_replaces_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "table.md"
    target.write_text("old")
    atomic_write_text(target, "Corr ± 0.01 — ok\n")
    assert target.read_bytes() == "Corr ± 0.01 — ok\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"good old content")

    def half_then_fail(handle) -> None:
        handle.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_bytes() == b"good old content"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_an_interrupted_write_creates_nothing_where_there_was_nothing(tmp_path: Path) -> None:
    def interrupted(handle) -> None:
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "x.bin", interrupted)
    assert not list(tmp_path.iterdir())
