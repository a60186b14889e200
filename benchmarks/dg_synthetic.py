"""Domain generalization on the synthetic multi-domain test bed: MIDG against MulT and against ERM.

    python benchmarks/dg_synthetic.py                                  # every run, target 3
    python benchmarks/dg_synthetic.py --runs erm --targets 0 3 --seeds 1111

`synthetic-dg` has four domains (shifted feature distributions and one unreliable modality each,
see `msakit datasets`). For each target domain every run trains on the other three, selects on
their validation data and is scored on the target (out of domain) and on the sources' test split
(in domain), once per seed (`msakit.api.dg`). Runs:
- midg: MIDG with its `synthetic` settings (invariance objective on);
- erm: the same MIDG network with the invariance weight at 0, i.e. empirical risk minimisation;
- mult: MulT with its `synthetic` settings.
Each (run, target, seed) is kept as its own record under `--records`, so the runs may be split over
processes; the table (benchmarks/results/dg_synthetic.{json,md}) is rebuilt from every record.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from msakit import api
from msakit.data.catalog import load_dataset
from msakit.evaluation.report import LABELS, format_value, mean_std
from records import machine_name, rebuild_table, save_record

RUNS = {"midg": ("midg", []), "erm": ("midg", ["model.invariance_weight=0"]), "mult": ("mult", [])}
COLUMNS = ("mae", "acc2_non0", "corr")


def run_one(run: str, target: str, seed: int, command: str) -> dict:
    model, overrides = RUNS[run]
    data = load_dataset("synthetic-dg")
    start = time.perf_counter()
    result = api.dg(model, target, dataset=data, seeds=[seed], overrides=overrides, progress=False,
                    command=command)
    machine = machine_name()
    seed_run = result["seeds"][0]
    return {"run": run, "target": target, "seed": seed, "in_domain": seed_run["in_domain"],
            "out_of_domain": seed_run["out_of_domain"], "best_epoch": seed_run["best_epoch"],
            "seconds": round(time.perf_counter() - start, 1), "machine": machine, "command": command}


def table(records: list[dict]) -> tuple[dict, str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: (r["target"], r["run"], r["seed"])):
        groups.setdefault((r["target"], r["run"]), []).append(r)
    head = [f"out-of-domain {LABELS[k]}" for k in COLUMNS] + [f"in-domain {LABELS[k]}" for k in COLUMNS]
    lines = ["Synthetic multi-domain test bed (`synthetic-dg`): train on three domains, select on their "
             "validation data, test on the fourth; mean ± std over seeds.", "",
             "| target | run | seeds | " + " | ".join(head) + " | seconds per seed | machine |",
             "|---" * (len(head) + 5) + "|"]
    summary = {}
    for (target, run), rs in groups.items():
        cells = []
        stats = {}
        for part in ("out_of_domain", "in_domain"):
            mean, std = mean_std([r[part] for r in rs])
            stats[part] = {"mean": mean, "std": std}
            cells += [f"{format_value(k, mean[k])} ± {format_value(k, std[k])}" for k in COLUMNS]
        summary[f"{target}/{run}"] = {"seeds": [r["seed"] for r in rs], **stats}
        seconds = sum(r["seconds"] for r in rs) / len(rs)
        lines.append(f"| {target} | {run} | {' '.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {seconds:.0f} | {rs[0]['machine']} |")
    targets = sorted({target for target, _ in groups})
    for run in RUNS:
        per_target = [summary.get(f"{t}/{run}") for t in targets]
        if len(targets) > 1 and all(per_target):
            cells = []
            for part in ("out_of_domain", "in_domain"):
                mean = {k: sum(r[part]["mean"][k] for r in per_target) / len(targets) for k in COLUMNS}
                summary[f"mean/{run}"] = {**summary.get(f"mean/{run}", {}), part: mean}
                cells += [format_value(k, mean[k]) for k in COLUMNS]
            lines.append(f"| mean of {len(targets)} targets | {run} | | " + " | ".join(cells) + " | | |")
    lines += ["", "Runs: midg = MIDG (`synthetic` settings); erm = the same network with "
              "`model.invariance_weight=0`; mult = MulT (`synthetic` settings). Commands: "
              + "; ".join(f"`{c}`" for c in sorted({r['command'] for r in records}))]
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--targets", nargs="+", default=["3"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    parser.add_argument("--records", default="runs/dg_synthetic")
    parser.add_argument("--output", default="benchmarks/results/dg_synthetic")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the records")
    args = parser.parse_args()
    records_dir = Path(args.records)
    if not args.table:
        command = shlex.join(["python", *sys.argv])
        for target in args.targets:
            for run in args.runs:
                for seed in args.seeds:
                    record = run_one(run, target, seed, command)
                    save_record(records_dir, f"{run}-{target}-{seed}", record)
                    print(f"{run} target {target} seed {seed}: out-of-domain MAE "
                          f"{record['out_of_domain']['mae']:.3f} ({record['seconds']:.0f} s)", flush=True)
    print(rebuild_table(records_dir, args.output, table))


if __name__ == "__main__":
    main()
