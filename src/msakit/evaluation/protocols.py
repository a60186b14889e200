"""Robustness protocols: score a checkpoint on the test split under missing data, rate by rate.

Intra-modal (LNLN) and inter-modal (HME/CyIN) missing are evaluated at each rate, fixed missing at
each subset of available modalities; each row is the mean over the mask seeds, and the summary row
is the mean over rows (the field's headline number; NaN when a metric is undefined in any row).
Masks come from `msakit.missing`, so every model is scored on exactly the same corrupted inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msakit.data.schema import Batch, MultimodalDataset
from msakit.errors import MsakitError
from msakit.evaluation.report import LABELS, csv_text, mean_std
from msakit.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from msakit.metrics import METRIC_KEYS, UNDEFINED_REASONS
from msakit.missing import DEFAULT_RATES, FIXED_SUBSETS, MissingSpec, apply_missing
from msakit.missing import PROTOCOLS as MASK_PROTOCOLS
from msakit.models.layers.text import special_token_ids
from msakit.training.trainer import Trainer

PROTOCOLS = tuple(p for p in MASK_PROTOCOLS if p != "none")


def conditions(protocol: str, rates: Sequence[float] | None,
               subsets: Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """(row label, MissingSpec arguments) for each condition a protocol evaluates."""
    if protocol not in PROTOCOLS:
        raise MsakitError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol == "fixed":
        if rates is not None:
            raise MsakitError("the fixed protocol takes subsets (e.g. t,ta,tav), not rates")
        return [(s, {"protocol": "fixed", "subset": s}) for s in (subsets or FIXED_SUBSETS)]
    if subsets is not None:
        raise MsakitError(f"the {protocol} protocol takes rates, not subsets")
    chosen = list(rates) if rates is not None else list(DEFAULT_RATES[protocol])
    return [(f"{r:.2f}", {"protocol": protocol, "rate": float(r)}) for r in chosen]


def run_protocol(
    trainer: Trainer, data: MultimodalDataset, protocol: str, *,
    rates: Sequence[float] | None = None, subsets: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,), split: str = "test",
) -> dict[str, Any]:
    """Metrics per condition (mean and std over mask seeds) and their mean over conditions."""
    tokens = special_token_ids(trainer.model.config)
    target = data.split(split)
    rows = []
    for label, spec_args in conditions(protocol, rates, subsets):
        per_seed = []
        for seed in seeds:
            spec = MissingSpec(seed=seed, **spec_args)

            def drop(batch: Batch, spec: MissingSpec = spec) -> Batch:
                return apply_missing(batch, spec, **tokens)

            per_seed.append(trainer.evaluate(target, transform=drop))
        mean, std = mean_std(per_seed)
        rows.append({"condition": label, **spec_args, "metrics": mean, "std": std})
    overall, _ = mean_std([r["metrics"] for r in rows])
    return {"protocol": protocol, "split": split, "seeds": list(seeds), "rows": rows,
            "mean": overall}


def write_robustness(out_dir: Path, result: dict[str, Any], title: str) -> None:
    """robustness.json, robustness.csv (one row per condition plus the mean) and robustness.png."""
    atomic_write_json(out_dir / "robustness.json", result, UNDEFINED_REASONS)
    rows = [{"condition": r["condition"], **r["metrics"]} for r in result["rows"]]
    rows.append({"condition": "mean", **result["mean"]})
    atomic_write_text(out_dir / "robustness.csv", csv_text(rows))
    plot_curves(out_dir / "robustness.png", {"": result}, title)


def _panels(family: str, several: bool) -> list[tuple[str, list[str]]]:
    """(y label, metric keys) per panel: metric families for one run, headline metrics for several."""
    if several:
        headline = ["acc2_non0", "acc7"] if family == "mosi" else ["acc2", "acc5"]
        return [(LABELS[k], [k]) for k in [*headline, "mae", "corr"]]
    accuracies = [k for k in METRIC_KEYS[family] if k not in ("mae", "corr")]
    return [("accuracy / F1 (%)", accuracies), ("MAE, Corr", ["mae", "corr"])]


def plot_curves(path: Path, results: dict[str, dict[str, Any]], title: str) -> None:
    """Metric vs condition; with several results (compare), one line per result in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    conditions = [r["condition"] for r in first["rows"]]
    x = np.arange(len(conditions))
    panels = _panels(first["dataset"]["metric_family"], several=len(results) > 1)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    for ax, (ylabel, keys) in zip(axes.flat, panels, strict=True):
        for name, result in results.items():
            for key in keys:
                scale = 1 if key in ("mae", "corr") else 100
                y = [r["metrics"][key] * scale for r in result["rows"]]
                ax.plot(x, y, marker="o", label=name or LABELS[key])
        fixed = first["protocol"] == "fixed"
        ax.set_xticks(x, conditions, rotation=0 if fixed else 45)
        ax.set_xlabel("available modalities" if fixed else "missing rate")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
