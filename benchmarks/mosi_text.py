"""Real-data check on the CMU-MOSI transcripts: frozen-MiniLM ridge vs a fine-tuned text model.

    python benchmarks/mosi_text.py --data ../shared/data/mosi-text/label.csv

1. Ridge regression on frozen, mean-pooled all-MiniLM-L6-v2 sentence embeddings; the ridge
   strength is chosen on the dev split.
2. `text_only` (the same encoder fine-tuned, mean pooling, MLP head) trained with msakit's loop,
   checkpoint selected on the dev split, one run per seed.
Both are scored once on the test split. Writes benchmarks/results/mosi_text.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge

from msakit import api
from msakit.data.batching import iterate_batches
from msakit.data.labelcsv import load_label_csv
from msakit.data.schema import MultimodalDataset, Split
from msakit.evaluation.report import format_value
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.metrics import compute_metrics
from msakit.models.base import ModelConfig
from msakit.models.layers.pooling import masked_mean
from msakit.models.layers.text import TextEncoder

KEYS = ("acc2_non0", "f1_non0", "acc2_has0", "acc7", "mae", "corr")


@torch.no_grad()
def sentence_embeddings(encoder: TextEncoder, split: Split) -> np.ndarray:
    encoder.eval()
    out = []
    for batch in iterate_batches(split, 128):
        out.append(masked_mean(*encoder(batch)).numpy())
    return np.concatenate(out)


def ridge_baseline(data: MultimodalDataset) -> dict:
    encoder = TextEncoder(ModelConfig(finetune_text=False), data.dims)
    x = {s: sentence_embeddings(encoder, data.split(s)) for s in ("train", "valid", "test")}
    scores = {}
    for alpha in (0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0):
        ridge = Ridge(alpha=alpha).fit(x["train"], data.train.labels)
        scores[alpha] = float(np.abs(ridge.predict(x["valid"]) - data.valid.labels).mean())
    alpha = min(scores, key=scores.get)
    ridge = Ridge(alpha=alpha).fit(x["train"], data.train.labels)
    return {
        "alpha_chosen_on_dev": alpha,
        "dev_mae_by_alpha": scores,
        "test": compute_metrics(ridge.predict(x["test"]), data.test.labels, "mosi"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mosi-text/label.csv")
    parser.add_argument("--seeds", default="1111 1112 1113")
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--run-dir", default="runs/mosi-text")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_label_csv(args.data)
    started = time.perf_counter()
    ridge = ridge_baseline(data)
    ridge_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run = api.train("text_only", data, seeds=[int(s) for s in args.seeds.split()],
                    output=args.run_dir, progress=False)
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "sizes": {s: len(data.split(s)) for s in ("train", "valid", "test")},
        "ridge_frozen_minilm": {**ridge, "seconds": round(ridge_seconds, 1)},
        "text_only_finetuned": {
            "config": run["config"], "selection": run["selection"],
            "test_mean": run["mean"]["test"], "test_std": run["std"]["test"],
            "per_seed": [{"seed": r["seed"], "best_epoch": r["best_epoch"], "test": r["test"]}
                         for r in run["seeds"]],
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    out = Path(args.output)
    atomic_write_json(out / "mosi_text.json", result)
    header = "| model | " + " | ".join(KEYS) + " |"
    lines = [
        "# CMU-MOSI transcripts, test split (686 clips)", "",
        f"Command: `{result['command']}`", "",
        header, "|" + "---|" * (len(KEYS) + 1),
        "| ridge on frozen MiniLM (alpha on dev) | "
        + " | ".join(format_value(k, ridge["test"][k]) for k in KEYS) + " |",
        f"| text_only fine-tuned, {len(run['seeds'])} seeds | " + " | ".join(
            format_value(k, run["mean"]["test"][k], run["std"]["test"][k]) for k in KEYS) + " |",
    ]
    atomic_write_text(out / "mosi_text.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
