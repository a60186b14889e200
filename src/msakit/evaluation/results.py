"""Every results document a run writes (results.json/.csv, reproduce.json/.csv, dg.json) and the
comparison of robustness runs, built in one place from a run's setup and its seeds' results.

Tables and plots themselves come from `msakit.evaluation.report` and the protocol modules; JSON is
written strict (an undefined metric is null with its reason beside it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msakit import __version__
from msakit.data.domains import DomainTask
from msakit.data.schema import MultimodalDataset
from msakit.errors import MsakitError
from msakit.evaluation.domains import PARTS, summarise
from msakit.evaluation.protocols import plot_curves
from msakit.evaluation.report import LABELS, csv_text, format_value, mean_std
from msakit.evaluation.reproduce import Recipe
from msakit.fileio import atomic_write_json, atomic_write_text
from msakit.metrics import LOWER_IS_BETTER, METRIC_KEYS, UNDEFINED_REASONS
from msakit.training.runs import RunSetup, dataset_info

# --- results documents: what a run's results.json, reproduce.json, dg.json say -------------------


def this_command() -> str:
    """The command line of this process, for results that did not get one from the CLI."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def run_warnings(data_warnings: list[str], runs: list[dict[str, Any]]) -> list[str]:
    """What a run's results must say besides its numbers: raw feature scales, degenerate seeds."""
    return data_warnings + [f"seed {r['seed']}: {line}" for r in runs for line in r.get("warnings", [])]


def _header(setup: RunSetup, command: str | None, data: MultimodalDataset | None = None) -> dict[str, Any]:
    """The part every results document begins with."""
    return {"msakit_version": __version__, "command": command or this_command(), "model": setup.model,
            "dataset": dataset_info(data or setup.data)}


def selection_text(config: dict[str, Any]) -> str:
    """How a run's checkpoints were chosen, in words ("... test never used to select")."""
    metric = config["training"]["select_metric"]
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    return (f"best validation {metric} ({direction} is better){missing_during_selection(config)}; "
            "test never used to select")


def missing_during_selection(config: dict[str, Any]) -> str:
    training = config["training"]
    if training["select_protocol"] == "none":
        return ""
    return f" under {training['select_protocol']}-modal missing at rate {training['select_rate']:g}"


def train_results(setup: RunSetup, runs: list[dict[str, Any]], command: str | None) -> dict[str, Any]:
    """results.json of `msakit train`: every seed, mean and std on valid and test, per stage too."""
    mean, std = {}, {}
    for split in ("valid", "test"):
        mean[split], std[split] = mean_std([r[split] for r in runs])
    stages = {}
    if "stages" in runs[0]:
        for i, stage in enumerate(runs[0]["stages"]):
            stages[stage["stage"]] = {
                split: dict(zip(("mean", "std"), mean_std([r["stages"][i][split] for r in runs]),
                                strict=True))
                for split in ("valid", "test")
            }
    return {**_header(setup, command), "selection": selection_text(setup.config), "config": setup.config,
            **setup.inputs, "seeds": runs, "mean": mean, "std": std,
            **({"stages": stages} if stages else {}), "warnings": run_warnings(setup.warnings, runs)}


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json and results.csv (one row per seed, then mean and std) into `out_dir`."""
    rows = []
    for label, metrics in [(str(r["seed"]), r) for r in results["seeds"]] + [
        ("mean", results["mean"]), ("std", results["std"])
    ]:
        row: dict[str, object] = {"model": results["model"], "dataset": results["dataset"]["name"],
                                  "seed": label}
        for split in ("valid", "test"):
            row.update({f"{split}_{k}": v for k, v in metrics[split].items()})
        rows.append(row)
    atomic_write_json(out_dir / "results.json", results, UNDEFINED_REASONS)
    atomic_write_text(out_dir / "results.csv", csv_text(rows))


def reproduce_results(setup: RunSetup, recipe: Recipe, models: list[tuple[str, dict[str, Any], Any]],
                      runs: list[dict[str, Any]], command: str | None) -> dict[str, Any]:
    """reproduce.json: every seed, and per condition and overall the mean over seeds."""
    mean, std = mean_std([r["mean"] for r in runs])
    conditions = [row["condition"] for row in runs[0]["rows"]]
    per_condition = [
        {"condition": c, "metrics": mean_std([r["rows"][i]["metrics"] for r in runs])[0]}
        for i, c in enumerate(conditions)
    ]
    per_rate = {"models": {name: changes for name, changes, _ in models}} if recipe.one_model_per_rate else {}
    return {**_header(setup, command), "recipe": dataclasses.asdict(recipe),
            "selection": recipe_selection(recipe, setup.config), "config": setup.config, **per_rate,
            **setup.inputs, "seeds": runs, "rows": per_condition, "mean": mean, "std": std,
            "warnings": run_warnings(setup.warnings, runs)}


def write_reproduce(out_dir: Path, result: dict[str, Any]) -> None:
    """reproduce.json and reproduce.csv (one row per seed, then mean and std) into `out_dir`."""
    rows = [{"seed": r["seed"], **r["mean"]} for r in result["seeds"]]
    rows += [{"seed": "mean", **result["mean"]}, {"seed": "std", **result["std"]}]
    atomic_write_json(out_dir / "reproduce.json", result, UNDEFINED_REASONS)
    atomic_write_text(out_dir / "reproduce.csv", csv_text(rows))


def recipe_selection(recipe: Recipe, config: dict[str, Any]) -> str:
    """How a recipe's checkpoints were chosen, in words, for reproduce.json."""
    training = config["training"]
    which = ("one checkpoint per metric (F1 with its accuracy)" if recipe.per_metric
             else f"the checkpoint with the best validation {training['select_metric']}")
    if recipe.one_model_per_rate:
        return (f"one model per {recipe.protocol}-modal missing rate, trained with {training['noise']} "
                f"noise at that rate; {which}, chosen on VALIDATION under {recipe.protocol}-modal missing "
                "at that rate; each tested at its own rate only; test never used to select")
    where = missing_during_selection(config) or " on clean data"
    return f"{which}, best on VALIDATION{where}; test never used to select"


def dg_results(setup: RunSetup, task: DomainTask, split_seed: int, runs: list[dict[str, Any]],
               command: str | None) -> dict[str, Any]:
    """dg.json: every seed's in-domain and out-of-domain metrics, their gap, means over seeds."""
    metric = setup.config["training"]["select_metric"]
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    return {**_header(setup, command, task.data), "task": {**task.describe(), "split_seed": split_seed},
            "selection": f"Checkpoint: best validation {metric} ({direction} is better) on held-out "
                         "SOURCE data; the target domain is never used to train or select.",
            "config": setup.config,
            **setup.inputs, "seeds": runs, **summarise(runs), "warnings": run_warnings(setup.warnings, runs)}


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Overlay the robustness curves of several runs (compare.png) and tabulate their means
    (compare.md) into `output`."""
    results: dict[str, dict[str, Any]] = {}
    kinds: set[tuple[Any, ...]] = set()
    for run_dir in run_dirs:
        path = Path(run_dir) / "robustness.json"
        if not path.is_file():
            raise MsakitError(f"{path} not found: run `msakit robustness ... --output {run_dir}` first")
        try:
            result = json.loads(path.read_text())
            for metrics in [result["mean"], *(row["metrics"] for row in result["rows"])]:
                metrics.update({k: math.nan for k, v in metrics.items() if v is None})  # strict JSON's null
            label = f"{result['model']} ({run_dir})"
            kind = (result["protocol"], result["dataset"]["metric_family"],
                    tuple(row["condition"] for row in result["rows"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MsakitError(f"{path} is not a robustness.json msakit wrote ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None
        if label in results:
            raise MsakitError(f"{run_dir} is given twice")
        results[label] = result
        kinds.add(kind)
    if len(kinds) > 1:
        raise MsakitError(
            "these runs are not comparable: they differ in protocol, metric family or conditions ("
            + "; ".join(f"{p}/{f}: {', '.join(c)}" for p, f, c in sorted(kinds)) + ")"
        )
    protocol, family, _ = kinds.pop()
    keys = METRIC_KEYS[family]
    lines = [f"Mean over conditions, {protocol}-modal missing", "",
             "| run | " + " | ".join(LABELS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(format_value(k, result["mean"][k]) for k in keys)
                     + " |")
    out = Path(output)
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    plot_curves(out / "compare.png", results, f"{protocol}-modal missing, test split")
    return {"protocol": protocol, "family": family,
            "means": {name: r["mean"] for name, r in results.items()}, "table": "\n".join(lines)}


# --- domain generalization: the report of a dg run --------------------------------------------------


def part_labels(result: dict[str, Any]) -> dict[str, str]:
    """Row names of the in-domain / out-of-domain / gap table."""
    sizes = result["task"]["sizes"]
    return {
        "in_domain": f"in-domain: sources' test ({sizes['in_domain_test']})",
        "out_of_domain": f"out-of-domain: {result['task']['target']} ({sizes['target']})",
        "gap": "gap (out - in)",
    }


def _grouping_text(task: dict[str, Any]) -> str:
    grouping, seed = task["grouping"], task.get("split_seed")
    return {
        "datasets": "whole datasets (leave-one-dataset-out)",
        "domains": "the dataset's own domain labels",
        "video": f"the dataset's videos dealt to {len(task['domains'])} groups (seed {seed})",
        "cluster": f"k-means clusters of the dataset's videos (seed {seed})",
    }.get(grouping, f"the column after the last ':' of {grouping}")


def modality_lines(task: dict[str, Any]) -> list[str]:
    """The modalities used and, between datasets, why each array was used or left out."""
    lines = [f"modalities used: {', '.join(task['modalities'])}"]
    if task["grouping"] == "datasets":
        lines += [f"{name} {'used' if d['used'] else 'left out'}: {d['reason']}"
                  for name, d in task["arrays"].items()]
    return lines


def dg_markdown(result: dict[str, Any]) -> str:
    """The markdown report: in-domain vs out-of-domain and their gap, then each domain."""
    family = result["dataset"]["metric_family"]
    keys = METRIC_KEYS[family]
    task = result["task"]
    several = len(result["seeds"]) > 1
    header = "| | " + " | ".join(LABELS[k] for k in keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"

    def cells(metrics: dict[str, float], std: dict[str, float] | None) -> str:
        return " | ".join(format_value(k, metrics[k], std[k] if std else None) for k in keys)

    worse = ", ".join(f"{LABELS[k]} {'up' if k in LOWER_IS_BETTER else 'down'}" for k in keys)
    lines = [
        f"# {result['model']}: domain generalization, {' + '.join(task['sources'])} -> {task['target']}",
        "",
        f"Regenerate with: `{result['command']}`",
        "",
        f"Domains: {_grouping_text(task)}; the target's samples come from its "
        f"{'/'.join(task['target_splits'])} split(s). {result['selection']}",
        f"Seeds: {', '.join(str(r['seed']) for r in result['seeds'])}"
        + (" (mean ± std)" if several else "") + ".",
        "",
        *[f"- {line}" for line in modality_lines(task)],
        *[f"- note: {note}" for note in task["notes"]],
        "",
        header, rule,
    ]
    for part, label in part_labels(result).items():
        lines.append(f"| {label} | {cells(result['mean'][part], result['std'][part] if several else None)} |")
    lines += ["", f"A worse out-of-domain result shows as a gap with {worse}.", "",
              "| domain (role, test samples) | " + " | ".join(LABELS[k] for k in keys) + " |", rule]
    for domain in task["domains"]:
        if domain["role"] == "unused":
            continue
        count = domain["samples"].get("target", domain["samples"].get("test"))
        scores = result["per_domain"][domain["name"]]
        lines.append(f"| {domain['name']} ({domain['role']}, {count}) | "
                     f"{cells(scores['mean'], scores['std'] if several else None)} |")
    return "\n".join(lines) + "\n"


def write_dg(out_dir: Path, result: dict[str, Any]) -> None:
    """dg.json, dg.csv (one row per seed and part, then mean and std rows) and dg.md, atomically."""
    task = result["task"]
    base = {"model": result["model"], "sources": "+".join(task["sources"]), "target": task["target"]}
    rows: list[dict[str, object]] = []
    for run in result["seeds"]:
        rows += [{**base, "seed": run["seed"], "part": part, **run[part]} for part in PARTS]
    for stat in ("mean", "std"):
        rows += [{**base, "seed": stat, "part": part, **result[stat][part]} for part in PARTS]
    for name, scores in result["per_domain"].items():
        for stat in ("mean", "std"):
            rows.append({**base, "seed": stat, "part": f"domain {name}", **scores[stat]})
    atomic_write_json(out_dir / "dg.json", result, UNDEFINED_REASONS)
    atomic_write_text(out_dir / "dg.csv", csv_text(rows))
    atomic_write_text(out_dir / "dg.md", dg_markdown(result))
