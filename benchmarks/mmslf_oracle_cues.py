"""Can MMSLF's teacher use a cue that tells it the answer? Its prompt path tested with the label.

    python benchmarks/mmslf_oracle_cues.py                              # seed 1111, both inits
    python benchmarks/mmslf_oracle_cues.py --position-std 0.02 --seeds 1112
    python benchmarks/mmslf_oracle_cues.py --table                      # only rebuild the table
    python benchmarks/mmslf_oracle_cues.py --cues-only                  # only write the cue files

A diagnostic, not a result of the method: every clip of every split (test included) gets a cue
that states its label, in the offline backend's words ("The annotated sentiment is weakly positive
(+0.8 on the 7-point scale from -3 to +3)."). The teacher stage alone is trained on them with
mmslf's `synthetic` settings and selected on validation MAE, then scored on the test split with
those cues and with the cues of other test clips (one fixed permutation). A prompt path that can
carry what a cue says to the prediction gives a test MAE far below the prompt-free networks' (about
0.74) that collapses under the permutation. `--position-std` is `model.prompt_position_std` (1 = the
official init). Each (init, seed) is its own record under `<runs-dir>/records/`; the table goes to
benchmarks/results/mmslf_oracle_cues.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from mmslf_teacher_cues import permuted_cues, teacher_predictions, write_cues
from msakit import api
from msakit.cues.backend import label_phrase
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import format_value, mean_std
from msakit.metrics import compute_metrics
from msakit.training.config import resolve_config
from records import machine_name, rebuild_table, save_record

COLUMNS = ("mae", "corr")


def oracle_cues(data: MultimodalDataset) -> dict[str, dict]:
    """One cue record per clip of every split, stating the clip's label."""
    records = {}
    for name in SPLITS:
        split = data.split(name)
        for sample_id, label in zip(split.ids, split.labels, strict=True):
            text = f"The annotated sentiment is {label_phrase(float(label), data.family)}."
            records[str(sample_id)] = {"id": str(sample_id), "split": name, "backend": "oracle",
                                       "model": "label", "prompt_version": "oracle-1",
                                       "visual_cues": "", "language_cues": text, "text": text}
    return records


def only_stage(name: str) -> str:
    """The override that trains mmslf's stage `name` alone, as configured for the synthetic data."""
    stage = next(s for s in resolve_config("mmslf", "synthetic")["training"]["stages"] if s["name"] == name)
    return f"training.stages={json.dumps([stage])}"


def write_oracle_files(runs_dir: Path, data: MultimodalDataset) -> tuple[Path, Path]:
    """`oracle.jsonl` and `oracle_permuted.jsonl` (each clip gets another clip's cue) in `runs_dir`."""
    cues = oracle_cues(data)
    return (write_cues(runs_dir / "oracle.jsonl", list(cues.values())),
            write_cues(runs_dir / "oracle_permuted.jsonl", permuted_cues(cues, data)))


def run_one(std: float, seed: int, data: MultimodalDataset, own: Path, permuted: Path, runs_dir: Path,
            command: str) -> dict:
    """The teacher stage trained on the `own` cue file, scored with it and with `permuted`."""
    start = time.perf_counter()
    api.train("mmslf", data, seeds=[seed], progress=False, output=runs_dir / f"std{std:g}",
              command=command, overrides=[f"model.cues={own}", f"model.prompt_position_std={std}",
                                          only_stage("teacher")])
    seconds = round(time.perf_counter() - start, 1)
    checkpoint = runs_dir / f"std{std:g}" / f"seed-{seed}.pt"
    labels = data.test.labels
    preds = {key: teacher_predictions(checkpoint, path, data, "test")
             for key, path in (("own", own), ("permuted", permuted))}
    train = compute_metrics(teacher_predictions(checkpoint, own, data, "train"), data.train.labels,
                            data.metric_family)
    return {"position_std": std, "seed": seed, "train": train,
            "test": {key: compute_metrics(p, labels, data.metric_family) for key, p in preds.items()},
            "moved": float(np.abs(preds["permuted"] - preds["own"]).mean()),
            "seconds": seconds, "machine": machine_name(), "command": command}


def _cell(mean: str, std: str, seeds: int) -> str:
    return f"{mean} ± {std}" if seeds > 1 else mean


def table(records: list[dict]) -> tuple[dict, str]:
    summary = {}
    lines = [
        "MMSLF's teacher trained and scored with cues that state every clip's label (all splits), "
        "synthetic default, `synthetic` teacher settings, selected on validation MAE; mean ± std over "
        "seeds. 'moved': mean absolute change of the test predictions when each clip gets another "
        "clip's cue.",
        "",
        "| prompt position init std | seeds | train MAE | test MAE, own cues | test Corr, own cues "
        "| test MAE, permuted cues | moved | seconds per seed | machine |",
        "|---" * 9 + "|",
    ]
    for std in sorted({r["position_std"] for r in records}, reverse=True):
        runs = sorted((r for r in records if r["position_std"] == std), key=lambda r: r["seed"])
        cells = {}
        for key, values in (("train", [r["train"] for r in runs]),
                            ("own", [r["test"]["own"] for r in runs]),
                            ("permuted", [r["test"]["permuted"] for r in runs])):
            mean, std_ = mean_std(values)
            cells[key] = {k: _cell(format_value(k, mean[k]), format_value(k, std_[k]), len(runs))
                          for k in COLUMNS}
        moved = np.array([r["moved"] for r in runs])
        summary[f"{std:g}"] = {"seeds": [r["seed"] for r in runs], "moved": float(moved.mean())}
        lines.append(
            f"| {std:g}{' (official)' if std == 1 else ''} | {' '.join(str(r['seed']) for r in runs)} "
            f"| {cells['train']['mae']} | {cells['own']['mae']} | {cells['own']['corr']} "
            f"| {cells['permuted']['mae']} | {_cell(f'{moved.mean():.3f}', f'{moved.std():.3f}', len(runs))} "
            f"| {sum(r['seconds'] for r in runs) / len(runs):.0f} | {runs[0]['machine']} |"
        )
    commands = sorted({r["command"] for r in records})
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands)]
    return summary, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--position-std", type=float, nargs="+", default=[1.0, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111])
    parser.add_argument("--runs-dir", default="runs/mmslf_oracle_cues")
    parser.add_argument("--output", default="benchmarks/results/mmslf_oracle_cues")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the records")
    parser.add_argument("--cues-only", action="store_true",
                        help="only write <runs-dir>/oracle.jsonl (and its permutation), e.g. for "
                             "studies/mmslf-distillation-variants.yaml")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    if args.cues_only:
        print(write_oracle_files(runs_dir, synthetic_dataset())[0])
        return
    if not args.table:
        command = shlex.join(["python", *sys.argv])
        data = synthetic_dataset()
        own, permuted = write_oracle_files(runs_dir, data)
        for std in args.position_std:
            for seed in args.seeds:
                record = run_one(std, seed, data, own, permuted, runs_dir, command)
                save_record(runs_dir / "records", f"std{std:g}-{seed}", record)
                print(f"std {std:g} seed {seed}: test MAE own {record['test']['own']['mae']:.3f}, "
                      f"permuted {record['test']['permuted']['mae']:.3f}", flush=True)
    print(rebuild_table(runs_dir / "records", args.output, table))


if __name__ == "__main__":
    main()
