"""LNLN against MulT under intra-modal missing data (the LNLN paper's protocol) on synthetic data.

    python benchmarks/lnln_vs_mult.py                                  # the synthetic default
    python benchmarks/lnln_vs_mult.py --size audio_len=50 --size vision_len=50   # a CPU-sized run
    python benchmarks/lnln_vs_mult.py --run lnln ...   # one run only (e.g. two processes at once)

Three runs, each trained once per seed with its synthetic settings (`configs/*.yaml`) and selected
on the validation split (a fourth, `--run lnln-discriminator`, moves LNLN's gradient reversal from
the proxy generator, where the official code has it, to the discriminator's input):
- LNLN trained with its own noise (r ~ U(0, 1) per sample and modality, half the samples clean);
- MulT trained on clean data;
- MulT trained with the same noise as LNLN.
Each checkpoint is then scored on the test split under intra-modal missing data at
r = 0.0, 0.1, ..., 0.9; a seed's number is the mean over the 10 rates, and the table gives the mean
and std of that over seeds. Writes benchmarks/results/lnln_vs_mult.{json,md} (or --output); runs
already there for the same data, seeds and settings are kept, so `--run` invocations add up.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from msakit import api
from msakit.config import parse_overrides
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import LABELS, format_value, mean_std
from msakit.fileio import atomic_write_text
from msakit.missing import DEFAULT_RATES

RUNS = {  # key -> (label, model, training overrides)
    "lnln": ("LNLN, trained with its noise", "lnln", ["training.noise=lnln"]),
    "lnln-discriminator": ("LNLN, reversal in front of the discriminator", "lnln",
                           ["training.noise=lnln", "model.gradient_reversal=discriminator"]),
    "mult-clean": ("MulT, trained on clean data", "mult", ["training.noise=none"]),
    "mult-noisy": ("MulT, trained with LNLN's noise", "mult", ["training.noise=lnln"]),
}
COLUMNS = ("mae", "acc2_non0", "f1_non0", "acc7", "corr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=list(RUNS), action="append",
                        help="run only these (default: the three of the issue)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    parser.add_argument("--size", action="append", default=[], metavar="KEY=N",
                        help="synthetic generator size, e.g. audio_len=50 (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run, e.g. training.epochs=10")
    parser.add_argument("--runs-dir", default="runs/lnln_vs_mult")
    parser.add_argument("--reuse", action="store_true",
                        help="score the checkpoints already trained in --runs-dir with these settings")
    parser.add_argument("--output", default="benchmarks/results/lnln_vs_mult")
    args = parser.parse_args()
    sizes = {k: int(v) for k, v in (item.split("=", 1) for item in args.size)}
    data = synthetic_dataset(**sizes)
    command = shlex.join(["python", *sys.argv])

    setting = {
        "dataset": {"source": data.source, "sizes": sizes or "defaults",
                    "train/valid/test": [len(data.train), len(data.valid), len(data.test)]},
        "protocol": "intra-modal missing on the test split, mean over r = 0.0 .. 0.9, then over seeds",
        "seeds": args.seeds,
        "extra_overrides": args.set,
    }
    out = Path(args.output)
    record = previous(out)
    if {k: record.get(k) for k in setting} != setting:
        record = {**setting, "runs": {}}
    for key in args.run or ["lnln", "mult-clean", "mult-noisy"]:
        label, model, overrides = RUNS[key]
        run_dir = Path(args.runs_dir) / key
        start = time.perf_counter()
        overrides = [*overrides, *args.set]
        trained = reusable(run_dir, args.seeds, overrides) if args.reuse else None
        if trained is None:
            trained = api.train(model, data, seeds=args.seeds, overrides=overrides, output=run_dir,
                                progress=False, command=command)
        per_seed = []
        for run in trained["seeds"]:
            curve = api.robustness(run_dir / run["checkpoint"], data, protocol="intra",
                                   rates=DEFAULT_RATES["intra"])
            per_seed.append({"seed": run["seed"], "best_epoch": run["best_epoch"],
                             "mean_over_rates": curve["mean"],
                             "per_rate": {row["condition"]: row["metrics"] for row in curve["rows"]}})
        mean, std = mean_std([s["mean_over_rates"] for s in per_seed])
        record["runs"][key] = {
            "label": label, "model": model, "overrides": overrides, "seeds": per_seed,
            "mean": mean, "std": std, "seconds": round(time.perf_counter() - start, 1),
            "command": command,
            "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        }
        print(f"{label}: MAE {mean['mae']:.3f}  Acc-2 {mean['acc2_non0']:.2f}", flush=True)
        # re-read so that a second process's finished runs are not overwritten
        latest = previous(out)
        if {k: latest.get(k) for k in setting} == setting:
            record["runs"] = {**latest["runs"], key: record["runs"][key]}
        atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        atomic_write_text(out.with_suffix(".md"), table(record) + "\n")
    print(table(record))


def reusable(run_dir: Path, seeds: list[int], overrides: list[str]) -> dict | None:
    """The results.json of an earlier training run of the same seeds and overrides, if any."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    trained = json.loads(path.read_text())
    wanted = parse_overrides(overrides)
    same = [r["seed"] for r in trained["seeds"]] == seeds and all(
        trained["config"][section].get(key) == value
        for section, values in wanted.items() for key, value in values.items())
    return trained if same else None


def previous(out: Path) -> dict:
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def table(record: dict) -> str:
    head = "| run | " + " | ".join(LABELS[k] for k in COLUMNS) + " | seconds | machine |"
    lines = [
        f"Synthetic (sizes: {record['dataset']['sizes']}), intra-modal missing on test, mean over "
        f"r = 0.0-0.9, mean ± std over seeds {', '.join(map(str, record['seeds']))}:",
        "",
        head,
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for key in RUNS:
        if key not in record["runs"]:
            continue
        run = record["runs"][key]
        cells = [f"{format_value(k, run['mean'][k])} ± {format_value(k, run['std'][k])}" for k in COLUMNS]
        cells += [f"{run['seconds']:.0f}", run["machine"]]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    commands = sorted({run["command"] for run in record["runs"].values()})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
