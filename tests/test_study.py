"""Studies: the study file's checks, job identity (a rerun executes nothing, a changed setting makes a
new job, a new protocol scores the existing checkpoints), the leaderboard, and a real Ray cluster on
loopback that loses a worker in the middle of a job and still ends with the same records."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from msakit import api
from msakit.errors import MsakitError
from msakit.study import load_study, plan_jobs, report_study, run_study
from msakit.study.store import ResultStore

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
    widened = write_study(tmp_path / "study.yaml", tiny_pickle,
                          models=["tfn", {"model": "lmf", "set": ["model.rank=3"]}],
                          evaluate={"intra": {"rates": [0.0, 0.5]}, "fixed": {"subsets": ["t", "tav"]},
                                    "inter": {"rates": [0.3]}})
    assert run_study(widened, study_dir=folder, executor="local")["ran"] == 4
    assert {p: p.stat().st_mtime_ns for p in folder.glob("jobs/*/seed-*.pt")} == checkpoints

    report = report_study(widened, study_dir=folder)
    text = (folder / "report" / "leaderboard.md").read_text()
    assert text == report["markdown"]
    assert "| lmf | 1 2 |" in text and "| tfn | 1 2 |" in text and "inter MAE" in text
    assert f"msakit study run {widened}" in text  # the table names the command that regenerates it
    for name in ("leaderboard.html", "leaderboard.json", "curves-tiny-intra.png", "curves-tiny-inter.svg",
                 "curves-tiny-fixed.svg"):
        assert (folder / "report" / name).stat().st_size > 0
    assert "<table>" in (folder / "report" / "leaderboard.html").read_text()


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray head on loopback with one worker CPU, stopped afterwards."""
    port = _free_port()
    env = {**os.environ, **RAY_ENV}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, env=env, timeout=180, capture_output=True)
    yield f"127.0.0.1:{port}"
    subprocess.run([str(RAY), "stop", "--force"], env=env, timeout=120, capture_output=True)


def _job_worker() -> int | None:
    found = subprocess.run(["pgrep", "-f", "ray::_job_task"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


@pytest.mark.slow
def test_a_study_on_a_ray_cluster_survives_a_killed_worker(tmp_path, tiny_pickle, ray_cluster):
    path = write_study(tmp_path / "study.yaml", tiny_pickle, seeds=[1],
                       set=["training.epochs=40", "training.patience=40", "training.state_every=1",
                            "model.text_source=features"])
    reference = run_study(path, study_dir=tmp_path / "reference", executor="local")
    assert reference["ran"] == 2

    folder = tmp_path / "on-ray"
    command = [sys.executable, "-c", "from msakit.cli import main; main()", "study", "run", str(path),
               "--address", ray_cluster, "--dir", str(folder)]
    study = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **RAY_ENV})
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and study.poll() is None and time.monotonic() < deadline:
        if any(folder.glob("jobs/*/seed-1.state*.pt")):  # a job is in the middle of its training
            killed = _job_worker()
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
