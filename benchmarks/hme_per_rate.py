"""HME as its paper evaluates it: one model per missing rate, trained and tested at that rate.

    python benchmarks/hme_per_rate.py                          # MR = 0.1, ..., 0.7, seed 1111
    python benchmarks/hme_per_rate.py --rates 0.1 0.3 --seeds 1111 1112

For each inter-modal missing rate MR: HME is trained on the default synthetic data with its
`synthetic` settings and `training.noise_rate = MR` (inter-modal dropping, resampled each epoch),
selected on clean validation MAE, then its test split is scored under inter-modal missing at the
same MR and under each of the seven fixed subsets of modalities (their mean is reported). Writes
benchmarks/results/hme_per_rate.{json,md}; rates already there for the same seeds are kept, so
several processes can share the work.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from msakit import api
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import format_value, mean_std
from msakit.fileio import atomic_write_json, atomic_write_text
from records import machine_name

COLUMNS = ("mae", "acc2_non0", "f1_non0", "corr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111])
    parser.add_argument("--runs-dir", default="runs/hme_per_rate")
    parser.add_argument("--output", default="benchmarks/results/hme_per_rate")
    args = parser.parse_args()
    data = synthetic_dataset()
    command = shlex.join(["python", *sys.argv])
    machine = machine_name()
    out = Path(args.output).with_suffix(".json")
    for rate in args.rates:
        run_dir = Path(args.runs_dir) / f"mr{rate:.1f}"
        start = time.perf_counter()
        trained = api.train("hme", data, seeds=args.seeds, output=run_dir, progress=False,
                            overrides=["training.noise=inter", f"training.noise_rate={rate}"],
                            command=command)
        inter, fixed = [], []
        for run in trained["seeds"]:
            checkpoint = run_dir / run["checkpoint"]
            inter.append(api.robustness(checkpoint, data, protocol="inter", rates=[rate])["mean"])
            fixed.append(api.robustness(checkpoint, data, protocol="fixed")["mean"])
        row = {"rate": rate, "seeds": args.seeds, "inter": mean_std(inter), "fixed": mean_std(fixed),
               "best_epochs": [r["best_epoch"] for r in trained["seeds"]],
               "seconds": round(time.perf_counter() - start, 1), "command": command, "machine": machine}
        record = json.loads(out.read_text()) if out.is_file() else {}
        if record.get("seeds") != args.seeds:
            record = {"dataset": data.source, "seeds": args.seeds, "rows": {}}
        record["rows"][f"{rate:.1f}"] = row
        atomic_write_json(out, record)
        atomic_write_text(out.with_suffix(".md"), table(record) + "\n")
        inter_mae, fixed_mae = row["inter"][0]["mae"], row["fixed"][0]["mae"]
        print(f"MR {rate:.1f}: inter MAE {inter_mae:.3f}  fixed MAE {fixed_mae:.3f}", flush=True)


def table(record: dict) -> str:
    def cell(pair: list, key: str) -> str:
        mean, std = pair[0][key], pair[1][key]
        return format_value(key, mean) + (f" ± {format_value(key, std)}" if len(record["seeds"]) > 1 else "")

    lines = [
        f"HME on the synthetic default, one model per missing rate MR (trained with inter-modal "
        f"dropping at MR), seeds {', '.join(map(str, record['seeds']))}; test under inter-modal "
        "missing at the same MR, and the mean over the 7 fixed subsets:",
        "",
        "| MR | inter MAE | inter Acc-2 Non0 | inter F1 Non0 | inter Corr | fixed MAE | fixed Acc-2 Non0 "
        "| fixed F1 Non0 | fixed Corr | seconds | machine |",
        "|---" * 11 + "|",
    ]
    for rate, row in sorted(record["rows"].items()):
        cells = [rate, *(cell(row["inter"], k) for k in COLUMNS), *(cell(row["fixed"], k) for k in COLUMNS),
                 f"{row['seconds']:.0f}", row["machine"]]
        lines.append("| " + " | ".join(cells) + " |")
    commands = sorted({row["command"] for row in record["rows"].values()})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
