"""The domain generalization protocol: disjoint, deterministic domain splits, what transfers between
datasets, and a whole run on tiny synthetic domains."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from msakit import api
from msakit.data import synthetic_dataset
from msakit.data.domains import (
    assign_groups,
    check_model,
    dataset_task,
    group_task,
    transfer,
    video_ids,
)
from msakit.data.schema import SPLITS, MultimodalDataset, concat_splits
from msakit.errors import MsakitError
from resume_check import Interrupted, interrupt_training

SIZES = {"n_train": 150, "n_valid": 90, "n_test": 90, "text_len": 12, "audio_len": 16,
         "vision_len": 14, "text_dim": 8}
FAST = ["model.text_source=features"]


@pytest.fixture(scope="module")
def domains_data() -> MultimodalDataset:
    return synthetic_dataset(**SIZES, domains=3, seed=0)


def _ids(split) -> set[str]:
    return set(map(str, split.ids))


def _check_disjoint(task) -> None:
    parts = [_ids(task.data.train), _ids(task.data.valid), _ids(task.data.test), _ids(task.target)]
    assert sum(map(len, parts)) == len(set().union(*parts))  # no sample in two parts
    assert all(parts)


def test_group_split_is_disjoint_complete_and_keeps_each_samples_split(domains_data):
    task = group_task(domains_data, "2")
    _check_disjoint(task)
    everything = set().union(*(_ids(domains_data.split(s)) for s in SPLITS))
    used = _ids(task.data.train) | _ids(task.data.valid) | _ids(task.data.test) | _ids(task.target)
    assert used == everything
    for split in SPLITS:
        assert _ids(task.data.split(split)) <= _ids(domains_data.split(split))
        assert set(task.data.split(split).domains.tolist()) == {0, 1}
    assert set(task.target.domains.tolist()) == {2}
    original = {str(i): d for s in SPLITS
                for i, d in zip(domains_data.split(s).ids, domains_data.split(s).domains, strict=True)}
    assert all(original[str(i)] == 2 for i in task.target.ids)
    assert task.sources == ["0", "1"] and task.modalities == ("text", "audio", "vision")


def test_target_splits_and_chosen_sources(domains_data):
    task = group_task(domains_data, "0", sources=["2"], target_splits=["test"])
    assert set(task.data.train.domains.tolist()) == {2}
    assert _ids(task.target) <= _ids(domains_data.test)
    described = {d["name"]: d for d in task.describe()["domains"]}
    assert described["1"]["role"] == "unused" and described["2"]["role"] == "source"
    assert described["0"]["samples"] == {"target": len(task.target)}


@pytest.mark.parametrize("by", ["video", "cluster"])
def test_video_and_cluster_groups_are_seeded_and_never_split_a_video(domains_data, by):
    first = group_task(domains_data, "1", by=by, n_groups=3, seed=4)
    again = group_task(domains_data, "1", by=by, n_groups=3, seed=4)
    for a, b in ((first.data.train, again.data.train), (first.target, again.target)):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.domains, b.domains)
    _check_disjoint(first)
    source_videos = set(video_ids(concat_splits([first.data.train, first.data.valid, first.data.test]).ids))
    assert not source_videos & set(video_ids(first.target.ids))
    if by == "video":
        other = [group_task(domains_data, "1", by=by, n_groups=3, seed=s).target.ids for s in (5, 6)]
        assert any(list(o) != list(first.target.ids) for o in other)


def test_clusters_find_the_shifted_synthetic_domains(domains_data):
    groups, names = assign_groups(domains_data, "cluster", n_groups=3, seed=0)
    assert names == ["0", "1", "2"]
    for split in SPLITS:
        assert adjusted_rand_score(domains_data.split(split).domains, groups[split]) == 1.0


def test_groups_from_a_csv_column(domains_data, tmp_path):
    videos = sorted(set(video_ids(concat_splits([domains_data.split(s) for s in SPLITS]).ids)))
    path = tmp_path / "speakers.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "speaker"])
        writer.writerows([v, "alice" if i % 2 else "bob"] for i, v in enumerate(videos))
    task = group_task(domains_data, "alice", by=f"{path}:speaker")
    assert task.domain_names == ["alice", "bob"] and task.sources == ["bob"]
    alice = {v for i, v in enumerate(videos) if i % 2}
    assert set(video_ids(task.target.ids)) == alice
    _check_disjoint(task)
    with path.open("w", newline="") as handle:
        handle.write(f"video_id,speaker\n{videos[0]},alice\n")
    with pytest.raises(MsakitError, match="no 'speaker' for"):
        group_task(domains_data, "alice", by=f"{path}:speaker")


def test_video_ids_of_the_id_layouts():
    ids = np.array(["abc$_$3", "Oz06ZWiO20M_6", "a_b_c_12", "plain"], dtype=object)
    assert list(video_ids(ids)) == ["abc", "Oz06ZWiO20M", "a_b_c", "plain"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"target": "7"}, "unknown target domain '7'.*0, 1, 2"),
    ({"target": "1", "sources": ["1", "2"]}, "both a source and the target"),
    ({"target": "1", "sources": ["9"]}, "unknown source domain '9'"),
    ({"target": "1", "by": "sideways"}, "unknown grouping 'sideways'"),
    ({"target": "1", "by": "video"}, "number of groups"),
    ({"target": "1", "by": "video", "n_groups": 999}, "fewer than the 999 groups"),
    ({"target": "1", "by": "nowhere.csv:speaker"}, "nowhere.csv is not a file"),
    ({"target": "1", "target_splits": ["dev"]}, "target splits"),
])
def test_bad_groupings_are_user_errors(domains_data, kwargs, needle):
    with pytest.raises(MsakitError, match=needle):
        group_task(domains_data, **kwargs)


def test_data_without_domains_must_be_grouped_another_way():
    data = synthetic_dataset(**SIZES, seed=0)
    with pytest.raises(MsakitError, match="no domain labels; group it by video"):
        group_task(data, "0")


# --- leave-one-dataset-out -------------------------------------------------------------------------
def _dataset(name: str, seed: int, family: str = "synthetic", **sizes: int) -> MultimodalDataset:
    return replace(synthetic_dataset(**{**SIZES, "n_train": 40, "n_valid": 12, "n_test": 20, **sizes},
                                     seed=seed), name=name, family=family)


def test_leave_one_dataset_out_keeps_what_transfers_and_pads_only_time():
    a = _dataset("a", 1)
    b = _dataset("b", 2, audio_dim=7, audio_len=30, text_len=20)
    target = _dataset("c", 3, vision_len=20)
    task = dataset_task([a, b], target)
    arrays = task.arrays
    assert not arrays["audio"]["used"] and "widths differ: 5 (a), 7 (b), 5 (c)" in arrays["audio"]["reason"]
    assert arrays["vision"]["used"] and arrays["text"]["used"] and arrays["text_bert"]["used"]
    assert task.modalities == ("text", "vision")
    train = task.data.train
    assert train.audio is None and train.audio_lengths is None
    assert train.vision.shape[1:] == (20, 20) and train.text_bert.shape[1:] == (3, 20)
    np.testing.assert_array_equal(train.vision_lengths[:40], a.train.vision_lengths)  # real lengths kept
    assert (train.vision[:40, 14:] == 0).all() and (train.text_bert[:40, :, 12:] == 0).all()
    assert len(train) == 80 and len(task.data.valid) == 24 and len(task.data.test) == 40
    assert len(task.target) == 72 and set(task.target.domains.tolist()) == {2}
    assert str(train.ids[0]).startswith("a/") and str(train.ids[-1]).startswith("b/")
    assert list(train.domains[:40]) == [0] * 40 and list(train.domains[40:]) == [1] * 40
    _check_disjoint(task)
    again = dataset_task([a, b], target)
    np.testing.assert_array_equal(again.data.valid.ids, task.data.valid.ids)


def test_other_vocabularies_and_encoders_do_not_transfer_and_labels_take_the_targets_scale():
    mosi = _dataset("mosi", 1, family="mosi")
    sims = _dataset("sims", 2, family="sims")
    arrays = transfer([mosi, sims])
    assert "bert-base-uncased (mosi), bert-base-chinese (sims)" in arrays["text_bert"]["reason"]
    assert not arrays["text"]["used"] and "different encoders" in arrays["text"]["reason"]
    assert arrays["audio"]["used"] and "only evidence" in arrays["audio"]["reason"]
    task = dataset_task([mosi], sims)
    assert task.modalities == ("audio", "vision") and task.data.metric_family == "sims"
    np.testing.assert_allclose(task.data.train.labels, mosi.train.labels / 3, rtol=1e-6)
    np.testing.assert_allclose(task.target.labels[:40], sims.train.labels)
    assert any("multiplied by 0.333333" in note for note in task.notes)
    with pytest.raises(MsakitError, match=r"'tfn' needs text, which .*vocabularies"):
        check_model(task, "tfn", ("text", "audio", "vision"), "features")


def test_extracted_features_transfer_only_with_the_same_settings():
    config = {"text": {"encoder": "minilm", "max_tokens": 50, "features": True},
              "acoustic": {"backend": "opensmile", "feature_set": "eGeMAPSv02", "pool": 4, "max_frames": 750},
              "visual": {"fps": 10.0, "max_frames": 300}}
    names = {"audio": [f"a{i}" for i in range(5)], "vision": [f"v{i}" for i in range(20)]}

    def extracted(name: str, seed: int, **changes: dict) -> MultimodalDataset:
        settings = {section: {**values, **changes.get(section, {})} for section, values in config.items()}
        return replace(_dataset(name, seed), features={"config": settings, "names": names})

    same = transfer([extracted("a", 1), extracted("b", 2, visual={"max_frames": 100})])
    assert all(d["used"] for d in same.values()), same  # a length setting changes no feature
    other = transfer([extracted("a", 1), extracted("b", 2, acoustic={"feature_set": "ComParE_2016"})])
    assert not other["audio"]["used"] and "acoustic.feature_set" in other["audio"]["reason"]
    assert other["vision"]["used"] and other["text_bert"]["used"]
    mixed = transfer([extracted("a", 1), _dataset("mmsa", 2)])
    assert not mixed["audio"]["used"] and "different extractors" in mixed["audio"]["reason"]


def test_nothing_in_common_and_names_twice_are_user_errors():
    mosi = _dataset("mosi", 1, family="mosi", audio_dim=3, vision_dim=4)
    sims = _dataset("sims", 2, family="sims")
    with pytest.raises(MsakitError, match="no modality transfers between mosi, sims"):
        dataset_task([mosi], sims)
    with pytest.raises(MsakitError, match="'mosi' is given twice"):
        dataset_task([mosi], mosi)


def test_models_are_told_what_does_not_transfer(domains_data):
    task = dataset_task([_dataset("a", 1)], _dataset("b", 2, audio_dim=3))
    with pytest.raises(MsakitError, match=r"'tfn' needs audio, .*widths differ"):
        check_model(task, "tfn", ("text", "audio", "vision"), "features")
    check_model(task, "text_only", ("text",), "encoder")
    text_ids_only = replace(task, arrays={**task.arrays, "text": {"used": False, "reason": "r"}})
    with pytest.raises(MsakitError, match="text_source=encoder"):
        check_model(text_ids_only, "text_only", ("text",), "features")


# --- a whole run ---------------------------------------------------------------------------------
def test_dg_run_scores_in_domain_out_of_domain_and_gap(domains_data, tmp_path):
    result = api.dg("tfn", "2", dataset=domains_data, seeds=[3, 4], epochs=2, overrides=FAST,
                    output=tmp_path, progress=False, command="msakit dg tfn ...")
    run = result["seeds"][0]
    for key, value in run["gap"].items():
        assert value == pytest.approx(run["out_of_domain"][key] - run["in_domain"][key])
    assert set(run["per_domain"]) == {"0", "1", "2"} and run["per_domain"]["2"] == run["out_of_domain"]
    assert result["mean"]["gap"]["mae"] == pytest.approx(
        np.mean([r["gap"]["mae"] for r in result["seeds"]]))
    assert result["task"]["sizes"]["target"] == sum(int((domains_data.split(s).domains == 2).sum())
                                                    for s in SPLITS)
    assert "SOURCE" in result["selection"]
    saved = json.loads((tmp_path / "dg.json").read_text())
    assert saved["task"]["target"] == "2" and saved["model"] == "tfn"
    rows = list(csv.DictReader((tmp_path / "dg.csv").open()))
    assert [(r["seed"], r["part"]) for r in rows[:3]] == [("3", "in_domain"), ("3", "out_of_domain"),
                                                         ("3", "gap")]
    assert {r["part"] for r in rows} >= {"domain 0", "domain 2"}
    table = (tmp_path / "dg.md").read_text()
    assert "out-of-domain: 2" in table and "gap (out - in)" in table and "msakit dg tfn ..." in table


def test_dg_refuses_a_model_that_needs_a_left_out_modality(tmp_path):
    with pytest.raises(MsakitError, match="needs audio"):
        api.dg("tfn", _dataset("b", 2, audio_dim=3), sources=[_dataset("a", 1)], epochs=1,
               overrides=FAST, progress=False)
    with pytest.raises(MsakitError, match="needs the dataset"):
        api.dg("tfn", "x", sources=["y"], group_by="video")


def test_an_interrupted_dg_run_resumes_to_the_same_numbers(domains_data, tmp_path, monkeypatch):
    options = dict(dataset=domains_data, seeds=[3, 4], epochs=2, progress=False,
                   overrides=[*FAST, "training.state_every=1"])  # resumes exactly where killed
    straight = api.dg("tfn", "2", output=tmp_path / "straight", **options)
    epochs = interrupt_training(monkeypatch, after=3)  # seed 3 done, seed 4 after its first epoch
    with pytest.raises(Interrupted):
        api.dg("tfn", "2", output=tmp_path / "resumed", **options)
    epochs.clear()
    resumed = api.dg("tfn", "2", output=tmp_path / "resumed", resume=True, **options)
    assert epochs == [2]
    assert resumed["seeds"] == straight["seeds"] and resumed["mean"] == straight["mean"]
    assert {p.name for p in (tmp_path / "resumed").glob("*.pt")} == {"seed-3.pt", "seed-4.pt"}
    with pytest.raises(MsakitError, match=r"seed-3.pt .*other settings \(dataset.name: .*0\+1->2.*0\+2->1"):
        api.dg("tfn", "1", output=tmp_path / "resumed", resume=True, **options)
