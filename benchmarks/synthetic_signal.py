"""How much each modality of the synthetic dataset tells: ridge regression on every subset.

    python benchmarks/synthetic_signal.py            # --seed N for another dataset seed

Regenerates the planted-signal numbers docs/data.md quotes for the default (MOSI-size) synthetic
dataset. For every non-empty subset of {text, audio, vision}: each modality's features are
averaged over its valid steps (tokens under the attention mask, frames within the length),
concatenated, standardised with the train split's mean and std, and fed to scikit-learn's
RidgeCV (ridge strength by leave-one-out on the train split). Predictions on the test split are
scored with msakit's metrics (MOSI rules); "predict the train mean" is the floor. Writes
benchmarks/results/synthetic_signal.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV

from msakit.data.schema import MODALITIES, MultimodalDataset, Split
from msakit.data.synthetic import synthetic_dataset
from msakit.evaluation.report import format_value
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.metrics import MetricWarning, compute_metrics

ALPHAS = tuple(10.0**k for k in np.arange(-2.0, 5.01, 0.5))
COLUMNS = {"mae": "MAE", "corr": "Corr", "acc2_non0": "Acc-2 (non0)"}


def pooled(split: Split, modality: str) -> np.ndarray:
    """(N, D) the mean of a modality's features over its valid steps."""
    features = getattr(split, modality)
    if modality == "text":
        valid = split.text_bert[:, 1] > 0
    else:
        lengths = getattr(split, f"{modality}_lengths")
        steps = np.arange(features.shape[1])
        valid = np.ones(features.shape[:2], bool) if lengths is None else steps < lengths[:, None]
    weights = valid.astype(np.float32)
    # einsum avoids materialising the masked (N, L, D) copy of the 768-d text features
    total = np.einsum("nld,nl->nd", features, weights)
    return total / np.maximum(weights.sum(1, keepdims=True), 1.0)


def fit_and_score(data: MultimodalDataset, modalities: tuple[str, ...]) -> dict:
    train = np.concatenate([pooled(data.train, m) for m in modalities], axis=1)
    test = np.concatenate([pooled(data.test, m) for m in modalities], axis=1)
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    ridge = RidgeCV(alphas=ALPHAS).fit((train - mean) / std, data.train.labels)
    predictions = ridge.predict((test - mean) / std)
    return {"alpha": float(ridge.alpha_), "features": int(train.shape[1]),
            "test": compute_metrics(predictions, data.test.labels, "mosi")}


def mean_baseline(data: MultimodalDataset) -> dict:
    constant = np.full(len(data.test), float(data.train.labels.mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # Corr of a constant is undefined: NaN
        return {"test": compute_metrics(constant, data.test.labels, "mosi")}


def json_safe(value: object) -> object:
    """NaN (Corr of the constant baseline) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/synthetic_signal.py", *sys.argv[1:]])

    started = time.perf_counter()
    data = synthetic_dataset(seed=args.seed)
    rows = {"train mean": mean_baseline(data)}
    for size in range(1, len(MODALITIES) + 1):
        for subset in itertools.combinations(MODALITIES, size):
            rows[" + ".join(subset)] = fit_and_score(data, subset)

    result = {
        "command": command,
        "dataset": data.source,
        "sizes": {s: len(data.split(s)) for s in ("train", "valid", "test")},
        "ridge_alphas": list(ALPHAS),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    lines = [
        f"# Planted signal in {data.source}, test split ({len(data.test)} clips)", "",
        f"Command: `{command}`", "",
        "Ridge (RidgeCV, leave-one-out on train) on standardised time-mean features.", "",
        "| features | " + " | ".join(COLUMNS.values()) + " | ridge alpha |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name, row in rows.items():
        alpha = f"{row['alpha']:g}" if "alpha" in row else "-"
        lines.append(f"| {name} | "
                     + " | ".join(format_value(k, row["test"][k]) for k in COLUMNS)
                     + f" | {alpha} |")
    out = Path(args.output)
    atomic_write_json(out / "synthetic_signal.json", json_safe(result))
    atomic_write_text(out / "synthetic_signal.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
