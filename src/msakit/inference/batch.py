"""Batch prediction: media files and folders in, one result per file, streamed to a CSV or JSONL file.

Folders are walked for media files (`MEDIA_SUFFIXES`). Extraction runs in worker processes while
this process scores with the model, loaded once; each result is appended to the output as soon as it
is known (flushed and synced), so a killed run loses at most the files in flight. Run again with the
same output and the files already scored are skipped; rows of failed files are dropped and those
files tried again. An output written with another model is refused rather than mixed. One failure
never stops the others: it is a row with an `error`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msakit.errors import MsakitError, one_line
from msakit.features.media import MEDIA_SUFFIXES
from msakit.features.workers import extract_all, progress_bar
from msakit.fileio import atomic_write_text
from msakit.inference.predict import Predictor

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("file", "score", "class", "label", "label_name", "scale", "text", "audio", "vision", "used",
               "transcript", "transcript_source", "model", "error")
FORMATS = (".csv", ".jsonl")


def find_media(inputs: Sequence[str | Path]) -> list[Path]:
    """The media files of `inputs`, in order and once each; a folder is walked for media suffixes
    (a named file is kept whatever it is, so that a bad one gets its error row)."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            media = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)
            if not media:
                raise MsakitError(f"no media files in the folder {path} (looked for "
                                  f"{', '.join(MEDIA_SUFFIXES)})")
        else:
            media = [path]
        found.update((str(p), p) for p in media if str(p) not in found)
    return list(found.values())


def model_identity(predictor: Predictor) -> str:
    """What the `model` column records: the packaged model's name, or the checkpoint's full path."""
    if predictor.checkpoint.startswith("pretrained:"):
        return predictor.checkpoint
    return str(Path(predictor.checkpoint).expanduser().resolve())


class PredictionFile:
    """The output of a batch run: rows already scored are read back, new rows appended and synced."""

    def __init__(self, path: str | Path, model: str, overwrite: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.format = self.path.suffix.lower()
        if self.format not in FORMATS:
            raise MsakitError(f"--output {self.path}: the file name must end in .csv or .jsonl")
        self.model = model
        kept = [] if overwrite or not self.path.exists() else self._scored_rows()
        self.done = {row["file"] for row in kept}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "".join(self._line(row) for row in kept) if self.format == ".jsonl"
                          else self._csv(kept, header=True))
        self._handle = self.path.open("a", encoding="utf-8", newline="")

    def _scored_rows(self) -> list[dict[str, Any]]:
        """The complete rows with a score (a line cut short by a kill is dropped)."""
        if not self.path.is_file():
            raise MsakitError(f"--output {self.path} exists and is not a file")
        text = self.path.read_text(encoding="utf-8", errors="replace")
        text = text[:text.rfind("\n") + 1]
        if self.format == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or "file" not in row:
                    raise MsakitError(f"{self.path} line {number} is not a prediction row of msakit; "
                                      "give another --output or --overwrite")
                rows.append(row)
        else:
            reader = csv.DictReader(io.StringIO(text))
            if text and tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise MsakitError(f"{self.path} is not a prediction file of msakit (its header is not "
                                  f"{','.join(CSV_COLUMNS)}); give another --output or --overwrite")
            rows = list(reader)
        other = next((row.get("model") for row in rows if row.get("model") != self.model), None)
        if other is not None:
            raise MsakitError(f"{self.path} holds predictions of another model ({other}); give another "
                              "--output or --overwrite")
        return [row for row in rows if not row.get("error")]

    def _line(self, row: dict[str, Any]) -> str:
        return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"

    def _csv(self, rows: Sequence[dict[str, Any]], header: bool = False) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def write(self, result: dict[str, Any]) -> None:
        """Appends one result and syncs it to disk."""
        row = {**result, "model": self.model}
        if self.format == ".csv":
            flat = {**row, **{m: int(there) for m, there in row.get("present", {}).items()},
                    "used": "+".join(row.get("used", [])),
                    "transcript": " ".join(str(row.get("transcript", "")).split())}  # one line per file
            line = self._csv([flat])
        else:
            line = self._line(row)
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


@dataclass
class BatchRun:
    """What one batch run did: its results (errors included) and the files skipped as already scored."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output: str | None = None

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if "error" in r]


def predict_many(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    *,
    text: str | None = None,
    output: str | Path | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchRun:
    """Scores every media file of `inputs` (files or folders), in `workers` extraction processes
    (default: one per core, none for a single file), writing each result to `output` as it comes."""
    files = find_media(inputs)
    if not files:
        raise MsakitError("no media files to predict")
    if text is not None and len(files) != 1:
        raise MsakitError(f"a given text applies to one file, not {len(files)}")
    sink = PredictionFile(output, model_identity(predictor), overwrite) if output is not None else None
    run = BatchRun(output=None if sink is None else str(sink.path))
    todo = files
    if sink is not None:
        run.skipped = [str(f) for f in files if str(f) in sink.done]
        todo = [f for f in files if str(f) not in sink.done]
        if run.skipped:
            logger.info("%d of %d files already scored in %s: skipped", len(run.skipped), len(files),
                        sink.path)
    if workers is None:
        workers = 0 if len(todo) <= 1 else min(os.cpu_count() or 1, len(todo))
    advance, stop = progress_bar(len(todo), "predicting", enabled=progress)

    def done(index: int, ok: bool, value: Any) -> None:
        path = str(todo[index])
        if ok:
            try:
                result = predictor.score(value)
            except MsakitError as exc:
                result = {"error": one_line(exc)}
        else:
            result = {"error": value}
        result = {"file": path, **{key: v for key, v in result.items() if key != "file"}}
        run.results.append(result)
        if sink is not None:
            sink.write(result)
        if on_result is not None:
            on_result(result)
        advance()

    try:
        extract_all(predictor.config, [(str(f), text) for f in todo], workers, done, reads=predictor.reads,
                    pipeline=predictor.pipeline)
    finally:
        stop()
        if sink is not None:
            sink.close()
    order = {str(f): i for i, f in enumerate(todo)}
    run.results.sort(key=lambda r: order[r["file"]])
    return run
