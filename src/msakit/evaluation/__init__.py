"""Evaluation: the field's metrics (`metrics.py`), protocols and reports."""

from msakit.evaluation.metrics import (
    LOWER_IS_BETTER,
    METRIC_KEYS,
    MetricWarning,
    compute_metrics,
    is_better,
    metric_family,
)

__all__ = [
    "LOWER_IS_BETTER", "METRIC_KEYS", "MetricWarning", "compute_metrics", "is_better",
    "metric_family",
]
