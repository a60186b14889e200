"""Evaluation: missing-data protocols, a paper's evaluation recipe, domain generalization, reports.

The field's metrics themselves live in `msakit.metrics` (below training, which selects with them).
"""
