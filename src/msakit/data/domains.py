"""Domain generalization: train on source domains, select on held-out source data, test on an unseen one.

A `DomainTask` is the data of one such run, already split, and nothing in it overlaps:

- `data.train`, `data.valid`: the source domains' training and validation samples; the checkpoint
  is chosen on `data.valid`, so selection sees source data only;
- `data.test`: the source domains' test samples, scored as the in-domain result;
- `target`: the target domain's samples (of every split by default), scored as the out-of-domain
  result; the model never sees them in training or selection.

Domains are whole datasets (`dataset_task`, leave-one-dataset-out) or groups inside one dataset
(`group_task`): the data's own `Split.domains` ("domains"), its videos dealt to `n_groups` groups in
a seeded order ("video"), a seeded k-means clustering of its videos' time-pooled features
("cluster"), or a column of a CSV file ("FILE.csv:COLUMN"). Source samples keep the dataset's own
train/valid/test membership, so a video never spans training and testing when the dataset's splits
keep videos apart (MMSA's and the synthetic data's do).

Between datasets a modality is used only where it means the same thing in every dataset
(`transfer`): audio and vision need the same width and, for pickles written by `msakit extract`, the
same recorded extractor settings (an extracted pickle and an MMSA one never share an extractor);
token ids need one vocabulary (MOSI, MOSEI and msakit's MiniLM share bert-base-uncased's, SIMS has
bert-base-chinese's); frozen text features need the same encoder. The other modalities are left
out, never padded to a common width, and the report names each decision and its reason. Labels are
put on the target's scale (SIMS' [-1, 1] and MOSI's [-3, 3] differ by a factor 3) and scored with
the target's metric rules.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from msakit.data.schema import MODALITIES, SPLITS, MultimodalDataset, Split, concat_splits
from msakit.errors import MsakitError

GROUPINGS = ("domains", "video", "cluster")  # or "FILE.csv:COLUMN"


LABEL_RANGE = {"mosi": 3.0, "sims": 1.0}  # labels lie in [-r, r], by metric family


ARRAYS = ("text_bert", "text", "audio", "vision")  # what a dataset may carry per modality


# extractor settings that only pad or truncate, or say whether an array is stored: they do not
# change what a feature means
_LENGTH_SETTINGS = {"max_frames", "max_tokens", "features"}


_SETTINGS_SECTIONS = {"text_bert": ("text",), "text": ("text",), "audio": ("acoustic",),
                      "vision": ("visual",)}


_CHUNK = 1024  # samples per step when pooling features for the clustering


@dataclass
class DomainTask:
    """One domain generalization run's data; `Split.domains` holds indexes into `domain_names`."""

    data: MultimodalDataset  # train / valid / test of the source domains
    target: Split  # the unseen domain
    domain_names: list[str]
    sources: list[str]
    target_name: str
    grouping: str  # "datasets", "domains", "video", "cluster" or "FILE:COLUMN"
    target_splits: tuple[str, ...]
    # array ("text_bert", "text", "audio", "vision") -> {"used": bool, "reason": str}
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the run uses: text when its ids or its features transfer."""
        used = {name for name, decision in self.arrays.items() if decision["used"]}
        return tuple(m for m in MODALITIES if m in used or (m == "text" and "text_bert" in used))

    def describe(self) -> dict[str, Any]:
        """What the run is made of, for dg.json: domains with their roles and sample counts."""
        domains = []
        for index, name in enumerate(self.domain_names):
            role = "target" if name == self.target_name else (
                "source" if name in self.sources else "unused")
            if role == "target":
                samples = {"target": int((self.target.domains == index).sum())}
            elif role == "unused":
                samples = {}
            else:
                samples = {s: int((self.data.split(s).domains == index).sum()) for s in SPLITS}
            domains.append({"index": index, "name": name, "role": role, "samples": samples})
        return {
            "grouping": self.grouping, "sources": self.sources, "target": self.target_name,
            "target_splits": list(self.target_splits),
            "sizes": {"train": len(self.data.train), "valid": len(self.data.valid),
                      "in_domain_test": len(self.data.test), "target": len(self.target)},
            "domains": domains, "modalities": list(self.modalities), "arrays": self.arrays,
            "notes": self.notes,
        }


# --- domains as whole datasets ---------------------------------------------------------------------
def _vocabulary(data: MultimodalDataset) -> str:
    """The vocabulary of a dataset's `text_bert` ids."""
    if data.features is not None:
        encoder = str(data.features.get("config", {}).get("text", {}).get("encoder", "minilm"))
        return "bert-base-uncased" if encoder == "minilm" else encoder  # MiniLM reuses its vocab
    return "bert-base-chinese" if data.metric_family == "sims" else "bert-base-uncased"


def _text_encoder(data: MultimodalDataset) -> str:
    """What computed a dataset's frozen `text` features."""
    if data.features is not None:
        encoder = data.features.get("config", {}).get("text", {}).get("encoder", "minilm")
        return f"frozen {encoder} states (msakit extract)"
    if data.family == "synthetic":
        return "msakit's synthetic stand-in"
    return f"frozen {_vocabulary(data)} states (MMSA)"


def _settings(data: MultimodalDataset, array: str) -> dict[str, Any]:
    """The recorded extractor settings that decide what `array` of an extracted pickle means."""
    config = (data.features or {}).get("config", {})
    out: dict[str, Any] = {}
    for section in _SETTINGS_SECTIONS[array]:
        for key, value in sorted((config.get(section) or {}).items()):
            if key not in _LENGTH_SETTINGS:
                out[f"{section}.{key}"] = value
    if array in ("audio", "vision"):
        out["names"] = (data.features or {}).get("names", {}).get(array)
    return out


def _listing(datasets: Sequence[MultimodalDataset], values: Sequence[Any]) -> str:
    return ", ".join(f"{v} ({d.name})" for d, v in zip(datasets, values, strict=True))


def _decide(datasets: Sequence[MultimodalDataset], array: str) -> dict[str, Any]:
    values = [getattr(d.train, array) for d in datasets]
    absent = [d.name for d, v in zip(datasets, values, strict=True) if v is None]
    if len(absent) == len(datasets):
        return {"used": False, "reason": "in no dataset"}
    if absent:
        return {"used": False, "reason": f"absent in {', '.join(absent)}"}
    if array == "text_bert":
        vocabularies = [_vocabulary(d) for d in datasets]
        if len(set(vocabularies)) > 1:
            return {"used": False, "reason": f"token ids of different vocabularies: "
                                             f"{_listing(datasets, vocabularies)}"}
        return {"used": True, "reason": f"token ids of one vocabulary ({vocabularies[0]}) in every "
                                        "dataset: one shared encoder reads them"}
    widths = [int(v.shape[-1]) for v in values]
    if len(set(widths)) > 1:
        return {"used": False, "reason": f"widths differ: {_listing(datasets, widths)}"}
    if array == "text":
        encoders = [_text_encoder(d) for d in datasets]
        if len(set(encoders)) > 1:
            return {"used": False, "reason": f"computed by different encoders: "
                                             f"{_listing(datasets, encoders)}"}
    extracted = [d.features is not None for d in datasets]
    if any(extracted) and not all(extracted):
        made = [d.name for d, e in zip(datasets, extracted, strict=True) if e]
        other = [d.name for d, e in zip(datasets, extracted, strict=True) if not e]
        return {"used": False, "reason": f"extracted by msakit in {', '.join(made)} but not in "
                                         f"{', '.join(other)}: different extractors"}
    if all(extracted):
        settings = [_settings(d, array) for d in datasets]
        for key in sorted(set().union(*settings)):
            seen = [s.get(key) for s in settings]
            if any(v != seen[0] for v in seen):
                shown = seen if key != "names" else ["(other feature names)"] * len(seen)
                return {"used": False, "reason": f"msakit extract settings differ: {key} = "
                                                 f"{_listing(datasets, shown)}"}
        return {"used": True, "reason": f"width {widths[0]} and the same msakit extract settings "
                                        "in every dataset"}
    if array == "text":
        return {"used": True, "reason": f"width {widths[0]}, {encoders[0]}, in every dataset"}
    return {"used": True, "reason": f"width {widths[0]} in every dataset (MMSA pickles record no "
                                    "extractor: the equal width is the only evidence)"}


def transfer(datasets: Sequence[MultimodalDataset]) -> dict[str, dict[str, Any]]:
    """Per array ("text_bert", "text", "audio", "vision"): whether it means the same in every
    dataset ({"used": bool, "reason": str})."""
    return {array: _decide(datasets, array) for array in ARRAYS}


def _pad_steps(values: np.ndarray, steps: int, axis: int) -> np.ndarray:
    if values.shape[axis] == steps:
        return values
    width = [(0, 0)] * values.ndim
    width[axis] = (0, steps - values.shape[axis])
    return np.pad(values, width)


def _harmonised(
    split: Split, *, prefix: str, domain: int, used: set[str], steps: dict[str, int],
    lengths: set[str], presence: bool, raw_text: bool, unimodal: set[str], scale: float,
) -> Split:
    """`split` with only the `used` arrays, padded in time to `steps`, labels scaled by `scale`.

    Time padding is what unaligned data already is (frames past a sample's length are zeros and
    masked); feature widths are never padded.
    """
    n = len(split)
    changes: dict[str, Any] = {
        "ids": np.array([f"{prefix}/{i}" for i in split.ids], dtype=object),
        "labels": (split.labels * np.float32(scale)).astype(np.float32),
        "raw_text": split.raw_text if raw_text else None,
        "unimodal_labels": {k: (v * np.float32(scale)).astype(np.float32)
                            for k, v in split.unimodal_labels.items() if k in unimodal},
        "presence": (np.ones((n, 3), dtype=bool) if split.presence is None else split.presence)
        if presence else None,
        "domains": np.full(n, domain, dtype=np.int64),
    }
    for array in ARRAYS:
        values = getattr(split, array)
        if array not in used:
            changes[array] = None
            continue
        changes[array] = _pad_steps(values, steps[array], axis=2 if array == "text_bert" else 1)
    for modality in ("audio", "vision"):
        key = f"{modality}_lengths"
        if modality not in used or modality not in lengths:
            changes[key] = None
        elif getattr(split, key) is None:  # aligned data: every one of its own steps is valid
            changes[key] = np.full(n, getattr(split, modality).shape[1], dtype=np.int64)
    return replace(split, **changes)


def dataset_task(
    sources: Sequence[MultimodalDataset], target: MultimodalDataset,
    target_splits: Sequence[str] = SPLITS,
) -> DomainTask:
    """Leave-one-dataset-out: train and select on `sources`, test on `target`.

    Only the arrays that `transfer` accepts are kept; labels go to the target's scale; sample ids
    become "<dataset>/<id>" so that equal ids of two datasets stay distinct.
    """
    if not sources:
        raise MsakitError("leave-one-dataset-out needs at least one source dataset")
    datasets = [*sources, target]
    names = [d.name for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MsakitError(f"dataset {repeated[0]!r} is given twice (as a source or as the target); "
                          "datasets are told apart by name, so give files with different names")
    target_splits = _check_target_splits(target_splits)
    arrays = transfer(datasets)
    used = {a for a, decision in arrays.items() if decision["used"]}
    if not used:
        reasons = "; ".join(f"{a}: {d['reason']}" for a, d in arrays.items())
        raise MsakitError(f"no modality transfers between {', '.join(names)} ({reasons})")
    steps = {a: max(getattr(d.train, a).shape[2 if a == "text_bert" else 1] for d in datasets)
             for a in used}
    lengths = {m for m in ("audio", "vision") if m in used and (
        any(getattr(d.train, f"{m}_lengths") is not None for d in datasets)
        or len({getattr(d.train, m).shape[1] for d in datasets}) > 1)}
    unimodal = set.intersection(*(set(d.train.unimodal_labels) for d in datasets))
    common = {
        "steps": steps, "used": used, "lengths": lengths, "unimodal": unimodal,
        "presence": any(d.train.presence is not None for d in datasets),
        "raw_text": all(d.train.raw_text is not None for d in datasets),
    }
    target_range = LABEL_RANGE[target.metric_family]
    notes = []
    for d in datasets:
        if d.metric_family != target.metric_family:
            notes.append(f"labels of {d.name} multiplied by {target_range / LABEL_RANGE[d.metric_family]:g} "
                         f"to the target's range [-{target_range:g}, {target_range:g}]")

    def harmonise(d: MultimodalDataset, index: int, split: str) -> Split:
        return _harmonised(d.split(split), prefix=d.name, domain=index,
                           scale=target_range / LABEL_RANGE[d.metric_family], **common)

    parts = {s: concat_splits([harmonise(d, i, s) for i, d in enumerate(sources)]) for s in SPLITS}
    target_split = concat_splits([harmonise(target, len(sources), s) for s in target_splits])
    features = sources[0].features if all(d.features == sources[0].features for d in datasets) else None
    data = MultimodalDataset(
        name=f"{'+'.join(names[:-1])}->{target.name}", family=target.family,
        source="leave-one-dataset-out: " + "; ".join(d.source for d in datasets),
        replaced_nonfinite=sum(d.replaced_nonfinite for d in datasets), features=features,
        warnings=[line for d in datasets for line in d.warnings], **parts,
    )
    return DomainTask(data=data, target=target_split, domain_names=names, sources=names[:-1],
                      target_name=target.name, grouping="datasets", target_splits=target_splits,
                      arrays=arrays, notes=notes)


# --- domains as groups inside one dataset ----------------------------------------------------------
def video_ids(ids: np.ndarray) -> np.ndarray:
    """The video of each sample id: the part before "$_$" (MMSA), else before a final "_<clip number>"
    (CMU-MOSI's label.csv), else the whole id."""
    out = np.empty(len(ids), dtype=object)
    for i, sample in enumerate(ids):
        sample = str(sample)
        if "$_$" in sample:
            out[i] = sample.split("$_$")[0]
        else:
            match = re.fullmatch(r"(.+)_\d+", sample)
            out[i] = match.group(1) if match else sample
    return out


def _pooled(split: Split, modality: str) -> np.ndarray:
    """(N, D) mean of each sample's valid steps."""
    values = getattr(split, modality)
    out = np.zeros((len(values), values.shape[-1]), dtype=np.float64)
    for start in range(0, len(values), _CHUNK):
        block = values[start:start + _CHUNK]
        if modality == "text":
            valid = (split.text_bert[start:start + _CHUNK, 1] > 0 if split.text_bert is not None
                     else np.abs(block).sum(-1) > 0)
        else:
            lengths = getattr(split, f"{modality}_lengths")
            valid = np.ones(block.shape[:2], dtype=bool) if lengths is None else (
                np.arange(block.shape[1]) < lengths[start:start + _CHUNK, None])
        count = np.maximum(valid.sum(1, keepdims=True), 1)
        out[start:start + len(block)] = (block * valid[..., None]).sum(1) / count
    return out


def _by_videos(data: MultimodalDataset, n_groups: int | None, seed: int,
               cluster: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    if n_groups is None or isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 2:
        raise MsakitError(f"grouping by {'cluster' if cluster else 'video'} needs a number of groups "
                          f">= 2, not {n_groups!r}")
    videos = {s: video_ids(data.split(s).ids) for s in SPLITS}
    every = np.concatenate(list(videos.values()))
    unique, inverse = np.unique(every, return_inverse=True)
    if len(unique) < n_groups:
        raise MsakitError(f"{data.name} has {len(unique)} videos, fewer than the {n_groups} groups asked for")
    if cluster:
        modalities = [m for m in MODALITIES if getattr(data.train, m) is not None]
        if not modalities:
            raise MsakitError(f"clustering needs feature arrays (text, audio or vision); {data.name} "
                              "has only token ids")
        from sklearn.cluster import KMeans

        pooled = np.concatenate([
            np.concatenate([_pooled(data.split(s), m) for s in SPLITS]) for m in modalities], axis=1)
        pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-8)
        per_video = np.zeros((len(unique), pooled.shape[1]))
        np.add.at(per_video, inverse, pooled)
        per_video /= np.bincount(inverse, minlength=len(unique))[:, None]
        of_video = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(per_video)
    else:
        of_video = np.empty(len(unique), dtype=np.int64)
        of_video[np.random.default_rng(seed).permutation(len(unique))] = np.arange(len(unique)) % n_groups
    groups = of_video[inverse].astype(np.int64)
    bounds = np.cumsum([0] + [len(videos[s]) for s in SPLITS])
    per_split = {s: groups[lo:hi] for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)}
    return per_split, [str(g) for g in range(n_groups)]


def _by_column(data: MultimodalDataset, spec: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Groups from a CSV with the column named after the last ":" of `spec`, keyed by `id`
    (sample ids as the dataset has them), `video_id` + `clip_id`, or `video_id` alone."""
    path_text, _, column = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MsakitError(f"grouping {spec!r}: {path} is not a file (expected FILE.csv:COLUMN, or one of "
                          f"{', '.join(GROUPINGS)})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if column not in columns:
                raise MsakitError(f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})")
            if "id" in columns:
                key, by_video = (lambda row: row["id"]), False
            elif "video_id" in columns:
                by_video = "clip_id" not in columns
                key = (lambda row: row["video_id"]) if by_video else (
                    lambda row: f"{row['video_id']}$_${row['clip_id']}")
            else:
                raise MsakitError(f"{path}: needs an 'id' or a 'video_id' column to find the samples")
            mapping = {key(row): (row[column] or "").strip() for row in reader}
    except UnicodeDecodeError as exc:
        raise MsakitError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise MsakitError(f"{path}: malformed CSV ({exc})") from None
    keys = {s: video_ids(data.split(s).ids) if by_video else data.split(s).ids for s in SPLITS}
    missing = [str(k) for s in SPLITS for k in keys[s] if str(k) not in mapping]
    if missing:
        raise MsakitError(f"{path} has no {column!r} for {len(missing)} sample(s) of {data.name}, "
                          f"e.g. {missing[0]!r}")
    names = sorted({mapping[str(k)] for s in SPLITS for k in keys[s]})
    index = {name: i for i, name in enumerate(names)}
    per_split = {s: np.array([index[mapping[str(k)]] for k in keys[s]], dtype=np.int64) for s in SPLITS}
    return per_split, names


def assign_groups(
    data: MultimodalDataset, by: str = "domains", n_groups: int | None = None, seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each sample's group index, per split, and the group names; the same for the same seed.

    by: "domains" (the data's own `Split.domains`), "video" (videos dealt to `n_groups` groups in an
    order drawn with `seed`), "cluster" (k-means with `seed` over the videos' standardised
    time-pooled features into `n_groups` clusters) or "FILE.csv:COLUMN".
    """
    if by == "domains":
        if any(data.split(s).domains is None for s in SPLITS):
            raise MsakitError(f"{data.name} has no domain labels; group it by video, cluster or "
                              "FILE.csv:COLUMN")
        per_split = {s: data.split(s).domains.astype(np.int64) for s in SPLITS}
        count = int(max(v.max(initial=0) for v in per_split.values())) + 1
        return per_split, [str(i) for i in range(count)]
    if by in ("video", "cluster"):
        return _by_videos(data, n_groups, seed, cluster=by == "cluster")
    if ":" in by:
        return _by_column(data, by)
    raise MsakitError(f"unknown grouping {by!r}; use one of {', '.join(GROUPINGS)} or FILE.csv:COLUMN")


def _check_target_splits(target_splits: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(target_splits))
    unknown = [s for s in chosen if s not in SPLITS]
    if unknown or not chosen:
        raise MsakitError(f"target splits must be some of {', '.join(SPLITS)}, not {list(target_splits)}")
    return chosen


def build_task(
    load: Callable[..., MultimodalDataset], target: str | MultimodalDataset, *,
    sources: Sequence[str | MultimodalDataset] | None, dataset: str | MultimodalDataset | None,
    group_by: str, n_groups: int | None, split_seed: int, target_splits: Sequence[str],
    family: str | None,
) -> DomainTask:
    """The task `msakit dg` asks for: whole datasets as domains (`dataset_task`, without `dataset`)
    or groups inside `dataset` (`group_task`); `load(name, family)` reads a dataset."""
    if dataset is None:
        if group_by != "domains" or n_groups is not None:
            raise MsakitError("a grouping (group_by, n_groups) needs the dataset whose groups are "
                              "the domains")
        if not sources:
            raise MsakitError("give the source datasets, or a dataset whose groups are the domains")
        return dataset_task([load(s) for s in sources], load(target), target_splits)
    if isinstance(target, MultimodalDataset):
        raise MsakitError("with a dataset, the target is the name of one of its domains")
    return group_task(load(dataset, family), target, by=group_by,
                      sources=None if sources is None else [str(s) for s in sources],
                      n_groups=n_groups, seed=split_seed, target_splits=target_splits)


def group_task(
    data: MultimodalDataset, target: str, *, by: str = "domains", sources: Sequence[str] | None = None,
    n_groups: int | None = None, seed: int = 0, target_splits: Sequence[str] = SPLITS,
) -> DomainTask:
    """Domains as groups inside `data` (see `assign_groups`); `sources` default to every other group.

    Source samples keep their split (train, valid, test); the target group's samples in
    `target_splits` form the target.
    """
    target_splits = _check_target_splits(target_splits)
    per_split, names = assign_groups(data, by, n_groups, seed)
    index = {name: i for i, name in enumerate(names)}
    target = str(target)
    if target not in index:
        raise MsakitError(f"unknown target domain {target!r}; the domains of {data.name} by {by} are "
                          f"{', '.join(names)}")
    chosen = [n for n in names if n != target] if sources is None else [str(s) for s in sources]
    for name in chosen:
        if name not in index:
            raise MsakitError(f"unknown source domain {name!r}; the domains of {data.name} by {by} are "
                              f"{', '.join(names)}")
    if target in chosen:
        raise MsakitError(f"domain {target!r} cannot be both a source and the target")
    if not chosen or len(set(chosen)) != len(chosen):
        raise MsakitError(f"source domains must be distinct and at least one, not {chosen}")
    wanted = np.array([index[n] for n in chosen])
    parts = {}
    for split in SPLITS:
        rows = np.flatnonzero(np.isin(per_split[split], wanted))
        parts[split] = replace(data.split(split).subset(rows), domains=per_split[split][rows])
    for name in chosen:
        if not (parts["train"].domains == index[name]).any():
            raise MsakitError(f"source domain {name!r} has no training samples in {data.name}")
    for split in ("valid", "test"):
        if not len(parts[split]):
            raise MsakitError(f"the source domains {', '.join(chosen)} have no {split} samples "
                              f"in {data.name}")
    pieces = []
    for split in target_splits:
        rows = np.flatnonzero(per_split[split] == index[target])
        pieces.append(replace(data.split(split).subset(rows), domains=per_split[split][rows]))
    target_split = concat_splits(pieces)
    if not len(target_split):
        raise MsakitError(f"target domain {target!r} has no samples in the {'/'.join(target_splits)} "
                          f"split(s) of {data.name}")
    sources_data = replace(data, name=f"{data.name} [{by}: {'+'.join(chosen)}->{target}]", **parts)
    arrays = {a: {"used": getattr(data.train, a) is not None,
                  "reason": "one dataset" if getattr(data.train, a) is not None else "not in the dataset"}
              for a in ARRAYS}
    return DomainTask(data=sources_data, target=target_split, domain_names=names, sources=chosen,
                      target_name=target, grouping=by, target_splits=target_splits, arrays=arrays)


# --- scoring and reports ---------------------------------------------------------------------------
def check_model(task: DomainTask, model: str, modalities: Sequence[str], text_source: str) -> None:
    """One-line error when `model` needs a modality (or a text form) that the task left out."""
    missing = [m for m in modalities if m not in task.modalities]
    if missing:
        why = "; ".join(
            f"{m}: {task.arrays[m]['reason']}" if m != "text" else
            f"text: ids {task.arrays['text_bert']['reason']}, features {task.arrays['text']['reason']}"
            for m in missing)
        raise MsakitError(f"model {model!r} needs {', '.join(missing)}, which the domains "
                          f"{', '.join(task.domain_names)} do not share ({why})")
    if "text" not in modalities:
        return
    if text_source == "features" and not task.arrays["text"]["used"]:
        raise MsakitError(f"model {model!r} reads text features, which do not transfer "
                          f"({task.arrays['text']['reason']}); use --set model.text_source=encoder")
    if text_source == "encoder" and not task.arrays["text_bert"]["used"]:
        raise MsakitError(f"model {model!r} reads token ids, which do not transfer "
                          f"({task.arrays['text_bert']['reason']}); use --set model.text_source=features")
