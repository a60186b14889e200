"""Does MMSLF's teacher read its cues? The saved teachers scored with their cue texts changed.

    python benchmarks/mmslf_teacher_cues.py        # after msakit study run studies/mmslf-distillation.yaml
    python benchmarks/mmslf_teacher_cues.py --table   # only rebuild the table

Each distilled checkpoint of the mmslf-distillation study (its `mmslf` model, or the model `--label`
names in the study `--study` names; `<study dir>/jobs/<job id>/seed-<seed>.pt`) keeps its frozen
teacher. Each teacher is scored on every split with:
- its own cues, as it was trained and selected;
- the cues of other samples of the same split (one fixed permutation): if the teacher uses what
  the cues say about each clip, its score must drop;
- on the training split, its own cues written without the label (the offline backend with the label
  withheld, as it writes valid and test cues): if the teacher leans on the label it was shown, its
  training score must drop.
It also measures how much the prompt can say: on the training split, the size of the projected
cue states against the learned positions they are added to, and how much the prompt summary P
differs between clips (its across-clip standard deviation over its root mean square).
The changed cue files are written into the study's folder (`<study dir>/mmslf-cue-variants/`); the
table goes to benchmarks/results/mmslf_teacher_cues.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msakit.cues import OfflineBackend, load_cue_texts, with_cues
from msakit.cues.backend import CueSample
from msakit.cues.cache import read_cue_records
from msakit.data.batching import iterate_batches
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import format_value, mean_std
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.metrics import compute_metrics
from msakit.study import load_study, plan_jobs
from msakit.study.runner import default_folder
from msakit.training.checkpoint import load_checkpoint
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer
from records import machine_name

CONDITIONS = {  # key -> (label, splits it is scored on)
    "own": ("its own cues", SPLITS),
    "permuted": ("another sample's cues (same split)", SPLITS),
    "no_label": ("its own cues without the label", ("train",)),
}


def permuted_cues(records: dict[str, dict], data: MultimodalDataset, seed: int = 0) -> list[dict]:
    """Every sample gets the cue text of another sample of its split (a seeded permutation)."""
    rng = np.random.default_rng(seed)
    out = []
    for name in SPLITS:
        ids = [str(i) for i in data.split(name).ids]
        order = rng.permutation(len(ids))  # each sample in this order takes the next one's cues
        out += [{**records[ids[d]], "id": ids[i], "split": name}
                for i, d in zip(order, np.roll(order, -1), strict=True)]
    return out


def label_free_cues(records: dict[str, dict], data: MultimodalDataset) -> list[dict]:
    """The offline backend's training cues written with the label withheld; valid and test as they are."""
    backend = OfflineBackend(data)
    train = data.split("train")
    out = []
    for i, sample_id in enumerate(str(s) for s in train.ids):
        transcript = None if train.raw_text is None else str(train.raw_text[i])
        record = backend.cues(CueSample(sample_id, "train", i, transcript, None, data.family))
        out.append({**json.loads(record.to_json()), "text": record.text})
    return out + [r for r in records.values() if r["split"] != "train"]


def write_cues(path: Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path.resolve()


def teacher_predictions(checkpoint: Path, cues: Path, data: MultimodalDataset, split: str) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint, {"cues": str(cues)})
    model.set_stage("teacher")
    trainer = Trainer(model, TrainConfig(device="cpu"), data.metric_family, progress=False)
    return trainer.predict(with_cues(data.split(split), load_cue_texts(cues)))[0]


def score_seed(checkpoint: Path, cue_files: dict[str, Path], data: MultimodalDataset) -> dict:
    """Per condition and split: the metrics, and how far the predictions moved from the own-cue ones."""
    scores: dict[str, dict[str, dict[str, float]]] = {key: {} for key in CONDITIONS}
    for split in SPLITS:
        labels = data.split(split).labels
        own = teacher_predictions(checkpoint, cue_files["own"], data, split)
        for key, (_, splits) in CONDITIONS.items():
            if split not in splits:
                continue
            preds = own if key == "own" else teacher_predictions(checkpoint, cue_files[key], data, split)
            scores[key][split] = {**compute_metrics(preds, labels, data.metric_family),
                                  "moved": float(np.abs(preds - own).mean())}
    return scores


@torch.no_grad()
def attention_spread(checkpoint: Path, cues: Path, data: MultimodalDataset) -> dict[str, float]:
    """Entropy of the teacher's last cross-attention maps on the test split, as a fraction of the
    uniform map's (1 = the text reads every frame alike), without ("plain") and with ("modulated")
    the prompt term."""
    model, _ = load_checkpoint(checkpoint, {"cues": str(cues)})
    model.set_stage("teacher")
    fractions: dict[str, list[torch.Tensor]] = {}
    for batch in iterate_batches(with_cues(data.test, load_cue_texts(cues)), 64):
        out = model.run_teacher(batch, maps=True)
        for m in ("audio", "vision"):
            mask = getattr(batch, f"{m}_mask")
            frames = torch.full((len(batch),), getattr(batch, m).shape[1]) if mask is None else mask.sum(-1)
            for kind, maps in (("plain", out.attention), ("modulated", out.used_attention)):
                entropy = -(maps[m] * maps[m].clamp_min(1e-30).log()).sum(-1)  # (B, heads, L)
                fraction = entropy / frames.clamp_min(2).log()[:, None, None]
                fractions.setdefault(f"{m} {kind}", []).append(fraction.mean(dim=(1, 2)))
    return {key: float(torch.cat(values).mean()) for key, values in fractions.items()}


@torch.no_grad()
def prompt_variation(checkpoint: Path, cues: Path, data: MultimodalDataset) -> dict[str, float]:
    """On the training split: the root mean square of the projected cue states W_p E(cues) and of
    the prompt transformer's positions added to them, and the across-clip variation of P."""
    model, _ = load_checkpoint(checkpoint, {"cues": str(cues)})
    model.set_stage("teacher")
    teacher = model.teacher
    length = data.dims.text_len
    cue_squares, position_squares, summaries = [], [], []
    for batch in iterate_batches(with_cues(data.train, load_cue_texts(cues)), 64):
        states, mask = model.prompts(batch)
        projected = teacher.prompt_project(states)
        # the prompt transformer's first `length` positions are its learned tokens'; the cue's follow
        positions = teacher.prompt_summary.positions[0, length:length + states.shape[1]]
        cue_squares.append(projected[mask].pow(2).mean(-1))
        position_squares.append(positions.expand(len(batch), -1, -1)[mask].pow(2).mean(-1))
        summaries.append(teacher.prompt_summary(projected, mask, keep=length)[-1])
    summary = torch.cat(summaries)
    return {
        "cue rms": float(torch.cat(cue_squares).mean().sqrt()),
        "position rms": float(torch.cat(position_squares).mean().sqrt()),
        "P variation": float(summary.std(0).pow(2).mean().sqrt() / summary.pow(2).mean().sqrt()),
    }


def table(records: list[dict], command: str, source: str) -> tuple[dict, str]:
    summary = {}
    lines = [
        f"MMSLF teachers of {source} (synthetic default, offline cues), "
        "scored with changed cue texts: MAE, Corr, and how far the predictions moved from those with "
        "its own cues (mean absolute change, in label units); mean ± std over seeds.",
        "",
        "| cues the teacher reads | " + " | ".join(f"{s} MAE | {s} Corr | {s} moved" for s in SPLITS) + " |",
        "|---" * (1 + 3 * len(SPLITS)) + "|",
    ]
    for key, (label, splits) in CONDITIONS.items():
        cells = []
        summary[key] = {}
        for split in SPLITS:
            if split not in splits:
                cells += ["", "", ""]
                continue
            mean, std = mean_std([r["scores"][key][split] for r in records])
            summary[key][split] = {"mean": mean, "std": std}
            cells += [f"{format_value(k, mean[k])} ± {format_value(k, std[k])}" for k in ("mae", "corr")]
            cells.append(f"{mean['moved']:.1e} ± {std['moved']:.1e}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    spread, spread_std = mean_std([r["attention_spread"] for r in records])
    summary["attention_spread"] = {"mean": spread, "std": spread_std}
    lines += ["", "Entropy of the teacher's last cross-attention maps on test (its own cues), as a "
              "fraction of the uniform map's (1 = every frame read alike):", "",
              "| " + " | ".join(spread) + " |", "|---" * len(spread) + "|",
              "| " + " | ".join(f"{spread[k]:.4f} ± {spread_std[k]:.4f}" for k in spread) + " |"]
    variation, variation_std = mean_std([r["prompt_variation"] for r in records])
    summary["prompt_variation"] = {"mean": variation, "std": variation_std}
    lines += ["", "What the prompt carries, on the training split: root mean square of the projected cue "
              "states and of the learned positions added to them, and the across-clip standard deviation "
              "of the prompt summary P over its root mean square (0 = the same P for every clip):", "",
              "| " + " | ".join(variation) + " |", "|---" * len(variation) + "|",
              "| " + " | ".join(f"{variation[k]:.4f} ± {variation_std[k]:.4f}" for k in variation) + " |"]
    seeds = " ".join(str(r["seed"]) for r in records)
    lines += ["", f"Seeds {seeds}; {records[0]['machine']}. Command: `{command}`"]
    return summary, "\n".join(lines)


def distilled_checkpoints(study_file: str, study_dir: str | None, label: str,
                          seeds: list[int]) -> tuple[Path, dict[int, Path]]:
    """The study's folder and the checkpoints its model `label` trained, per seed."""
    study = load_study(study_file)
    models = tuple(m for m in study.models if m.label == label)
    if not models:
        raise SystemExit(f"{study_file}: no model labelled {label!r}")
    folder = Path(study_dir) if study_dir else default_folder(study)
    jobs = plan_jobs(dataclasses.replace(study, models=models, seeds=tuple(seeds)))
    return folder, {job.seed: folder / "jobs" / job.id / f"seed-{job.seed}.pt" for job in jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    parser.add_argument("--cues", default="runs/synthetic_cues.jsonl")
    parser.add_argument("--study", default="studies/mmslf-distillation.yaml",
                        help="the study that trained the distilled students")
    parser.add_argument("--study-dir", help="its folder (default: runs/studies/<its name>)")
    parser.add_argument("--label", default="mmslf", help="the study's model whose teachers are scored")
    parser.add_argument("--output", default="benchmarks/results/mmslf_teacher_cues")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the JSON")
    args = parser.parse_args()
    out = Path(args.output)
    if args.table:
        saved = json.loads(Path(f"{out}.json").read_text())
        write_table(out, saved["records"], saved["command"], saved["source"])
        return
    study_dir, checkpoints = distilled_checkpoints(args.study, args.study_dir, args.label, args.seeds)
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing or not Path(args.cues).is_file():
        parser.error(f"run `msakit study run {args.study}` first: missing {', '.join(missing) or args.cues}")
    data = synthetic_dataset()
    records = read_cue_records(Path(args.cues))
    variants = study_dir / "mmslf-cue-variants"
    variants.mkdir(parents=True, exist_ok=True)
    cue_files = {
        "own": Path(args.cues).resolve(),
        "permuted": write_cues(variants / "permuted.jsonl", permuted_cues(records, data)),
        "no_label": write_cues(variants / "no_label.jsonl", label_free_cues(records, data)),
    }
    results = []
    for seed, checkpoint in checkpoints.items():
        start = time.perf_counter()
        scores = score_seed(checkpoint, cue_files, data)
        spread = attention_spread(checkpoint, cue_files["own"], data)
        variation = prompt_variation(checkpoint, cue_files["own"], data)
        results.append({"seed": seed, "checkpoint": str(checkpoint), "scores": scores,
                        "attention_spread": spread, "prompt_variation": variation,
                        "seconds": round(time.perf_counter() - start, 1), "machine": machine_name()})
        print(f"seed {seed}: test MAE own {scores['own']['test']['mae']:.3f}, "
              f"permuted {scores['permuted']['test']['mae']:.3f}", flush=True)
    write_table(out, results, shlex.join(["python", *sys.argv]), f"{args.label} in {args.study}")


def write_table(out: Path, records: list[dict], command: str, source: str) -> None:
    """`source`: the study model whose teachers were scored (`mmslf in studies/...yaml`)."""
    summary, text = table(records, command, source)
    atomic_write_json(Path(f"{out}.json"),
                      {"rows": summary, "records": records, "command": command, "source": source})
    atomic_write_text(Path(f"{out}.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
