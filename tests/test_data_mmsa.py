"""The MMSA pickle reader/writer and the dataset catalog."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from msakit.cli import cli
from msakit.data import (
    list_datasets,
    load_dataset,
    load_mmsa,
    make_batch,
    save_mmsa,
)
from msakit.data.mmsa import dataset_from_raw
from msakit.data.schema import SPLITS
from msakit.data.synthetic import generate_synthetic
from msakit.errors import MsakitError

SIZES = {"n_train": 20, "n_valid": 8, "n_test": 10, "text_len": 12, "audio_len": 30,
         "vision_len": 25, "text_dim": 16}
FEATURES = ("text", "audio", "vision")


def tiny_raw(**changes) -> dict:
    return generate_synthetic(**{**SIZES, **changes})


def write(raw, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(raw, f)
    return path


def assert_error(raw, *needles: str) -> None:
    with pytest.raises(MsakitError) as info:
        dataset_from_raw(raw, source="data.pkl", family="mosi", name="t")
    message = str(info.value)
    assert "\n" not in message
    for needle in ("data.pkl", *needles):
        assert needle in message, message


# --- round trip and cleaning ---------------------------------------------------------------


def test_save_then_load_gives_the_generated_arrays(tmp_path):
    raw = tiny_raw()
    path = save_mmsa(raw, tmp_path / "sub" / "unaligned_50.pkl")
    with path.open("rb") as f:
        stored = pickle.load(f)
    for split in SPLITS:
        assert stored[split].keys() == raw[split].keys()
        for key, value in raw[split].items():
            np.testing.assert_array_equal(stored[split][key], value)

    ds = load_mmsa(path)
    for split in SPLITS:
        s, r = ds.split(split), raw[split]
        np.testing.assert_array_equal(s.ids, r["id"])
        np.testing.assert_array_equal(s.raw_text, r["raw_text"])
        np.testing.assert_array_equal(s.labels, r["regression_labels"])
        np.testing.assert_array_equal(s.text_bert, r["text_bert"])
        np.testing.assert_array_equal(s.audio_lengths, r["audio_lengths"])
        np.testing.assert_array_equal(s.vision_lengths, r["vision_lengths"])
        for key in FEATURES:
            expected = np.where(np.isfinite(r[key]), r[key], 0)
            np.testing.assert_array_equal(getattr(s, key), expected)
            assert getattr(s, key).dtype == np.float32
    assert ds.dims.text == 16 and ds.dims.audio_len == 30 and ds.dims.vision == 20


def test_save_is_atomic_and_overwrites(tmp_path):
    target = tmp_path / "data.pkl"
    target.write_bytes(b"old")
    save_mmsa(tiny_raw(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["data.pkl"]  # no temporary file left
    assert len(load_mmsa(target).train) == SIZES["n_train"]


def test_save_that_fails_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "data.pkl"
    save_mmsa(tiny_raw(), target)
    before = target.read_bytes()
    broken = tiny_raw()
    broken["test"]["id"] = lambda: None  # pickle fails after train and valid are written
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_mmsa(broken, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.pkl"]


def test_save_refuses_a_dict_without_splits(tmp_path):
    with pytest.raises(MsakitError, match="valid"):
        save_mmsa({"train": {}}, tmp_path / "x.pkl")
    assert not list(tmp_path.iterdir())


def test_nonfinite_features_become_zero_and_are_counted(caplog):
    raw = tiny_raw()
    raw["train"]["vision"][0, 0, 3] = np.nan
    raw["test"]["text"][1, 0, 0] = np.inf
    expected = sum(int((~np.isfinite(raw[s][k])).sum()) for s in SPLITS for k in FEATURES)
    assert expected >= 3  # the generator plants -inf in audio as well
    with caplog.at_level(logging.INFO, logger="msakit.data.mmsa"):
        ds = dataset_from_raw(raw, source="data.pkl", family="mosi", name="t")
    assert ds.replaced_nonfinite == expected
    for split in SPLITS:
        for key in FEATURES:
            assert np.isfinite(getattr(ds.split(split), key)).all()
    assert ds.train.vision[0, 0, 3] == 0 and ds.test.text[1, 0, 0] == 0
    assert f"set {expected} non-finite" in caplog.text


def test_loader_converts_old_and_loose_array_types(tmp_path):
    raw = tiny_raw()
    train = raw["train"]
    n, length = len(train["id"]), train["audio"].shape[1]
    per_sample = np.empty(n, dtype=object)  # old pickles: an object array of per-sample arrays
    for i in range(n):
        per_sample[i] = train["audio"][i].astype(np.float64)
    train["audio"] = per_sample
    train["vision"] = train["vision"].astype(np.float64)
    ids = train["text_bert"]
    train["text_bert"] = ids.astype(np.float32)
    train["regression_labels"] = train["regression_labels"].astype(np.float64)[:, None]
    train["id"] = np.array([i.encode() for i in train["id"]])
    ds = load_mmsa(write(raw, tmp_path / "old.pkl"))
    assert ds.train.audio.dtype == np.float32 and ds.train.audio.shape == (n, length, 5)
    assert ds.train.vision.dtype == np.float32
    assert ds.train.text_bert.dtype == np.int64
    np.testing.assert_array_equal(ds.train.text_bert, ids)
    assert ds.train.labels.shape == (n,)
    assert ds.train.ids[0].startswith("syn")


def test_python2_era_strings_load_with_the_latin1_fallback(tmp_path):
    raw = tiny_raw()
    raw["train"]["raw_text"] = raw["train"]["raw_text"].copy()
    raw["train"]["raw_text"][0] = "PLACEHOLDERTEXT"
    data = pickle.dumps(raw, protocol=2)
    # what python2 wrote for a str: raw bytes (here UTF-8 Chinese) under SHORT_BINSTRING
    unicode_op = b"X" + len("PLACEHOLDERTEXT").to_bytes(4, "little") + b"PLACEHOLDERTEXT"
    legacy = "中文".encode()
    assert data.count(unicode_op) == 1
    path = tmp_path / "py2.pkl"
    path.write_bytes(data.replace(unicode_op, b"U" + bytes([len(legacy)]) + legacy))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    ds = load_mmsa(path)
    assert ds.train.raw_text[0] == "中文"
    assert ds.train.raw_text[1] == raw["train"]["raw_text"][1]


def test_split_arrays_are_shared_and_batches_gather_the_right_rows(tmp_path):
    raw = tiny_raw()
    ds = load_mmsa(save_mmsa(raw, tmp_path / "d.pkl"))
    split = ds.valid
    for key in ("ids", "labels", "raw_text", "text", "text_bert", "audio", "vision",
                "audio_lengths", "vision_lengths"):
        value = getattr(split, key)
        assert isinstance(value, np.ndarray) and len(value) == SIZES["n_valid"], key
    for key in FEATURES:
        assert getattr(split, key).dtype == np.float32 and getattr(split, key).ndim == 3
    index = np.array([5, 0, 3])
    batch = make_batch(split, index)
    r = raw["valid"]
    assert batch.ids == [r["id"][i] for i in index]
    np.testing.assert_array_equal(batch.labels.numpy(), r["regression_labels"][index])
    np.testing.assert_array_equal(batch.vision.numpy(), r["vision"][index])
    np.testing.assert_array_equal(batch.text_ids.numpy(), r["text_bert"][index])
    lengths = r["audio_lengths"][index]
    assert batch.audio_mask.sum(1).tolist() == lengths.tolist()


def test_aligned_and_unaligned_shapes(tmp_path):
    aligned = load_mmsa(save_mmsa(tiny_raw(aligned=True), tmp_path / "aligned_50.pkl"))
    unaligned = load_mmsa(save_mmsa(tiny_raw(), tmp_path / "unaligned_50.pkl"))
    L = SIZES["text_len"]
    for split in SPLITS:
        s = aligned.split(split)
        assert s.text.shape[1] == s.audio.shape[1] == s.vision.shape[1] == L
        assert s.audio_lengths is None and s.vision_lengths is None
        u = unaligned.split(split)
        assert u.audio.shape[1] == SIZES["audio_len"] and u.vision.shape[1] == SIZES["vision_len"]
        assert u.audio_lengths is not None and u.vision_lengths is not None


def test_the_family_is_given_or_recognised_from_the_data_never_from_the_file_name(tmp_path):
    raw = tiny_raw(audio_dim=6)
    # a folder named MOSEI does not make a pickle MOSEI: its content is none of the benchmarks
    named = load_mmsa(write(raw, tmp_path / "MOSEI" / "Processed" / "a.pkl"))
    assert (named.family, named.name, named.metric_family) == ("custom", "a", "mosi")
    assert "not recognised" in named.family_source and "--family" in named.family_source
    given = load_mmsa(tmp_path / "MOSEI" / "Processed" / "a.pkl", family="sims", name="mine")
    assert (given.family, given.name, given.metric_family) == ("sims", "mine", "sims")
    # MOSEI's feature widths (COVAREP 74, FACET 35) are recognised whatever the file is called
    mosei_like = load_mmsa(write(tiny_raw(audio_dim=74, vision_dim=35), tmp_path / "x.pkl"))
    assert mosei_like.family == "mosei" and "widths 74 and 35" in mosei_like.family_source
    # SIMS' widths with labels beyond [-1, 1] are not SIMS
    assert load_mmsa(write(tiny_raw(audio_dim=33, vision_dim=709), tmp_path / "y.pkl")).family == "custom"
    # the synthetic default has MOSI's widths
    assert load_mmsa(write(tiny_raw(), tmp_path / "z.pkl")).family == "mosi"


def test_a_catalog_name_or_family_option_chooses_the_family(tmp_path):
    path = write(tiny_raw(), tmp_path / "mine.pkl")
    assert load_dataset("mosei", data_dir=str(path)).family == "mosei"
    chosen = load_dataset(str(path), family="simsv2")
    assert (chosen.family, chosen.family_source) == ("simsv2", "given with --family")
    with pytest.raises(MsakitError, match="unknown dataset family 'imdb'"):
        load_dataset(str(path), family="imdb")


def test_unimodal_labels_are_read(tmp_path):
    raw = tiny_raw()
    for split in SPLITS:
        for m in "TAV":
            raw[split][f"regression_labels_{m}"] = raw[split]["regression_labels"] / 3
    ds = load_mmsa(write(raw, tmp_path / "sims.pkl"))
    assert sorted(ds.test.unimodal_labels) == ["A", "T", "V"]
    batch = make_batch(ds.test, np.arange(3))
    assert batch.unimodal_labels["T"].shape == (3,)


def test_per_sample_presence_reaches_the_batch(tmp_path):
    raw = tiny_raw()
    for split in SPLITS:
        n = len(raw[split]["id"])
        presence = np.ones((n, 3), dtype=np.int64)
        presence[0, 2] = 0  # no face in the first clip
        presence[1, 1] = 0  # a silent one
        raw[split]["presence"] = presence
    ds = load_mmsa(write(raw, tmp_path / "extracted.pkl"))
    batch = make_batch(ds.test, np.arange(3))
    assert batch.presence.tolist() == [[True, True, False], [True, False, True], [True, True, True]]
    assert make_batch(load_mmsa(write(tiny_raw(), tmp_path / "plain.pkl")).test,
                      np.arange(2)).presence.all()


def test_error_bad_presence():
    raw = tiny_raw()
    raw["train"]["presence"] = np.ones((len(raw["train"]["id"]), 2))
    assert_error(raw, "presence", "(samples, 3)")


# --- validation errors -------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    with pytest.raises(MsakitError, match="not found.*nope.pkl"):
        load_mmsa(tmp_path / "nope.pkl")


def test_error_not_a_pickle(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("this is plainly not a pickle\nsecond line\n")
    with pytest.raises(MsakitError) as info:
        load_mmsa(path)
    assert "notes.pkl" in str(info.value) and "pickle" in str(info.value)
    assert "\n" not in str(info.value)


def test_error_folder_instead_of_file(tmp_path):
    with pytest.raises(MsakitError, match="folder"):
        load_mmsa(tmp_path)


def test_error_top_level_not_a_dict(tmp_path):
    with pytest.raises(MsakitError, match="list.*not a dict"):
        load_mmsa(write([1, 2, 3], tmp_path / "list.pkl"))


def test_error_missing_split():
    raw = tiny_raw()
    del raw["valid"]
    assert_error(raw, "'valid' split")


def test_error_split_not_a_dict():
    raw = tiny_raw()
    raw["test"] = [1, 2]
    assert_error(raw, "split 'test'", "not a dict")


def test_error_missing_labels():
    raw = tiny_raw()
    del raw["train"]["regression_labels"]
    assert_error(raw, "split 'train'", "'regression_labels'")


def test_error_missing_ids():
    raw = tiny_raw()
    del raw["test"]["id"]
    assert_error(raw, "split 'test'", "'id'")


def test_error_no_modality():
    raw = tiny_raw()
    for key in ("text", "text_bert", "audio", "vision"):
        del raw["valid"][key]
    assert_error(raw, "split 'valid'", "'audio'", "'vision'")


def test_error_arrays_of_different_lengths():
    raw = tiny_raw()
    raw["train"]["audio"] = raw["train"]["audio"][:-2]
    n = SIZES["n_train"]
    assert_error(raw, "split 'train'", f"'regression_labels' has {n}", f"'audio' has {n - 2}")


def test_error_nan_labels():
    raw = tiny_raw()
    raw["test"]["regression_labels"] = raw["test"]["regression_labels"].copy()
    raw["test"]["regression_labels"][[1, 4]] = np.nan
    assert_error(raw, "split 'test'", "2 NaN")


def test_error_feature_dims_differ_between_splits():
    raw = tiny_raw()
    raw["test"]["vision"] = raw["test"]["vision"][:, :, :7]
    assert_error(raw, "'vision'", "train (25, 20)", "test (25, 7)")


def test_error_modality_only_in_some_splits():
    raw = tiny_raw()
    del raw["valid"]["audio"], raw["valid"]["audio_lengths"]
    assert_error(raw, "'audio'", "missing in valid")


def test_error_features_not_3d():
    raw = tiny_raw()
    raw["train"]["audio"] = raw["train"]["audio"].mean(1)
    assert_error(raw, "split 'train'", "'audio'", "3-D")


def test_error_unknown_family():
    with pytest.raises(MsakitError, match="unknown dataset family 'imdb'"):
        dataset_from_raw(tiny_raw(), source="x", family="imdb", name="x")


# --- catalog -----------------------------------------------------------------------------


def test_catalog_synthetic_with_sizes():
    ds = load_dataset("synthetic", seed=3, **SIZES)
    assert (ds.family, len(ds.train), len(ds.valid), len(ds.test)) == ("synthetic", 20, 8, 10)
    aligned = load_dataset("Synthetic", aligned=True, **SIZES)
    assert aligned.train.audio.shape[1] == SIZES["text_len"]


def test_catalog_rejects_unknown_names_and_misplaced_options(tmp_path):
    with pytest.raises(MsakitError) as info:
        load_dataset("imdb")
    for name in ("synthetic", "mosi", "mosei", "sims", "simsv2", "mosi-text"):
        assert name in str(info.value)
    with pytest.raises(MsakitError, match="only to the synthetic"):
        load_dataset("mosi", data_dir=str(tmp_path), n_train=5)
    with pytest.raises(MsakitError, match="n_trian"):
        load_dataset("synthetic", n_trian=5)
    with pytest.raises(MsakitError, match="needs data_dir"):
        load_dataset("mosei")


@pytest.mark.parametrize(
    ("name", "relative", "aligned"),
    [
        ("mosi", "unaligned_50.pkl", False),
        ("mosi", "MOSI/Processed/unaligned_50.pkl", False),
        ("mosei", "mosei/aligned_50.pkl", True),
        ("sims", "SIMS/Processed/unaligned_39.pkl", False),
        ("simsv2", "SIMSv2/Processed/unaligned.pkl", False),
    ],
)
def test_catalog_finds_pickles_in_mmsa_layouts(tmp_path, name, relative, aligned):
    write(tiny_raw(aligned=aligned), tmp_path / relative)
    ds = load_dataset(name, data_dir=str(tmp_path), aligned=aligned)
    assert (ds.family, ds.name, len(ds.test)) == (name, name, SIZES["n_test"])
    assert ds.source == str(tmp_path / relative)
    direct = load_dataset(name, data_dir=str(tmp_path / relative))
    assert direct.source == str(tmp_path / relative)


def test_catalog_lists_the_paths_it_tried(tmp_path):
    write(tiny_raw(), tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl")
    with pytest.raises(MsakitError) as info:
        load_dataset("mosi", data_dir=str(tmp_path), aligned=True)
    message = str(info.value)
    assert str(tmp_path / "aligned_50.pkl") in message
    assert str(tmp_path / "MOSI" / "Processed" / "aligned_50.pkl") in message
    assert "unaligned" not in message.split("tried:")[1]


def test_catalog_accepts_file_paths(tmp_path):
    pkl = write(tiny_raw(), tmp_path / "anything.pkl")
    assert load_dataset(str(pkl)).source == str(pkl)
    with pytest.raises(MsakitError, match="not found"):
        load_dataset(str(tmp_path / "missing.pkl"))


def test_list_datasets_says_what_each_needs():
    rows = list_datasets()
    assert [r["name"] for r in rows] == ["synthetic", "synthetic-raw", "synthetic-dg", "mosi", "mosei",
                                         "sims", "simsv2", "mosi-text"]
    assert all(r["description"] and r["needs"] for r in rows)


def test_domain_labels_survive_a_pickle_round_trip(tmp_path):
    raw = generate_synthetic(n_train=120, n_valid=90, n_test=90, text_len=4, audio_len=5, vision_len=5,
                             text_dim=8, domains=3, seed=2)
    loaded = load_dataset(str(save_mmsa(raw, tmp_path / "dg.pkl")))
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(loaded.split(split).domains, raw[split]["domains"])


class _Evil:
    """Unpickling this runs a shell command: what a hostile 'dataset' would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    raw = tiny_raw()
    raw["train"]["payload"] = _Evil(marker)
    path = write(raw, tmp_path / "evil.pkl")
    result = CliRunner().invoke(cli, ["train", "tfn", "--dataset", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msakit: error:")
    assert "evil.pkl" in lines[0] and ("posix.system" in lines[0] or "os.system" in lines[0])
    assert not marker.exists()


def test_plain_pickles_of_every_protocol_still_load(tmp_path):
    raw = tiny_raw()
    raw["train"]["extra"] = {"nested": [1, 2.5, "s", b"b", None, True, (1, 2)], "n": np.int64(3)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(raw, protocol=protocol))
        np.testing.assert_array_equal(load_mmsa(path).train.audio,
                                      dataset_from_raw(raw, source="x", family="mosi", name="x").train.audio)
