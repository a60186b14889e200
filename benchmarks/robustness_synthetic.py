"""Every model's robustness on the synthetic default under the three missing-data protocols.

    python benchmarks/robustness_synthetic.py --models tfn lmf dashfusion
    python benchmarks/robustness_synthetic.py --models mult --seeds 1111 1112 1113
    python benchmarks/robustness_synthetic.py --models mmslf --seeds 1111 1112 1113 --reuse
    python benchmarks/robustness_synthetic.py --dataset synthetic-raw --models tfn lmf

Each model is trained on the default (MOSI-sized) synthetic dataset with its `synthetic` settings,
once per seed, selected on validation MAE, then its test split is scored under intra-modal missing
(r = 0.0-0.9), inter-modal missing (MR = 0.1-0.7) and the seven fixed subsets of modalities. A
cell is the mean over the protocol's conditions, then over seeds (mean ± std). Writes
benchmarks/results/robustness_synthetic.{json,md}; rows of models not re-run are kept.
`--dataset synthetic-raw` runs the same on the real-scale test bed (raw, mixed feature scales and
a small label range) into runs/robustness_synthetic-raw and
benchmarks/results/robustness_synthetic-raw.{json,md}; its table also counts the warnings of each
run (raw feature scales, constant or no-better-than-constant predictions).

`--set` overrides training settings, or, with `--reuse`, the test-time model settings the
checkpoints are scored with (e.g. `--set model.missing_fill=own` for CyIN); a row made with
overrides or another `--runs-dir` is kept under its own name beside the plain one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from msakit import api
from msakit.data.catalog import load_dataset
from msakit.evaluation.report import LABELS, format_value, mean_std
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.metrics import UNDEFINED_REASONS
from records import machine_name

PROTOCOLS = ("intra", "inter", "fixed")
COLUMNS = ("mae", "acc2_non0", "corr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111])
    parser.add_argument("--dataset", choices=("synthetic", "synthetic-raw"), default="synthetic")
    parser.add_argument("--runs-dir", default=None, help="default: runs/robustness_<dataset>")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/robustness_<dataset>")
    parser.add_argument("--reuse", action="store_true", help="score existing checkpoints, no training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    stem = f"robustness_{args.dataset}"
    args.runs_dir = args.runs_dir or f"runs/{stem}"
    args.output = args.output or f"benchmarks/results/{stem}"
    data = load_dataset(args.dataset)
    command = shlex.join(["python", *sys.argv])
    machine = machine_name()
    out = Path(args.output)
    for model in args.models:
        # checkpoints trained with overrides live beside the plain ones, never over them
        trained_with = [] if args.reuse else args.overrides
        run_dir = Path(args.runs_dir) / "_".join([model, *(o.replace("=", "-") for o in trained_with)])
        start = time.perf_counter()
        checkpoints = [run_dir / f"seed-{seed}.pt" for seed in args.seeds]
        if args.reuse:
            missing = [str(c) for c in checkpoints if not c.is_file()]
            if missing:
                parser.error(f"--reuse: no checkpoint {', '.join(missing)}")
            clean = mean_std([api.evaluate(c, data, overrides=args.overrides)["metrics"]
                              for c in checkpoints])[0]
            best_epochs = None  # chosen by the run that trained them; see its own results
            warnings = None
        else:
            trained = api.train(model, data, seeds=args.seeds, output=run_dir, progress=False,
                                command=command, overrides=args.overrides, overwrite=True)
            clean = trained["mean"]["test"]
            best_epochs = [r["best_epoch"] for r in trained["seeds"]]
            warnings = trained["warnings"]
        protocols = {}
        for protocol in PROTOCOLS:
            per_seed = [api.robustness(c, data, protocol=protocol,
                                       overrides=args.overrides if args.reuse else ())
                        for c in checkpoints]
            mean, std = mean_std([r["mean"] for r in per_seed])
            protocols[protocol] = {
                "mean": mean, "std": std,
                "conditions": {row["condition"]: mean_std([r["rows"][i]["metrics"] for r in per_seed])[0]
                               for i, row in enumerate(per_seed[0]["rows"])},
            }
        row = {"model": model, "overrides": args.overrides, "runs_dir": args.runs_dir,
               "seeds": args.seeds, "clean_test": clean,
               "best_epochs": best_epochs, "warnings": warnings, "protocols": protocols,
               "seconds": round(time.perf_counter() - start, 1), "command": command, "machine": machine}
        record = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() \
            else {"dataset": data.source, "rows": {}}
        record["rows"][row_name(model, args.overrides, args.runs_dir, f"runs/{stem}")] = row
        atomic_write_json(out.with_suffix(".json"), record, UNDEFINED_REASONS)
        atomic_write_text(out.with_suffix(".md"), table(record) + "\n")
        print(f"{model}: " + "  ".join(f"{p} MAE {protocols[p]['mean']['mae']:.3f}" for p in PROTOCOLS),
              flush=True)


def row_name(model: str, overrides: list[str], runs_dir: str, default_runs_dir: str) -> str:
    """The model, plus what sets the row apart from the plain one: its overrides, its checkpoints."""
    extra = [*overrides, *([f"from {runs_dir}"] if runs_dir != default_runs_dir else [])]
    return model + (f" [{', '.join(extra)}]" if extra else "")


def table(record: dict) -> str:
    head = ["model", "seeds", "clean MAE"] + [f"{p} {LABELS[k]}" for p in PROTOCOLS for k in COLUMNS]
    lines = [
        f"Synthetic data ({record['dataset']}), test split; each protocol cell is the mean over "
        "its conditions (intra r = 0.0-0.9, inter MR = 0.1-0.7, fixed: the 7 subsets), then "
        "mean ± std over seeds.",
        "",
        "| " + " | ".join(head) + " | warnings | seconds | machine |",
        "|---" * (len(head) + 3) + "|",
    ]
    for name, row in sorted(record["rows"].items()):
        cells = [name, " ".join(map(str, row["seeds"])), format_value("mae", row["clean_test"]["mae"])]
        for p in PROTOCOLS:
            for k in COLUMNS:
                mean, std = row["protocols"][p]["mean"][k], row["protocols"][p]["std"][k]
                cells.append(format_value(k, mean) + (f" ± {format_value(k, std)}" if len(row["seeds"]) > 1
                                                      else ""))
        warned = row.get("warnings")
        cells.append("-" if warned is None else str(len(warned)))
        lines.append("| " + " | ".join(cells) + f" | {row['seconds']:.0f} | {row['machine']} |")
    commands = sorted({row["command"] for row in record["rows"].values()})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
