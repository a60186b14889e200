"""MMSLF on the synthetic default: does the student gain from the prompt-guided teacher?

    python benchmarks/mmslf_distillation.py                      # both runs, seeds 1111-1113
    python benchmarks/mmslf_distillation.py --run plain --seeds 1111 1112 1113
    python benchmarks/mmslf_distillation.py --table              # only rebuild the table

Cues come from the offline backend (`msakit cues synthetic --output runs/synthetic_cues.jsonl`,
written here when missing), or from the file `--cues` names (e.g. mmslf_oracle_cues.py's). Two
runs per seed, both with mmslf's `synthetic` settings:
- distilled: the teacher stage (with cues), then the student stage against the frozen teacher;
- plain: the same student network and student stage (epochs, learning rate, schedule) with the
  distillation weights at 0, i.e. trained on the labels alone.
Every run selects on validation MAE. Each (run, seed) is kept as its own record under
`<runs-dir>/mmslf-records/`, so runs may be split over processes; the table
(benchmarks/results/mmslf_distillation.{json,md}) is rebuilt from all records. The distilled
students' checkpoints are `<runs-dir>/mmslf/seed-<seed>.pt`, which `robustness_synthetic.py
--models mmslf --reuse` scores under the missing-data protocols.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from msakit import api
from msakit.cues import run_cues
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import LABELS, format_value, mean_std
from msakit.training.config import resolve_config
from records import machine_name, rebuild_table, save_record

COLUMNS = ("mae", "acc2_non0", "f1_non0", "acc7", "corr")
RUNS = ("distilled", "plain")
OFFLINE_CUES = "runs/synthetic_cues.jsonl"


def only_stage(name: str) -> str:
    """The override that trains mmslf's stage `name` alone, as configured for the synthetic data."""
    stage = next(s for s in resolve_config("mmslf", "synthetic")["training"]["stages"] if s["name"] == name)
    return f"training.stages={json.dumps([stage])}"


def plain_overrides() -> list[str]:
    """The student stage alone, as configured for the synthetic data, without distillation."""
    return ["model.attention_weight=0", "model.fusion_weight=0", only_stage("student")]


def cue_backend(cues: Path) -> str:
    """The backend named by the cue file's first record (the table says whose cues were read)."""
    with cues.open() as lines:
        return json.loads(next(lines))["backend"]


def run_one(run: str, seed: int, cues: Path, runs_dir: Path, command: str, extra: list[str]) -> dict:
    data = synthetic_dataset()
    overrides = [f"model.cues={cues}", *extra] + (plain_overrides() if run == "plain" else [])
    start = time.perf_counter()
    result = api.train("mmslf", data, seeds=[seed], overrides=overrides, progress=False,
                       output=runs_dir / ("mmslf" if run == "distilled" else "mmslf-plain"),
                       command=command)
    seed_run = result["seeds"][0]
    machine = machine_name()
    return {"run": run, "seed": seed, "test": seed_run["test"],
            "stages": {s["stage"]: {"best_epoch": s["best_epoch"], "test": s["test"]}
                       for s in seed_run.get("stages", [])},
            "best_epoch": seed_run["best_epoch"], "seconds": round(time.perf_counter() - start, 1),
            "machine": machine, "command": command, "overrides": extra, "cues": cue_backend(cues)}


def table(records: list[dict]) -> tuple[dict, str]:
    rows: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["run"] == "distilled":
            teacher = {**r, "test": r["stages"]["teacher"]["test"]}
            rows.setdefault("teacher (reads the cues)", []).append(teacher)
            rows.setdefault("student, distilled from the teacher", []).append(r)
        else:
            rows.setdefault("student, trained without distillation", []).append(r)
    summary = {}
    changed = sorted({o for r in records for o in r.get("overrides", [])})
    backends = sorted({r.get("cues", "offline") for r in records if r["run"] == "distilled"})
    lines = [
        f"MMSLF on the synthetic default (synthetic(seed=0, unaligned)), {', '.join(backends)} cues, "
        "test split, mean ± std over seeds; every run selected on validation MAE."
        + (f" Changed from mmslf's `synthetic` settings: {', '.join(f'`{o}`' for o in changed)}."
           if changed else ""),
        "",
        "| network | seeds | " + " | ".join(LABELS[k] for k in COLUMNS) + " | seconds per seed | machine |",
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    for name, runs in rows.items():
        mean, std = mean_std([r["test"] for r in runs])
        seeds = [r["seed"] for r in runs]
        summary[name] = {"seeds": seeds, "mean": mean, "std": std}
        cells = [f"{format_value(k, mean[k])} ± {format_value(k, std[k])}" for k in COLUMNS]
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        lines.append(f"| {name} | {' '.join(map(str, seeds))} | " + " | ".join(cells)
                     + f" | {seconds:.0f} | {runs[0]['machine']} |")
    commands = sorted({r["command"] for r in records})
    lines += ["", "The teacher row is the distilled runs' first stage. Commands: "
              + "; ".join(f"`{c}`" for c in commands)]
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=RUNS, action="append", help="default: both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    parser.add_argument("--cues", help="a cue file (default: the offline backend's, written when missing)")
    parser.add_argument("--runs-dir", default="runs/robustness_synthetic")
    parser.add_argument("--output", default="benchmarks/results/mmslf_distillation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="applied to both runs (use another --runs-dir and --output)")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the records")
    args = parser.parse_args()
    runs_dir, cues = Path(args.runs_dir), Path(args.cues or OFFLINE_CUES)
    records_dir = runs_dir / "mmslf-records"
    if not args.table:
        if not cues.is_file():
            if args.cues:
                parser.error(f"cue file not found: {cues}")
            run_cues("synthetic", cues, progress=False)
        command = shlex.join(["python", *sys.argv])
        for run in args.run or RUNS:
            for seed in args.seeds:
                record = run_one(run, seed, cues.resolve(), runs_dir, command, args.overrides)
                save_record(records_dir, f"{run}-{seed}", record)
                print(f"{run} seed {seed}: test MAE {record['test']['mae']:.3f} "
                      f"({record['seconds']:.0f} s)", flush=True)
    print(rebuild_table(records_dir, args.output, table))


if __name__ == "__main__":
    main()
