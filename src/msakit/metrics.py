"""Sentiment-regression metrics computed exactly as the field reports them.

Published MSA tables come from MMSA's ``utils/metricsTop.py``; these functions follow the same rules
(REFERENCES.md §2) so that msakit's numbers can sit next to them. Two families exist:

- ``mosi`` (MOSI, MOSEI, synthetic, and any unknown dataset): scores in [-3, 3]. Acc-7 / Acc-5 clip
  to [-3, 3] / [-2, 2] and round half to even; MAE on unclipped values; Pearson Corr; Acc-2 and
  weighted F1 twice, "Has0" (all samples, ``>= 0``) and "Non0" (truth != 0 only, ``> 0``).
- ``sims`` (SIMS, SIMS v2): both sides clipped to [-1, 1] first, then binned into the first
  interval ``(lo, hi]`` that holds the value; Acc-2/3/5, weighted F1 on 2 classes, MAE and Corr on
  the clipped values.

Accuracies and F1 are fractions in [0, 1], not percentages, and are not rounded. A metric that is
undefined for the inputs (correlation of a constant series, Non0 with no non-zero truth) comes back
as NaN with a `MetricWarning` instead of an exception, so a degenerate epoch never kills training.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from msakit.errors import MsakitError

__all__ = [
    "LOWER_IS_BETTER",
    "METRIC_KEYS",
    "MetricWarning",
    "UNDEFINED_REASONS",
    "compute_metrics",
    "is_better",
    "metric_family",
    "prediction_warnings",
    "sentiment_classes",
]


class MetricWarning(UserWarning):
    """A metric is undefined for the given inputs and was reported as NaN."""


METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "mosi": ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"),
    "sims": ("acc2", "acc3", "acc5", "f1", "mae", "corr"),
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae"})
# why a metric can be undefined (NaN), for the `<key>_null` notes of strict JSON results
UNDEFINED_REASONS: dict[str, str] = {
    "corr": "undefined: the predictions or the labels are constant (or fewer than 2 samples)",
    "acc2_non0": "undefined: no sample has a non-zero label",
    "f1_non0": "undefined: no sample has a non-zero label",
}
CONSTANT_SPREAD = 0.01  # predictions whose std is below this share of the labels' std are constant

_SIMS_DATASETS = frozenset({"sims", "simsv2"})
# Left-open, right-closed bins; the outer edges sit just past +-1 so every clipped value lands.
_SIMS_EDGES: dict[int, tuple[float, ...]] = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}


def metric_family(dataset: str) -> str:
    """Which rule set scores `dataset`: "sims" for SIMS / SIMS v2, "mosi" for everything else."""
    return "sims" if str(dataset).strip().lower() in _SIMS_DATASETS else "mosi"


def compute_metrics(preds: Any, labels: Any, dataset: str) -> dict[str, float]:
    """Score regression predictions against labels with the rules of `dataset`'s family.

    `preds` and `labels` are numpy arrays, torch tensors or sequences of any shape; both are
    flattened and must hold the same number of finite values. Returns the keys of
    ``METRIC_KEYS[metric_family(dataset)]`` in that order.
    """
    pred = _as_flat_array(preds, "preds")
    true = _as_flat_array(labels, "labels")
    if pred.size != true.size:
        raise MsakitError(
            f"preds and labels differ in length: {pred.size} predictions vs {true.size} labels"
        )
    if pred.size == 0:
        raise MsakitError("preds and labels are empty: there is nothing to score")
    for arr, name in ((pred, "preds"), (true, "labels")):
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise MsakitError(
                f"{name} contains {int(bad.sum())} NaN or infinite value(s), the first at flat "
                f"index {first} ({arr[first]})"
            )

    notes: list[str] = []
    if metric_family(dataset) == "sims":
        result = _sims_metrics(pred, true, notes)
    else:
        result = _mosi_metrics(pred, true, notes)
    for note in notes:
        warnings.warn(note, MetricWarning, stacklevel=2)
    return result


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether `new` beats `best` for `metric` (strictly, so ties keep the earlier checkpoint).

    A NaN or infinite `new` is never better; a missing or NaN `best` loses to any finite `new`.
    """
    known = {key for keys in METRIC_KEYS.values() for key in keys}
    if metric not in known:
        raise MsakitError(f"unknown metric {metric!r}; choose one of {sorted(known)}")
    if not math.isfinite(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new < best if metric in LOWER_IS_BETTER else new > best


def _as_flat_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        values = tensor.numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise MsakitError(f"{name} cannot be read as a numeric array: {exc}") from exc
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise MsakitError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr.reshape(-1)


def _mosi_metrics(pred: np.ndarray, true: np.ndarray, notes: list[str]) -> dict[str, float]:
    # Float64 loses nothing here: rounding and sign tests give the same answer in any float width.
    pred = pred.astype(np.float64)
    true = true.astype(np.float64)

    has0_pred, has0_true = pred >= 0, true >= 0
    nonzero = true != 0
    if nonzero.any():
        non0_pred, non0_true = pred[nonzero] > 0, true[nonzero] > 0
        acc2_non0 = _accuracy(non0_pred, non0_true)
        f1_non0 = _weighted_f1(non0_pred, non0_true)
    else:
        notes.append("acc2_non0 and f1_non0 are NaN: every label is exactly 0")
        acc2_non0 = f1_non0 = math.nan

    return {
        "acc2_has0": _accuracy(has0_pred, has0_true),
        "f1_has0": _weighted_f1(has0_pred, has0_true),
        "acc2_non0": acc2_non0,
        "f1_non0": f1_non0,
        "acc5": _rounded_accuracy(pred, true, 2.0),
        "acc7": _rounded_accuracy(pred, true, 3.0),
        "mae": float(np.mean(np.abs(pred - true))),
        "corr": _pearson(pred, true, notes),
    }


def _sims_metrics(pred: np.ndarray, true: np.ndarray, notes: list[str]) -> dict[str, float]:
    # Binning stays in each array's own float type: MMSA compares float32 scores with float32
    # edges, so a float32 0.1 belongs to (-0.1, 0.1] although it is slightly above the double 0.1.
    pred = np.clip(pred, -1.0, 1.0)
    true = np.clip(true, -1.0, 1.0)
    classes = {k: (_bin(pred, edges), _bin(true, edges)) for k, edges in _SIMS_EDGES.items()}
    pred64 = pred.astype(np.float64)
    true64 = true.astype(np.float64)
    return {
        "acc2": _accuracy(*classes[2]),
        "acc3": _accuracy(*classes[3]),
        "acc5": _accuracy(*classes[5]),
        "f1": _weighted_f1(*classes[2]),
        "mae": float(np.mean(np.abs(pred64 - true64))),
        "corr": _pearson(pred64, true64, notes),
    }


def _bin(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    # side="left" finds the first edge >= value, i.e. the bin (lo, hi] with hi >= value > lo.
    return np.searchsorted(np.asarray(edges, dtype=values.dtype), values, side="left") - 1


def _rounded_accuracy(pred: np.ndarray, true: np.ndarray, bound: float) -> float:
    # np.round rounds halves to even (2.5 -> 2), which is what published Acc-5/Acc-7 rely on.
    pred_cls = np.round(np.clip(pred, -bound, bound))
    true_cls = np.round(np.clip(true, -bound, bound))
    return _accuracy(pred_cls, true_cls)


def _accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true))


def _weighted_f1(pred: np.ndarray, true: np.ndarray) -> float:
    # imported here: sklearn.metrics costs a few seconds, which every command (even a bad one) paid
    from sklearn.metrics import f1_score

    # zero_division=0 is sklearn's default value without its warning (a class never predicted).
    return float(f1_score(true, pred, average="weighted", zero_division=0))


def _pearson(pred: np.ndarray, true: np.ndarray, notes: list[str]) -> float:
    if pred.size < 2:
        notes.append(f"corr is NaN: it needs at least 2 samples, got {pred.size}")
        return math.nan
    for arr, name in ((pred, "predictions"), (true, "labels")):
        if np.all(arr == arr[0]):
            notes.append(f"corr is NaN: the {name} are constant (all {arr[0]:g})")
            return math.nan
    with np.errstate(all="ignore"):
        corr = float(np.corrcoef(pred, true)[0, 1])
    if not math.isfinite(corr):
        notes.append("corr is NaN: the spread of the values is too small to compute it")
        return math.nan
    return corr


def prediction_warnings(preds: np.ndarray, labels: np.ndarray, train_labels: np.ndarray,
                        split: str = "validation") -> list[str]:
    """One line for each way the predictions of a selected model are degenerate: (near) constant
    (std below CONSTANT_SPREAD of the labels' std, or Corr undefined), or no better than a
    constant (MAE not below that of always predicting the training labels' median)."""
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    lines = []
    spread, label_spread = float(preds.std()), float(labels.std())
    if spread <= CONSTANT_SPREAD * label_spread or not math.isfinite(
            _pearson(preds, labels, [])):
        lines.append(f"the selected model's {split} predictions are (nearly) constant: std "
                     f"{spread:.3g} against the labels' {label_spread:.3g}; it has not learnt to "
                     "rank the samples (check the feature scales, --set data.normalize=zscore)")
    baseline = float(np.median(train_labels))
    mae, constant_mae = float(np.abs(preds - labels).mean()), float(np.abs(baseline - labels).mean())
    if mae >= constant_mae:
        lines.append(f"the selected model's {split} MAE {mae:.4g} is no better than always "
                     f"predicting the training labels' median {baseline:.3g} (MAE {constant_mae:.4g})")
    return lines


# the 7-point scale of MOSI/MOSEI labels, by rounded score
SEVEN_POINT = {-3: "strongly negative", -2: "negative", -1: "weakly negative", 0: "neutral",
               1: "weakly positive", 2: "positive", 3: "strongly positive"}
# SIMS' 5 classes (REFERENCES §2): upper edges of (lo, hi] intervals over [-1, 1]
FIVE_POINT = ((-0.7, "negative", -2), (-0.1, "weakly negative", -1), (0.1, "neutral", 0),
              (0.7, "weakly positive", 1), (1.01, "positive", 2))


def sentiment_classes(score: float, family: str) -> dict[str, Any]:
    """The score's negative/neutral/positive class and its point on the dataset's label scale.

    MOSI/MOSEI: the 7-point label is the score clipped to [-3, 3] and rounded (as Acc-7 scores it),
    and its sign gives the class. SIMS: the 5 classes and 3 classes of the field's metric edges.
    """
    if metric_family(family) == "sims":
        clipped = float(np.clip(score, -1.0, 1.0))
        _, name, point = next(edge for edge in FIVE_POINT if clipped <= edge[0])
        polarity = "negative" if clipped <= -0.1 else "positive" if clipped > 0.1 else "neutral"
        return {"class": polarity, "label": point, "label_name": name, "scale": "5-point"}
    point = int(np.round(np.clip(score, -3.0, 3.0)))
    polarity = "negative" if point < 0 else "positive" if point > 0 else "neutral"
    return {"class": polarity, "label": point, "label_name": SEVEN_POINT[point], "scale": "7-point"}
