"""Read and write the MMSA pickle layout that the field exchanges its pre-extracted features in.

A pickle is a dict with `train`, `valid` and `test`, each a dict of arrays (REFERENCES.md §1).
`dataset_from_raw` is the one place where such a dict is checked and cleaned into a
`MultimodalDataset`; the pickle reader, the synthetic generator and the label.csv reader all go
through it, so every source obeys the same rules:

- each array is converted once per split (features float32, token ids and lengths int64);
- -inf/+inf/NaN feature values (COVAREP writes -inf) become 0 and are counted;
- labels must be finite, every array of a split must have one row per sample, and feature shapes
  must agree between splits (models are sized on the train split);
- ids, lengths and feature shapes are validated (`msakit.data.validate`): errors for what makes
  numbers meaningless, warnings (logged once, kept in `MultimodalDataset.warnings`) for the rest.

Pickles can run code when loaded, so they are read with a restricted unpickler that allows only
the globals plain data needs (`PLAIN_GLOBALS`: containers, numbers, strings, numpy arrays and
dtypes) and refuses anything else, naming it, before any of it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from msakit.choices import FAMILIES
from msakit.data.schema import SPLITS, MultimodalDataset, Split
from msakit.data.validate import validate_splits
from msakit.errors import MsakitError, one_line
from msakit.fileio import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

FEATURE_KEYS = ("text", "audio", "vision")
MODALITY_KEYS = ("text", "text_bert", "audio", "vision")
LENGTH_KEYS = {"audio": "audio_lengths", "vision": "vision_lengths"}
UNIMODAL_LABEL_KEYS = {"T": "regression_labels_T", "A": "regression_labels_A",
                       "V": "regression_labels_V"}
# what the MMSA releases of the benchmarks look like: (train, valid, test) sizes, (audio, vision)
# feature widths and the label range; a pickle is recognised by its sizes or by its widths, never
# by its file name
SIGNATURES = {
    "mosi": {"sizes": (1284, 229, 686), "widths": (5, 20), "labels": 3.0},
    "mosei": {"sizes": (16326, 1871, 4659), "widths": (74, 35), "labels": 3.0},
    "sims": {"sizes": (1368, 456, 457), "widths": (33, 709), "labels": 1.0},
    "simsv2": {"sizes": (2722, 647, 1034), "widths": (25, 177), "labels": 1.0},
}
_CHUNK = 512  # samples per step when scanning features, to bound the temporary mask's size


def recognise_family(splits: dict[str, Split]) -> tuple[str | None, str]:
    """The benchmark whose MMSA release `splits` match, and the evidence; (None, why not) when none.

    A family matches when its labels' range holds every label and either the split sizes or the
    audio and vision widths are that release's.
    """
    sizes = tuple(len(splits[s]) for s in SPLITS)
    train = splits["train"]
    widths = tuple(None if a is None else int(a.shape[-1]) for a in (train.audio, train.vision))
    largest = max(float(np.abs(splits[s].labels).max(initial=0.0)) for s in SPLITS)
    for family, signature in SIGNATURES.items():
        if largest > signature["labels"]:
            continue
        if sizes == signature["sizes"]:
            return family, f"recognised from its split sizes {'/'.join(map(str, sizes))}"
        if widths == signature["widths"]:
            return family, f"recognised from its audio and vision widths {widths[0]} and {widths[1]}"
    return None, (f"not recognised (sizes {'/'.join(map(str, sizes))}, audio/vision widths "
                  f"{widths[0]}/{widths[1]}): the model's default settings and MOSI's metric rules; "
                  "give --family to choose")


# the only globals a pickle of dicts, lists, strings, numbers and numpy arrays refers to (numpy 1 and
# 2 module names; `_codecs.encode` rebuilds bytes in protocol-2 pickles)
PLAIN_GLOBALS = frozenset({
    *(f"{core}.multiarray.{name}" for core in ("numpy.core", "numpy._core")
      for name in ("_reconstruct", "scalar")),
    "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
    "numpy.ndarray", "numpy.dtype", "_codecs.encode", "collections.OrderedDict",
    *(f"builtins.{name}" for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray",
                                      "complex", "int", "float", "str", "bytes", "bool")),
})


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for something other than plain data (which could run code)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in PLAIN_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_plain_pickle(path: Path, what: str = "pickle") -> tuple[Any, bool]:
    """The object in the pickle `path`, loaded with only the globals of plain data allowed (a
    pickle that names any other, e.g. `os.system`, is refused before anything runs), and whether
    the python2-era latin1 fallback was needed. One-line MsakitError for a missing, damaged or
    refused file."""
    if not path.exists():
        raise MsakitError(f"{what} not found: {path}")
    if path.is_dir():
        raise MsakitError(f"{path} is a folder, not a {what}")
    for encoding in ("ASCII", "latin1"):
        try:
            with path.open("rb") as f:
                return _PlainUnpickler(f, encoding=encoding).load(), encoding == "latin1"
        except UnicodeDecodeError:
            continue  # python2 str pickled by old numpy: latin1 maps every byte, numpy's own advice
        except RefusedGlobal as exc:
            raise MsakitError(f"{path} refused: it asks to load {exc}, which a {what} of plain data "
                              "never does (loading it could run code)") from None
        except (Exception, MemoryError) as exc:  # a damaged file can fail in any unpickling step
            raise MsakitError(f"{path} is not a readable {what} ({one_line(exc)})") from None
    raise MsakitError(f"{path} is not a readable {what} (its strings decode neither as ASCII nor latin1)")


def _strings(value: Any, where: str, key: str, latin1: bool) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise MsakitError(f"{where}: {key!r} should be 1-D, got shape {arr.shape}")
    out = np.empty(len(arr), dtype=object)
    for i, item in enumerate(arr.tolist()):
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        elif latin1 and isinstance(item, str):
            # the latin1 fallback turns python2 utf-8 byte strings (SIMS' Chinese) into mojibake
            with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
                item = item.encode("latin1").decode("utf-8")
        out[i] = str(item)
    return out


def _numeric(value: Any, where: str, key: str, dtype: type) -> np.ndarray:
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    try:
        if arr.dtype == object:
            # old MMSA pickles hold an object array of per-sample arrays
            arr = np.stack([np.asarray(item, dtype=dtype) for item in arr])
        elif arr.dtype != dtype:
            arr = arr.astype(dtype)
    except (ValueError, TypeError) as exc:
        raise MsakitError(f"{where}: {key!r} is not a numeric array ({one_line(exc)})") from None
    return arr


def _features(value: Any, where: str, key: str) -> tuple[np.ndarray, int]:
    """float32 (N, L, D) features with non-finite values set to 0, and how many there were."""
    arr = _numeric(value, where, key, np.float32)
    if arr.ndim != 3:
        raise MsakitError(
            f"{where}: {key!r} should be 3-D (samples, steps, features), got shape {arr.shape}"
        )
    replaced = 0
    for start in range(0, len(arr), _CHUNK):
        chunk = arr[start:start + _CHUNK]
        bad = ~np.isfinite(chunk)
        count = int(bad.sum())
        if count:
            if not arr.flags.writeable:
                arr = arr.copy()
                chunk = arr[start:start + _CHUNK]
            chunk[bad] = 0.0
            replaced += count
    return arr, replaced


def _labels(value: Any, where: str, key: str) -> np.ndarray:
    arr = _numeric(value, where, key, np.float32)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise MsakitError(f"{where}: {key!r} should be 1-D, got shape {arr.shape}")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise MsakitError(f"{where}: {key!r} has {bad} NaN or infinite label(s)")
    return arr


def _split(raw: Any, source: str, name: str, latin1: bool) -> tuple[Split, int]:
    where = f"{source} split {name!r}"
    if not isinstance(raw, dict):
        raise MsakitError(f"{where} is a {type(raw).__name__}, not a dict of arrays")
    for key in ("regression_labels", "id"):
        if key not in raw:
            raise MsakitError(f"{where} has no key {key!r}")
    if not any(raw.get(key) is not None for key in MODALITY_KEYS):
        raise MsakitError(
            f"{where} has none of the modality keys {', '.join(map(repr, MODALITY_KEYS))}"
        )

    labels = _labels(raw["regression_labels"], where, "regression_labels")
    n = len(labels)
    if n == 0:
        raise MsakitError(f"{where} is empty")
    rows = {"regression_labels": n}
    fields: dict[str, Any] = {"labels": labels}
    fields["ids"] = _strings(raw["id"], where, "id", latin1)
    rows["id"] = len(fields["ids"])
    if raw.get("raw_text") is not None:
        fields["raw_text"] = _strings(raw["raw_text"], where, "raw_text", latin1)
        rows["raw_text"] = len(fields["raw_text"])

    replaced = 0
    for key in FEATURE_KEYS:
        if raw.get(key) is None:
            continue
        fields[key], count = _features(raw[key], where, key)
        replaced += count
        rows[key] = len(fields[key])
    if raw.get("text_bert") is not None:
        value = raw["text_bert"]
        arr = np.asarray(value)
        if arr.dtype.kind == "f":
            arr = np.rint(np.nan_to_num(arr))  # float ids from some MMSA exports
        ids = _numeric(arr, where, "text_bert", np.int64)
        if ids.ndim != 3 or ids.shape[1] != 3:
            raise MsakitError(
                f"{where}: 'text_bert' should have shape (samples, 3, length), got {ids.shape}"
            )
        fields["text_bert"] = ids
        rows["text_bert"] = len(ids)
    for modality, key in LENGTH_KEYS.items():
        if raw.get(key) is None or modality not in fields:
            continue
        fields[key] = _numeric(raw[key], where, key, np.int64).reshape(-1)  # range: validate_splits
        rows[key] = len(fields[key])
    if raw.get("presence") is not None:  # written by `msakit extract`: modalities each clip has
        presence = _numeric(raw["presence"], where, "presence", np.int64)
        if presence.ndim != 2 or presence.shape[1] != 3 or not np.isin(presence, (0, 1)).all():
            raise MsakitError(
                f"{where}: 'presence' should be 0/1 of shape (samples, 3) for text, audio, vision, "
                f"got shape {presence.shape}"
            )
        fields["presence"] = presence.astype(bool)
        rows["presence"] = len(presence)
    if raw.get("domains") is not None:  # the synthetic generator's `domains` option writes it
        domains = _numeric(raw["domains"], where, "domains", np.int64).reshape(-1)
        if (domains < 0).any():
            raise MsakitError(f"{where}: 'domains' should hold domain indexes >= 0")
        fields["domains"] = domains
        rows["domains"] = len(domains)
    unimodal = {}
    for short, key in UNIMODAL_LABEL_KEYS.items():
        if raw.get(key) is not None:
            unimodal[short] = _labels(raw[key], where, key)
            rows[key] = len(unimodal[short])

    wrong = {key: count for key, count in rows.items() if count != n}
    if wrong:
        listed = ", ".join(f"{key!r} has {count}" for key, count in wrong.items())
        raise MsakitError(
            f"{where}: arrays differ in length: 'regression_labels' has {n}, {listed}"
        )
    return Split(unimodal_labels=unimodal, **fields), replaced


def _check_shapes(splits: dict[str, Split], source: str) -> None:
    """Every split must carry the same modalities with the same per-sample shapes."""
    for key in (*FEATURE_KEYS, "text_bert"):
        shapes = {name: getattr(s, key) for name, s in splits.items()}
        present = {name for name, arr in shapes.items() if arr is not None}
        if not present:
            continue
        if len(present) != len(shapes):
            missing = sorted(set(shapes) - present, key=SPLITS.index)
            raise MsakitError(
                f"{source}: {key!r} is in split(s) {', '.join(sorted(present, key=SPLITS.index))} "
                f"but missing in {', '.join(missing)}"
            )
        trailing = {name: arr.shape[1:] for name, arr in shapes.items()}
        if len(set(trailing.values())) > 1:
            listed = ", ".join(f"{name} {shape}" for name, shape in trailing.items())
            raise MsakitError(
                f"{source}: {key!r} has different (length, dim) between splits: {listed}"
            )


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise MsakitError(
            f"unknown dataset family {family!r}; expected one of {', '.join(FAMILIES)}"
        )


def dataset_from_raw(
    raw: Any, *, source: str, family: str | None, name: str, latin1: bool = False,
    family_source: str = "",
) -> MultimodalDataset:
    """Check and clean an MMSA-layout dict into a `MultimodalDataset`.

    `family` None recognises it from the data (`recognise_family`), else "custom"; `family_source`
    says where a given family came from. Feature arrays that already are float32 are used as they
    are and cleaned in place.
    """
    if family is not None:
        check_family(family)
    if not isinstance(raw, dict):
        raise MsakitError(
            f"{source} holds a {type(raw).__name__}, not a dict with 'train', 'valid' and 'test'"
        )
    for split_name in SPLITS:
        if split_name not in raw:
            raise MsakitError(
                f"{source} has no {split_name!r} split (keys: {sorted(map(str, raw))})"
            )
    splits: dict[str, Split] = {}
    replaced = 0
    for split_name in SPLITS:
        splits[split_name], count = _split(raw[split_name], source, split_name, latin1)
        replaced += count
    _check_shapes(splits, source)
    warnings = validate_splits(splits, source)
    for line in warnings:
        logger.warning("%s", line)
    if replaced:
        logger.info("%s: set %d non-finite feature values (-inf/inf/NaN) to 0", source, replaced)
    if family is None:
        family, family_source = recognise_family(splits)
        family = family or "custom"
    features = raw.get("features")  # written by `msakit extract`: its feature configuration
    return MultimodalDataset(
        name=name, family=family, family_source=family_source, source=source, replaced_nonfinite=replaced,
        features=features if isinstance(features, dict) else None, warnings=warnings, **splits
    )


def load_mmsa(
    path: str | os.PathLike[str], family: str | None = None, name: str | None = None,
    family_source: str = "given",
) -> MultimodalDataset:
    """Load an MMSA pickle (`unaligned_50.pkl`, `aligned_50.pkl`, ...) as a `MultimodalDataset`.

    `family` picks the metric rules and the settings section; when not given it is recognised from
    the data (`recognise_family`), and a pickle that is none of the benchmarks is "custom".
    """
    path = Path(path).expanduser()
    raw, latin1 = read_plain_pickle(path, "dataset pickle")
    data = dataset_from_raw(raw, source=str(path), family=family, name=name or path.stem, latin1=latin1,
                            family_source=family_source if family else "")
    _remembered_fingerprint(path, data)
    return data


def fingerprint_cache() -> Path:
    """Where the fingerprints of pickles are remembered: $XDG_CACHE_HOME/msakit (~/.cache/msakit)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "msakit" / "fingerprints.json"


def _remembered_fingerprint(path: Path, data: MultimodalDataset) -> None:
    """Give `data` the fingerprint remembered for the file at `path` when its size and modification
    time are unchanged (hashing a MOSEI pickle's arrays takes seconds); else compute it and remember
    it. The cache is a convenience: when it cannot be read or written, the hash is computed."""
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    cache = fingerprint_cache()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("fingerprint"), str):
        data.__dict__["fingerprint"] = entry["fingerprint"]  # the cached_property's own slot
        return
    known = known if isinstance(known, dict) else {}
    known[key] = {"stat": stamp, "fingerprint": data.fingerprint}
    try:
        atomic_write_text(cache, json.dumps(known, indent=1) + "\n")
    except OSError as exc:
        logger.debug("fingerprint cache %s not written: %s", cache, exc)


def save_mmsa(raw: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write an MMSA-layout dict as a pickle, atomically: readers never see half a file."""
    if not isinstance(raw, dict) or any(split not in raw for split in SPLITS):
        raise MsakitError(f"save_mmsa needs a dict with 'train', 'valid' and 'test' (for {path})")
    path = Path(path).expanduser()
    atomic_write_bytes(path, lambda f: pickle.dump(raw, f, protocol=pickle.HIGHEST_PROTOCOL))
    return path
