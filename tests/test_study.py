"""Studies: the study file's checks, job identity (a rerun executes nothing, a changed setting makes a
new job, a new protocol scores the existing checkpoints), the leaderboard, and a real Ray cluster on
loopback that loses a worker in the middle of a job and still ends with the same records."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from msakit import api
from msakit.cli import cli as main_cli
from msakit.errors import MsakitError
from msakit.study import (
    export_records,
    import_records,
    load_study,
    plan_jobs,
    report_study,
    run_study,
    study_status,
)
from msakit.study.store import CLAIM_STALE_S, ResultStore
from msakit.training.trainer import state_seconds

pytest.importorskip("ray")
pytest.importorskip("sqlalchemy")

RAY = Path(sys.executable).with_name("ray")
# a throwaway cluster on loopback: no token (Ray's token files are per user, shared with any other
# cluster of this user), no usage statistics
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_pickle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.pkl"
    api.write_synthetic(path, n_train=64, n_valid=16, n_test=24, text_len=8, audio_len=12, vision_len=10)
    return path


def write_study(path: Path, data: Path, **changes) -> Path:
    document = {
        "name": "tiny", "datasets": [str(data)],
        "models": ["tfn", {"model": "lmf", "set": ["model.rank=2"]}],
        "seeds": [1, 2], "set": ["training.epochs=2", "model.text_source=features"],
        "evaluate": {"intra": {"rates": [0.0, 0.5]}, "fixed": {"subsets": ["t", "tav"]}},
        **changes,
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"models": []}, "models: expected a non-empty list"),
    ({"models": ["tfn", "tfn"]}, "two models are labelled 'tfn'"),
    ({"evaluate": {"intra": {"rates": ["x"]}}}, "evaluate.intra.rates: expected a non-empty list of floats"),
    ({"evaluate": {"fixed": {"rates": [0.1]}}}, "the fixed protocol takes subsets"),
    ({"evaluate": {"sideways": {}}}, "evaluate: unknown key 'sideways'"),
    ({"resources": {"cpus": -1}}, "resources.cpus: expected a number >= 0"),
    ({"set": "training.epochs=2"}, "set: expected a list of SECTION.KEY=VALUE strings"),
])
def test_a_bad_study_file_is_one_line_naming_the_key(tmp_path, tiny_pickle, change, message):
    path = write_study(tmp_path / "study.yaml", tiny_pickle, **change)
    with pytest.raises(MsakitError, match=message) as caught:
        load_study(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_study_runs_once_reuses_its_records_and_reports(tmp_path, tiny_pickle):
    path = write_study(tmp_path / "study.yaml", tiny_pickle)
    folder = tmp_path / "study"
    first = run_study(path, study_dir=folder, executor="local")
    assert (first["jobs"], first["ran"], first["skipped"], first["failures"]) == (4, 4, 0, [])
    assert run_study(path, study_dir=folder, executor="local")["ran"] == 0  # a rerun executes nothing

    # a changed setting of one model is a new job for that model only
    changed = write_study(tmp_path / "study.yaml", tiny_pickle,
                          models=["tfn", {"model": "lmf", "set": ["model.rank=3"]}])
    assert run_study(changed, study_dir=folder, executor="local")["ran"] == 2

    # a new protocol scores the checkpoints there are, without training them again
    checkpoints = {p: p.stat().st_mtime_ns for p in folder.glob("jobs/*/seed-*.pt")}
    store, ids = ResultStore(folder / "study.db"), [job.id for job in plan_jobs(load_study(changed))]
    trained = {key: (r["label"], r["seconds"]) for key, r in store.records(ids).items()}
    widened = write_study(tmp_path / "study.yaml", tiny_pickle,
                          models=["tfn", {"model": "lmf", "set": ["model.rank=3"]}],
                          evaluate={"intra": {"rates": [0.0, 0.5]}, "fixed": {"subsets": ["t", "tav"]},
                                    "inter": {"rates": [0.3, 0.6]}})
    assert run_study(widened, study_dir=folder, executor="local")["ran"] == 4
    assert {p: p.stat().st_mtime_ns for p in folder.glob("jobs/*/seed-*.pt")} == checkpoints
    # each job keeps the label and seconds of the execution that trained it
    assert {key: (r["label"], r["seconds"]) for key, r in store.records(ids).items()} == trained

    report = report_study(widened, study_dir=folder)
    text = (folder / "report" / "leaderboard.md").read_text()
    assert text == report["markdown"]
    assert "| lmf | 1 2 |" in text and "| tfn | 1 2 |" in text and "inter MAE" in text
    per_seed = text.split("### Per seed")[1].split("###")[0]  # a row per seed, each protocol's mean
    assert all(f"| {model} | {seed} |" in per_seed for model in ("lmf", "tfn") for seed in (1, 2))
    assert "inter MAE" in per_seed and "fixed MAE" in per_seed
    assert f"msakit study run {widened}" in text  # the table names the command that regenerates it
    files = [folder / "report" / name for name in ("leaderboard.md", "leaderboard.html", "leaderboard.json",
                                                   "curves-tiny-intra.png", "curves-tiny-inter.svg",
                                                   "curves-tiny-fixed.svg")]
    made = {path: path.read_bytes() for path in files}
    assert all(made.values())
    assert "<table>" in (folder / "report" / "leaderboard.html").read_text()
    report_study(widened, study_dir=folder)  # the same records make the same bytes, figures included
    assert {path: path.read_bytes() for path in files} == made


def test_records_travel_to_another_store_and_report_the_same(tmp_path, tiny_pickle):
    path = write_study(tmp_path / "study.yaml", tiny_pickle, evaluate={"intra": {"rates": [0.0, 0.5]}})
    run_study(path, study_dir=tmp_path / "a", executor="local")
    records, a, b = tmp_path / "records.jsonl", str(tmp_path / "a"), str(tmp_path / "b")
    cli = CliRunner()
    exported = cli.invoke(main_cli, ["study", "export", str(path), "--dir", a, "-o", str(records)])
    assert exported.exit_code == 0 and "the records of 4 of 4 jobs" in exported.output
    first = records.read_bytes()
    cli.invoke(main_cli, ["study", "export", str(path), "--dir", a, "-o", str(records)])
    assert records.read_bytes() == first  # the same records make the same bytes

    imported = cli.invoke(main_cli, ["study", "import", str(path), str(records), "--dir", b])
    assert imported.exit_code == 0 and "4 imported, 0 already in the store" in imported.output
    assert run_study(path, study_dir=tmp_path / "b", executor="local")["ran"] == 0  # nothing left to train
    reports = [json.loads(Path(report_study(path, study_dir=tmp_path / where)["output"], "leaderboard.json")
                          .read_text()) for where in ("a", "b")]
    assert reports[0]["datasets"] == reports[1]["datasets"] and reports[1]["records"] == 4
    again = cli.invoke(main_cli, ["study", "import", str(path), str(records), "--dir", b])
    assert "0 imported, 4 already in the store" in again.output

    # a setting outside the identity (where TensorBoard logs went) may differ: still the same jobs
    logged = tmp_path / "logged.jsonl"
    logged.write_text("".join(json.dumps({**r, "config": {**r["config"], "training": {
        **r["config"]["training"], "log": "tensorboard"}}}) + "\n"
        for r in map(json.loads, records.read_text().splitlines())))
    assert import_records(path, logged, study_dir=tmp_path / "d")["imported"] == 4

    # a changed setting makes other jobs: lmf's records are not this study's any more, tfn's are
    changed = write_study(tmp_path / "changed.yaml", tiny_pickle, evaluate={"intra": {"rates": [0.0, 0.5]}},
                          models=["tfn", {"model": "lmf", "set": ["model.rank=3"]}])
    assert import_records(changed, records, study_dir=tmp_path / "c") | {"store": None} == {
        "study": "tiny", "store": None, "imported": 2, "already": 0, "foreign": 2, "unsearched": []}


@pytest.fixture(scope="module")
def exported_tfn(tmp_path_factory, tiny_pickle) -> tuple[Path, Path]:
    """A one-model study trained once, and its records exported."""
    folder = tmp_path_factory.mktemp("exported")
    path = write_study(folder / "study.yaml", tiny_pickle, models=["tfn"], evaluate={})
    run_study(path, study_dir=folder / "a", executor="local")
    export_records(path, folder / "records.jsonl", study_dir=folder / "a")
    return path, folder / "records.jsonl"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda lines: [lines[0], "{not json", *lines[1:]], "line 2: not a JSON record"),
    (lambda lines: [lines[0], "[1, 2]"], "line 2: expected a JSON object, got list"),
    (lambda lines: [lines[0], json.dumps({"job": "x", "train": {}})], "line 2: key 'evaluations' missing"),
    (lambda lines: [lines[0], json.dumps({**json.loads(lines[1]), "seed": 7})],
     "line 2: record [0-9a-f]+ does not hold the settings and seed"),
])
def test_a_damaged_records_file_is_one_line_and_imports_nothing(tmp_path, exported_tfn, damage, message):
    path, exported = exported_tfn
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(damage(exported.read_text().splitlines())) + "\n")
    into = ["--dir", str(tmp_path / "b")]
    result = CliRunner().invoke(main_cli, ["study", "import", str(path), str(records), *into])
    assert result.exit_code == 2
    assert re.search(f"{re.escape(str(records))} {message}", result.output), result.output
    assert ResultStore(tmp_path / "b" / "study.db").records(j.id for j in plan_jobs(load_study(path))) == {}
    missing = CliRunner().invoke(main_cli, ["study", "import", str(path), str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "none.jsonl: no such records file" in missing.output


def test_a_job_whose_data_changed_fails_alone(tmp_path, tiny_pickle):
    data = tmp_path / "data.pkl"
    shutil.copy(tiny_pickle, data)
    path = write_study(tmp_path / "study.yaml", data, models=["tfn"], seeds=[1])
    jobs = plan_jobs(load_study(path))
    api.write_synthetic(data, seed=5, n_train=64, n_valid=16, n_test=24, text_len=8, audio_len=12,
                        vision_len=10)
    from msakit.study.runner import run_job

    with pytest.raises(MsakitError, match="changed since the study was planned"):
        run_job(jobs[0], str(tmp_path / "study"))


def test_a_resumed_job_records_the_seconds_of_every_execution(tmp_path, tiny_pickle, monkeypatch):
    """The record of a job killed and resumed counts the training its state file carries, so a
    resumed job does not read as faster than it was."""
    from msakit.study.runner import run_job
    from resume_check import Interrupted, interrupt_training

    path = write_study(tmp_path / "study.yaml", tiny_pickle, models=["tfn"], seeds=[1],
                       set=["training.epochs=4", "training.patience=4", "model.text_source=features"])
    (job,) = plan_jobs(load_study(path))
    interrupt_training(monkeypatch, after=2)
    with pytest.raises(Interrupted):
        run_job(job, str(tmp_path / "study"))
    state_file = tmp_path / "study" / "jobs" / job.id / "seed-1.state.pt"
    assert 0 < state_seconds(state_file) < 600
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "seconds": 5000.0}, state_file)  # as if the killed execution had trained long
    record = run_job(job, str(tmp_path / "study"))
    assert record["train"]["epochs_run"] == 4
    assert 5000 < record["seconds"] < 5600


def test_a_claim_is_held_by_one_driver_until_released_or_stale(tmp_path):
    store = ResultStore(tmp_path / "study.db")
    assert store.claim("job-a", "driver-1") is None
    assert store.claim("job-a", "driver-1") is None  # its own claim again (a retried task)
    assert store.claim("job-a", "driver-2").startswith("driver-1 (heartbeat 0 s ago")
    with store.engine.begin() as connection:  # driver-1 died: its heartbeat stopped
        connection.execute(store.claims.update().values(heartbeat=time.time() - CLAIM_STALE_S - 1))
    assert store.claim("job-a", "driver-2") is None
    assert store.claim("job-a", "driver-1") is not None
    with store.holding("job-b", "driver-1") as holder:
        assert holder is None
        with store.holding("job-b", "driver-2") as other:
            assert other.startswith("driver-1")
        assert store.claim("job-b", "driver-2") is not None  # the refused driver took nothing
    # a finished job stays claimed until it is recorded or its driver stops
    assert store.claim("job-b", "driver-2") is not None
    store.release("driver-1")
    assert store.claim("job-b", "driver-2") is None
    with pytest.raises(RuntimeError), store.holding("job-c", "driver-1"):
        raise RuntimeError("the training failed")
    assert store.claim("job-c", "driver-2") is None  # a failed job is free at once
    store.release("driver-2")
    assert all(store.claim(job, "driver-3") is None for job in ("job-a", "job-b", "job-c"))


def test_a_driver_stopping_on_a_store_error_keeps_that_error(tmp_path, monkeypatch, caplog):
    import sqlalchemy

    store = ResultStore(tmp_path / "study.db")

    def unreachable(owner: str, job_id: str | None = None) -> None:
        raise sqlalchemy.exc.OperationalError("DELETE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(store, "release", unreachable)
    store.release_quietly("driver-1")  # logged, not raised over the error that stopped the driver
    assert "stay until they go stale" in caplog.text


def test_a_held_claim_keeps_its_heartbeat_through_a_busy_store(tmp_path, monkeypatch):
    import sqlalchemy

    store = ResultStore(tmp_path / "study.db")
    monkeypatch.setattr("msakit.study.store.HEARTBEAT_S", 0.02)
    renew, calls = store.renew, []

    def busy_once(job_id: str, owner: str) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked"))
        renew(job_id, owner)

    monkeypatch.setattr(store, "renew", busy_once)
    with store.holding("job", "driver-1"):
        with store.engine.begin() as connection:  # as if the claim were ten minutes old
            connection.execute(store.claims.update().values(heartbeat=0.0))
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.claim("job", "driver-2") is not None  # renewed after the failed beat, not stale
    assert len(calls) >= 3


def test_drivers_sharing_a_store_leave_each_others_jobs_alone(tmp_path, tiny_pickle):
    path = write_study(tmp_path / "study.yaml", tiny_pickle, models=["tfn"], seeds=[1, 2])
    folder = tmp_path / "study"
    store = ResultStore(folder / "study.db")
    held, free = plan_jobs(load_study(path))
    assert store.claim(held.id, "other-host:123:abc") is None  # another driver is training it
    first = run_study(path, study_dir=folder, executor="local")
    assert (first["ran"], [e["job"] for e in first["elsewhere"]]) == (1, [held.id])
    assert "held by other-host:123:abc" in first["elsewhere"][0]["why"]
    assert set(store.records([held.id, free.id])) == {free.id}
    (row,) = study_status(path, study_dir=folder)["models"]
    assert (row["jobs"], row["recorded"], row["to_run"]) == (2, 1, 0)
    assert [(job["job"], job["owner"]) for job in row["running"]] == [(held.id, "other-host:123:abc")]
    shown = CliRunner().invoke(main_cli, ["study", "status", str(path), "--dir", str(folder)])
    assert shown.exit_code == 0 and f"seed 1 (job {held.id}): other-host:123:abc" in shown.output

    with store.engine.begin() as connection:  # that driver died: its claim goes stale and is taken over
        connection.execute(store.claims.update().values(heartbeat=time.time() - CLAIM_STALE_S - 1))
    (row,) = study_status(path, study_dir=folder)["models"]
    assert (row["recorded"], row["running"], row["to_run"]) == (1, [], 1)
    second = run_study(path, study_dir=folder, executor="local")
    assert (second["ran"], second["elsewhere"]) == (1, [])
    assert set(store.records([held.id, free.id])) == {held.id, free.id}
    with store.engine.connect() as connection:  # a recorded job holds no claim
        assert connection.execute(store.claims.select()).first() is None

    from msakit.study.runner import run_claimed_job  # recorded by another driver since this one planned

    late = run_claimed_job(held, str(folder), store.url, "late-driver")
    assert late == {"skipped": "recorded by another driver"}


def test_a_search_tunes_on_validation_only_prunes_and_keeps_its_optuna_study(tmp_path, tiny_pickle,
                                                                          monkeypatch):
    import optuna

    from msakit.training.trainer import Trainer

    test_ids = set(api.load_dataset(str(tiny_pickle)).test.ids.tolist())
    scored = []  # every split any training or scoring in the search reads, by its ids
    evaluate = Trainer.evaluate

    def spy(self, split, *args, **kwargs):
        scored.append(set(split.ids.tolist()))
        return evaluate(self, split, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    search = {"models": ["tfn"], "trials": 4, "startup_trials": 1, "sampler_seed": 2,
              "params": {"training.lr": {"choices": [3.0e-3, 1.0e-9]},
                         "model.post_fusion_dropout": {"low": 0.0, "high": 0.3}}}
    path = write_study(tmp_path / "study.yaml", tiny_pickle, models=["tfn"], seeds=[1], search=search,
                       set=["training.epochs=4", "model.text_source=features"], evaluate={})
    from msakit.study.executors import LocalExecutor
    from msakit.study.search import best_settings, load_search, optuna_name, tune

    study = load_study(path)
    store = f"sqlite:///{tmp_path / 'study.db'}"
    before = study_status(path, study_dir=tmp_path, store=store)  # the searched entry's jobs are unknown
    assert (before["models"], before["unsearched"]) == ([], ["tfn"])
    chosen = tune(study, load_search(study), store, LocalExecutor())
    assert scored and not any(ids & test_ids for ids in scored)  # no trial ever saw a test clip

    name = optuna_name(study, study.datasets[0], study.models[0],
                       api.load_dataset(str(tiny_pickle)).fingerprint)
    searched = optuna.load_study(study_name=name, storage=store)
    states = [t.state for t in searched.trials]
    assert len(states) == 4 and optuna.trial.TrialState.PRUNED in states
    assert chosen[("tiny", "tfn")] == best_settings(study, load_search(study), store)[("tiny", "tfn")]
    assert "training.lr=0.003" in chosen[("tiny", "tfn")]

    # the study trains the chosen settings with its seeds and scores test once; a rerun adds no trial
    scored.clear()
    summary = run_study(path, study_dir=tmp_path, store=store, executor="local")
    assert summary["ran"] == 1 and len(optuna.load_study(study_name=name, storage=store).trials) == 4
    record = next(iter(ResultStore(store).records([j.id for j in plan_jobs(study, chosen)]).values()))
    assert record["config"]["training"]["lr"] == 0.003  # the grid trained the setting the search chose
    (row,) = study_status(path, study_dir=tmp_path, store=store)["models"]
    assert (row["model"], row["recorded"], row["to_run"]) == ("tfn", 1, 0)
    assert any(ids == test_ids for ids in scored)  # the final model is scored on test, once


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray head on loopback with one worker CPU, in its own process group: stopping it stops
    this cluster only (`ray stop` would stop every Ray of the user on the machine)."""
    port = _free_port()
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--disable-usage-stats"], env={**os.environ, **RAY_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", head.pid
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    # `ray start` points later `ray.init()`s at this cluster through this file; it is gone now
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return seen


def _job_worker(head: int) -> int | None:
    """A worker of this cluster (a descendant of its head) running a job."""
    found = subprocess.run(["pgrep", "-f", "ray::_with_threads"], capture_output=True,
                           text=True).stdout.split()
    return next((int(pid) for pid in found if head in _ancestors(int(pid))), None)


@pytest.mark.slow
def test_a_study_on_a_ray_cluster_survives_a_killed_worker(tmp_path, tiny_pickle, ray_cluster):
    address, head = ray_cluster
    path = write_study(tmp_path / "study.yaml", tiny_pickle, seeds=[1],
                       set=["training.epochs=40", "training.patience=40", "training.state_every=1",
                            "model.text_source=features"])
    reference = run_study(path, study_dir=tmp_path / "reference", executor="local")
    assert reference["ran"] == 2

    folder = tmp_path / "on-ray"
    command = [sys.executable, "-c", "from msakit.cli import main; main()", "study", "run", str(path),
               "--address", address, "--dir", str(folder)]
    study = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **RAY_ENV})
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and study.poll() is None and time.monotonic() < deadline:
        if any(folder.glob("jobs/*/seed-1.state*.pt")):  # a job is in the middle of its training
            killed = _job_worker(head)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    output, _ = study.communicate(timeout=600)
    assert killed is not None, f"no job was caught in the middle of its training: {output}"
    assert study.returncode == 0, output
    assert "2 jobs, 2 run, 0 already done" in output

    ids = [job.id for job in plan_jobs(load_study(path))]
    expected = ResultStore(tmp_path / "reference" / "study.db").records(ids)
    found = ResultStore(folder / "study.db").records(ids)
    for job in ids:  # the resumed training ends exactly where the uninterrupted one did
        assert found[job]["train"] == expected[job]["train"]
        assert found[job]["evaluations"] == expected[job]["evaluations"]

    again = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **RAY_ENV},
                           timeout=300)
    assert "2 jobs, 0 run, 2 already done" in again.stdout, again.stderr


def test_the_docs_ray_cluster_file_is_one_ray_up_accepts():
    """The cluster file docs/cluster.md shows passes the checks `ray up` runs on it (its defaults
    filled in, then Ray's schema), and a misspelt key does not."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "docs" / "ray-cluster.yaml").read_text())
    prepared = prepare_config(dict(config))
    validate_config(prepared)
    assert prepared["max_workers"] == len(config["provider"]["worker_ips"])
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config({**config, "setup_comands": config["setup_commands"]}))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder` (TFRecord frames of Event protos), as
    TensorBoard shows them: a session START at step P hides what earlier files logged at P or later."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_scalars_follow_the_epochs_and_a_resume(tmp_path, tiny_pickle, monkeypatch):
    from resume_check import Interrupted, interrupt_training

    overrides = ["training.epochs=4", "training.patience=4", "training.log=tensorboard",
                 "model.text_source=features"]
    interrupt_training(monkeypatch, after=2)
    with pytest.raises(Interrupted):
        api.train("tfn", str(tiny_pickle), seeds=[1], overrides=overrides, output=tmp_path, progress=False)
    api.train("tfn", str(tiny_pickle), seeds=[1], overrides=overrides, output=tmp_path, progress=False,
              resume=True)
    scalars = _scalars(tmp_path / "tensorboard" / "seed-1")
    history = json.loads((tmp_path / "results.json").read_text())["seeds"][0]["history"]
    assert [step for step, _ in scalars["main/train_loss"]] == [1, 2, 3, 4]  # no step twice
    assert [v for _, v in scalars["main/valid_mae"]] == pytest.approx([h["valid"]["mae"] for h in history])
    assert {"main/lr_group0", "main/valid_corr"} <= set(scalars)
    with pytest.raises(MsakitError, match="training.log must be one of none, tensorboard"):
        api.train("tfn", str(tiny_pickle), seeds=[1], overrides=["training.log=wandb"], progress=False)


def test_the_report_names_the_warnings_a_seed_recorded(tmp_path, tiny_pickle):
    """A seed whose training warned (a constant model) is named under the robustness table, so
    its row does not read as a result."""
    path = write_study(tmp_path / "study.yaml", tiny_pickle, models=["tfn"], seeds=[1])
    folder = tmp_path / "study"
    run_study(path, study_dir=folder, executor="local")
    store = ResultStore(folder / "study.db")
    (job,) = plan_jobs(load_study(path))
    record = store.records([job.id])[job.id]
    record["train"]["warnings"] = ["the selected model's validation predictions are (nearly) constant"]
    store.save(job, record)
    report_study(path, study_dir=folder)
    table = (folder / "report" / "robustness.md").read_text()
    assert "- tfn, seed 1: the selected model's validation predictions are (nearly) constant" in table
