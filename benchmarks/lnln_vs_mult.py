"""LNLN against MulT under intra-modal missing data (the LNLN paper's protocol) on synthetic data.

    python benchmarks/lnln_vs_mult.py                                  # the synthetic default
    python benchmarks/lnln_vs_mult.py --size audio_len=50 --size vision_len=50   # a CPU-sized run
    python benchmarks/lnln_vs_mult.py --run lnln --seeds 1113   # one run and seed, e.g. in parallel
    python benchmarks/lnln_vs_mult.py --table                          # only rebuild the table

Three runs, each trained once per seed with its synthetic settings (`configs/*.yaml`) and selected
on the validation split (a fourth, `--run lnln-discriminator`, moves LNLN's gradient reversal from
the proxy generator, where the official code has it, to the discriminator's input):
- LNLN trained with its own noise (r ~ U(0, 1) per sample and modality, half the samples clean);
- MulT trained on clean data;
- MulT trained with the same noise as LNLN.
Each checkpoint is then scored on the test split under intra-modal missing data at
r = 0.0, 0.1, ..., 0.9; a seed's number is the mean over the 10 rates, and the table gives the mean
and std of that over seeds.

Every (run, seed) is trained, scored and kept as its own record under `<runs-dir>/records/` as soon
as it is done, so the work may be split over processes and sessions: a (run, seed) whose record
exists for the same data and settings is not run again, and a training that was cut off continues
from its last finished epoch (`api.train(..., resume=True)`). `--reuse` scores a checkpoint already in
`<runs-dir>/<run>/seed-<seed>.pt` (trained with the same settings) instead of training it. The table
(benchmarks/results/lnln_vs_mult.{json,md}, with a suffix naming non-default sizes and `--set`
values) is rebuilt from every matching record.

Selection reads the clean validation split unless `--set training.select_protocol=intra --set
training.select_rate=0.5` scores validation under missing data, as the LNLN paper's code does
(there on test, at r = 0.5).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from msakit import api
from msakit.data.schema import MultimodalDataset
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import LABELS, format_value, mean_std
from msakit.missing import DEFAULT_RATES
from msakit.training.checkpoint import load_checkpoint
from msakit.training.config import parse_overrides
from records import machine_name, rebuild_table, save_record

RUNS = {  # key -> (label, model, training overrides)
    "lnln": ("LNLN, trained with its noise", "lnln", ["training.noise=lnln"]),
    "lnln-discriminator": ("LNLN, reversal in front of the discriminator", "lnln",
                           ["training.noise=lnln", "model.gradient_reversal=discriminator"]),
    "mult-clean": ("MulT, trained on clean data", "mult", ["training.noise=none"]),
    "mult-noisy": ("MulT, trained with LNLN's noise", "mult", ["training.noise=lnln"]),
}
DEFAULT_RUNS = ("lnln", "mult-clean", "mult-noisy")
COLUMNS = ("mae", "acc2_non0", "f1_non0", "acc7", "corr")


def settings_tag(sizes: dict[str, int], extra: list[str]) -> str:
    """'' for the default data and settings, else a file and folder suffix naming what differs,
    e.g. '_audio_len50_vision_len50' or '_select_protocolintra_select_rate0.5'."""
    changed = sorted(sizes.items())
    changed += [(key.split(".")[-1], value) for key, value in (item.split("=", 1) for item in extra)]
    return "".join(f"_{key}{value}" for key, value in changed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=list(RUNS), action="append",
                        help="run only these (default: the three of the issue)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    parser.add_argument("--size", action="append", default=[], metavar="KEY=N",
                        help="synthetic generator size, e.g. audio_len=50 (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run, e.g. training.epochs=10")
    parser.add_argument("--runs-dir", help="default: runs/lnln_vs_mult plus a suffix naming sizes and --set")
    parser.add_argument("--reuse", action="store_true",
                        help="score checkpoints already trained in --runs-dir with these settings")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the records")
    parser.add_argument("--output",
                        help="default: benchmarks/results/lnln_vs_mult plus a suffix naming sizes and --set")
    args = parser.parse_args()
    sizes = {k: int(v) for k, v in (item.split("=", 1) for item in args.size)}
    tag = settings_tag(sizes, args.set)
    runs_dir = Path(args.runs_dir or f"runs/lnln_vs_mult{tag}")
    output = args.output or f"benchmarks/results/lnln_vs_mult{tag}"
    records_dir = runs_dir / "records"
    if not args.table:
        data = synthetic_dataset(**sizes)
        command = shlex.join(["python", *sys.argv])
        for key in args.run or DEFAULT_RUNS:
            for seed in args.seeds:
                done = records_dir / f"{key}-{seed}.json"
                if done.is_file() and same_setting(json.loads(done.read_text()), sizes, args.set):
                    continue
                record = run_one(key, seed, data, sizes, args.set, runs_dir, args.reuse, command)
                save_record(records_dir, f"{key}-{seed}", record)
                print(f"{key} seed {seed}: intra MAE {record['mean_over_rates']['mae']:.3f} "
                      f"({record['seconds']:.0f} s)", flush=True)
    print(rebuild_table(records_dir, output,
                        lambda records: table(records, sizes, args.set, str(runs_dir))))


def same_setting(record: dict, sizes: dict[str, int], extra: list[str]) -> bool:
    return record["sizes"] == sizes and record["extra_overrides"] == extra


def run_one(key: str, seed: int, data: MultimodalDataset, sizes: dict[str, int], extra: list[str],
            runs_dir: Path, reuse: bool, command: str) -> dict:
    """Train (or, with `reuse`, take the existing checkpoint of) one run and seed; score it."""
    label, model, overrides = RUNS[key]
    overrides = [*overrides, *extra]
    run_dir = runs_dir / key
    checkpoint = run_dir / f"seed-{seed}.pt"
    start = time.perf_counter()
    reused = reuse and checkpoint.is_file() and trained_with(checkpoint, overrides)
    if reused:
        best_epoch = previous_best_epoch(run_dir, seed)
    else:
        trained = api.train(model, data, seeds=[seed], overrides=overrides, output=run_dir,
                            progress=False, command=command, resume=True)
        best_epoch = trained["seeds"][0]["best_epoch"]
    curve = api.robustness(checkpoint, data, protocol="intra", rates=DEFAULT_RATES["intra"])
    return {
        "run": key, "label": label, "model": model, "overrides": overrides, "seed": seed,
        "sizes": sizes, "extra_overrides": extra, "dataset": data.source,
        "train/valid/test": [len(data.train), len(data.valid), len(data.test)],
        "reused": reused, "best_epoch": best_epoch, "mean_over_rates": curve["mean"],
        "per_rate": {row["condition"]: row["metrics"] for row in curve["rows"]},
        "seconds": round(time.perf_counter() - start, 1), "command": command,
        "machine": machine_name(),
    }


def trained_with(checkpoint: Path, overrides: list[str]) -> bool:
    """Whether the checkpoint's saved model and training settings include every override."""
    _, meta = load_checkpoint(checkpoint)
    sections = {"model": meta["model_config"], "training": meta["training_config"]}
    return all(sections[section].get(key) == value
               for section, values in parse_overrides(overrides).items()
               for key, value in values.items())


def previous_best_epoch(run_dir: Path, seed: int) -> int | None:
    """The selected epoch of an earlier training of this seed, where its results.json says it."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    runs = json.loads(path.read_text())["seeds"]
    return next((r["best_epoch"] for r in runs if r["seed"] == seed), None)


def table(records: list[dict], sizes: dict[str, int], extra: list[str], runs_dir: str) -> tuple[dict, str]:
    records = [r for r in records if same_setting(r, sizes, extra)]
    head = "| run | seeds | " + " | ".join(LABELS[k] for k in COLUMNS) + " | seconds per seed | machine |"
    reused = False
    # select_protocol / select_rate score the validation split under missing data
    under_missing = any(e.startswith(("training.select_protocol=", "training.select_rate=")) for e in extra)
    selection = "validation MAE" + (" under the extra settings' missing data" if under_missing else "")
    lines = [
        f"Synthetic ({records[0]['dataset'] if records else 'synthetic'}, sizes: {sizes or 'defaults'}"
        f"{', extra settings: ' + ' '.join(extra) if extra else ''}), intra-modal missing on test, "
        f"mean over r = 0.0-0.9, then mean ± std over seeds; every run selected on {selection}.",
        "",
        head,
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    summary = {}
    for key in RUNS:
        runs = sorted((r for r in records if r["run"] == key), key=lambda r: r["seed"])
        if not runs:
            continue
        mean, std = mean_std([r["mean_over_rates"] for r in runs])
        seeds = [r["seed"] for r in runs]
        summary[key] = {"label": runs[0]["label"], "seeds": seeds, "mean": mean, "std": std,
                        "best_epochs": [r["best_epoch"] for r in runs]}
        cells = [f"{format_value(k, mean[k])} ± {format_value(k, std[k])}" for k in COLUMNS]
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        # records written before the field existed were trained by their own run
        scored_only = any(r.get("reused", False) for r in runs)
        reused |= scored_only
        lines.append(f"| {runs[0]['label']} | {' '.join(map(str, seeds))} | " + " | ".join(cells)
                     + f" | {seconds:.0f}{' *' if scored_only else ''} | {runs[0]['machine']} |")
    commands = sorted({r["command"] for r in records})
    lines += [""]
    if reused:
        lines += ["\\* scoring only, for at least one seed: an earlier run trained its checkpoint.", ""]
    lines += ["Seconds per seed: the wall time of the process that finished the seed (training and "
              "scoring); where a cut-off training resumed from its state file, only its last part.", ""]
    lines += [f"Records: `{runs_dir}/records/`. Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return summary, "\n".join(lines)


if __name__ == "__main__":
    main()
