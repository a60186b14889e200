"""bf16 autocast against fp32 on the CPU: the time of one training step and of one evaluation
pass, per model, as a ratio (below 1: bf16 is faster).

    python benchmarks/perf/precision.py                      # every registered model
    python benchmarks/perf/precision.py --models mult lnln   # re-measure some (other rows stay)

Each model runs with its `synthetic` settings (the networks msakit's synthetic benchmarks train, on
precomputed 768-wide text features; text_only, which has none, with its defaults: a fine-tuned
MiniLM) in its recipe's last stage, on a batch of 32 clips with MOSI's
feature widths and sequences shortened to text 32, audio 64, vision 64 steps: large enough that the
matrix products, not Python, take the time, small enough for one thread. The fp32 and bf16 copies
start from the same weights; after two warm-up steps each, the repeats alternate between them, so
that other load on the machine falls on both alike, and a row shows the medians. One thread.
Writes benchmarks/results/perf/precision.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from harness import SHAPES, Step, machine, needs_cues, stand_in_data, timed, with_cues

from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models import list_models
from msakit.training.config import resolve_config

FAMILY = "synthetic"
BATCH = 32
SHAPE = {**SHAPES["mosi"], "text_len": 32, "audio_len": 64, "vision_len": 64}
OUTPUT = Path("benchmarks/results/perf/precision")
PRECISIONS = ("fp32", "bf16")


def measure(model_name: str, repeats: int) -> dict:
    data = stand_in_data(SHAPE, n_train=BATCH, n_test=BATCH)
    overrides = [f"training.batch_size={BATCH}", f"training.eval_batch_size={BATCH}"]
    if needs_cues(model_name, FAMILY):
        data, cues = with_cues(data)
        overrides.append(cues)
    stages = [s["name"] for s in resolve_config(model_name, FAMILY)["training"].get("stages") or []]
    stage = stages[-1] if stages else None
    steps = {p: Step(model_name, FAMILY, data, "cpu", p, stage, overrides) for p in PRECISIONS}
    device = torch.device("cpu")
    for step in steps.values():
        for _ in range(2):
            step.train(data.train)
            step.evaluate(data.test)
    seconds: dict[str, dict[str, list[float]]] = {p: {"train": [], "eval": []} for p in PRECISIONS}
    for _ in range(repeats):
        for precision, step in steps.items():
            seconds[precision]["train"].append(timed(lambda s=step: s.train(data.train), device))
            seconds[precision]["eval"].append(timed(lambda s=step: s.evaluate(data.test), device))
    median = {p: {phase: statistics.median(v) for phase, v in seconds[p].items()} for p in PRECISIONS}
    return {
        "model": model_name, "stage": stage or "main", "batch": BATCH, "repeats": repeats,
        "parameters": steps["fp32"].parameters,
        **{f"{p}_{phase}_ms": 1000 * median[p][phase] for p in PRECISIONS for phase in ("train", "eval")},
        "train_ratio": median["bf16"]["train"] / median["fp32"]["train"],
        "eval_ratio": median["bf16"]["eval"] / median["fp32"]["eval"],
    }


def table(rows: list[dict], where: dict) -> str:
    lines = [
        "# bf16 autocast vs fp32 on the CPU", "",
        f"Command: `{where['command']}`. Device: {where['device']}; torch {where['torch']}, "
        f"{where['threads']} thread(s). Batch {BATCH}, {FAMILY} settings, text {SHAPE['text_len']} / "
        f"audio {SHAPE['audio_len']} / vision {SHAPE['vision_len']} steps; medians of interleaved "
        "repeats. Ratio = bf16 time / fp32 time (below 1: bf16 is faster).", "",
        "| model | stage | params | fp32 train ms | bf16 train ms | train bf16/fp32 | fp32 eval ms "
        "| bf16 eval ms | eval bf16/fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['stage']} | {r['parameters'] / 1e6:.2f}M | {r['fp32_train_ms']:.1f} | "
              f"{r['bf16_train_ms']:.1f} | {r['train_ratio']:.2f} | {r['fp32_eval_ms']:.1f} | "
              f"{r['bf16_eval_ms']:.1f} | {r['eval_ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = OUTPUT.with_name(OUTPUT.name + ".json")
    rows = {r["model"]: r for r in (json.loads(path.read_text())["rows"] if path.is_file() else [])}
    where = {**machine(), "command": shlex.join(["python", "benchmarks/perf/precision.py", *sys.argv[1:]])}
    for model_name in args.models or list_models():
        rows[model_name] = r = measure(model_name, args.repeats)
        print(f"{model_name:11s} train {r['fp32_train_ms']:8.1f} -> {r['bf16_train_ms']:8.1f} ms "
              f"({r['train_ratio']:.2f})  eval {r['fp32_eval_ms']:7.1f} -> {r['bf16_eval_ms']:7.1f} ms "
              f"({r['eval_ratio']:.2f})", flush=True)
        ordered = [rows[k] for k in sorted(rows)]  # written after each model: a long run keeps its rows
        atomic_write_json(path, {**where, "rows": ordered})
        atomic_write_text(OUTPUT.with_name(OUTPUT.name + ".md"), table(ordered, where) + "\n")


if __name__ == "__main__":
    main()
