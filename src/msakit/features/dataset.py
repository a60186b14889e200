"""A folder of clips plus a label.csv -> an MMSA-layout pickle that every model trains on.

`build_dataset` reads an MMSA-FET-style label.csv (`video_id, clip_id` or a single `id`, then
`text`, `label`, `mode`; other columns ignored), finds each clip's media file, extracts the clips in
worker processes, and caches each clip's features under `<output>.cache/` (keyed by the clip
file, its size and time, its text and the feature configuration), so an interrupted run resumes
without redoing finished clips. A clip that fails (unreadable file, a crash in a native library)
is reported and skipped; the run goes on. Frame features are padded to the longest clip (at most
the configuration's `max_frames`) and their lengths recorded; word-aligned features
(`alignment.unit: word`) are padded to `text.max_tokens` rows, one per word, as aligned pickles
have every modality at the text's length; a per-sample `presence` (N, 3) array
says which modalities each clip really has. The pickle carries its feature configuration under
`features`, and `<output stem>.report.json` lists failed clips and why, absent modalities and the
time each extractor took.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msakit import __version__
from msakit.data.labelcsv import parse_label, parse_mode
from msakit.data.mmsa import save_mmsa
from msakit.data.schema import MODALITIES, SPLITS
from msakit.errors import MsakitError
from msakit.features.config import FeatureConfig
from msakit.features.media import MEDIA_SUFFIXES
from msakit.features.pipeline import feature_names
from msakit.features.workers import extract_all, progress_bar
from msakit.fileio import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

# a label.csv without `mode`: a stable split drawn from the id, in per-mille
_HASH_SPLIT = (("train", 800), ("valid", 900), ("test", 1000))


@dataclass(frozen=True)
class LabelRow:
    id: str  # "<video_id>$_$<clip_id>", or the single `id` column as given
    keys: tuple[str, ...]  # the relative file names (without suffix) the clip may have
    text: str
    label: float
    split: str


def _split_of(row_id: str) -> str:
    draw = int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % 1000
    return next(name for name, bound in _HASH_SPLIT if draw < bound)


def read_labels(path: str | Path) -> list[LabelRow]:
    """The rows of an MMSA-FET-style label.csv; errors name the file, line and value."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MsakitError(f"label file not found: {path}")
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            has_id = "id" in columns
            needed = ["label"] + (["id"] if has_id or "video_id" not in columns else ["video_id", "clip_id"])
            for column in needed:
                if column not in columns:
                    raise MsakitError(
                        f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})"
                    )
            for row in reader:
                line = reader.line_num
                if has_id:
                    row_id = (row["id"] or "").strip()
                    video, _, clip = row_id.partition("$_$")
                    keys = (row_id, f"{video}/{clip}", f"{video}_{clip}") if clip else (row_id,)
                else:
                    video, clip = (row["video_id"] or "").strip(), (row["clip_id"] or "").strip()
                    row_id = f"{video}$_${clip}"
                    keys = (f"{video}/{clip}", f"{video}_{clip}")
                if not row_id or row_id == "$_$":
                    raise MsakitError(f"{path} line {line}: empty clip id")
                if row_id in seen:
                    raise MsakitError(f"{path} line {line}: clip {row_id!r} already on line {seen[row_id]}")
                seen[row_id] = line
                label = parse_label(row["label"], path, line)
                split = parse_mode(row["mode"], path, line) if "mode" in columns else _split_of(row_id)
                rows.append(LabelRow(row_id, keys, (row.get("text") or "").strip(), label, split))
    except UnicodeDecodeError as exc:
        raise MsakitError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise MsakitError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise MsakitError(f"{path} has no clips")
    return rows


def index_media(folder: Path) -> dict[str, Path]:
    """Relative path without suffix ("video/clip") and bare stem -> media file; video before audio."""
    if not folder.is_dir():
        raise MsakitError(f"clip folder not found: {folder}")
    rank = {suffix: i for i, suffix in enumerate(MEDIA_SUFFIXES)}
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in rank and p.is_file()),
                   key=lambda p: (rank[p.suffix.lower()], str(p)))
    index: dict[str, Path] = {}
    for path in files:
        relative = path.relative_to(folder).with_suffix("").as_posix()
        index.setdefault(relative, path)
        index.setdefault(path.stem, path)
    return index


def _cache_key(config: FeatureConfig, media: Path, text: str) -> str:
    stat = media.stat()
    blob = json.dumps({"config": config.to_dict(), "file": str(media.resolve()), "size": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "text": text, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# a cache entry is an .npz file: the feature arrays, and everything else as one JSON string, so
# reading it back never unpickles anything
CACHED_ARRAYS = ("text_bert", "text", "audio", "vision")


def _write_cache(path: Path, value: dict[str, Any]) -> None:
    arrays = {k: value[k] for k in CACHED_ARRAYS if value.get(k) is not None}
    rest = {k: v for k, v in value.items() if k not in CACHED_ARRAYS}
    text = json.dumps(rest, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    atomic_write_bytes(path, lambda f: np.savez(f, _json=np.array(text), **arrays))


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cache entry written by `_write_cache`, or None when there is none or it is damaged (the
    clip is then extracted again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            value = json.loads(str(stored["_json"]))
            value.update({k: stored[k] if k in stored.files else None for k in CACHED_ARRAYS})
    except Exception as exc:  # a damaged file can fail in any step of reading a zip of arrays
        logger.warning("%s: damaged extraction cache entry, extracting again (%s: %s)", path,
                       type(exc).__name__, exc)
        return None
    return value


# --- assembling the pickle -------------------------------------------------------------------------
def _pad(arrays: list[np.ndarray], width: int, limit: int, fixed: bool = False
         ) -> tuple[np.ndarray, np.ndarray]:
    """(N, length, width) and the lengths: `length` the longest array up to `limit`, or `limit`
    when `fixed`."""
    length = limit if fixed else max(1, min(limit, max((len(a) for a in arrays), default=1)))
    out = np.zeros((len(arrays), length, width), dtype=np.float32)
    lengths = np.ones(len(arrays), dtype=np.int64)  # an absent modality: one zero frame
    for i, array in enumerate(arrays):
        n = min(len(array), length)
        out[i, :n] = array[:n]
        lengths[i] = max(n, 1)
    return out, lengths


def assemble(rows: list[LabelRow], results: dict[str, dict[str, Any]], config: FeatureConfig,
             names: dict[str, list[str]]) -> dict[str, Any]:
    """The MMSA-layout dict of the extracted clips, splits in label.csv order, padded per dataset."""
    kept = [row for row in rows if row.id in results]
    widths = {m: len(names[m]) for m in ("audio", "vision")}
    if config.word_aligned:
        limits = {"audio": config.text.max_tokens, "vision": config.text.max_tokens}
    else:
        limits = {"audio": config.acoustic.max_frames, "vision": config.visual.max_frames}
    padded = {m: _pad([results[r.id][m] for r in kept], widths[m], limits[m], config.word_aligned)
              for m in ("audio", "vision")}
    position = {row.id: i for i, row in enumerate(kept)}
    raw: dict[str, Any] = {}
    for split in SPLITS:
        index = np.array([position[r.id] for r in kept if r.split == split], dtype=np.int64)
        members = [kept[i] for i in index]
        part: dict[str, Any] = {
            "id": np.array([r.id for r in members], dtype=object),
            "raw_text": np.array([results[r.id]["transcript"] for r in members], dtype=object),
            "text_bert": np.stack([results[r.id]["text_bert"] for r in members]).astype(np.int64)
            if members else np.zeros((0, 3, config.text.max_tokens), dtype=np.int64),
            "regression_labels": np.array([r.label for r in members], dtype=np.float32),
            "presence": np.array([[results[r.id]["present"][m] for m in MODALITIES] for r in members],
                                 dtype=bool).reshape(-1, len(MODALITIES)),
        }
        if config.text.features:
            part["text"] = np.stack([results[r.id]["text"] for r in members]) if members else None
        for modality in ("audio", "vision"):
            features, lengths = padded[modality]
            part[modality], part[f"{modality}_lengths"] = features[index], lengths[index]
        raw[split] = part
    raw["features"] = {"config": config.to_dict(), "names": names, "msakit_version": __version__}
    return raw


def _summary(row: LabelRow, media: Path, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": row.id, "split": row.split, "file": str(media), "duration": round(result["duration"], 3),
            "present": result["present"], "transcript_source": result["transcript_source"],
            "notes": result["notes"], "stats": result["stats"],
            "seconds": {k: round(v, 4) for k, v in result["seconds"].items()}}


def build_dataset(
    clips: str | Path,
    labels: str | Path,
    output: str | Path,
    config: FeatureConfig,
    *,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract every clip of `labels` found in the folder `clips` and write the pickle `output`.

    `workers`: processes (default: one per CPU core; 0 extracts in this process). Returns the
    report that is also written to `<output stem>.report.json`.
    """
    clips, output = Path(clips).expanduser(), Path(output).expanduser()
    rows = read_labels(labels)
    media_index = index_media(clips)
    names = feature_names(config)  # also fails early, in one line, when the extract extra is absent
    cache = Path(cache_dir).expanduser() if cache_dir is not None else output.with_suffix(".cache")
    workers = (os.cpu_count() or 1) if workers is None else workers

    failures: list[dict[str, str]] = []
    results: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[LabelRow, Path, Path]] = []  # label row, media file, cache file
    for row in rows:
        media = next((media_index[k] for k in row.keys if k in media_index), None)
        if media is None:
            failures.append({"id": row.id, "file": "", "reason": f"no media file for {row.id!r} in {clips} "
                             f"(looked for {', '.join(row.keys)} with a media suffix)"})
            continue
        cache_file = cache / f"{_safe(row.id)}-{_cache_key(config, media, row.text)}.npz"
        cached = _read_cache(cache_file)
        if cached is not None:
            results[row.id] = cached
            summaries[row.id] = _summary(row, media, cached)
        else:
            jobs.append((row, media, cache_file))
    cached_count = len(results)

    def done(index: int, ok: bool, value: Any) -> None:
        row, media, cache_file = jobs[index]
        if ok and not any(value["present"].values()):
            ok, value = False, "nothing usable: no audio above the silence threshold, no face, no words"
        if ok:
            _write_cache(cache_file, value)
            results[row.id] = value
            summaries[row.id] = _summary(row, media, value)
        else:
            failures.append({"id": row.id, "file": str(media), "reason": value})
        advance()

    advance, stop = progress_bar(len(jobs), "extracting", f"({cached_count} cached)" if cached_count else "",
                                 progress)
    try:
        if jobs:
            extract_all(config, [(str(media), row.text) for row, media, _ in jobs], workers, done)
    finally:
        stop()

    report = _report(rows, results, summaries, failures, cached_count, output, config)
    report_path = output.with_name(f"{output.stem}.report.json")
    atomic_write_json(report_path, report)
    empty = [s for s in SPLITS if not any(r.split == s and r.id in results for r in rows)]
    if empty:
        raise MsakitError(f"no clip of split(s) {', '.join(empty)} could be extracted "
                          f"({len(failures)} failed; see {report_path})")
    save_mmsa(assemble(rows, results, config, names), output)
    report["report"] = str(report_path)
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _report(rows: Iterable[LabelRow], results: dict[str, Any], summaries: dict[str, Any],
            failures: list[dict[str, str]], cached: int, output: Path,
            config: FeatureConfig) -> dict[str, Any]:
    rows = list(rows)
    extracted = [summaries[r.id] for r in rows if r.id in summaries]
    media_seconds = sum(s["duration"] for s in extracted)
    per_extractor: dict[str, float] = {}
    for summary in extracted:
        for name, seconds in summary["seconds"].items():
            per_extractor[name] = per_extractor.get(name, 0.0) + seconds
    return {
        "output": str(output),
        "clips": len(rows),
        "extracted": len(extracted),
        "from_cache": cached,
        "failed": len(failures),
        "splits": {s: sum(1 for r in rows if r.split == s and r.id in results) for s in SPLITS},
        "absent": {m: [s["id"] for s in extracted if not s["present"][m]] for m in MODALITIES},
        "failures": failures,
        "media_seconds": round(media_seconds, 3),
        "extraction_seconds_per_media_second": {
            name: round(seconds / media_seconds, 4) if media_seconds else None
            for name, seconds in per_extractor.items()
        },
        "config": config.to_dict(),
        "clips_detail": extracted,
    }
