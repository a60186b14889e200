"""The cue file: one JSON object per line and per sample, appended as results arrive.

Each line holds `id`, `split`, `backend`, `model`, `prompt_version`, `visual_cues`,
`language_cues` and `text` ("Visual cues: ...\\nLanguage cues: ..."), plus `usage`
(`prompt_tokens`, `completion_tokens`) for replies of an HTTP backend. A later line for the same id
replaces an earlier one. Records are appended and flushed one by one, so a crash can only leave the
last line cut short: the reader skips such a line with a warning and `CueFileWriter` removes it
before appending; any other malformed line is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from msakit.data.schema import SPLITS, MultimodalDataset, Split
from msakit.errors import MsakitError

logger = logging.getLogger(__name__)

RECORD_KEYS = ("id", "split", "backend", "model", "prompt_version", "visual_cues", "language_cues", "text")


def cue_text(visual_cues: str, language_cues: str) -> str:
    """The text the model's frozen prompt encoder reads."""
    return f"Visual cues: {visual_cues}\nLanguage cues: {language_cues}"


@dataclass(frozen=True)
class CueRecord:
    """The cues of one sample, as one line of the cue file."""

    id: str
    split: str
    backend: str
    model: str
    prompt_version: str
    visual_cues: str
    language_cues: str
    usage: dict[str, int] | None = field(default=None)

    @property
    def text(self) -> str:
        return cue_text(self.visual_cues, self.language_cues)

    def to_json(self) -> str:
        values: dict[str, Any] = {key: getattr(self, key) for key in RECORD_KEYS}
        if self.usage is not None:
            values["usage"] = self.usage
        return json.dumps(values, ensure_ascii=False)


def _parse_line(raw: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MsakitError(f"{path} line {number}: not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise MsakitError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
    for key in RECORD_KEYS:
        if key not in value:
            raise MsakitError(f"{path} line {number}: missing key {key!r}")
        if not isinstance(value[key], str):
            raise MsakitError(f"{path} line {number}: {key!r} should be a string, got {value[key]!r}")
    if value["split"] not in SPLITS:
        raise MsakitError(
            f"{path} line {number}: split {value['split']!r} is not one of {', '.join(SPLITS)}"
        )
    return value


def _complete_length(data: bytes, path: Path) -> int:
    """Bytes of `data` up to the end of its last complete record (all of it unless the tail was cut)."""
    if not data or data.endswith(b"\n"):
        return len(data)
    start = data.rfind(b"\n") + 1
    try:
        _parse_line(data[start:], path, data.count(b"\n") + 1)
    except MsakitError:
        return start
    return len(data)


def read_cue_records(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Every record of a cue file by id (a later line for an id wins); {} for a missing file."""
    path = Path(path).expanduser()
    if not path.exists():
        return {}
    if not path.is_file():
        raise MsakitError(f"cue file {path} is not a file")
    data = path.read_bytes()
    complete = _complete_length(data, path)
    if complete < len(data):
        logger.warning("%s: skipped the cut-off last line %d (an interrupted run)", path,
                       data.count(b"\n") + 1)
    records: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(data[:complete].split(b"\n"), start=1):
        if raw.strip():
            record = _parse_line(raw, path, number)
            records[record["id"]] = record
    return records


def load_cue_texts(path: str | os.PathLike[str]) -> dict[str, str]:
    """Sample id -> cue text ("Visual cues: ...\\nLanguage cues: ...") from a cue file."""
    return {sample_id: record["text"] for sample_id, record in _existing_records(path).items()}


def _existing_records(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MsakitError(f"cue file not found: {path}")
    return read_cue_records(path)


def cue_sources(path: str | os.PathLike[str], records: dict[str, dict[str, Any]],
                ids: Iterable[str]) -> dict[str, Any]:
    """Who wrote the cues of the samples `ids` in `records` (the cue file at `path`): the backends
    (so that offline cues are never taken for an MLLM's), and per backend, model and prompt version
    the number of those samples; `samples_without_cues` counts the ids the file has no record for."""
    path = Path(path).expanduser()
    counts: Counter[tuple[str, str, str]] = Counter()
    missing = 0
    for sample_id in ids:
        record = records.get(sample_id)
        if record is None:
            missing += 1
        else:
            counts[record["backend"], record["model"], record["prompt_version"]] += 1
    return {
        "path": str(path.resolve()),
        "backends": sorted({backend for backend, _, _ in counts}),
        "sources": [{"backend": b, "model": m, "prompt_version": v, "samples": n}
                    for (b, m, v), n in sorted(counts.items())],
        "samples_without_cues": missing,
    }


class CueFileWriter:
    """Appends records to a cue file, flushing each, after removing a cut-off last line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> CueFileWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab+")
        handle.seek(0)
        data = handle.read()
        complete = _complete_length(data, self.path)
        if complete < len(data):
            logger.warning("%s: removed the cut-off last line before appending", self.path)
            handle.truncate(complete)
        elif data and not data.endswith(b"\n"):
            handle.write(b"\n")  # a complete record without its newline: keep it, start a new line
        self._handle = handle
        return self

    def write(self, record: CueRecord) -> None:
        if self._handle is None:
            raise RuntimeError("CueFileWriter.write outside its `with` block")
        # one write per line, so an interruption cuts at most this line
        self._handle.write((record.to_json() + "\n").encode("utf-8"))
        self._handle.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


def with_cues(split: Split, texts: dict[str, str]) -> Split:
    """`split` with `side["cues"]`: each sample's cue text from `texts`, None where it has none."""
    cues = np.array([texts.get(str(i)) for i in split.ids], dtype=object)
    return replace(split, side={**split.side, "cues": cues})


def attach_cues(
    data: MultimodalDataset, path: str | os.PathLike[str]
) -> tuple[MultimodalDataset, dict[str, Any]]:
    """`data` with every split's cues from the cue file at `path` (`with_cues`), and who wrote
    them (`cue_sources`)."""
    records = _existing_records(path)  # read once: the texts and who wrote them
    texts = {sample_id: record["text"] for sample_id, record in records.items()}
    ids = [str(i) for name in SPLITS for i in data.split(name).ids]
    splits = {name: with_cues(data.split(name), texts) for name in SPLITS}
    return data.derive(**splits), cue_sources(path, records, ids)
