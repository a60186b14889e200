"""A paper's evaluation recipe, declared in its model's YAML under `reproduce:`.

    reproduce:
      seeds: [1111, 1112, 1113]
      protocol: intra                    # intra, inter or fixed (msakit.missing)
      rates: [0.0, 0.1, ..., 0.9]        # or `subsets:` for the fixed protocol
      selection_rate: 0.5                # validation is scored under the protocol at this rate

Some papers (LNLN among them) report each metric from its own checkpoint: the epoch that scored
best on that metric. `per_metric_scores` does that, with one difference from the official code it
reproduces: checkpoints are chosen on the VALIDATION split, never on test. An F1 is read from the
checkpoint of its accuracy, as the official code does. Each metric of a seed is the mean over the
protocol's conditions; the report is the mean and std of that over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError, reject_unknown_keys
from msakit.evaluation.metrics import METRIC_KEYS
from msakit.evaluation.protocols import run_protocol
from msakit.missing import PROTOCOLS
from msakit.training.trainer import Trainer

# an F1 is reported from the checkpoint selected for its accuracy
SELECTED_WITH = {"f1_has0": "acc2_has0", "f1_non0": "acc2_non0", "f1": "acc2"}


@dataclass(frozen=True)
class Recipe:
    seeds: Sequence[int] = (1111, 1112, 1113)
    protocol: str = "intra"
    rates: Sequence[float] | None = None
    subsets: Sequence[str] | None = None
    selection_rate: float = 0.0
    mask_seeds: Sequence[int] = (0,)  # seeds of the test-time masks

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MsakitError(
                f"reproduce.protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MsakitError(f"reproduce.seeds must be distinct and at least one, not {self.seeds}")


def load_recipe(values: dict[str, Any] | None, model: str) -> Recipe:
    """The `reproduce:` section of a model's YAML as a checked Recipe."""
    if not values:
        raise MsakitError(f"model {model!r} declares no `reproduce` recipe in its YAML")
    reject_unknown_keys(values, Recipe, f"reproduce setting(s) for {model}")
    return Recipe(**values)


def tracked_metrics(metric_family: str) -> list[str]:
    """The metrics that get their own checkpoint (every metric but the F1s)."""
    return [m for m in METRIC_KEYS[metric_family] if m not in SELECTED_WITH]


def per_metric_scores(
    trainer: Trainer, data: MultimodalDataset, recipe: Recipe
) -> dict[str, Any]:
    """Test metrics under the recipe's protocol, each from the checkpoint selected for it.

    Returns {"rows": [{"condition", "metrics", "epochs"}], "mean": {...}}: per condition (rate or
    subset) every metric, and the epoch of the checkpoint it came from.
    """
    keys = METRIC_KEYS[data.metric_family]
    current = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    by_condition: dict[str, dict[str, float]] = {}
    epochs: dict[str, int] = {}
    means: dict[str, float] = {}
    for metric in tracked_metrics(data.metric_family):
        snapshot = trainer.best_by_metric[metric]
        trainer.model.load_state_dict(snapshot.state)
        result = run_protocol(trainer, data, recipe.protocol, rates=recipe.rates,
                              subsets=recipe.subsets, seeds=recipe.mask_seeds)
        for key in [metric, *[f1 for f1, acc in SELECTED_WITH.items() if acc == metric]]:
            if key not in keys:
                continue
            epochs[key] = snapshot.epoch
            means[key] = result["mean"][key]
            for row in result["rows"]:
                by_condition.setdefault(row["condition"], {})[key] = row["metrics"][key]
    trainer.model.load_state_dict(current)
    rows = [{"condition": c, "metrics": {k: m[k] for k in keys}} for c, m in by_condition.items()]
    return {"rows": rows, "mean": {k: means[k] for k in keys}, "epochs": {k: epochs[k] for k in keys}}
