"""The size of the full benchmark: every registered model x MOSI, MOSEI, SIMS, SIMSv2 x 5 seeds, each
job trained with its published settings and scored under the three missing-data protocols.

    python benchmarks/full_benchmark_plan.py [--records RECORDS.jsonl ...]

Counts the jobs, reads each model's epochs per dataset family from its YAML (an upper bound: early
stopping ends most runs sooner) and the training-set sizes of the four benchmarks, and turns them
into hours with measured speeds:
- GPU: `benchmarks/results/perf/gpu.json` (train samples/s per model at MOSI and MOSEI shapes,
  made by `benchmarks/perf/gpu.py` on a GPU), when it exists;
- CPU: seconds per training sample measured by study jobs on the MOSI-sized synthetic data (the
  job records of the `--records` files, as `msakit study export` writes them, the first that has the
  model: the job's seconds over the epochs it ran times the training samples; evaluation included,
  so an upper bound), for the models they have. The default is the published records of the
  real-scale robustness study, so the table regenerates from a clean clone. A job that resumed from
  its training state counts the seconds its state carries (`msakit.training.trainer.state_seconds`);
  one recorded before states carried them counts only the execution that finished it.
Writes benchmarks/results/full_benchmark_plan.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models.registry import list_models
from msakit.study.records import read_records
from msakit.training.config import resolve_config

TRAIN_SIZES = {"mosi": 1284, "mosei": 16326, "sims": 1368, "simsv2": 2722}  # REFERENCES.md §1
SEEDS = 5
PROTOCOL_PASSES = 10 + 7 + 7  # intra rates, inter rates, fixed subsets: test passes per job
SYNTHETIC_TRAIN = 1284  # the default synthetic dataset is MOSI-sized


def epochs(model: str, family: str) -> int:
    training = resolve_config(model, family, [])["training"]
    stages = training.get("stages") or []
    return sum(s["epochs"] for s in stages) if stages else training["epochs"]


def cpu_seconds_per_sample(records: Path) -> dict[str, float]:
    """Per model: the median over its recorded jobs of seconds / (epochs run x training samples).
    Only jobs recorded under the model's own name count: an entry of another label may share a job
    whose record holds the seconds of the execution that only added that entry's evaluations (CyIN's
    `cyin-own-fill`)."""
    if not records.is_file():
        return {}
    per: dict[str, list[float]] = {}
    for _, record in read_records(records):
        ran = record["train"].get("epochs_run") or 0
        if record.get("seconds") and ran and record["label"] == record["model"]:
            per.setdefault(record["model"], []).append(record["seconds"] / (ran * SYNTHETIC_TRAIN))
    return {m: sorted(v)[len(v) // 2] for m, v in per.items()}


def gpu_samples_per_second(path: Path) -> dict[tuple[str, str], float]:
    if not path.is_file():
        return {}
    document = json.loads(path.read_text())
    out = {}
    for row in document.get("models", []):
        if row.get("precision") == "fp32" and row.get("train_samples_per_s"):
            out[row["model"], row["shape"]] = row["train_samples_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", nargs="+",
                        default=["benchmarks/results/studies/robustness-synthetic-raw/records.jsonl"])
    parser.add_argument("--gpu", default="benchmarks/results/perf/gpu.json")
    parser.add_argument("--output", default="benchmarks/results/full_benchmark_plan")
    args = parser.parse_args()
    cpu: dict[str, float] = {}
    for records in args.records:
        cpu = cpu_seconds_per_sample(Path(records)) | cpu
    gpu = gpu_samples_per_second(Path(args.gpu))
    rows = []
    for model in list_models():
        per_family = {f: epochs(model, f) for f in TRAIN_SIZES}
        samples = sum(per_family[f] * TRAIN_SIZES[f] for f in TRAIN_SIZES) * SEEDS
        row = {"model": model, "jobs": len(TRAIN_SIZES) * SEEDS, "epochs": per_family,
               "training_samples": samples}
        if model in cpu:
            row["cpu_hours"] = samples * cpu[model] / 3600
        speeds = {f: gpu.get((model, "mosei" if f == "mosei" else "mosi")) for f in TRAIN_SIZES}
        if all(speeds.values()):
            row["gpu_hours"] = sum(per_family[f] * TRAIN_SIZES[f] * SEEDS / speeds[f]
                                   for f in TRAIN_SIZES) / 3600
        rows.append(row)
    jobs = sum(r["jobs"] for r in rows)
    command = shlex.join(["python", *sys.argv])
    lines = [
        f"The full benchmark: {len(rows)} models x 4 datasets x {SEEDS} seeds = **{jobs} training jobs**, "
        f"each scored clean and in {PROTOCOL_PASSES} test passes under the three protocols. Epochs are the "
        "YAMLs' maxima (early stopping ends most runs sooner), so the hours are upper bounds. CPU hours: one "
        "thread, per training sample as measured by study jobs on the MOSI-sized synthetic data with the "
        "models' CPU-sized `synthetic` settings (the published settings are larger: read them as a lower "
        "bound of the per-sample cost), from the seconds each job recorded, whatever else its machine ran "
        f"meanwhile (records: {', '.join(f'`{r}`' for r in args.records)}; a dash where they lack the "
        "model). "
        "GPU hours need `benchmarks/perf/gpu.py` run on a GPU"
        + (" (found)." if gpu else " (not run yet: no column)."),
        "",
        "| model | jobs | epochs MOSI / MOSEI / SIMS / SIMSv2 | training samples | CPU hours |"
        + (" GPU hours |" if gpu else ""),
        "|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in rows:
        cells = [r["model"], str(r["jobs"]), " / ".join(str(r["epochs"][f]) for f in TRAIN_SIZES),
                 f"{r['training_samples']:,}", f"{r['cpu_hours']:.0f}" if "cpu_hours" in r else "-"]
        if gpu:
            cells.append(f"{r['gpu_hours']:.1f}" if "gpu_hours" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{command}`"]
    atomic_write_json(Path(f"{args.output}.json"), {"command": command, "jobs": jobs, "rows": rows})
    atomic_write_text(Path(f"{args.output}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
