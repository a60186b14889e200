"""Training and evaluation throughput (samples/s) and peak memory per model, at MOSI and MOSEI shapes.

    python benchmarks/perf/throughput.py                  # every model, both shapes
    python benchmarks/perf/throughput.py --models mult --samples 16   # re-measure one model only

A model trained in stages (MMSLF: teacher, then student) gets one row per stage, each stage measured
as it trains (the student's step includes the frozen teacher's forward pass); MMSLF's cues are
written by the offline backend for the stand-in data.

Each (model, shape) runs in its own process so that its peak memory is its own: resident set size on
the CPU, `torch.cuda.max_memory_allocated` on a GPU. The data are synthetic samples with the real
datasets' sequence lengths and feature widths (MOSI: audio 375x5, vision 500x20; MOSEI: audio 500x74,
vision 500x35; text 50 tokens); throughput is per sample, so `--samples` of them stand in for the
full split. Each model runs with its published configuration for that dataset (batch size, text
encoder). "intra 10 rates / 1 eval" is the time of a whole intra-modal robustness evaluation
(rates 0.0-0.9) over that of one plain evaluation: about 10 means masking adds little. Writes
benchmarks/results/perf/throughput.json and throughput.md; rows of models not re-measured are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from harness import SHAPES, Step, first_rows, needs_cues, stand_in_data, timed, with_cues


def stage_names(model_name: str, shape: str) -> list[str | None]:
    from msakit.training.config import resolve_config

    stages = resolve_config(model_name, shape)["training"].get("stages") or []
    return [s["name"] for s in stages] if len(stages) > 1 else [None]


def measure(model_name: str, shape: str, samples: int, device: str, stage: str | None = None) -> dict:
    from msakit.evaluation.protocols import run_protocol

    data = stand_in_data(SHAPES[shape], n_train=samples, n_test=samples)
    overrides = []
    if needs_cues(model_name, shape):
        data, cues = with_cues(data)  # as a run gives them to the model
        overrides.append(cues)
    step = Step(model_name, shape, data, device, None, stage, overrides)
    trainer = step.trainer
    warm = first_rows(data.train, 2 * step.settings.batch_size)
    step.train(warm, epoch=1)  # allocator, kernels warm
    step.evaluate(warm)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    train_seconds = timed(lambda: step.train(data.train), trainer.device)
    eval_seconds = timed(lambda: step.evaluate(data.test), trainer.device)
    # the 10 default rates, batched like a plain evaluation
    intra_seconds = timed(lambda: run_protocol(trainer, data, "intra"), trainer.device)
    if trainer.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": model_name if stage is None else f"{model_name} ({stage})", "shape": shape,
        "device": str(trainer.device),
        "text_source": step.model_settings.get("text_source", "encoder"),
        "batch_size": step.settings.batch_size, "samples": samples,
        "parameters": step.parameters,
        "train_samples_per_s": samples / train_seconds,
        "eval_samples_per_s": samples / eval_seconds,
        "intra_10_rates_over_one_eval": intra_seconds / eval_seconds,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "cuda max allocated" if trainer.device.type == "cuda" else "process RSS",
    }


def main() -> None:
    from msakit.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="benchmarks/results/perf")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.samples, args.device, args.stage)))
        return
    from msakit.fileio import atomic_write_json, atomic_write_text

    command = shlex.join(["python", "benchmarks/perf/throughput.py", *sys.argv[1:]])
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    out = Path(args.output)
    stem = "throughput" if not torch.cuda.is_available() else "throughput-gpu"
    # rows of earlier runs stay unless re-measured, so one slow model can be measured on its own
    json_path = out / f"{stem}.json"
    rows = {(r["model"], r["shape"]): r
            for r in (json.loads(json_path.read_text())["results"] if json_path.is_file() else [])}
    for model in args.models or list_models():
        for shape in args.shapes:
            for stage in stage_names(model, shape):
                cmd = [sys.executable, __file__, "--one", model, shape, "--samples", str(args.samples),
                       "--device", args.device] + (["--stage", stage] if stage else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{model}/{shape} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = {**json.loads(done.stdout.strip().splitlines()[-1]), "machine": machine,
                     "command": command}
                rows[(r["model"], shape)] = r
                print(f"{r['model']:10s} {shape:6s} train {r['train_samples_per_s']:8.1f}/s  "
                      f"eval {r['eval_samples_per_s']:8.1f}/s  peak {r['peak_memory_mb']:8.0f} MB")
    ordered = [rows[k] for k in sorted(rows)]
    atomic_write_json(json_path, {"results": ordered})
    lines = ["# Training and evaluation throughput", "",
             "Each row: the command that measured it and the machine in the last columns.", "",
             "| model | shape | text | batch | params | samples | train samples/s | eval samples/s "
             "| intra 10 rates / 1 eval | peak MB | machine | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['shape']} | {r['text_source']} | {r['batch_size']} | "
              f"{r['parameters'] / 1e6:.2f}M | {r['samples']} | {r['train_samples_per_s']:.1f} | "
              f"{r['eval_samples_per_s']:.1f} | {r['intra_10_rates_over_one_eval']:.1f}x | "
              f"{r['peak_memory_mb']:.0f} ({r['peak_memory_kind']}) | {r['machine']} | "
              f"`{r['command']}` |"
              for r in ordered]
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
