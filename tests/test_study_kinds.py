"""Study kinds beyond the clean/protocol grid: domain-generalization jobs (equal to a direct `api.dg`
call), a model's own evaluations, synthetic generator options in the data fingerprint, files named
in settings entering the job identity by content, and the one-line errors of these keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from msakit import api
from msakit.cli import cli
from msakit.errors import MsakitError
from msakit.study import import_records, load_study, plan_jobs, report_study, run_study
from msakit.study.report import _as_written
from msakit.study.search import load_search
from msakit.study.spec import job_identity
from msakit.study.store import ResultStore

pytest.importorskip("sqlalchemy")

# a tiny synthetic-dg (4 domains): the generator's options, as a study's dataset entry carries them
DG_SIZES = {"n_train": 120, "n_valid": 60, "n_test": 60, "text_len": 6, "audio_len": 8, "vision_len": 8,
            "text_dim": 16}
TINY_MIDG = ["model.hidden=8", "model.heads=2", "model.adapter_dim=4", "model.adapter_heads=2",
             "model.num_experts=3", "model.expert_hidden=8", "training.epochs=2", "training.batch_size=8"]
TINY_DATA = {"n_train": 40, "n_valid": 12, "n_test": 16, "text_len": 6, "audio_len": 8, "vision_len": 8,
             "text_dim": 16}


def write(path, **document):
    path.write_text(yaml.safe_dump({"name": "kinds", "seeds": [1], **document}, sort_keys=False))
    return path


def dg_study(path):
    return write(
        path, datasets=[{"dataset": "synthetic-dg", "options": DG_SIZES}], set=TINY_MIDG,
        models=["midg", {"model": "midg", "label": "erm", "set": ["model.invariance_weight=0"]}],
        evaluate={"dg": {"targets": ["0", "3"], "group_by": "domains"}})


def test_a_dg_study_records_what_a_direct_dg_call_gives_and_reports_it(tmp_path):
    path = dg_study(tmp_path / "dg.yaml")
    summary = run_study(path, study_dir=tmp_path / "study", executor="local")
    assert (summary["jobs"], summary["ran"], summary["failures"]) == (4, 4, [])
    study = load_study(path)
    jobs = plan_jobs(study)
    records = ResultStore(tmp_path / "study" / "study.db").records(j.id for j in jobs)
    erm = next(j for j in jobs if j.model.label == "erm" and j.target == "3")
    direct = api.dg("midg", "3", dataset=api.load_dataset("synthetic-dg", **DG_SIZES), seeds=[1],
                    overrides=[*TINY_MIDG, "model.invariance_weight=0"], progress=False)["seeds"][0]
    recorded = records[erm.id]["train"]
    for part in ("in_domain", "out_of_domain", "gap", "best_epoch"):
        assert recorded[part] == direct[part], part  # bit for bit
    # the target and the grouping are part of a job's identity
    assert len({j.id for j in jobs}) == 4

    report = report_study(path, study_dir=tmp_path / "study")
    text = report["markdown"]
    assert "### Domain generalization" in text and "out-of-domain MAE" in text and "gap MAE" in text
    assert "| mean of 2 targets | erm |" in text and "| 3 | midg | 1 |" in text


def test_a_model_evaluates_as_its_own_entry_says(tmp_path):
    path = write(
        tmp_path / "own.yaml", datasets=[{"dataset": "synthetic", "options": TINY_DATA}],
        set=["training.epochs=1", "model.text_hidden=8", "model.audio_hidden=4", "model.vision_hidden=4",
             "model.text_out=4", "model.post_fusion_dim=4"],
        models=["tfn", {"model": "tfn", "label": "tfn-mr0.5", "set": ["training.noise=inter",
                                                                        "training.noise_rate=0.5"],
                        "evaluate": {"inter": {"rates": [0.5]}, "fixed": {"subsets": ["t", "ta"]}}},
                # trains as tfn does: one job, scored a second time with a test-time setting
                {"model": "tfn", "label": "tfn-rescored",
                 "evaluate": {"intra": {"rates": [0.0, 0.5], "set": ["model.post_fusion_dropout=0.5"]}}}],
        evaluate={"intra": {"rates": [0.0, 0.5]}})
    study = load_study(path)
    plain, own, rescored = study.models
    assert [e.protocol for e in plain.evaluations] == ["intra"]
    assert [(e.protocol, e.rates, e.subsets) for e in own.evaluations] == \
        [("inter", (0.5,), None), ("fixed", None, ("t", "ta"))]
    summary = run_study(path, study_dir=tmp_path / "study", executor="local")
    assert (summary["jobs"], summary["ran"], summary["failures"]) == (2, 2, [])
    jobs = plan_jobs(study)
    shared = next(j.id for j in jobs if j.model.label == "tfn")
    assert next(j.id for j in jobs if j.model.label == "tfn-rescored") == shared
    record = ResultStore(tmp_path / "study" / "study.db").records([shared])[shared]
    assert set(record["evaluations"]) == {plain.evaluations[0].key, rescored.evaluations[0].key}
    assert plain.evaluations[0].key != rescored.evaluations[0].key
    text = report_study(path, study_dir=tmp_path / "study")["markdown"]
    assert "### inter: r = 0.5: MAE per condition" in text
    assert "### intra: r = 0, 0.5: MAE per condition" in text
    robustness = text.split("### Robustness")[1].split("###")[0]
    assert all(f"| {label} | 1 |" in robustness for label in ("tfn", "tfn-mr0.5", "tfn-rescored"))


TINY_LNLN = ["model.hidden_dim=8", "model.num_tokens=2", "model.heads=2", "model.dim_head=4",
             "model.mlp_dim=8", "model.embed_depth=1", "model.checker_depth=1", "model.proxy_depth=1",
             "model.reconstructor_depth=1", "model.language_depth=1", "model.fusion_depth=1",
             "model.discriminator_hidden=4", "model.checker_hidden=4", "training.epochs=2",
             "training.batch_size=8"]


def test_a_reproduce_study_records_what_a_direct_reproduce_call_gives(tmp_path):
    path = write(tmp_path / "recipe.yaml", datasets=[{"dataset": "synthetic", "options": TINY_DATA}],
                 models=[{"model": "lnln", "set": TINY_LNLN}], evaluate={"reproduce": {}})
    summary = run_study(path, study_dir=tmp_path / "study", executor="local")
    assert (summary["jobs"], summary["failures"]) == (1, [])
    (job,) = plan_jobs(load_study(path))
    record = ResultStore(tmp_path / "study" / "study.db").records([job.id])[job.id]
    recorded = record["evaluations"]["reproduce"]
    direct = api.reproduce("lnln", api.load_dataset("synthetic", **TINY_DATA), seeds=[1], overrides=TINY_LNLN,
                           progress=False)["seeds"][0]
    assert recorded["rows"] == direct["rows"] and recorded["mean"] == direct["mean"]  # bit for bit
    assert [row["condition"] for row in recorded["rows"]][:2] == ["0.00", "0.10"]
    text = report_study(path, study_dir=tmp_path / "study")["markdown"]
    assert "### The papers' recipes (reproduce)" in text and "| lnln | 1 | intra |" in text


def test_generator_options_change_the_data_and_the_jobs(tmp_path):
    small = write(tmp_path / "a.yaml", models=["tfn"],
                  datasets=[{"dataset": "synthetic", "options": TINY_DATA}])
    longer = write(tmp_path / "b.yaml", models=["tfn"],
                   datasets=[{"dataset": "synthetic", "options": {**TINY_DATA, "audio_len": 9}}])
    first, second = plan_jobs(load_study(small))[0], plan_jobs(load_study(longer))[0]
    assert first.fingerprint != second.fingerprint and first.id != second.id
    assert second.dataset.label == \
        "synthetic-audio_len9-n_test16-n_train40-n_valid12-text_dim16-text_len6-vision_len8"


def test_a_changed_file_named_in_the_settings_is_a_new_job(tmp_path):
    cues = tmp_path / "cues.jsonl"
    cues.write_text('{"backend": "offline", "id": "a", "cue": "one"}\n')
    path = write(tmp_path / "cues.yaml", datasets=[{"dataset": "synthetic", "options": TINY_DATA}],
                 models=[{"model": "mmslf", "set": [f"model.cues={cues}"]}])
    before = plan_jobs(load_study(path))[0].id
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(cues.read_bytes())
    relocated = write(tmp_path / "moved.yaml", datasets=[{"dataset": "synthetic", "options": TINY_DATA}],
                      models=[{"model": "mmslf", "set": [f"model.cues={moved}"]}])
    assert plan_jobs(load_study(relocated))[0].id == before  # the content counts, not the path
    cues.write_text('{"backend": "offline", "id": "a", "cue": "two"}\n')
    assert plan_jobs(load_study(path))[0].id != before


def test_the_report_names_a_settings_file_as_the_study_file_does(tmp_path, monkeypatch):
    """The loaded study holds a cue file's absolute path; the report shows it from the working
    directory, so a committed leaderboard does not name the machine it was made on."""
    monkeypatch.chdir(tmp_path)
    assert _as_written(f"model.cues={tmp_path / 'runs' / 'cues.jsonl'}") == "model.cues=runs/cues.jsonl"
    assert _as_written("model.cues=/elsewhere/cues.jsonl") == "model.cues=/elsewhere/cues.jsonl"
    assert _as_written(f"model.name={tmp_path / 'x'}") == f"model.name={tmp_path / 'x'}"  # not a file setting


@pytest.mark.parametrize(("change", "message"), [
    ({"datasets": [{"dataset": "synthetic", "options": {"colour": 3}}]},
     r"datasets\[0\]\.options: unknown synthetic size option\(s\) colour"),
    ({"datasets": [{"dataset": "synthetic", "options": {"audio_len": "long"}}]},
     r"datasets\[0\]\.options\.audio_len: expected a number"),
    ({"datasets": ["synthetic", {"dataset": "synthetic", "label": "synthetic"}]},
     "two datasets are labelled 'synthetic'"),
    ({"models": [{"model": "tfn", "evaluate": {"dg": {"targets": ["0"]}, "intra": {}}}]},
     r"models\[0\]\.evaluate\.intra: a dg evaluation takes no other evaluation"),
    ({"evaluate": {"dg": {"targets": []}}}, r"evaluate\.dg\.targets: expected a non-empty list"),
    ({"evaluate": {"dg": {"targets": ["0"], "by": "video"}}}, r"evaluate\.dg: unknown key 'by'"),
    ({"models": [{"model": "tfn", "evaluate": {"inter": {"subsets": ["t"]}}}]},
     r"models\[0\]\.evaluate\.inter\.subsets: the inter protocol takes rates"),
    ({"evaluate": {"intra": {"set": ["training.lr=1"]}}},
     r"evaluate\.intra\.set: 'training\.lr=1': only model\.KEY=VALUE test-time settings"),
    ({"evaluate": {"dg": {"targets": ["0"]}}, "search": {"params": {"training.lr": {"choices": [0.1]}}}},
     r"search\.models: 'tfn' is evaluated by domain generalization"),
    ({"evaluate": {"reproduce": {}}}, r"models\[0\]: tfn declares no `reproduce:` recipe"),
    ({"models": [{"model": "lnln", "evaluate": {"reproduce": {"rates": [0.5]}}}]},
     r"models\[0\]\.evaluate\.reproduce: takes no settings"),
    ({"evaluate": {"reproduce": {}, "intra": {}}}, r"evaluate\.intra: a reproduce evaluation takes no other"),
    ({"models": [{"model": "mmslf", "set": ["model.cues=/no/such/cues.jsonl"]}]},
     r"models\[0\]\.set: model\.cues=/no/such/cues\.jsonl: no such file"),
])
def test_bad_keys_are_one_line_naming_them(tmp_path, change, message):
    path = write(tmp_path / "bad.yaml", **{"datasets": ["synthetic"], "models": ["tfn"], **change})
    with pytest.raises(MsakitError, match=message) as caught:
        load_search(load_study(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_setting_added_later_keeps_the_identity_at_its_old_behaviour():
    before = {"model": {"hidden": 8}, "training": {"lr": 1e-3}}
    at_old = {"model": {"hidden": 8}, "training": {"lr": 1e-3, "accumulate_steps": 1}}
    changed = {"model": {"hidden": 8}, "training": {"lr": 1e-3, "accumulate_steps": 2}}
    assert job_identity("tfn", at_old, 1, "data") == job_identity("tfn", before, 1, "data")
    assert job_identity("tfn", changed, 1, "data") != job_identity("tfn", before, 1, "data")


REPO = Path(__file__).resolve().parents[1]
PUBLISHED_STUDIES = sorted((REPO / "studies").glob("*.yaml"))


def _named_cue_files(study_file: Path) -> set[str]:
    return set(re.findall(r"model\.cues=([^,\]\s]+)", study_file.read_text()))


@pytest.mark.parametrize("study_file", PUBLISHED_STUDIES, ids=lambda path: path.stem)
def test_every_published_study_file_loads(study_file, tmp_path, monkeypatch):
    """A typo in a study of `studies/` fails here, not hours into its run. The cue files its
    entries name (made once by the commands its header gives) are stood in for by empty files."""
    monkeypatch.chdir(tmp_path)
    for name in _named_cue_files(study_file):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    study = load_study(str(study_file))
    assert study.models and study.seeds


PUBLISHED_RECORDS = sorted((REPO / "benchmarks" / "results" / "studies").glob("*/records.jsonl"))


def _msakit(*args: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


def _python(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / script), *args], check=True)


# How each cue file a published study names is made (its header gives the same commands). The files
# enter the jobs' identities by content, so they are made here, not stood in for.
CUE_FILE_COMMANDS = {
    "runs/synthetic_cues.jsonl": (_msakit, "cues", "synthetic", "--output", "runs/synthetic_cues.jsonl"),
    "runs/synthetic-raw_cues.jsonl": (_msakit, "cues", "synthetic-raw", "--output",
                                      "runs/synthetic-raw_cues.jsonl"),
    "runs/mmslf_oracle_cues/oracle.jsonl": (_python, "benchmarks/mmslf_oracle_cues.py", "--cues-only",
                                            "--runs-dir", "runs/mmslf_oracle_cues"),
}


def _make_cue_files(study_file: Path) -> None:
    """The cue files `study_file`'s entries name, made in the working directory."""
    for name in sorted(_named_cue_files(study_file)):
        assert name in CUE_FILE_COMMANDS, f"{study_file.name} names {name}: say how it is made"
        run, *args = CUE_FILE_COMMANDS[name]
        run(*args)


@pytest.mark.parametrize("records", PUBLISHED_RECORDS, ids=lambda path: path.parent.name)
def test_a_published_leaderboard_regenerates_from_its_records(records, tmp_path, monkeypatch):
    """The records published beside a leaderboard are still the jobs its study plans with today's
    code and data, and the report of them is the published one. A failure here means a published
    number no longer regenerates: rerun the study (its header has the commands) and publish again."""
    study_file = REPO / "studies" / f"{records.parent.name}.yaml"
    monkeypatch.chdir(tmp_path)
    _make_cue_files(study_file)
    store = str(tmp_path / "study.db")
    done = import_records(study_file, records, store=store)
    assert (done["foreign"], done["unsearched"]) == (0, [])
    made = json.loads(Path(report_study(study_file, store=store, output=tmp_path / "report")["output"],
                           "leaderboard.json").read_text())
    published = json.loads((records.parent / "leaderboard.json").read_text())
    compared = ("jobs", "records", "datasets", "domain_generalization", "reproduce")
    assert {key: made.get(key) for key in compared} == {key: published.get(key) for key in compared}
