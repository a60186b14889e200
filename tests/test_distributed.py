"""Training on several processes: 2 CPU ranks (gloo) started by torchrun once for the module
(`ddp_worker.py` says what they do), checked against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_worker import STEP_BATCH, STEP_SAMPLES, TRAINED, settings, step_data, step_model, two_steps
from msakit import api
from msakit.data import generate_synthetic, save_mmsa, synthetic_dataset
from msakit.data.batching import training_shards
from msakit.errors import MsakitError
from msakit.training.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
DATA = {"n_train": 24, "n_valid": 8, "n_test": 8, "text_len": 8, "audio_len": 10, "vision_len": 10,
        "text_dim": 16}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the 2 ranks wrote; `data.pkl` beside it is what their trainings read."""
    root = tmp_path_factory.mktemp("ddp")
    data = save_mmsa(generate_synthetic(seed=0, **DATA), root / "data.pkl")
    out = root / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(out), str(data)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_ranks_share_each_batch_of_the_single_process_order():
    split = synthetic_dataset(n_train=11, n_valid=2, n_test=2, text_len=3, audio_len=3, vision_len=3,
                              seed=0).train
    alone = [(b.index.tolist(), share) for b, share in
             training_shards(split, 4, torch.Generator().manual_seed(5))]
    ranks = [list(training_shards(split, 4, torch.Generator().manual_seed(5), (rank, 3)))
             for rank in range(3)]
    assert [share for _, share in alone] == [1.0, 1.0, 1.0]
    for step, (whole, _) in enumerate(alone):
        parts = [ranks[rank][step] for rank in range(3)]
        held = [b.index.tolist() for b, share in parts if share > 0]
        assert sum(held, []) == whole
        assert sum(share for _, share in parts) == pytest.approx(1.0)
    # the last batch holds 3 samples, then 3 ranks hold 1 each; with 4 ranks one would sit it out
    last = [list(training_shards(split, 4, torch.Generator().manual_seed(5), (rank, 4)))[-1]
            for rank in range(4)]
    assert [share for _, share in last] == [1 / 3, 1 / 3, 1 / 3, 0.0]
    assert last[3][0].index.tolist() == alone[-1][0][:1]


@pytest.mark.slow
def test_two_ranks_take_the_steps_one_process_takes(two_ranks: Path):
    # batches of 7 of 8 samples: one shared 4 + 3, one of a single sample that rank 1 sits out
    assert (STEP_SAMPLES, STEP_BATCH) == (8, 7)
    ranks, alone = torch.load(two_ranks / "two-steps.pt"), two_steps(step_data())
    before = step_model(step_data()).state_dict()
    assert ranks.keys() == alone.keys()
    assert all(not torch.equal(alone[k], before[k]) for k in alone if k.endswith("weight"))
    for key in alone:
        torch.testing.assert_close(ranks[key], alone[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("model", TRAINED)
def test_a_torchrun_training_leaves_one_checkpoint_and_one_results_file(two_ranks: Path, model: str):
    assert sorted(p.name for p in (two_ranks / model / "straight").iterdir()) == [
        "results.csv", "results.json", "seed-1111.pt"]
    results = json.loads((two_ranks / model / "straight" / "results.json").read_text())
    assert [r["epochs_run"] for r in results["seeds"]] == [2]
    assert results["dataset"]["sizes"] == {"train": 24, "valid": 8, "test": 8}


@pytest.mark.slow
@pytest.mark.parametrize("model", TRAINED)
def test_a_torchrun_training_resumes_as_if_never_interrupted(two_ranks: Path, model: str):
    straight, resumed = (json.loads((two_ranks / model / run / "results.json").read_text())
                         for run in ("straight", "resumed"))
    assert resumed["seeds"] == straight["seeds"]
    ours, theirs = (load_checkpoint(two_ranks / model / run / "seed-1111.pt")[0].state_dict()
                    for run in ("straight", "resumed"))
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_scores_of_a_torchrun_training_are_the_whole_splits(two_ranks: Path):
    # the test metrics rank 0 wrote are those of its checkpoint scored by one process on all 8 clips
    results = json.loads((two_ranks / "mult" / "straight" / "results.json").read_text())
    scored = api.evaluate(str(two_ranks / "mult" / "straight" / "seed-1111.pt"),
                          str(two_ranks.parent / "data.pkl"))
    assert np.allclose([scored["metrics"][k] for k in ("mae", "corr")],
                       [results["seeds"][0]["test"][k] for k in ("mae", "corr")], atol=1e-6)


@pytest.mark.slow
def test_other_commands_are_refused_under_torchrun(two_ranks: Path):
    code, output = (two_ranks / "evaluate.txt").read_text().split("\n", 1)
    assert code == "2" and output.strip().splitlines()[-1].startswith("msakit: error: torchrun started")
    assert "only `msakit train`" in output


@pytest.mark.slow
def test_a_state_of_two_ranks_is_not_resumed_by_one_process(two_ranks: Path, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "seed-1111.state.pt").write_bytes((two_ranks / "mult" / "state-of-2-ranks.pt").read_bytes())
    with pytest.raises(MsakitError, match="2 process"):
        api.train("mult", str(two_ranks.parent / "data.pkl"), epochs=2, output=run, resume=True,
                  progress=False, overrides=settings("mult"))
