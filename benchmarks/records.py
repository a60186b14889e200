"""Benchmarks whose runs may be split over processes keep one JSON record per run in a folder and
rebuild their table from every record there."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from msakit.fileio import atomic_write_json, atomic_write_text

Table = Callable[[list[dict]], tuple[dict, str]]


def machine_name() -> str:
    """What a benchmark ran on: the GPU's name, else the CPU architecture and torch's thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def save_record(records_dir: Path, name: str, record: dict) -> None:
    atomic_write_json(records_dir / f"{name}.json", record)


def rebuild_table(records_dir: Path, output: str | Path, table: Table) -> str:
    """`table(records)` over every record in `records_dir`, written as `output`.json and .md."""
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    summary, text = table(records)
    # appended, not with_suffix: a stem may hold a dot of its own (e.g. '..._select_rate0.5')
    atomic_write_json(Path(f"{output}.json"), {"rows": summary, "records": records})
    atomic_write_text(Path(f"{output}.md"), text + "\n")
    return text
