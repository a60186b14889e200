"""Tables and files for results: rich tables for the terminal, mean ± std over seeds, CSV rows."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

import numpy as np
from rich.table import Table

from msakit.metrics import METRIC_KEYS

LABELS = {
    "acc2_has0": "Acc-2 Has0", "f1_has0": "F1 Has0", "acc2_non0": "Acc-2 Non0",
    "f1_non0": "F1 Non0", "acc2": "Acc-2", "acc3": "Acc-3", "acc5": "Acc-5", "acc7": "Acc-7",
    "f1": "F1", "mae": "MAE", "corr": "Corr",
}


def mean_std(runs: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and (population) standard deviation over runs. A metric that is undefined
    (NaN) in any run is NaN in the mean too: a mean over the other rows would pass for the mean of
    all of them."""
    keys = list(runs[0])
    values = {k: np.array([r[k] for r in runs], dtype=float) for k in keys}
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std()) for k, v in values.items()})


def format_value(key: str, value: float, std: float | None = None) -> str:
    """Accuracies and F1 as percentages (as papers print them), MAE and Corr as decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    scale, digits = (1, 3) if key in ("mae", "corr") else (100, 2)
    text = f"{value * scale:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f"±{std * scale:.{digits}f}"
    return text


def metrics_table(
    title: str, rows: dict[str, dict[str, float]], family: str,
    stds: dict[str, dict[str, float]] | None = None, first_column: str = "",
) -> Table:
    """One row per entry of `rows` (e.g. seeds, rates), the field's metrics as columns."""
    keys = METRIC_KEYS[family]
    table = Table(title=title, title_justify="left")
    table.add_column(first_column)
    for key in keys:
        table.add_column(LABELS.get(key, key), justify="right")
    for name, metrics in rows.items():
        std = (stds or {}).get(name, {})
        table.add_row(name, *(format_value(k, metrics[k], std.get(k)) for k in keys))
    return table


def csv_text(rows: list[dict[str, object]]) -> str:
    """CSV with a header from the union of keys, in first-seen order."""
    fieldnames: list[str] = []
    for row in rows:
        fieldnames += [k for k in row if k not in fieldnames]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
