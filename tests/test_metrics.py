"""Metrics checked against independent pure-Python references (torchmetrics style).

The references below never call numpy's rounding, binning or sklearn: Python's built-in `round`
(half to even on floats), explicit interval comparisons, confusion counts for weighted F1, and
scipy's `pearsonr` (or the textbook formula when scipy is absent).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from msakit.errors import MsakitError
from msakit.metrics import (
    LOWER_IS_BETTER,
    METRIC_KEYS,
    MetricWarning,
    compute_metrics,
    is_better,
    metric_family,
)

try:
    from scipy.stats import pearsonr
except ImportError:  # pragma: no cover - scipy is optional
    pearsonr = None

SEEDS = range(30)


# ----------------------------------------------------------------------------- references


def ref_weighted_f1(pred: list, true: list) -> float:
    """Weighted F1 from confusion counts: each class's F1 weighted by its true support."""
    total = 0.0
    for cls in set(pred) | set(true):
        tp = sum(1 for p, t in zip(pred, true, strict=True) if p == cls and t == cls)
        fp = sum(1 for p, t in zip(pred, true, strict=True) if p == cls and t != cls)
        fn = sum(1 for p, t in zip(pred, true, strict=True) if p != cls and t == cls)
        support = tp + fn
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        total += f1 * support
    return total / len(true)


def ref_accuracy(pred: list, true: list) -> float:
    return sum(1 for p, t in zip(pred, true, strict=True) if p == t) / len(true)


def ref_corr(pred: list, true: list) -> float:
    if pearsonr is not None:
        return float(pearsonr(pred, true)[0])
    n = len(pred)
    mp, mt = sum(pred) / n, sum(true) / n
    cov = sum((p - mp) * (t - mt) for p, t in zip(pred, true, strict=True))
    sp = math.sqrt(sum((p - mp) ** 2 for p in pred))
    st = math.sqrt(sum((t - mt) ** 2 for t in true))
    return cov / (sp * st)


def clip(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def ref_mosi(pred: list[float], true: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    has0_p = [p >= 0 for p in pred]
    has0_t = [t >= 0 for t in true]
    out["acc2_has0"] = ref_accuracy(has0_p, has0_t)
    out["f1_has0"] = ref_weighted_f1(has0_p, has0_t)
    keep = [i for i, t in enumerate(true) if t != 0]
    non0_p = [pred[i] > 0 for i in keep]
    non0_t = [true[i] > 0 for i in keep]
    out["acc2_non0"] = ref_accuracy(non0_p, non0_t) if keep else math.nan
    out["f1_non0"] = ref_weighted_f1(non0_p, non0_t) if keep else math.nan
    for key, bound in (("acc5", 2.0), ("acc7", 3.0)):
        pc = [round(clip(p, -bound, bound)) for p in pred]  # Python's round: half to even
        tc = [round(clip(t, -bound, bound)) for t in true]
        out[key] = ref_accuracy(pc, tc)
    out["mae"] = sum(abs(p - t) for p, t in zip(pred, true, strict=True)) / len(true)
    out["corr"] = ref_corr(pred, true)
    return out


SIMS_INTERVALS = {
    2: [(-1.01, 0.0), (0.0, 1.01)],
    3: [(-1.01, -0.1), (-0.1, 0.1), (0.1, 1.01)],
    5: [(-1.01, -0.7), (-0.7, -0.1), (-0.1, 0.1), (0.1, 0.7), (0.7, 1.01)],
}


def ref_sims_class(v: float, k: int) -> int:
    for idx, (lo, hi) in enumerate(SIMS_INTERVALS[k]):
        if lo < v <= hi:
            return idx
    raise AssertionError(f"{v} is in no interval")


def ref_sims(pred: list[float], true: list[float]) -> dict[str, float]:
    pred = [clip(p, -1.0, 1.0) for p in pred]
    true = [clip(t, -1.0, 1.0) for t in true]
    cls = {
        k: ([ref_sims_class(p, k) for p in pred], [ref_sims_class(t, k) for t in true])
        for k in SIMS_INTERVALS
    }
    return {
        "acc2": ref_accuracy(*cls[2]),
        "acc3": ref_accuracy(*cls[3]),
        "acc5": ref_accuracy(*cls[5]),
        "f1": ref_weighted_f1(*cls[2]),
        "mae": sum(abs(p - t) for p, t in zip(pred, true, strict=True)) / len(true),
        "corr": ref_corr(pred, true),
    }


def assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------- random inputs


def mosi_like(seed: int) -> tuple[list[float], list[float]]:
    """Labels on the annotators' grid (thirds, halves, many zeros); preds continuous and on ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 150))
    grid = np.concatenate([np.arange(-9, 10) / 3, np.arange(-7, 8) / 2, np.zeros(6)])
    true = rng.choice(grid, n)
    pred = rng.normal(0.0, 1.8, n)
    ties = rng.random(n) < 0.25
    pred[ties] = rng.choice(np.arange(-9, 10) / 2, int(ties.sum()))  # x.5 values, beyond +-3 too
    true[0], true[-1] = -1.0, 2.0  # labels never constant
    pred[0], pred[-1] = -0.3, 0.4
    return pred.tolist(), true.tolist()


def sims_like(seed: int) -> tuple[list[float], list[float]]:
    """Both sides partly on the bin edges (as float64), partly continuous, some beyond +-1."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(2, 150))
    edges = np.array([-1.4, -1.0, -0.8, -0.7, -0.6, -0.2, -0.1, 0.0, 0.1, 0.2, 0.7, 0.8, 1.0, 1.2])
    true = rng.choice(edges, n)
    pred = rng.uniform(-1.3, 1.3, n)
    on_edge = rng.random(n) < 0.4
    pred[on_edge] = rng.choice(edges, int(on_edge.sum()))
    true[0], true[-1] = -0.6, 0.8
    pred[0], pred[-1] = -0.3, 0.4
    return pred.tolist(), true.tolist()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dataset", ["mosi", "mosei", "synthetic"])
def test_mosi_rules_match_reference(seed: int, dataset: str) -> None:
    pred, true = mosi_like(seed)
    got = compute_metrics(np.array(pred), np.array(true), dataset)
    assert tuple(got) == METRIC_KEYS["mosi"]
    assert_matches(got, ref_mosi(pred, true))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dataset", ["sims", "simsv2"])
def test_sims_rules_match_reference(seed: int, dataset: str) -> None:
    pred, true = sims_like(seed)
    got = compute_metrics(np.array(pred), np.array(true), dataset)
    assert tuple(got) == METRIC_KEYS["sims"]
    assert_matches(got, ref_sims(pred, true))


@pytest.mark.parametrize("seed", range(5))
def test_ordinary_inputs_raise_no_warnings(seed: int) -> None:
    pred, true = mosi_like(seed)
    pred = [abs(p) + 0.1 for p in pred]  # one predicted class only: sklearn would warn by default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(pred, true, "mosi")
        compute_metrics([clip(p, -1, 1) for p in pred], [t / 3 for t in true], "sims")


# ----------------------------------------------------------------------------- hand cases


def test_mosi_hand_computed() -> None:
    got = compute_metrics([-1.6, 0.4, 2.5, -0.2], [-2.0, 0.0, 3.0, 0.6], "mosi")
    # Has0: (pred>=0) F T T F vs (truth>=0) F T T T. Class F: tp 1 fp 1 fn 0 -> 2/3, support 1;
    # class T: tp 2 fp 0 fn 1 -> 4/5, support 3. Weighted (2/3 + 12/5) / 4 = 23/30.
    assert got["acc2_has0"] == pytest.approx(0.75)
    assert got["f1_has0"] == pytest.approx(23 / 30)
    # Non0 drops the zero label: F T F vs F T T; both classes have F1 2/3.
    assert got["acc2_non0"] == pytest.approx(2 / 3)
    assert got["f1_non0"] == pytest.approx(2 / 3)
    # Acc-5 rounds -1.6 0.4 2(clipped) -0.2 -> -2 0 2 0 vs -2 0 2 1; Acc-7 has 2.5 -> 2 vs 3.
    assert got["acc5"] == pytest.approx(0.75)
    assert got["acc7"] == pytest.approx(0.5)
    assert got["mae"] == pytest.approx((0.4 + 0.4 + 0.5 + 0.8) / 4)


def test_sims_hand_computed() -> None:
    got = compute_metrics([-1.5, -0.1, 0.1, 0.7, 0.05], [-1.0, -0.7, 0.0, 1.2, 0.1], "sims")
    # Clipped preds -1 -0.1 0.1 0.7 0.05, labels -1 -0.7 0 1 0.1.
    # 2 classes: 0 0 1 1 1 vs 0 0 0 1 1; 3: 0 0 1 2 1 vs 0 0 1 2 1; 5: 0 1 2 3 2 vs 0 0 2 4 2.
    assert got["acc2"] == pytest.approx(0.8)
    assert got["acc3"] == pytest.approx(1.0)
    assert got["acc5"] == pytest.approx(0.6)
    assert got["f1"] == pytest.approx(0.8)  # both classes 4/5
    assert got["mae"] == pytest.approx((0 + 0.6 + 0.1 + 0.3 + 0.05) / 5)  # on clipped values


def test_perfect_and_inverted_correlation() -> None:
    labels = [-2.0, -1.0, 0.5, 1.0, 3.0]
    assert compute_metrics([2 * v + 1 for v in labels], labels, "mosi")["corr"] == pytest.approx(1)
    assert compute_metrics([-v for v in labels], labels, "mosi")["corr"] == pytest.approx(-1)


def test_rounding_ties_go_to_even() -> None:
    # Half-to-even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2, 2.5 -> 2, -0.5 -> -0, 3.5 clipped to 3.
    pred = [0.5, 1.5, -2.5, 2.5, -0.5, 3.5]
    got = compute_metrics(pred, [0.0, 2.0, -2.0, 2.0, 0.0, 3.0], "mosi")
    assert got["acc7"] == 1.0
    # Rounding half away from zero would match these instead; none may match.
    got = compute_metrics(pred, [1.0, 2.0, -3.0, 3.0, -1.0, 3.0], "mosi")
    assert got["acc7"] == pytest.approx(2 / 6)  # only 1.5 -> 2 and 3.5 -> 3 agree
    # Acc-5 clips 2.5 and 3.5 to 2 and -2.5 to -2 before rounding.
    got = compute_metrics(pred, [0.0, 2.0, -2.0, 2.0, 0.0, 2.0], "mosi")
    assert got["acc5"] == 1.0


def test_zero_labels_split_has0_from_non0() -> None:
    got = compute_metrics([0.5, -0.5, 0.2], [0.0, 0.0, 1.0], "mosi")
    assert got["acc2_has0"] == pytest.approx(2 / 3)  # -0.5 vs non-negative truth is wrong
    assert got["acc2_non0"] == 1.0  # only the last sample remains
    assert got["f1_non0"] == 1.0


def test_sims_boundaries() -> None:
    values = [-1.0, -0.7, -0.1, 0.0, 0.1, 0.7, 1.0]
    two = [0, 0, 0, 0, 1, 1, 1]  # 0.0 is negative in SIMS
    three = [0, 0, 0, 1, 1, 2, 2]
    five = [0, 0, 1, 2, 2, 3, 4]
    for k, classes in ((2, two), (3, three), (5, five)):
        assert [ref_sims_class(v, k) for v in values] == classes  # the reference itself
        # Predict each bin with a clearly-inside value; exact-match rate must be 1.
        centres = {2: [-0.5, 0.5], 3: [-0.5, 0.0, 0.5], 5: [-0.9, -0.4, 0.0, 0.4, 0.9]}[k]
        pred = [centres[c] for c in classes]
        assert compute_metrics(pred, values, "sims")[f"acc{k}"] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sims_edges_compare_in_input_precision(dtype: type) -> None:
    # float32(0.1) exceeds the double 0.1; MMSA compares in float32, so it still counts as neutral.
    labels = np.array([-0.7, -0.1, 0.1, 0.7], dtype=dtype)
    pred = np.array([-0.9, -0.4, 0.0, 0.4], dtype=dtype)
    assert compute_metrics(pred, labels, "sims")["acc5"] == 1.0


def test_sims_clips_beyond_one() -> None:
    got = compute_metrics([1.7, -2.0, 0.3], [1.0, -1.0, 5.0], "sims")
    assert got["mae"] == pytest.approx(0.7 / 3)  # |1-1| + |-1+1| + |0.3-1|
    assert got["acc5"] == pytest.approx(2 / 3)
    assert got["acc2"] == 1.0


def test_mosi_mae_uses_unclipped_values() -> None:
    got = compute_metrics([5.0, -1.0], [3.0, -1.0], "mosi")
    assert got["mae"] == pytest.approx(1.0)
    assert got["acc7"] == 1.0  # 5 clips to 3


# ----------------------------------------------------------------------------- degenerate inputs


def test_constant_predictions_give_nan_corr_with_warning() -> None:
    with pytest.warns(MetricWarning, match="predictions are constant"):
        got = compute_metrics([0.3] * 5, [-1.0, 0.0, 1.0, 2.0, -2.0], "mosi")
    assert math.isnan(got["corr"])
    assert got["acc2_has0"] == pytest.approx(3 / 5)  # the rest is still scored


def test_constant_labels_give_nan_corr_with_warning() -> None:
    with pytest.warns(MetricWarning, match="labels are constant"):
        got = compute_metrics([0.1, 0.5, -0.3], [0.4, 0.4, 0.4], "sims")
    assert math.isnan(got["corr"])


def test_single_sample_gives_nan_corr_with_warning() -> None:
    with pytest.warns(MetricWarning, match="at least 2 samples"):
        got = compute_metrics([1.2], [1.0], "mosi")
    assert math.isnan(got["corr"])
    assert got["acc7"] == 1.0


def test_all_zero_labels_make_non0_nan_with_warning() -> None:
    with pytest.warns(MetricWarning) as record:
        got = compute_metrics([0.5, -0.5, 0.2], [0.0, 0.0, 0.0], "mosi")
    messages = [str(w.message) for w in record]
    assert any("exactly 0" in m for m in messages)
    assert math.isnan(got["acc2_non0"]) and math.isnan(got["f1_non0"])
    assert got["acc2_has0"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- input types


def test_torch_tensors_and_shapes() -> None:
    pred, true = mosi_like(3)
    pred_t = torch.tensor(pred, dtype=torch.float64, requires_grad=True).reshape(-1, 1)
    true_t = torch.tensor(true, dtype=torch.float64)
    assert_matches(compute_metrics(pred_t, true_t, "mosi"), ref_mosi(pred, true))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_tensors(dtype: torch.dtype) -> None:
    pred_t = torch.tensor([-1.6, 0.4, 2.5, -0.2], dtype=dtype)
    true_t = torch.tensor([-2.0, 0.0, 3.0, 0.6], dtype=dtype)
    want = ref_mosi(pred_t.double().tolist(), true_t.double().tolist())
    got = compute_metrics(pred_t, true_t, "mosi")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_integer_and_list_inputs() -> None:
    got = compute_metrics([1, -2, 0, 3], np.array([[1], [-1], [0], [3]]), "mosi")
    assert got["acc7"] == pytest.approx(3 / 4)
    assert all(isinstance(v, float) for v in got.values())


def test_dataset_routing_and_family() -> None:
    assert metric_family("MOSI") == "mosi"
    assert metric_family("mosei") == "mosi"
    assert metric_family("synthetic") == "mosi"
    assert metric_family("SIMS") == "sims"
    assert metric_family("simsv2") == "sims"
    assert metric_family("something-else") == "mosi"
    got = compute_metrics([0.1, 0.4, -0.3], [0.2, 0.6, -0.8], "my-own-data")
    assert tuple(got) == METRIC_KEYS["mosi"]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("preds", "labels", "match"),
    [
        ([0.1, 0.2], [0.1, 0.2, 0.3], "differ in length"),
        ([], [], "empty"),
        ([0.1, float("nan")], [0.1, 0.2], "preds contains 1 NaN"),
        ([0.1, 0.2], [float("nan"), 0.2], "labels contains 1 NaN"),
        ([0.1, float("inf")], [0.1, 0.2], "preds contains 1 NaN or infinite"),
        (["a", "b"], [0.1, 0.2], "preds must hold real numbers"),
        ([0.1, 0.2], [[0.1], [0.2, 0.3]], "labels cannot be read"),
    ],
)
def test_bad_inputs_raise(preds: list, labels: list, match: str) -> None:
    with pytest.raises(MsakitError, match=match):
        compute_metrics(preds, labels, "mosi")


def test_nan_in_torch_input_raises() -> None:
    with pytest.raises(MsakitError, match="labels"):
        compute_metrics(torch.zeros(3), torch.tensor([0.0, math.nan, 1.0]), "sims")


# ----------------------------------------------------------------------------- selection


def test_is_better() -> None:
    assert sorted(LOWER_IS_BETTER) == ["mae"]
    assert is_better("mae", 0.7, 0.8)
    assert not is_better("mae", 0.9, 0.8)
    assert is_better("acc2_non0", 0.8, 0.7)
    assert not is_better("acc7", 0.3, 0.4)
    assert not is_better("corr", 0.5, 0.5)  # ties keep the earlier checkpoint
    assert not is_better("mae", 0.5, 0.5)
    assert is_better("corr", -0.2, None)
    assert is_better("mae", 3.0, float("nan"))
    assert not is_better("corr", float("nan"), None)
    assert not is_better("mae", float("nan"), 0.8)
    assert not is_better("f1", float("nan"), 0.1)


def test_is_better_rejects_unknown_metric() -> None:
    with pytest.raises(MsakitError, match="'loss'"):
        is_better("loss", 0.1, 0.2)
