"""Which datasets msakit knows and where it looks for their files: one name -> one loader.

`load_dataset` accepts a catalog name ("synthetic", "synthetic-dg", "mosi", "mosei", "sims",
"simsv2", "mosi-text") or a path to a `.pkl` (MMSA layout) or `.csv` (label.csv layout). For the
benchmarks, `data_dir` may be the pickle itself, the folder holding it, or a root in MMSA's own
layout (`<data_dir>/MOSI/Processed/unaligned_50.pkl`).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from msakit.data.labelcsv import load_label_csv
from msakit.data.mmsa import check_family, load_mmsa
from msakit.data.schema import MultimodalDataset
from msakit.data.synthetic import generate_synthetic, synthetic_dataset
from msakit.errors import MsakitError

logger = logging.getLogger(__name__)

DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "description": "MOSI-sized synthetic data with planted text/audio/vision signal, "
                       "generated in memory (the default and demo dataset)",
        "needs": "nothing (sizes and seed optional)",
    },
    "synthetic-raw": {
        "description": "the synthetic data with raw, unnormalised feature scales (audio and vision "
                       "dims scaled from 1e-2 to 1e3 with offsets, -inf in most clips' first audio "
                       "dim, labels with std 0.13): the real-scale test bed",
        "needs": "nothing (sizes and seed optional)",
    },
    "synthetic-dg": {
        "description": "synthetic data in 4 domains with shifted features and modality reliability, "
                       "sized for CPU runs (1200/300/600 clips, audio and vision 50 frames): the "
                       "domain generalization test bed",
        "needs": "nothing (sizes, domains, domain_shift and seed optional)",
    },
    "mosi": {
        "description": "CMU-MOSI, MMSA pickle: 1284/229/686 clips, English, labels in [-3, 3]",
        "needs": "data_dir: the pickle, its folder, or an MMSA root with MOSI/Processed/",
        "folders": ("MOSI", "mosi", "CMU-MOSI"),
        "files": {False: ("unaligned_50.pkl",), True: ("aligned_50.pkl",)},
    },
    "mosei": {
        "description": "CMU-MOSEI, MMSA pickle: 16326/1871/4659 clips, English, labels in [-3, 3]",
        "needs": "data_dir: the pickle, its folder, or an MMSA root with MOSEI/Processed/",
        "folders": ("MOSEI", "mosei", "CMU-MOSEI"),
        "files": {False: ("unaligned_50.pkl",), True: ("aligned_50.pkl",)},
    },
    "sims": {
        "description": "CH-SIMS, MMSA pickle: 1368/456/457 clips, Chinese, labels in [-1, 1] "
                       "with unimodal labels",
        "needs": "data_dir: the pickle, its folder, or an MMSA root with SIMS/Processed/",
        "folders": ("SIMS", "sims", "CH-SIMS"),
        "files": {False: ("unaligned_39.pkl",), True: ("aligned_39.pkl",)},
    },
    "simsv2": {
        "description": "CH-SIMS v2, MMSA pickle: Chinese, labels in [-1, 1] with unimodal labels",
        "needs": "data_dir: the pickle, its folder, or an MMSA root with SIMSv2/Processed/",
        "folders": ("SIMSv2", "SIMSV2", "simsv2", "CH-SIMS-v2", "CH-SIMSv2"),
        "files": {False: ("unaligned.pkl", "sims_unaligned.pkl"), True: ("aligned.pkl",)},
    },
    "mosi-text": {
        "description": "CMU-MOSI transcripts and labels only (label.csv: id,text,label,mode); "
                       "text-only",
        "needs": "data_dir: label.csv or the folder holding it",
    },
}


# synthetic-dg: short sequences and small text features so that every model, MulT's cross-modal
# attention included, trains on it in minutes on a CPU; four domains leave three sources per target
SYNTHETIC_DG = {"n_train": 1200, "n_valid": 300, "n_test": 600, "text_len": 32, "audio_len": 50,
                "vision_len": 50, "text_dim": 64, "domains": 4}
SYNTHETIC = {"synthetic": {}, "synthetic-dg": SYNTHETIC_DG, "synthetic-raw": {"real_scale": True}}


def check_synthetic_sizes(sizes: dict[str, Any]) -> None:
    """One-line error for a size option `generate_synthetic` does not have."""
    allowed = set(inspect.signature(generate_synthetic).parameters) - {"aligned", "seed"}
    unknown = sorted(set(sizes) - allowed)
    if unknown:
        raise MsakitError(
            f"unknown synthetic size option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )


def list_datasets() -> list[dict[str, str]]:
    """Name, description and what must be given, for each catalog dataset."""
    return [
        {"name": name, "description": entry["description"], "needs": entry["needs"]}
        for name, entry in DATASETS.items()
    ]


def _candidates(name: str, data_dir: Path, aligned: bool) -> list[Path]:
    entry = DATASETS[name]
    folders = [data_dir, data_dir / "Processed"]
    for folder in entry["folders"]:
        folders += [data_dir / folder, data_dir / folder / "Processed"]
    return [folder / file for folder in folders for file in entry["files"][aligned]]


def _first_existing(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise MsakitError(f"{what} not found; tried: {', '.join(map(str, candidates))}")


def load_dataset(
    name_or_path: str | MultimodalDataset,
    data_dir: str | None = None,
    aligned: bool = False,
    seed: int = 0,
    family: str | None = None,
    **synthetic_sizes: int,
) -> MultimodalDataset:
    """Load a catalog dataset by name, or a `.pkl` / `.csv` file by path (a dataset already in
    memory is taken as it is). The family it gets, and why, is logged.

    `synthetic_sizes` (n_train, text_len, audio_dim, domains, ...) apply to the synthetic datasets
    only; `seed` seeds their generator. `family` (mosi, mosei, sims, simsv2, synthetic, custom)
    chooses the settings section and metric rules; without it a catalog name gives its own, a
    pickle is recognised from its data (see `msakit.data.mmsa.recognise_family`).
    """
    data = name_or_path if isinstance(name_or_path, MultimodalDataset) else _load(
        name_or_path, data_dir, aligned, seed, synthetic_sizes)
    if family is not None:
        check_family(family)
        data = data.derive(family=family, family_source="given with --family")
    logger.info("%s: family %s (%s)", data.name, data.family, data.family_source or "given")
    return data


def _load(name_or_path: str, data_dir: str | None, aligned: bool, seed: int,
          synthetic_sizes: dict[str, int]) -> MultimodalDataset:
    key = str(name_or_path).strip().lower()
    if synthetic_sizes and key not in SYNTHETIC:
        raise MsakitError(
            f"size options ({', '.join(sorted(synthetic_sizes))}) apply only to the synthetic "
            f"datasets, not {name_or_path!r}"
        )
    if key in SYNTHETIC:
        check_synthetic_sizes(synthetic_sizes)
        options = {**SYNTHETIC[key], **synthetic_sizes}
        return synthetic_dataset(name=key, aligned=aligned, seed=seed, **options)
    if key == "mosi-text":
        if data_dir is None:
            raise MsakitError(f"dataset 'mosi-text' needs data_dir ({DATASETS[key]['needs']})")
        root = Path(data_dir).expanduser()
        if root.is_file():
            return load_label_csv(root)
        tried = [root / "label.csv", root / "mosi-text" / "label.csv"]
        return load_label_csv(_first_existing(tried, "label.csv for 'mosi-text'"))
    if key in DATASETS:
        if data_dir is None:
            raise MsakitError(f"dataset {key!r} needs data_dir ({DATASETS[key]['needs']})")
        root = Path(data_dir).expanduser()
        named = f"the dataset name {key!r}"
        if root.is_file():
            return load_mmsa(root, family=key, name=key, family_source=named)
        kind = "aligned" if aligned else "unaligned"
        path = _first_existing(_candidates(key, root, aligned), f"{kind} {key!r} pickle")
        return load_mmsa(path, family=key, name=key, family_source=named)

    path = Path(str(name_or_path)).expanduser()
    if path.suffix.lower() == ".pkl":
        return load_mmsa(path)
    if path.suffix.lower() == ".csv":
        return load_label_csv(path)
    raise MsakitError(
        f"unknown dataset {name_or_path!r}; known: {', '.join(DATASETS)}, "
        "or a path to a .pkl (MMSA layout) or .csv (label.csv layout) file"
    )
