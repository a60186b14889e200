"""`msakit study report`: the leaderboard of a study, from its store.

Per dataset: the clean test metrics of every model (mean ± std over seeds), each training stage's
test metrics for models trained in stages, the robustness table (clean MAE, then each protocol's
mean over its conditions: MAE, Acc-2 and Corr), one table per evaluation with every condition, and
per-rate curves with error bands (PNG and SVG; MAE and Corr on separate axes, distinct markers and
line styles). Models with their own evaluations share the robustness table's protocol columns and
get a per-condition table per distinct evaluation. Models evaluated by their paper's recipe have
a table of their own (the recipe's mean, then MAE per condition). Domain generalization has its own table: per
target and model, out-of-domain and in-domain metrics and their gap (mean ± std over seeds), then
each model's mean over the targets. Written as markdown, a static HTML page and JSON; each table
names the command that regenerates it. Only the records of the study's current jobs are read, so a
changed setting never mixes with results of the old one.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msakit.errors import MsakitError
from msakit.evaluation.report import LABELS, format_value, mean_std
from msakit.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from msakit.metrics import METRIC_KEYS, UNDEFINED_REASONS
from msakit.study.runner import plan_jobs, study_store
from msakit.study.search import best_settings, load_search
from msakit.study.spec import FILE_SETTINGS, Evaluation, Study, load_study

ROBUSTNESS_COLUMNS = ("mae", "acc2_non0", "corr")
SIMS_ROBUSTNESS_COLUMNS = ("mae", "acc2", "corr")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


def _as_written(override: str) -> str:
    """A file setting as the study file names it: the loaded study holds the file's absolute path
    (its identity is the file's content), which names the machine the report was made on."""
    setting, _, value = override.partition("=")
    section, _, key = setting.strip().partition(".")
    path = Path(value.strip())
    if key in FILE_SETTINGS.get(section, ()) and path.is_absolute() and path.is_relative_to(Path.cwd()):
        return f"{setting}={path.relative_to(Path.cwd())}"
    return override


def _cell(key: str, mean: float, std: float, seeds: int) -> str:
    return format_value(key, mean) + (f" ± {format_value(key, std)}" if seeds > 1 else "")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _describe(evaluation: Evaluation) -> str:
    if evaluation.protocol == "fixed":
        conditions = ", ".join(evaluation.subsets) if evaluation.subsets else "the 7 subsets"
    else:
        conditions = "default rates" if evaluation.rates is None else \
            f"r = {', '.join(f'{r:g}' for r in evaluation.rates)}"
    scored_with = f", scored with {' '.join(evaluation.overrides)}" if evaluation.overrides else ""
    return f"{evaluation.protocol}: {conditions}{scored_with}"


def _distinct(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    return list(dict.fromkeys(evaluations))


def _evaluations(study: Study, labels: Sequence[str]) -> list[Evaluation]:
    """The distinct evaluations of the models labelled `labels`, in the study's order."""
    return _distinct([e for m in study.models if m.label in labels for e in m.evaluations])


def _curve_stems(dataset: str, evaluations: Sequence[Evaluation]) -> dict[str, str | None]:
    """Per evaluation key: the curves' file stem (None for a single condition: no curve to draw);
    numbered only where one protocol is evaluated in more than one way."""
    out: dict[str, str | None] = {}
    for evaluation in evaluations:
        same = [e for e in evaluations if e.protocol == evaluation.protocol]
        single = evaluation.rates is not None and len(evaluation.rates) == 1 or \
            evaluation.subsets is not None and len(evaluation.subsets) == 1
        suffix = "" if len(same) == 1 else f"-{same.index(evaluation) + 1}"
        out[evaluation.key] = None if single else f"curves-{dataset}-{evaluation.protocol}{suffix}"
    return out


def _stages(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each training stage's test metrics, mean/std over the runs (models trained in stages)."""
    if not all(r["train"].get("stages") for r in runs):
        return {}
    names = [stage["stage"] for stage in runs[0]["train"]["stages"]]
    return {name: dict(zip(("mean", "std"), mean_std([r["train"]["stages"][i]["test"] for r in runs]),
                           strict=True))
            for i, name in enumerate(names)}


def summarise(study: Study, records: dict[str, dict[str, Any]], jobs: list) -> dict[str, Any]:
    """Per dataset and model label: seeds recorded, clean test mean/std, each stage's, each
    protocol's mean/std and its per-condition means/stds (domain generalization: `summarise_dg`)."""
    out: dict[str, Any] = {}
    for ref in study.datasets:
        models: dict[str, Any] = {}
        for model in (m for m in study.models if m.dg is None and not m.reproduce):
            cell = [j for j in jobs if j.dataset == ref and j.model.label == model.label and j.id in records]
            if not cell:
                continue
            runs = [records[j.id] for j in cell]
            clean_mean, clean_std = mean_std([r["train"]["test"] for r in runs])
            protocols = {}
            for evaluation in model.evaluations:
                done = [r["evaluations"][evaluation.key] for r in runs if evaluation.key in r["evaluations"]]
                if len(done) != len(runs):
                    continue
                mean, std = mean_std([d["mean"] for d in done])
                conditions = [row["condition"] for row in done[0]["rows"]]
                per_condition = [mean_std([d["rows"][i]["metrics"] for d in done])
                                 for i in range(len(conditions))]
                protocols[evaluation.protocol] = {
                    "key": evaluation.key, "describe": _describe(evaluation), "mean": mean, "std": std,
                    "conditions": conditions,
                    "condition_mean": [m for m, _ in per_condition],
                    "condition_std": [s for _, s in per_condition],
                }
            per_seed = [{"seed": job.seed, "best_epoch": run["train"].get("best_epoch"),
                         "clean": run["train"]["test"],
                         "protocols": {p: run["evaluations"][found["key"]]["mean"]
                                       for p, found in protocols.items()}}
                        for job, run in sorted(zip(cell, runs, strict=True), key=lambda pair: pair[0].seed)]
            models[model.label] = {"model": model.model,
                                   "overrides": [_as_written(o) for o in cell[0].model.overrides],
                                   "seeds": sorted(j.seed for j in cell), "per_seed": per_seed,
                                   "clean": clean_mean,
                                   "clean_std": clean_std, "stages": _stages(runs), "protocols": protocols,
                                   "seconds": sum(r.get("seconds") or 0.0 for r in runs),
                                   "warnings": {job.seed: records[job.id]["train"]["warnings"] for job in cell
                                                if records[job.id]["train"].get("warnings")}}
        out[ref.label] = models
    return out


def summarise_dg(study: Study, records: dict[str, dict[str, Any]], jobs: list) -> dict[str, Any]:
    """Per dataset, target and model label: the seeds recorded and the mean/std over them of the
    in-domain and out-of-domain metrics and their gap."""
    out: dict[str, Any] = {}
    for ref in study.datasets:
        targets: dict[str, Any] = {}
        for model in (m for m in study.models if m.dg is not None):
            for target in model.dg.targets:
                cell = sorted((j for j in jobs if j.dataset == ref and j.model.label == model.label
                               and j.target == target and j.id in records), key=lambda j: j.seed)
                if not cell:
                    continue
                runs = [records[j.id]["train"] for j in cell]
                found = {"seeds": [j.seed for j in cell], "group_by": model.dg.group_by,
                         "seconds": sum(records[j.id].get("seconds") or 0.0 for j in cell)}
                for part in ("out_of_domain", "in_domain", "gap"):
                    found[part] = dict(zip(("mean", "std"), mean_std([r[part] for r in runs]), strict=True))
                targets.setdefault(target, {})[model.label] = found
        if targets:
            out[ref.label] = targets
    return out


def summarise_reproduce(study: Study, records: dict[str, dict[str, Any]], jobs: list) -> dict[str, Any]:
    """Per dataset and model label (models evaluated by their `reproduce:` recipe): the seeds, the
    selection rule, and the mean/std over seeds of the recipe's mean and of each condition."""
    out: dict[str, Any] = {}
    for ref in study.datasets:
        models: dict[str, Any] = {}
        for model in (m for m in study.models if m.reproduce):
            cell = sorted((j for j in jobs if j.dataset == ref and j.model.label == model.label
                           and j.id in records), key=lambda j: j.seed)
            if not cell:
                continue
            runs = [records[j.id]["evaluations"]["reproduce"] for j in cell]
            mean, std = mean_std([r["mean"] for r in runs])
            conditions = [row["condition"] for row in runs[0]["rows"]]
            per_condition = [mean_std([r["rows"][i]["metrics"] for r in runs])
                             for i in range(len(conditions))]
            models[model.label] = {"seeds": [j.seed for j in cell], "protocol": runs[0]["spec"]["protocol"],
                                   "selection": runs[0]["selection"], "mean": mean, "std": std,
                                   "conditions": conditions, "condition_mean": [m for m, _ in per_condition],
                                   "condition_std": [s for _, s in per_condition]}
        if models:
            out[ref.label] = models
    return out


def reproduce_tables(models: dict[str, Any], family: str) -> list[str]:
    """The recipe's mean over its conditions per model, then MAE per condition."""
    columns = SIMS_ROBUSTNESS_COLUMNS if family == "sims" else ROBUSTNESS_COLUMNS
    lines = ["Each model trained, selected and scored on test as its YAML's `reproduce:` recipe says, once "
             "per study seed; the mean over the recipe's conditions, then mean ± std over seeds.", ""]
    lines += _table(["model", "seeds", "protocol", *(LABELS[k] for k in columns), "selection"],
                    [[label, " ".join(map(str, m["seeds"])), m["protocol"],
                      *(_cell(k, m["mean"][k], m["std"][k], len(m["seeds"])) for k in columns),
                      m["selection"]]
                     for label, m in sorted(models.items())])
    for label, m in sorted(models.items()):
        lines += ["", f"{label}: {LABELS['mae']} per condition", ""]
        lines += _table([*m["conditions"], "mean"],
                        [[*(_cell("mae", mean["mae"], std["mae"], len(m["seeds"]))
                            for mean, std in zip(m["condition_mean"], m["condition_std"], strict=True)),
                          _cell("mae", m["mean"]["mae"], m["std"]["mae"], len(m["seeds"]))]])
    return lines


def dg_table(targets: dict[str, Any], family: str) -> list[str]:
    """Per target and model: out-of-domain, in-domain and gap (out - in) metrics, mean ± std over
    seeds; then each model's mean over the targets (where it has every one)."""
    columns = SIMS_ROBUSTNESS_COLUMNS if family == "sims" else ROBUSTNESS_COLUMNS
    parts = (("out_of_domain", "out-of-domain"), ("in_domain", "in-domain"), ("gap", "gap"))
    group_by = next(iter(next(iter(targets.values())).values()))["group_by"]
    lines = [f"Each run trains on every group ({group_by}) but the target, selects on their validation "
             "data, and is scored on the target (out of domain) and on the sources' test split (in "
             "domain); gap = out-of-domain - in-domain; mean ± std over seeds.", ""]
    head = ["target", "model", "seeds", *(f"{name} {LABELS[k]}" for _, name in parts for k in columns)]
    rows = []
    labels: list[str] = []
    for target, models in targets.items():
        for label, found in models.items():
            labels += [label] if label not in labels else []
            rows.append([target, label, " ".join(map(str, found["seeds"])),
                         *(_cell(k, found[part]["mean"][k], found[part]["std"][k], len(found["seeds"]))
                           for part, _ in parts for k in columns)])
    if len(targets) > 1:
        for label in labels:
            every = [models.get(label) for models in targets.values()]
            if all(every):
                rows.append([f"mean of {len(every)} targets", label, "",
                             *(format_value(k, float(np.mean([f[part]["mean"][k] for f in every])))
                               for part, _ in parts for k in columns)])
    return lines + _table(head, rows)


def _protocols(evaluations: Sequence[Evaluation]) -> list[str]:
    return list(dict.fromkeys(e.protocol for e in evaluations))


def per_seed_table(models: dict[str, Any], evaluations: Sequence[Evaluation], family: str) -> list[str]:
    """Each seed's selected epoch, clean MAE and Corr, and each protocol's mean over its conditions."""
    columns = SIMS_ROBUSTNESS_COLUMNS if family == "sims" else ROBUSTNESS_COLUMNS
    protocols = _protocols(evaluations)
    head = ["model", "seed", "best epoch", f"clean {LABELS['mae']}", f"clean {LABELS['corr']}",
            *(f"{p} {LABELS[k]}" for p in protocols for k in columns)]
    rows = [[label, str(run["seed"]), str(run["best_epoch"]), format_value("mae", run["clean"]["mae"]),
             format_value("corr", run["clean"]["corr"]),
             *(format_value(k, run["protocols"][p][k]) if p in run["protocols"] else "-"
               for p in protocols for k in columns)]
            for label, m in sorted(models.items()) for run in m["per_seed"]]
    return ["Each seed's selected epoch and test metrics (protocols: the mean over their conditions).",
            "", *_table(head, rows)]


def robustness_table(models: dict[str, Any], evaluations: Sequence[Evaluation], family: str) -> list[str]:
    """Clean MAE, then each protocol's mean over its conditions (MAE, Acc-2, Corr), per model."""
    columns = SIMS_ROBUSTNESS_COLUMNS if family == "sims" else ROBUSTNESS_COLUMNS
    protocols = _protocols(evaluations)
    described = "; ".join(dict.fromkeys(_describe(e) for e in evaluations))
    lines = [f"Test split; each protocol cell is the mean over its conditions ({described}), then "
             "mean ± std over seeds.", ""]
    head = ["model", "seeds", f"clean {LABELS['mae']}",
            *(f"{p} {LABELS[k]}" for p in protocols for k in columns)]
    rows = []
    for label, m in sorted(models.items()):
        row = [label, " ".join(map(str, m["seeds"])), format_value("mae", m["clean"]["mae"])]
        for p in protocols:
            found = m["protocols"].get(p)
            row += [_cell(k, found["mean"][k], found["std"][k], len(m["seeds"])) if found else "-"
                    for k in columns]
        rows.append(row)
    return lines + _table(head, rows) + _warnings(models)


def _warnings(models: dict[str, Any]) -> list[str]:
    """The warnings the seeds' trainings recorded (a constant or no-better-than-median model), one
    line each under the table, so that a row of a degenerate model does not read as a result."""
    found = [f"- {label}, seed {seed}: {line}" for label, m in sorted(models.items())
             for seed, lines in sorted(m["warnings"].items()) for line in lines]
    return ["", "Warnings recorded by the seeds' trainings:", "", *found] if found else []


def markdown(study: Study, summary: dict[str, Any], families: dict[str, str], command: str,
             missing: int, dg: dict[str, Any] | None = None, reproduced: dict[str, Any] | None = None) -> str:
    lines = [f"# Study {study.name}", ""]
    if missing:
        lines += [f"{missing} job(s) of the study have no record yet: their cells are left out.", ""]
    for dataset in dict.fromkeys([*summary, *(dg or {}), *(reproduced or {})]):
        family = families[dataset]
        lines += [f"## {dataset}", ""]
        if dataset in (dg or {}):
            lines += ["### Domain generalization", "", *dg_table(dg[dataset], family), ""]
        if dataset in (reproduced or {}):
            lines += ["### The papers' recipes (reproduce)", "",
                      *reproduce_tables(reproduced[dataset], family), ""]
        models = summary.get(dataset)
        if not models:
            continue
        keys = METRIC_KEYS[family]
        columns = SIMS_ROBUSTNESS_COLUMNS if family == "sims" else ROBUSTNESS_COLUMNS
        lines += ["### Clean test split", "",
                  "Mean ± std over seeds; each seed selected on validation.", ""]
        lines += _table(["model", "seeds", *(LABELS[k] for k in keys)],
                        [[label, " ".join(map(str, m["seeds"])),
                          *(_cell(k, m["clean"][k], m["clean_std"][k], len(m["seeds"])) for k in keys)]
                         for label, m in sorted(models.items())])
        staged = {label: m for label, m in sorted(models.items()) if m["stages"]}
        if staged:
            lines += ["", "### Training stages", "",
                      "Each stage's selected checkpoint on the test split (the last is the model's own).", ""]
            lines += _table(["model", "stage", "seeds", *(LABELS[k] for k in keys)],
                            [[label, stage, " ".join(map(str, m["seeds"])),
                              *(_cell(k, found["mean"][k], found["std"][k], len(m["seeds"])) for k in keys)]
                             for label, m in staged.items() for stage, found in m["stages"].items()])
        tuned = {label: m["overrides"] for label, m in sorted(models.items()) if m["overrides"]}
        if tuned:
            lines += ["", "Settings over each model's defaults (the study's, then those its search chose on "
                      "validation):", ""]
            lines += _table(["model", "settings"],
                            [[label, " ".join(f"`{o}`" for o in overrides)]
                             for label, overrides in tuned.items()])
        evaluations = _evaluations(study, list(models))
        lines += ["", "### Per seed", "", *per_seed_table(models, evaluations, family)]
        stems = _curve_stems(dataset, evaluations)
        if evaluations:
            lines += ["", "### Robustness", "", *robustness_table(models, evaluations, family)]
            for evaluation in evaluations:
                p = evaluation.protocol
                with_p = {label: m["protocols"][p] for label, m in sorted(models.items())
                          if m["protocols"].get(p, {}).get("key") == evaluation.key}
                if not with_p:
                    continue
                conditions = next(iter(with_p.values()))["conditions"]
                for key in columns:
                    lines += ["", f"### {_describe(evaluation)}: {LABELS[key]} per condition", ""]
                    lines += _table(["model", *conditions, "mean"], [
                        [label, *(_cell(key, mean[key], std[key], len(models[label]["seeds"]))
                                  for mean, std in zip(found["condition_mean"], found["condition_std"],
                                                       strict=True)),
                         _cell(key, found["mean"][key], found["std"][key], len(models[label]["seeds"]))]
                        for label, found in with_p.items()])
                if stems[evaluation.key] is not None:
                    lines += ["", f"![{dataset} {p}]({stems[evaluation.key]}.svg)"]
        lines.append("")
    lines += [f"Regenerate: `{command}`", ""]
    return "\n".join(lines)


def plot_protocol(path_stem: Path, title: str, models: dict[str, Any], protocol: str) -> None:
    """MAE and Corr per condition, one line (distinct marker and style) and error band per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (label, m) in enumerate(sorted(models.items())):
        found = m["protocols"][protocol]
        x = np.arange(len(found["conditions"]))
        style = {"marker": MARKERS[index % len(MARKERS)], "linestyle": LINESTYLES[index % len(LINESTYLES)]}
        for ax, key in zip(axes, ("mae", "corr"), strict=True):
            mean = np.array([c[key] for c in found["condition_mean"]], dtype=float)
            std = np.array([c[key] for c in found["condition_std"]], dtype=float)
            ax.plot(x, mean, label=label, **style)
            if len(m["seeds"]) > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.15)
            ax.set_xticks(x, found["conditions"], rotation=0 if protocol == "fixed" else 45)
    directions = ("lower is better ↓", "higher is better ↑")
    for ax, key, better in zip(axes, ("mae", "corr"), directions, strict=True):
        ax.set_ylabel(f"{LABELS[key]} ({better})")
        ax.set_xlabel("available modalities" if protocol == "fixed" else "missing rate")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    # a fixed salt and no date make the SVG the same bytes each time the same records are reported
    with plt.rc_context({"svg.hashsalt": "msakit"}):
        for suffix, metadata in (("png", {}), ("svg", {"Date": None})):
            atomic_write_bytes(path_stem.with_name(f"{path_stem.name}.{suffix}"),
                               lambda handle, suffix=suffix, metadata=metadata: fig.savefig(
                                   handle, format=suffix, dpi=150, metadata=metadata))
    plt.close(fig)


def html_page(text: str) -> str:
    """The markdown report as a static HTML page (tables, headings, images, paragraphs)."""
    body, table = [], []

    def close_table() -> None:
        if table:
            head, *rows = [cells for cells in table if not set("".join(cells)) <= set("-")]
            cells = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                        + "</tr></thead><tbody>" + "".join(cells) + "</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        close_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    close_table()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,"
             "th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(text.splitlines()[0][2:])}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def report_study(path: str | Path, *, output: str | Path | None = None, store: str | None = None,
                 study_dir: str | Path | None = None) -> dict[str, Any]:
    """Writes leaderboard.md / .html / .json and the curves into `output` (default:
    `<study_dir>/report`); returns the summary."""
    study = load_study(path)
    root, results = study_store(study, study_dir, store)
    search = load_search(study)
    jobs = plan_jobs(study, best_settings(study, search, results.url) if search is not None else None)
    records = results.records(j.id for j in jobs)
    if not records:
        raise MsakitError(f"the store {results.url} has no record of study {study.name}'s jobs: "
                          f"run `msakit study run {path}` first")
    out = Path(output).expanduser() if output is not None else root / "report"
    summary = summarise(study, records, jobs)
    dg = summarise_dg(study, records, jobs)
    reproduced = summarise_reproduce(study, records, jobs)
    families = {job.dataset.label: job.metric_family for job in jobs}  # planning loaded the data once
    store_part = ([] if store is None else ["--store", str(store)]) + \
        ([] if study_dir is None else ["--dir", str(study_dir)])
    command = shlex.join(["msakit", "study", "run", str(path), *store_part]) + " && " + shlex.join(
        ["msakit", "study", "report", str(path), *store_part, "--output", str(out)])
    distinct = len({j.id for j in jobs})  # model entries that train alike share one job
    text = markdown(study, summary, families, command, distinct - len(records), dg, reproduced)
    compact = []  # the robustness (or domain-generalization) tables alone, for pages that show only them
    for dataset, models in summary.items():
        evaluations = _evaluations(study, list(models))
        if evaluations:
            compact += [f"**{dataset}**", "", *robustness_table(models, evaluations, families[dataset]), ""]
        for evaluation, stem in zip(evaluations, _curve_stems(dataset, evaluations).values(), strict=True):
            with_p = {label: m for label, m in models.items()
                      if m["protocols"].get(evaluation.protocol, {}).get("key") == evaluation.key}
            if with_p and stem is not None:
                title = f"{study.name}: {dataset}, {_describe(evaluation)}"
                plot_protocol(out / stem, title, with_p, evaluation.protocol)
    atomic_write_text(out / "leaderboard.md", text)
    for dataset, targets in dg.items():
        compact += [f"**{dataset}**", "", *dg_table(targets, families[dataset]), ""]
    if compact:
        atomic_write_text(out / "robustness.md", "\n".join([*compact, f"Regenerate: `{command}`", ""]))
    atomic_write_text(out / "leaderboard.html", html_page(text))
    atomic_write_json(out / "leaderboard.json", {"study": study.name, "command": command, "jobs": distinct,
                                                 "records": len(records), "datasets": summary,
                                                 **({"domain_generalization": dg} if dg else {}),
                                                 **({"reproduce": reproduced} if reproduced else {})},
                      UNDEFINED_REASONS)
    return {"study": study.name, "output": str(out), "jobs": distinct, "records": len(records),
            "markdown": text}
