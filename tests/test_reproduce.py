"""A paper's evaluation recipe (`reproduce:` in a model YAML): per-metric checkpoints chosen on
validation, scored on test under the protocol at every rate, averaged over the recipe's seeds."""

from __future__ import annotations

import numpy as np
import pytest

from msakit import api
from msakit.errors import MsakitError
from msakit.evaluation.protocols import run_protocol
from msakit.evaluation.reproduce import Recipe, load_recipe, per_metric_scores, tracked_metrics
from msakit.missing import DEFAULT_RATES
from msakit.training.runs import fit_one_seed, resolved_config
from resume_check import Interrupted, interrupt_training

SMALL_LNLN = ["model.hidden_dim=16", "model.heads=2", "model.dim_head=8", "model.mlp_dim=16",
              "model.num_tokens=2", "model.fusion_depth=1", "training.batch_size=16"]


@pytest.fixture(scope="module")
def reproduced(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    result = api.reproduce("lnln", tiny_dataset, seeds=[1, 2], epochs=3, overrides=SMALL_LNLN,
                           output=out, progress=False)
    return result, out


def test_the_recipe_grid_seeds_and_files(reproduced):
    result, out = reproduced
    assert [run["seed"] for run in result["seeds"]] == [1, 2]
    assert [row["condition"] for row in result["rows"]] == [f"{r:.2f}" for r in DEFAULT_RATES["intra"]]
    assert result["recipe"]["selection_rate"] == 0.5
    assert "VALIDATION" in result["selection"]
    assert {p.name for p in out.iterdir()} == {"reproduce.json", "reproduce.csv", "seed-1.pt",
                                               "seed-2.pt"}
    for run in result["seeds"]:
        # a seed's number is the mean over the rates; the F1s come from their accuracy's checkpoint
        for key, value in run["mean"].items():
            assert value == pytest.approx(np.mean([row["metrics"][key] for row in run["rows"]]))
        assert run["epochs"]["f1_non0"] == run["epochs"]["acc2_non0"]
        assert run["epochs"]["f1_has0"] == run["epochs"]["acc2_has0"]
    expected = np.mean([run["mean"]["mae"] for run in result["seeds"]])
    assert result["mean"]["mae"] == pytest.approx(expected)


def test_each_metric_is_scored_with_its_own_checkpoint(tiny_dataset):
    config = resolved_config("lnln", tiny_dataset, SMALL_LNLN, epochs=4)
    trainer, fit = fit_one_seed("lnln", tiny_dataset, config, seed=3, progress=False,
                                 track_metrics=tracked_metrics("mosi"))
    recipe = Recipe(seeds=(3,), rates=(0.0, 0.5))
    scores = per_metric_scores(trainer, tiny_dataset, recipe)
    for metric in ("mae", "corr", "acc7"):
        values = [record.valid[metric] for record in fit.history]
        best = min(values) if metric == "mae" else max(values)
        assert scores["epochs"][metric] == values.index(best) + 1
    trainer.model.load_state_dict(trainer.best_by_metric["corr"].state)
    direct = run_protocol(trainer, tiny_dataset, "intra", rates=(0.0, 0.5))
    assert scores["mean"]["corr"] == pytest.approx(direct["mean"]["corr"])


def test_recipes_are_checked():
    with pytest.raises(MsakitError, match="no `reproduce` recipe"):
        load_recipe(None, "tfn")
    with pytest.raises(MsakitError, match="selection"):
        load_recipe({"selection": "test"}, "lnln")
    with pytest.raises(MsakitError, match="sideways"):
        load_recipe({"protocol": "sideways"}, "lnln")
    with pytest.raises(MsakitError, match="distinct"):
        load_recipe({"seeds": [1, 1]}, "lnln")


def test_an_interrupted_reproduction_resumes_to_the_same_numbers(reproduced, tiny_dataset, tmp_path,
                                                                 monkeypatch):
    epochs = interrupt_training(monkeypatch, after=4)  # seed 1 done, seed 2 after its first epoch
    options = dict(seeds=[1, 2], epochs=3, overrides=[*SMALL_LNLN, "training.state_every=1"],
                   output=tmp_path, progress=False)
    with pytest.raises(Interrupted):
        api.reproduce("lnln", tiny_dataset, **options)
    epochs.clear()
    result = api.reproduce("lnln", tiny_dataset, resume=True, **options)
    assert epochs == [2, 3]
    straight, _ = reproduced
    assert result["seeds"] == straight["seeds"] and result["mean"] == straight["mean"]
