"""What the resumable training state costs: bytes written per epoch and the share of the training
time spent writing it, for TFN and LNLN on MOSI-shaped synthetic data.

    python benchmarks/perf/state_cost.py --label after                     # this checkout
    PYTHONPATH=/tmp/before/src python benchmarks/perf/state_cost.py --label before   # an older checkout

Each model trains `--epochs` epochs with its `synthetic` settings through `api.train` (so the state
is written exactly as a run writes it); every write of `seed-<seed>.state.pt` is timed and the file
size after it counted. `--set` passes settings on (e.g. `--set training.state_every=1`). Rows are
kept per label in benchmarks/results/perf/state_cost.{json,md}, so the table shows before and after.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from msakit import api
from msakit.data.catalog import load_dataset
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/records.py
from records import machine_name  # noqa: E402

OUTPUT = Path("benchmarks/results/perf/state_cost")


def measure(model: str, data, epochs: int, overrides: list[str]) -> dict:
    writes: list[tuple[float, int]] = []
    original = Trainer._write_state

    def timed(self, path, *args, **kwargs):
        start = time.perf_counter()
        original(self, path, *args, **kwargs)
        writes.append((time.perf_counter() - start, path.stat().st_size))

    Trainer._write_state = timed
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            run = api.train(model, data, seeds=[1111], epochs=epochs, output=folder, progress=False,
                            overrides=["training.patience=null", *overrides])
            total = time.perf_counter() - start
    finally:
        Trainer._write_state = original
    ran = run["seeds"][0]["epochs_run"]
    write_seconds = sum(s for s, _ in writes)
    return {"model": model, "epochs": ran, "writes": len(writes),
            "bytes_per_epoch": sum(b for _, b in writes) / ran,
            "largest_write_bytes": max((b for _, b in writes), default=0),
            "seconds_per_epoch": total / ran, "write_seconds": write_seconds,
            "write_share": write_seconds / total}


def table(rows: dict) -> str:
    lines = ["| model | code | epochs | state writes | MB written per epoch | largest write MB | "
             "s per epoch | share of time writing |", "|---" * 8 + "|"]
    for key in sorted(rows):
        r = rows[key]
        lines.append(f"| {r['model']} | {r['label']} | {r['epochs']} | {r['writes']} | "
                     f"{r['bytes_per_epoch'] / 1e6:.1f} | {r['largest_write_bytes'] / 1e6:.1f} | "
                     f"{r['seconds_per_epoch']:.1f} | {100 * r['write_share']:.1f}% |")
    commands = sorted({r["command"] for r in rows.values()})
    machines = sorted({r["machine"] for r in rows.values()})
    lines += ["", f"Machine: {'; '.join(machines)}. Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the code measured, e.g. before or after")
    parser.add_argument("--models", nargs="+", default=["tfn", "lnln"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=1284, help="training clips (MOSI: 1284)")
    parser.add_argument("--n-valid", type=int, default=229, help="validation clips (MOSI: 229)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("synthetic", n_train=args.n_train, n_valid=args.n_valid)
    command = shlex.join(["python", *sys.argv])
    record = json.loads(OUTPUT.with_suffix(".json").read_text()) if OUTPUT.with_suffix(".json").is_file() \
        else {"rows": {}}
    for model in args.models:
        row = {**measure(model, data, args.epochs, args.overrides), "label": args.label,
               "n_train": args.n_train, "n_valid": args.n_valid, "overrides": args.overrides,
               "command": command, "machine": machine_name()}
        record["rows"][f"{model} {args.label}"] = row
        atomic_write_json(OUTPUT.with_suffix(".json"), record)
        atomic_write_text(OUTPUT.with_suffix(".md"), table(record["rows"]) + "\n")
        print(table({model: row}), flush=True)


if __name__ == "__main__":
    main()
