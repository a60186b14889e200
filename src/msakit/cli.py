"""The `msakit` command: parses arguments, calls `msakit.api`, prints tables.

Only click, rich and the light `msakit.choices` load with this module: each command imports the
torch-backed layers it needs when it runs, so `msakit --help` and `msakit models` start at once.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from msakit import __version__
from msakit.choices import CUE_BACKENDS, FAMILIES, describe_datasets, describe_models
from msakit.errors import MsakitError

# piped or logged output gets wide tables instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 150)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MsakitError as exc:
            click.echo(f"msakit: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise MsakitError(f"--seeds {text!r}: expected integers like '1111 1112 1113'") from None
    if not seeds:
        raise MsakitError("--seeds is empty")
    wrong = [s for s in seeds if not 0 <= s < 2**32]
    if wrong:
        raise MsakitError(f"--seeds: {wrong[0]} is not in [0, 2**32)")
    return seeds


class _RecordingGroup(click.Group):
    """Keeps the arguments as given, so results can name the command that made them; a usage error
    (an unknown option, a missing argument, a bad value) is one `msakit: error:` line, exit 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["msakit.argv"] = list(args)
        return super().parse_args(ctx, args)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `msakit`: the help is the answer
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            where = f"{context.command_path}: " if context is not None else ""
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            click.echo(f"msakit: error: {where}{' '.join(exc.format_message().split()).rstrip('.')}{hint}",
                       err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("msakit: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `msakit models | head`: the reader left, nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _command_line() -> str:
    return shlex.join(["msakit", *click.get_current_context().meta["msakit.argv"]])


FAMILY_HELP = ("which benchmark's settings section and metric rules apply [default: the catalog name's, "
               "or recognised from the data; else custom: the model's defaults, MOSI's rules]")
ALIGNED_HELP = ("read the word-aligned (MMSA aligned_*.pkl) or the unaligned pickle [default: the one "
                "the model's paper trained on: aligned for hme and mag_bert, unaligned for the others]")
dataset_options = [
    click.option("--dataset", "-d", required=True,
                 help="synthetic, mosi, mosei, sims, simsv2, mosi-text, or a .pkl/.csv path"),
    click.option("--data-dir", default=None, help="folder (or file) holding the dataset"),
    click.option("--aligned/--unaligned", default=None, help=ALIGNED_HELP),
    click.option("--family", type=click.Choice(FAMILIES), default=None, help=FAMILY_HELP),
]


RESUME_HELP = ("continue an interrupted run of the same command in --output: finished seeds are "
               "read back, the unfinished one goes on from its last epoch")
OVERWRITE_HELP = "replace the run already in --output (its results and checkpoints are removed first)"
SCORING_SET_HELP = ("change a test-time model setting of the checkpoint, e.g. --set "
                    "model.eval_bottleneck=mean (weights are never changed)")


def with_dataset_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(dataset_options):
        func = option(func)
    return func


@click.group(cls=_RecordingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msakit")
@click.option("--quiet", "-q", is_flag=True, help="only warnings and results")
def cli(quiet: bool) -> None:
    """Multimodal sentiment analysis that holds up when modalities are missing."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=errors, show_path=False, show_time=False)],
    )


@cli.command()
@click.argument("model")
@with_dataset_options
@click.option("--seeds", default=None,
              help="one run per seed, e.g. '1111 1112 1113' [default: 1111; the paper's with --reproduce]")
@click.option("--epochs", type=int, default=None,
              help="override training.epochs (a staged model's stages are scaled to it)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a setting, e.g. --set training.lr=1e-3 --set model.hidden=64")
@click.option("--reproduce", is_flag=True,
              help="the paper's evaluation (the model YAML's `reproduce:` recipe): its seeds, "
                   "missing-data protocol and per-metric checkpoints, selected on validation")
@click.option("--output", "-o", default=None, help="folder for results.json, results.csv, checkpoints")
@click.option("--resume", is_flag=True, help=RESUME_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--no-progress", is_flag=True, help="no progress bars")
@_user_errors
def train(model: str, dataset: str, data_dir: str | None, aligned: bool | None, family: str | None,
          seeds: str | None, epochs: int | None, overrides: tuple[str, ...], reproduce: bool,
          output: str | None, resume: bool, overwrite: bool, no_progress: bool) -> None:
    """Train MODEL, select on validation, report valid and test metrics (mean ± std over seeds)."""
    from msakit import api
    from msakit.evaluation.report import metrics_table

    output = output or f"runs/{model}-{Path(dataset).stem}{'-reproduce' if reproduce else ''}"
    common = dict(data_dir=data_dir, aligned=aligned, family=family, epochs=epochs, overrides=list(overrides),
                  output=output, progress=not no_progress, command=_command_line(), resume=resume,
                  overwrite=overwrite)
    if reproduce:
        results = api.reproduce(model, dataset, seeds=None if seeds is None else _parse_seeds(seeds),
                                **common)
        family = results["dataset"]["metric_family"]
        rows = {row["condition"]: row["metrics"] for row in results["rows"]}
        rows["mean"] = results["mean"]
        console.print(metrics_table(
            f"{model} on {results['dataset']['name']}: test under {results['recipe']['protocol']}-modal "
            f"missing, mean over seeds {', '.join(str(r['seed']) for r in results['seeds'])}",
            rows, family, first_column="condition"))
        console.print(results["selection"])
        console.print(f"results: {Path(output) / 'reproduce.json'}")
        return
    results = api.train(model, dataset, seeds=_parse_seeds("1111" if seeds is None else seeds), **common)
    family = results["dataset"]["metric_family"]
    rows = {f"seed {r['seed']}, epoch {r['best_epoch']}": r["test"] for r in results["seeds"]}
    console.print(metrics_table(f"{model} on {results['dataset']['name']}: test", rows, family,
                                first_column="run"))
    means = {"valid": results["mean"]["valid"], "test": results["mean"]["test"]}
    console.print(metrics_table(f"mean ± std over {len(results['seeds'])} seed(s); "
                                f"{results['selection']}", means, family,
                                stds=results["std"] if len(results["seeds"]) > 1 else None,
                                first_column="split"))
    if "stages" in results:
        stages = results["stages"]
        console.print(metrics_table(
            "every stage, each selected on validation: test, mean ± std over seeds",
            {name: s["test"]["mean"] for name, s in stages.items()}, family,
            stds={name: s["test"]["std"] for name, s in stages.items()} if len(results["seeds"]) > 1
            else None, first_column="stage"))
    console.print(f"results: {Path(output) / 'results.json'}")


def _names(text: str, option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MsakitError(f"{option} is empty")
    return names


@cli.command()
@click.argument("model")
@click.option("--target", "-t", required=True,
              help="the unseen domain: a dataset (name or path), or with --dataset one of its groups")
@click.option("--sources", "-s", default=None,
              help="comma list: source datasets (leave-one-dataset-out), or with --dataset source groups "
                   "[default with --dataset: every other group]")
@click.option("--dataset", "-d", default=None,
              help="one dataset whose groups are the domains (e.g. synthetic-dg); without it the "
                   "domains are whole datasets")
@click.option("--group-by", default="domains", show_default=True,
              help="with --dataset: domains (the data's own), video (videos dealt to --groups groups), "
                   "cluster (k-means of the videos' features), or FILE.csv:COLUMN")
@click.option("--groups", "n_groups", type=int, default=None, help="number of groups for video and cluster")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="seed of the video and cluster groupings")
@click.option("--target-splits", default="train,valid,test", show_default=True,
              help="which splits of the target domain are tested")
@click.option("--data-dir", default=None, help="folder (or file) holding the dataset(s)")
@click.option("--aligned/--unaligned", default=None, help=ALIGNED_HELP)
@click.option("--family", type=click.Choice(FAMILIES), default=None,
              help="with --dataset: " + FAMILY_HELP)
@click.option("--seeds", default="1111", show_default=True, help="one run per seed, e.g. '1111 1112 1113'")
@click.option("--epochs", type=int, default=None,
              help="override training.epochs (a staged model's stages are scaled to it)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a setting, e.g. --set training.lr=1e-3")
@click.option("--output", "-o", default=None, help="folder for dg.json, dg.csv, dg.md, checkpoints")
@click.option("--resume", is_flag=True, help=RESUME_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--no-progress", is_flag=True, help="no progress bars")
@_user_errors
def dg(model: str, target: str, sources: str | None, dataset: str | None, group_by: str,
       n_groups: int | None, split_seed: int, target_splits: str, data_dir: str | None,
       aligned: bool | None,
       family: str | None,
       seeds: str, epochs: int | None, overrides: tuple[str, ...], output: str | None,
       resume: bool, overwrite: bool, no_progress: bool) -> None:
    """Domain generalization: train MODEL on source domains, select on their validation data, and
    compare in-domain (the sources' test split) with out-of-domain (the target) metrics."""
    from msakit import api
    from msakit.evaluation.report import metrics_table
    from msakit.evaluation.results import modality_lines, part_labels

    where = f"{Path(dataset).stem}-{target}" if dataset else Path(target).stem
    output = output or f"runs/dg-{model}-{where}"
    result = api.dg(
        model, target, sources=_names(sources, "--sources") if sources is not None else None,
        dataset=dataset, group_by=group_by, n_groups=n_groups, split_seed=split_seed,
        target_splits=_names(target_splits, "--target-splits"), data_dir=data_dir, aligned=aligned,
        family=family, seeds=_parse_seeds(seeds), epochs=epochs, overrides=list(overrides), output=output,
        progress=not no_progress, command=_command_line(), resume=resume, overwrite=overwrite,
    )
    task, family = result["task"], result["dataset"]["metric_family"]
    several = len(result["seeds"]) > 1
    labels = part_labels(result)
    console.print(metrics_table(
        f"{model}: {' + '.join(task['sources'])} -> {task['target']} ({task['grouping']}), "
        f"{'mean ± std over ' + str(len(result['seeds'])) + ' seeds' if several else 'seed ' + seeds}",
        {labels[p]: result["mean"][p] for p in labels}, family,
        stds={labels[p]: result["std"][p] for p in labels} if several else None, first_column="test"))
    for line in modality_lines(task):
        console.print(line)
    for note in task["notes"]:
        console.print(f"note: {note}")
    console.print(result["selection"])
    console.print(f"written: {Path(output) / 'dg.json'}, dg.csv, dg.md")


@cli.command()
@click.argument("checkpoint")
@with_dataset_options
@click.option("--split", default="test", show_default=True, help="train, valid or test")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--set", "overrides", multiple=True, metavar="model.KEY=VALUE", help=SCORING_SET_HELP)
@_user_errors
def evaluate(checkpoint: str, dataset: str, data_dir: str | None, aligned: bool | None, family: str | None,
             split: str, device: str, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Score a saved CHECKPOINT on one split of a dataset."""
    from msakit import api
    from msakit.evaluation.report import metrics_table
    from msakit.fileio import strict_json
    from msakit.metrics import UNDEFINED_REASONS

    result = api.evaluate(checkpoint, dataset, data_dir=data_dir, aligned=aligned, family=family,
                          split=split, device=device, overrides=overrides)
    if as_json:
        click.echo(strict_json(result, UNDEFINED_REASONS), nl=False)
        return
    family = result["dataset"]["metric_family"]
    console.print(metrics_table(f"{result['model']} on {result['dataset']['name']}", {
        split: result["metrics"]}, family, first_column="split"))


@cli.command()
@click.argument("checkpoint")
@with_dataset_options
@click.option("--protocol", required=True,
              help="intra: tokens/frames dropped (LNLN); inter: whole modalities (HME/CyIN); "
                   "fixed: a set of available modalities")
@click.option("--rates", default=None,
              help="start:stop:step or a comma list; default intra 0:0.9:0.1, inter 0.1:0.7:0.1")
@click.option("--subsets", default=None, help="fixed protocol: e.g. 't,ta,tav'; default all seven")
@click.option("--seeds", default="0", show_default=True, help="mask seeds; rows are their mean")
@click.option("--output", "-o", default=None, help="folder for robustness.json/.csv/.png")
@click.option("--device", default="auto", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="model.KEY=VALUE", help=SCORING_SET_HELP)
@_user_errors
def robustness(checkpoint: str, dataset: str, data_dir: str | None, aligned: bool | None, family: str | None,
               protocol: str,
               rates: str | None, subsets: str | None, seeds: str, output: str | None,
               device: str, overrides: tuple[str, ...]) -> None:
    """Score CHECKPOINT on the test split under a missing-modality protocol."""
    from msakit import api
    from msakit.evaluation.report import metrics_table
    from msakit.missing import parse_rates

    output = output or str(Path(checkpoint).parent / f"robustness-{protocol}")
    result = api.robustness(
        checkpoint, dataset, protocol=protocol, data_dir=data_dir, aligned=aligned, family=family,
        rates=None if rates is None else parse_rates(rates),
        subsets=None if subsets is None else _names(subsets, "--subsets"),
        seeds=_parse_seeds(seeds), output=output, device=device, command=_command_line(),
        overrides=overrides,
    )
    rows = {r["condition"]: r["metrics"] for r in result["rows"]}
    rows["mean"] = result["mean"]
    first = "modalities" if protocol == "fixed" else "rate"
    console.print(metrics_table(
        f"{result['model']} on {result['dataset']['name']}: {protocol}-modal missing, test split",
        rows, result["dataset"]["metric_family"], first_column=first))
    console.print(f"written: {Path(output) / 'robustness.json'}, robustness.csv, robustness.png")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--output", "-o", default="runs/compare", show_default=True)
@_user_errors
def compare(run_dirs: tuple[str, ...], output: str) -> None:
    """Overlay the robustness curves of several RUN_DIRS (each with a robustness.json)."""
    from msakit import api

    result = api.compare(list(run_dirs), output)
    click.echo(result["table"])
    console.print(f"written: {Path(output) / 'compare.md'}, compare.png")


@cli.command()
@click.argument("output")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--aligned", is_flag=True, help="every modality at the text length, no *_lengths")
@click.option("--size", "sizes", multiple=True, metavar="KEY=N",
              help="e.g. --size n_train=200 --size audio_len=100 --size domains=4 --size domain_shift=0.5 "
                   "(see `generate_synthetic`)")
@_user_errors
def synthetic(output: str, seed: int, aligned: bool, sizes: tuple[str, ...]) -> None:
    """Write the synthetic dataset to OUTPUT as an MMSA pickle (any `--dataset PATH` reads it)."""
    from msakit import api

    parsed: dict[str, int | float] = {}
    for item in sizes:
        key, _, value = item.partition("=")
        try:
            parsed[key.strip()] = float(value) if key.strip() == "domain_shift" else int(value)
        except ValueError:
            raise MsakitError(f"--size {item!r}: expected KEY=N with a number N") from None
    result = api.write_synthetic(output, seed=seed, aligned=aligned, **parsed)
    sizes_text = "/".join(str(n) for n in result["sizes"].values())
    console.print(f"wrote {result['path']} (train/valid/test {sizes_text})")


@cli.command()
def models() -> None:
    """List the registered models."""
    table = Table("model", "description")
    for entry in describe_models():
        table.add_row(entry["name"], entry["description"])
    console.print(table)


@cli.command()
def datasets() -> None:
    """List the datasets msakit can read and what each needs."""
    table = Table("dataset", "description", "needs")
    for entry in describe_datasets():
        table.add_row(entry["name"], entry["description"], entry.get("needs", ""))
    console.print(table)



@cli.command()
@click.argument("clips")
@click.option("--labels", "-l", required=True,
              help="label.csv: video_id,clip_id (or id), text, label, mode; other columns ignored")
@click.option("--output", "-o", required=True, help="the MMSA-layout pickle to write")
@click.option("--features", default=None, help="YAML file of feature settings over the defaults")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a feature setting, e.g. --set visual.fps=5 --set transcript.source=asr")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="worker processes [default: one per CPU core; 0: extract in this process]")
@click.option("--cache", default=None, help="per-clip cache folder [default: OUTPUT with .cache]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@_user_errors
def extract(clips: str, labels: str, output: str, features: str | None, overrides: tuple[str, ...],
            workers: int | None, cache: str | None, no_progress: bool) -> None:
    """Extract features of the media files in CLIPS listed in a label.csv into an MMSA pickle."""
    from msakit import api

    report = api.extract(clips, labels, output, features=features, overrides=list(overrides),
                         workers=workers, cache_dir=cache, progress=not no_progress)
    splits = "/".join(str(n) for n in report["splits"].values())
    console.print(f"extracted {report['extracted']} of {report['clips']} clips "
                  f"({report['from_cache']} from the cache; train/valid/test {splits})")
    for modality, ids in report["absent"].items():
        if ids:
            console.print(f"{modality} absent in {len(ids)} clip(s): {', '.join(ids[:10])}"
                          + (" ..." if len(ids) > 10 else ""))
    if report["failures"]:
        table = Table("failed clip", "reason", title=f"{len(report['failures'])} clip(s) failed")
        for failure in report["failures"]:
            table.add_row(failure["id"], failure["reason"])
        console.print(table)
    console.print(f"wrote {output}; report: {report['report']}")


@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--checkpoint", "-c", default=None,
              help="a checkpoint [default: the packaged text model, which reads the transcript only]")
@click.option("--output", "-o", default=None,
              help="a .csv or .jsonl file that receives each result as it comes; run again, it resumes")
@click.option("--text", default=None,
              help="transcript of the (one) file; default: FILE.txt beside it, else speech recognition")
@click.option("--features", default=None,
              help="YAML of transcript settings (other keys must match the checkpoint)")
@click.option("--set", "overrides", multiple=True, metavar="transcript.KEY=VALUE",
              help="e.g. --set transcript.source=asr")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="extraction processes [default: one per CPU core; 0 for a single file]")
@click.option("--overwrite", is_flag=True, help="start --output afresh instead of resuming it")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@_user_errors
def predict(files: tuple[str, ...], checkpoint: str | None, output: str | None, text: str | None,
            features: str | None, overrides: tuple[str, ...], workers: int | None, overwrite: bool,
            device: str, as_json: bool, no_progress: bool) -> None:
    """Sentiment of each media FILE (video or audio; a folder: every media file in it) with a
    CHECKPOINT, or with the packaged default model; the model loads once."""
    from msakit import api
    from msakit.fileio import strict_json

    results = api.predict(list(files), checkpoint, text=text, features=features, overrides=list(overrides),
                          device=device, output=output, workers=workers, overwrite=overwrite,
                          progress=not no_progress and sys.stderr.isatty())
    for notice in dict.fromkeys(r["notice"] for r in results if "notice" in r):
        click.echo(f"msakit: note: {notice}", err=True)
    if as_json:
        click.echo(strict_json(results), nl=False)
    elif output is None:
        table = Table("file", "score", "class", "label", "present", "used", "transcript")
        for result in results:
            if "error" in result:
                table.add_row(result["file"], "-", "error", "-", "-", "-", result["error"])
                continue
            present = "".join(m[0] if result["present"][m] else "-" for m in ("text", "audio", "vision"))
            table.add_row(result["file"], f"{result['score']:+.3f}", result["class"],
                          f"{result['label']:+d} {result['label_name']} ({result['scale']})", present,
                          "+".join(result["used"]), result["transcript"])
        console.print(table)
    else:
        click.echo(f"wrote {len(results)} result(s) to {output}", err=True)
    failed = [r for r in results if "error" in r]
    if failed:  # the readable files are scored; the others are bad input
        click.echo(f"msakit: error: {len(failed)} of {len(results)} file(s) could not be scored: "
                   + "; ".join(f"{r['file']} ({r['error']})" for r in failed), err=True)
        sys.exit(2)


@cli.command()
@click.argument("dataset")
@click.option("--output", "-o", required=True, help="the cue file (JSONL); an existing one is resumed")
@click.option("--backend", type=click.Choice(CUE_BACKENDS), default="offline", show_default=True,
              help="offline: the clip's features described in words, no network; openai: an MLLM "
                   "behind an OpenAI-compatible chat-completions endpoint")
@click.option("--data-dir", default=None, help="folder (or file) holding the dataset")
@click.option("--aligned", is_flag=True, help="read the word-aligned pickle (MMSA aligned_*.pkl)")
@click.option("--media", default=None,
              help="openai: folder of the clips' videos (named as for `msakit extract`); 3 frames each")
@click.option("--base-url", default=None,
              help="openai: endpoint, e.g. http://localhost:8000/v1 [default: $OPENAI_BASE_URL, "
                   "else https://api.openai.com/v1]")
@click.option("--model", default=None, help="openai: the model's name there [default: gpt-4o-mini]")
@click.option("--api-key-env", default=None, metavar="NAME",
              help="openai: environment variable holding the key [default: MSAKIT_CUES_API_KEY, "
                   "else OPENAI_API_KEY; a local server needs none]")
@click.option("--concurrency", type=int, default=4, show_default=True, help="openai: requests in flight")
@click.option("--max-retries", type=int, default=5, show_default=True,
              help="openai: retries of a request after a 429, 5xx or connection error")
@click.option("--price-input", type=float, default=None, help="price per million prompt tokens, for the cost")
@click.option("--price-output", type=float, default=None, help="price per million completion tokens")
@click.option("--splits", default="train,valid,test", show_default=True, help="comma list of splits")
@click.option("--limit", type=int, default=None, help="only the first N samples of each split")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@_user_errors
def cues(dataset: str, output: str, backend: str, data_dir: str | None, aligned: bool, media: str | None,
         base_url: str | None, model: str | None, api_key_env: str | None, concurrency: int,
         max_retries: int, price_input: float | None, price_output: float | None, splits: str,
         limit: int | None, no_progress: bool) -> None:
    """Write MMSLF's cue text ("Visual cues: ... Language cues: ...") for each sample of DATASET.

    Samples already in OUTPUT from the same backend, model and prompt version are not asked again.
    """
    from msakit.cues.pipeline import run_cues

    chosen = [s.strip() for s in splits.split(",") if s.strip()]
    if not chosen:
        raise MsakitError("--splits is empty")
    report = run_cues(dataset, output, backend=backend, data_dir=data_dir, aligned=aligned, media=media,
                      splits=chosen, limit=limit, price_input=price_input, price_output=price_output,
                      progress=not no_progress, base_url=base_url, model=model, api_key_env=api_key_env,
                      concurrency=concurrency, max_retries=max_retries)
    table = Table("requested", "written", "failed", "skipped (resumed)", "with frames", "prompt tokens",
                  "completion tokens", "cost",
                  title=f"{report.backend} cues: {report.model}, prompt {report.prompt_version}")
    cost = "-" if report.cost is None else f"{report.cost:.4f}"
    table.add_row(*(str(n) for n in (report.requested, report.written, report.failed, report.skipped,
                                     report.with_media, report.prompt_tokens, report.completion_tokens)),
                  cost)
    console.print(table)
    if report.failures:
        failed = Table("failed sample", "split", "reason",
                       title=f"{report.failed} sample(s) failed; run the command again to retry them")
        for failure in report.failures[:20]:
            failed.add_row(failure.id, failure.split, failure.reason)
        if report.failed > 20:
            failed.add_row("...", "", f"{report.failed - 20} more")
        console.print(failed)
    console.print(f"cue file: {report.output} ({report.seconds:.1f} s)")


@cli.command()
@click.option("--checkpoint", "-c", default=None,
              help="the checkpoint to serve [default: the packaged text model]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; 0.0.0.0 reaches the network (use a token or a proxy)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token-env", default=None, metavar="NAME",
              help="require 'Authorization: Bearer TOKEN' on /v1/*, TOKEN read from environment "
                   "variable NAME (never given on the command line)")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="largest request body in MB, a batch's files together (413 beyond)")
@click.option("--max-duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="longest media file in seconds (413 beyond)")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="media requests extracted at once (429 beyond)")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="most items in one batch request (413 beyond)")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds a request may take (504 beyond)")
@click.option("--device", default="cpu", show_default=True)
@_user_errors
def serve(checkpoint: str | None, host: str, port: int, token_env: str | None, device: str,
          **limits: float | None) -> None:
    """HTTP service: load one model once and score uploaded media and transcripts (docs at /docs).

    Limits not given keep their defaults; the server logs the limits in effect when it starts.
    """
    from msakit.serve import Limits, run  # FastAPI comes with the serve extra, not with msakit itself

    given = Limits(**{name: value for name, value in limits.items() if value is not None})
    run(checkpoint, host=host, port=port, token_env=token_env, limits=given, device=device)


@cli.group()
def study() -> None:
    """Run a benchmark grid (a study YAML) on Ray, and report its leaderboard."""


STUDY_DIR_HELP = "the study's folder: job run folders and the default store [default: runs/studies/NAME]"
STORE_HELP = "the results store: a SQLite file or any SQLAlchemy URL [default: STUDY_DIR/study.db]"


@study.command("run")
@click.argument("study_file")
@click.option("--dir", "study_dir", default=None, help=STUDY_DIR_HELP)
@click.option("--store", default=None, help=STORE_HELP)
@click.option("--address", default=None,
              help="an existing Ray cluster (e.g. HOST:6379) [default: a local Ray started and stopped here]")
@click.option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="local: one job after another in this process, without Ray")
@click.option("--only", default=None, metavar="LABELS",
              help="run only these models of the study, e.g. 'tfn,lmf'")
@_user_errors
def study_run(study_file: str, study_dir: str | None, store: str | None, address: str | None,
              executor: str, only: str | None) -> None:
    """Run every job of STUDY_FILE that the store has no record of (a rerun skips what is done)."""
    from msakit.study import run_study

    labels = None if only is None else _names(only, "--only")
    summary = run_study(study_file, study_dir=study_dir, store=store, address=address, executor=executor,
                        only=labels)
    elsewhere = f", {len(summary['elsewhere'])} left to other drivers" if summary["elsewhere"] else ""
    click.echo(f"study {summary['study']}: {summary['jobs']} jobs, {summary['ran']} run, "
               f"{summary['skipped']} already done{elsewhere}; store {summary['store']}")
    if summary["failures"]:
        click.echo(f"msakit: error: {len(summary['failures'])} job(s) failed: " + "; ".join(
            f"{f['what']} ({f['error']})" for f in summary["failures"]), err=True)
        sys.exit(2)


@study.command("status")
@click.argument("study_file")
@click.option("--dir", "study_dir", default=None, help=STUDY_DIR_HELP)
@click.option("--store", default=None, help=STORE_HELP)
@_user_errors
def study_status(study_file: str, study_dir: str | None, store: str | None) -> None:
    """What the store holds of STUDY_FILE: per model, jobs recorded, in training (by which driver),
    left to run. Runs nothing."""
    from msakit.study import study_status as status_of

    status = status_of(study_file, study_dir=study_dir, store=store)
    console.print(f"study {status['study']}, store {status['store']}")
    table = Table("model", "jobs", "recorded", "training now", "to run")
    for row in status["models"]:
        table.add_row(row["model"], str(row["jobs"]), str(row["recorded"]), str(len(row["running"])),
                      str(row["to_run"]))
    console.print(table)
    for row in status["models"]:
        for job in row["running"]:
            console.print(f"{row['model']} on {job['dataset']}, seed {job['seed']} (job {job['job']}): "
                          f"{job['owner']}, heartbeat {job['heartbeat_s']:.0f} s ago")
    if status["unsearched"]:
        console.print(f"not planned until their search finishes: {', '.join(status['unsearched'])}")


@study.command("report")
@click.argument("study_file")
@click.option("--dir", "study_dir", default=None, help=STUDY_DIR_HELP)
@click.option("--store", default=None, help=STORE_HELP)
@click.option("--output", "-o", default=None, help="folder for leaderboard.md/.html/.json and the curves "
              "[default: STUDY_DIR/report]")
@_user_errors
def study_report(study_file: str, study_dir: str | None, store: str | None, output: str | None) -> None:
    """The leaderboard of STUDY_FILE from its store: tables per protocol, curves, an HTML page."""
    from msakit.study import report_study

    result = report_study(study_file, output=output, store=store, study_dir=study_dir)
    click.echo(result["markdown"])
    click.echo(f"wrote {result['output']}/leaderboard.md, .html, .json ({result['records']} of "
               f"{result['jobs']} jobs recorded)", err=True)


@study.command("export")
@click.argument("study_file")
@click.option("--dir", "study_dir", default=None, help=STUDY_DIR_HELP)
@click.option("--store", default=None, help=STORE_HELP)
@click.option("--output", "-o", required=True, help="the records file to write (JSON lines)")
@_user_errors
def study_export(study_file: str, study_dir: str | None, store: str | None, output: str) -> None:
    """Write the store's records of STUDY_FILE to a text file, for another store or to publish."""
    from msakit.study import export_records

    done = export_records(study_file, output, study_dir=study_dir, store=store)
    click.echo(f"study {done['study']}: the records of {done['records']} of {done['jobs']} jobs to "
               f"{done['output']}")


@study.command("import")
@click.argument("study_file")
@click.argument("records_file")
@click.option("--dir", "study_dir", default=None, help=STUDY_DIR_HELP)
@click.option("--store", default=None, help=STORE_HELP)
@_user_errors
def study_import(study_file: str, records_file: str, study_dir: str | None, store: str | None) -> None:
    """Add the records in RECORDS_FILE (from `msakit study export`) to the store of STUDY_FILE; records
    of jobs the study does not plan now are skipped, those the store holds are kept as they are."""
    from msakit.study import import_records

    done = import_records(study_file, records_file, study_dir=study_dir, store=store)
    unsearched = (f"; not planned until their search is in the store: {', '.join(done['unsearched'])}"
                  if done["unsearched"] else "")
    click.echo(f"study {done['study']}: {done['imported']} imported, {done['already']} already in the store, "
               f"{done['foreign']} not jobs of this study as planned now{unsearched}; store {done['store']}")


def main() -> None:
    """The `msakit` command. An error that is not bad input (a bug) is one line on stderr, exit 1,
    with the full traceback written to a file the line names: never a bare traceback."""
    try:
        cli(prog_name="msakit")
    except Exception as exc:
        fd, path = tempfile.mkstemp(prefix="msakit-traceback-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(f"msakit {__version__}: {shlex.join(sys.argv)}\n{traceback.format_exc()}")
        summary = " ".join(f"{type(exc).__name__}: {exc}".split())
        summary = summary if len(summary) <= 300 else summary[:297] + "..."
        click.echo(f"msakit: internal error: {summary} (a bug in "
                   f"msakit, not in your input; full traceback: {path})", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
