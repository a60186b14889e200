"""MulT against MMSA's MULT, side by side: time of a training step and of an evaluation forward
pass, and the peak memory of each, at MOSI's unaligned shape on one CPU thread.

    python benchmarks/perf/mult.py --official /path/to/MMSA          # a checkout of thuiar/MMSA
    PYTHONPATH=/tmp/before/src python benchmarks/perf/mult.py --official /path/to/MMSA --label before

Both sides: text 50 x 768 (BERT features; MMSA `use_bert: false`, msakit `text_source: features`,
so the text encoder is the identity on both), audio 375 x 5, vision 500 x 20, every step valid, a
batch of 16, MMSA's MOSI settings (config_regression.json, "mult"; msakit's mult.yaml holds the same
values), both models built from seed 0. MMSA's MULT is imported from the checkout's model file (its
package __init__ files, which load BERT and every model, are bypassed). A training step is
zero_grad, forward, L1 loss, backward and an Adam step, the same on both sides (MMSA's gradient
value clipping and msakit's norm clipping left out); an evaluation is a forward pass in eval mode
under torch.no_grad.

Time: CPU seconds of this process (time.process_time) with one torch thread; other jobs on a shared
machine stretch wall time far more than CPU time. After one unmeasured step per side, `--repeats`
steps per side alternate between the sides (the first side alternating too); medians are reported,
wall times recorded beside them.

Peak memory: each (side, phase) in a fresh subprocess, with glibc's mmap threshold fixed so that a
freed block returns to the system at once (its default threshold rises after large frees and keeps
later blocks on the heap, so the peak RSS would count memory freed long before); one step at batch
1 first loads code and the optimizer's state, then the growth of the process's peak resident set
over one step at the full batch (the peak reset first through /proc/self/clear_refs, Linux) is that
step's working set (activations kept for the backward pass, gradients, transients).

Rows are kept per `--label` in benchmarks/results/perf/mult.{json,md}, so the table shows a run of
an older checkout (through PYTHONPATH; the row's command names it) beside the current one.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import msakit
from msakit.data.schema import Batch, FeatureDims
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models import create_model
from msakit.training.config import resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from msakit_parity import full_batch, official_commit  # noqa: E402  (benchmarks/parity)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine  # noqa: E402  (benchmarks/perf/harness.py)

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
OUTPUT = Path("benchmarks/results/perf/mult")
TEXT, AUDIO, VISION = (50, 768), (375, 5), (500, 20)  # MOSI unaligned: (steps, width)
SIDES = ("mmsa", "msakit")
PHASES = ("train", "eval")


def official_model(root: Path) -> nn.Module:
    """MMSA's MULT at its MOSI settings, from src/MMSA/models/singleTask/MULT.py of the checkout."""
    source = root / "src" / "MMSA"
    for name in ("models", "models.subNets", "models.subNets.transformers_encoder", "models.singleTask"):
        package = types.ModuleType(name)
        package.__path__ = [str(source.joinpath(*name.split(".")))]
        sys.modules[name] = package
    sys.modules["models.subNets"].BertTextEncoder = None  # only used with use_bert, off here
    sys.path.insert(0, str(source))
    module = importlib.import_module("models.singleTask.MULT")
    config = json.loads((source / "config" / "config_regression.json").read_text())
    args = {**config["mult"]["commonParams"], **config["mult"]["datasetParams"]["mosi"],
            "feature_dims": [TEXT[1], AUDIO[1], VISION[1]], "train_mode": "regression"}
    torch.manual_seed(0)
    return module.MULT(types.SimpleNamespace(**args))


def msakit_model() -> nn.Module:
    config = resolve_config("mult", "mosi", ["model.text_source=features"])["model"]
    dims = FeatureDims(text=TEXT[1], audio=AUDIO[1], vision=VISION[1], text_len=TEXT[0],
                       audio_len=AUDIO[0], vision_len=VISION[0], has_text_ids=False)
    torch.manual_seed(0)
    return create_model("mult", config, dims)


def inputs(batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = {m: torch.randn(batch, *shape, generator=generator)
                for m, shape in (("text", TEXT), ("audio", AUDIO), ("vision", VISION))}
    return features, torch.randn(batch, generator=generator)


class Side:
    """One implementation's model, optimizer and inputs: `run(phase)` is one step of `phase`."""

    def __init__(self, name: str, official: Path, batch: int) -> None:
        self.model = official_model(official) if name == "mmsa" else msakit_model()
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.name = name
        self.resize(batch)

    def resize(self, batch: int) -> None:
        self.features, self.labels = inputs(batch)
        self.batch: Batch = full_batch(self.labels, **self.features)

    def predict(self) -> torch.Tensor:
        if self.name == "mmsa":
            f = self.features
            return self.model(f["text"], f["audio"], f["vision"])["M"].squeeze(-1)
        return self.model(self.batch).pred

    def run(self, phase: str) -> None:
        if phase == "train":
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            F.l1_loss(self.predict(), self.labels).backward()
            self.optimizer.step()
        else:
            self.model.eval()
            with torch.no_grad():
                self.predict()


def clocked(run: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `run()`."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def times(official: Path, batch: int, repeats: int) -> dict[str, dict[str, dict]]:
    sides = {name: Side(name, official, batch) for name in SIDES}
    result: dict[str, dict[str, dict]] = {phase: {} for phase in PHASES}
    for phase in PHASES:
        for side in sides.values():
            side.run(phase)  # unmeasured: first-call costs
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in SIDES}
        for repeat in range(repeats):
            order = SIDES if repeat % 2 == 0 else SIDES[::-1]
            for name in order:
                samples[name].append(clocked(partial(sides[name].run, phase)))
        for name, runs in samples.items():
            result[phase][name] = {"cpu_s": statistics.median(c for c, _ in runs),
                                   "wall_s": statistics.median(w for _, w in runs),
                                   "runs_cpu_s": [c for c, _ in runs], "runs_wall_s": [w for _, w in runs]}
    return result


def fix_mmap_threshold() -> bool:
    """Every freed block of 64 KiB or more goes back to the system at once (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, 64 * 1024))  # -3 = M_MMAP_THRESHOLD


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(name: str, phase: str, official: Path, batch: int) -> dict:
    """In this (fresh) process: the growth of the peak RSS over one step of `phase`."""
    fixed = fix_mmap_threshold()
    side = Side(name, official, 1)
    side.run(phase)
    side.resize(batch)
    # reset the peak (VmHWM) to the current RSS: importing and building peaked higher than now
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb("VmRSS")
    side.run(phase)
    return {"peak_growth_mb": status_mb("VmHWM") - before, "fixed_mmap_threshold": fixed}


def memory(official: Path, batch: int) -> dict[str, dict[str, dict]]:
    result: dict[str, dict[str, dict]] = {phase: {} for phase in PHASES}
    for phase in PHASES:
        for name in SIDES:
            done = subprocess.run(
                [sys.executable, __file__, "--official", str(official), "--batch", str(batch),
                 "--worker", name, phase],
                check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            result[phase][name] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def this_command() -> str:
    command = shlex.join(["python", "benchmarks/perf/mult.py", *sys.argv[1:]])
    path = os.environ.get("PYTHONPATH")
    return f"PYTHONPATH={shlex.quote(path)} {command}" if path else command


def table(results: list[dict]) -> str:
    lines = ["| label | phase | MMSA CPU s | msakit CPU s | time msakit / MMSA | MMSA peak MB | "
             "msakit peak MB | peak memory msakit / MMSA |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        for phase in PHASES:
            t, m = result["time"][phase], result["memory"][phase]
            lines.append(
                f"| {result['label']} | {phase} | {t['mmsa']['cpu_s']:.2f} | {t['msakit']['cpu_s']:.2f} | "
                f"{result['ratios'][phase]['time']:.2f} | {m['mmsa']['peak_growth_mb']:.0f} | "
                f"{m['msakit']['peak_growth_mb']:.0f} | {result['ratios'][phase]['memory']:.2f} |")
    notes = [f"{r['label']}: `{r['command']}`, msakit from `{r['msakit']}`, {r['official']['repository']} @ "
             f"{r['official']['commit']}, {r['repeats']} repeats, on {r['machine']['device']}, torch "
             f"{r['machine']['torch']}, load average {r['load_average']}" for r in results]
    return "\n".join(lines) + (
        "\n\nMOSI unaligned shape (text 50 x 768 features, audio 375 x 5, vision 500 x 20), batch "
        f"{results[-1]['batch']}, one thread. Time: median CPU seconds of one training step (forward, "
        "L1 loss, backward, Adam) or one evaluation forward pass, the sides alternating. Peak: growth "
        "of a fresh process's peak RSS over one such step. " + "; ".join(notes) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--official", required=True, type=Path,
                        help=f"a checkout of {REPOSITORY} (tested at {COMMIT[:7]})")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per side and phase")
    parser.add_argument("--label", default="after", help="this row set's name (before, after, ...)")
    parser.add_argument("--output", default=str(OUTPUT), help="writes OUTPUT.json and OUTPUT.md")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.official / "src" / "MMSA" / "models" / "singleTask" / "MULT.py").is_file():
        parser.error(f"--official {args.official}: no src/MMSA/models/singleTask/MULT.py there")
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(peak_growth(*args.worker, args.official, args.batch)))
        return
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    timing = times(args.official, args.batch, args.repeats)
    peaks = memory(args.official, args.batch)
    ratios = {phase: {
        "time": timing[phase]["msakit"]["cpu_s"] / timing[phase]["mmsa"]["cpu_s"],
        "memory": peaks[phase]["msakit"]["peak_growth_mb"] / peaks[phase]["mmsa"]["peak_growth_mb"],
    } for phase in PHASES}
    result = {"label": args.label, "command": this_command(), "machine": machine(), "load_average": load,
              "msakit": str(Path(msakit.__file__).parent),
              "official": {"repository": REPOSITORY, "commit": official_commit(args.official, COMMIT)},
              "batch": args.batch, "repeats": args.repeats, "time": timing, "memory": peaks,
              "ratios": ratios}
    json_path, md_path = Path(f"{args.output}.json"), Path(f"{args.output}.md")
    kept = json.loads(json_path.read_text())["results"] if json_path.is_file() else []
    results = [r for r in kept if r["label"] != args.label] + [result]
    atomic_write_json(json_path, {"results": results})
    text = table(results)
    atomic_write_text(md_path, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
