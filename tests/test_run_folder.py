"""Runs cannot mix: data is identified by its content, and a run folder describes one run."""

from __future__ import annotations

import json

import pytest

from msakit import api
from msakit.data import generate_synthetic, save_mmsa
from msakit.errors import MsakitError
from msakit.training import runs
from msakit.training.settings import ADDED_SETTINGS
from resume_check import Interrupted, interrupt_training

SIZES = {"n_train": 24, "n_valid": 8, "n_test": 8, "text_len": 8, "audio_len": 10, "vision_len": 10,
         "text_dim": 16}
FAST = ["model.text_source=features", "model.hidden=8", "training.state_every=1"]


def _train(data, output, **options):
    return api.train("text_only", str(data), seeds=[1, 2], epochs=2, overrides=FAST, output=output,
                     progress=False, **options)


def test_the_fingerprint_follows_the_content_not_the_file(tmp_path):
    raw = generate_synthetic(seed=0, **SIZES)
    first = api.load_dataset(str(save_mmsa(raw, tmp_path / "a.pkl")))
    second = api.load_dataset(str(save_mmsa(raw, tmp_path / "b.pkl")))
    assert first.fingerprint == second.fingerprint
    raw["test"]["regression_labels"][0] += 0.2
    changed = api.load_dataset(str(save_mmsa(raw, tmp_path / "a.pkl")))
    assert changed.fingerprint != first.fingerprint


def test_resume_refuses_data_whose_labels_changed_under_the_same_path(tmp_path, monkeypatch):
    raw = generate_synthetic(seed=0, **SIZES)
    data = save_mmsa(raw, tmp_path / "data.pkl")
    interrupt_training(monkeypatch, after=3)  # seed 1 finished, seed 2 killed after one epoch
    with pytest.raises(Interrupted):
        _train(data, tmp_path / "run")
    raw["train"]["regression_labels"][5] = -raw["train"]["regression_labels"][5] + 0.2
    save_mmsa(raw, data)
    with pytest.raises(MsakitError, match="content_fingerprint") as info:
        _train(data, tmp_path / "run", resume=True)
    assert "\n" not in str(info.value)


def test_a_folder_holding_a_run_is_refused_replaced_or_continued(tmp_path, monkeypatch):
    raw = generate_synthetic(seed=0, **SIZES)
    data = save_mmsa(raw, tmp_path / "data.pkl")
    out = tmp_path / "run"
    first = _train(data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(MsakitError, match="already holds a run .*--overwrite"):
        api.train("lmf", str(data), seeds=[1], epochs=1, overrides=["model.text_source=features"],
                  output=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing touched"
    # a rerun with --overwrite that is killed never leaves the old results beside new checkpoints
    interrupt_training(monkeypatch, after=1)
    with pytest.raises(Interrupted):
        api.train("lmf", str(data), seeds=[1], epochs=2, output=out, progress=False, overwrite=True,
                  overrides=["model.text_source=features", "training.state_every=1"])
    assert sorted(p.name for p in out.iterdir()) == ["seed-1.state.pt"]
    # ... and it resumes in place
    finished = api.train("lmf", str(data), seeds=[1], epochs=2, output=out, progress=False, resume=True,
                         overrides=["model.text_source=features", "training.state_every=1"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "lmf" == finished["model"] and first["model"] == "text_only"
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "seed-1.pt"]


def test_a_pickles_fingerprint_is_remembered_by_its_size_and_time(tmp_path, monkeypatch):
    from msakit.data import load_mmsa
    from msakit.data.mmsa import fingerprint_cache
    from msakit.data.schema import MultimodalDataset

    path = save_mmsa(generate_synthetic(seed=0, **SIZES), tmp_path / "a.pkl")
    first = load_mmsa(path).fingerprint
    assert json.loads(fingerprint_cache().read_text())[str(path.resolve())]["fingerprint"] == first
    hashed = []
    original = MultimodalDataset.fingerprint.func
    monkeypatch.setattr(MultimodalDataset, "fingerprint", property(lambda d: hashed.append(1) or original(d)))
    assert load_mmsa(path).__dict__["fingerprint"] == first and not hashed  # read back, not hashed
    fingerprint_cache().write_text("{not json")  # a damaged cache costs a hash, nothing else
    monkeypatch.undo()
    assert load_mmsa(path).fingerprint == first


def test_a_run_saved_before_a_setting_existed_resumes_at_its_old_behaviour(tmp_path, monkeypatch):
    """A run written by an msakit without `training.accumulate_steps` (and the other ADDED_SETTINGS)
    is the same run as one with them at the value that trains as it did: it continues, finished
    seeds and the interrupted seed's state alike, and a changed value is still refused."""
    data = save_mmsa(generate_synthetic(seed=0, **SIZES), tmp_path / "data.pkl")
    current = runs.run_meta

    def as_written_before(*args, **kwargs):
        meta = current(*args, **kwargs)
        training = {key: value for key, value in meta["config"]["training"].items()
                    if key not in ADDED_SETTINGS["training"]}
        return {**meta, "config": {**meta["config"], "training": training}}

    monkeypatch.setattr(runs, "run_meta", as_written_before)
    interrupt_training(monkeypatch, after=3)  # seed 1 finished, seed 2 killed after one epoch
    with pytest.raises(Interrupted):
        _train(data, tmp_path / "run")
    monkeypatch.undo()
    trained = interrupt_training(monkeypatch, after=99)
    resumed = _train(data, tmp_path / "run", resume=True)
    assert trained == [2] and [s["seed"] for s in resumed["seeds"]] == [1, 2]
    with pytest.raises(MsakitError, match=r"accumulate_steps: None then, 2 now"):
        api.train("text_only", str(data), seeds=[1], epochs=2, output=tmp_path / "run", progress=False,
                  resume=True, overrides=[*FAST, "training.accumulate_steps=2"])
