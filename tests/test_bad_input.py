"""Bad input as a careless or hostile user gives it, against the real `msakit` command.

Each case of CASES writes nothing of its own: it runs `python -m msakit.cli` in a folder holding a
finished run (`run/`) and asserts exit code 2, exactly one stderr line `msakit: error: ...` that
names the file, key or value, no traceback, and every file of the folder byte-identical afterwards
(nothing new either). The subprocesses run side by side (each spends ~3 s importing); the checks
that do not need the command's own error handling run in-process.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from msakit import api, cli
from msakit.data import generate_synthetic, save_mmsa
from msakit.data.mmsa import dataset_from_raw
from msakit.errors import MsakitError
from msakit.fileio import atomic_write_bytes, check_output
from msakit.training.checkpoint import FORMAT

SIZES = {"n_train": 12, "n_valid": 6, "n_test": 6, "text_len": 8, "audio_len": 6, "vision_len": 5,
         "text_dim": 8, "audio_dim": 3, "vision_dim": 4}
FAST = ["--set", "model.text_source=features", "--set", "model.hidden=8", "--no-progress"]


def tiny_raw() -> dict:
    return generate_synthetic(seed=5, **SIZES)


def _no_audio_frames(raw: dict) -> None:
    for split in ("train", "valid", "test"):
        raw[split]["audio"] = raw[split]["audio"][:, :0]


def _no_audio_dims(raw: dict) -> None:
    for split in ("train", "valid", "test"):
        raw[split]["audio"] = raw[split]["audio"][:, :, :0]


def _set(split: str, key: str, index: tuple | int, value: object) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        raw[split][key] = raw[split][key].copy()
        raw[split][key][index] = value
    return change


# file name -> how a good pickle is spoilt
BAD_PICKLES: dict[str, Callable[[dict], None]] = {
    "labels.pkl": _set("test", "regression_labels", 0, 1000.0),
    "repeated.pkl": _set("train", "id", 1, "syn0000$_$1"),
    "leak.pkl": _set("test", "id", 0, "syn0000$_$1"),
    "length0.pkl": _set("train", "audio_lengths", 0, 0),
    "length-3.pkl": _set("valid", "vision_lengths", 2, -3),
    "length10000.pkl": _set("train", "audio_lengths", 3, 10_000),
    "frames0.pkl": _no_audio_frames,
    "dims0.pkl": _no_audio_dims,
    "vocabulary.pkl": _set("valid", "text_bert", (0, 0, 1), 999_999),
}


class Evil:
    """Runs a shell command when unpickled (what a hostile dataset pickle does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The bad files, a good pickle and one tiny trained checkpoint (`ckpt/seed-1111.pt`)."""
    folder = tmp_path_factory.mktemp("inputs")
    save_mmsa(tiny_raw(), folder / "ok.pkl")
    for name, spoil in BAD_PICKLES.items():
        raw = tiny_raw()
        spoil(raw)
        save_mmsa(raw, folder / name)
    (folder / "evil.pkl").write_bytes(__import__("pickle").dumps(Evil(f"touch {folder / 'pwned'}")))
    (folder / "garbage.pkl").write_bytes(b"\x80\x05not a pickle at all")
    (folder / "repeated.csv").write_text("id,text,label,mode\na_1,good,1.0,train\nb_1,bad,-1.0,valid\n"
                                         "c_1,fine,0.5,test\na_1,again,2.0,test\n")
    torch.save({"format": FORMAT, "model_name": "text_only", "dims": {}}, folder / "damaged.pt")
    api.train("text_only", str(folder / "ok.pkl"), epochs=1, output=folder / "ckpt",
              overrides=["model.text_source=features", "model.hidden=8"], progress=False)
    return folder


# name -> (arguments, with {data} for the inputs folder; what the one error line must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "labels outside the family's range": (
        ["train", "text_only", "--dataset", "{data}/labels.pkl", "--output", "run"],
        ["labels.pkl", "split 'test'", "'regression_labels'", "value 1000", "data.label_range"]),
    "labels outside the range at scoring": (
        ["evaluate", "{data}/ckpt/seed-1111.pt", "--dataset", "{data}/labels.pkl"],
        ["labels.pkl", "'regression_labels'", "value 1000"]),
    "a repeated id within a split": (
        ["train", "text_only", "--dataset", "{data}/repeated.pkl", "--output", "run"],
        ["repeated.pkl", "split 'train'", "'id'", "syn0000$_$1"]),
    "an id shared by train and test": (
        ["train", "text_only", "--dataset", "{data}/leak.pkl", "--output", "run"],
        ["leak.pkl", "'train' and 'test'", "syn0000$_$1"]),
    "a length of 0": (
        ["train", "text_only", "--dataset", "{data}/length0.pkl", "--output", "run"],
        ["length0.pkl", "'audio_lengths'", "value 0"]),
    "a length of -3": (
        ["train", "text_only", "--dataset", "{data}/length-3.pkl", "--output", "run"],
        ["length-3.pkl", "split 'valid'", "'vision_lengths'", "value -3"]),
    "a length beyond the frames": (
        ["train", "text_only", "--dataset", "{data}/length10000.pkl", "--output", "run"],
        ["length10000.pkl", "'audio_lengths'", "value 10000"]),
    "audio with zero frames": (
        ["train", "text_only", "--dataset", "{data}/frames0.pkl", "--output", "run"],
        ["frames0.pkl", "'audio'", "no frames"]),
    "audio with zero feature dims": (
        ["train", "text_only", "--dataset", "{data}/dims0.pkl", "--output", "run"],
        ["dims0.pkl", "'audio'", "no feature dims"]),
    "token ids outside the encoder's vocabulary": (
        ["train", "text_only", "--dataset", "{data}/vocabulary.pkl", "--output", "run"],
        ["vocabulary.pkl", "split 'valid'", "'text_bert'", "999999", "minilm"]),
    "a label.csv with a repeated id": (
        ["train", "text_only", "--dataset", "{data}/repeated.csv", "--output", "run"],
        ["repeated.csv", "line 5", "'a_1'", "line 2"]),
    "a pickle that runs code": (
        ["train", "text_only", "--dataset", "{data}/evil.pkl", "--output", "run"],
        ["evil.pkl", "refused", "system"]),
    "a pickle that is garbage": (
        ["train", "text_only", "--dataset", "{data}/garbage.pkl", "--output", "run"],
        ["garbage.pkl", "not a readable"]),
    "a checkpoint with the tag but missing keys": (
        ["evaluate", "{data}/damaged.pt", "--dataset", "{data}/ok.pkl"],
        ["damaged.pt", "'model_config'"]),
    "an unknown option": (["train", "text_only", "--foo"], ["msakit train", "--foo"]),
    "a missing argument": (["train"], ["msakit train", "MODEL"]),
    "empty --seeds": (["train", "text_only", "--dataset", "{data}/ok.pkl", "--seeds", "", "--output", "run"],
                      ["--seeds", "empty"]),
    "a seed beyond 64 bits": (
        ["train", "text_only", "--dataset", "{data}/ok.pkl", "--seeds", "99999999999999999999",
         "--output", "run"], ["--seeds", "99999999999999999999"]),
    "empty --subsets": (
        ["robustness", "{data}/ckpt/seed-1111.pt", "--dataset", "{data}/ok.pkl", "--protocol", "fixed",
         "--subsets", "", "--output", "run"], ["--subsets", "empty"]),
    "negative --workers": (["extract", "{data}", "--labels", "{data}/repeated.csv", "--output", "run/x.pkl",
                            "--workers", "-1"], ["--workers", "-1"]),
    "--output that is a file": (
        ["train", "text_only", "--dataset", "{data}/ok.pkl", "--output", "run/results.json"],
        ["run/results.json", "is a file"]),
    "--output below a file": (
        ["robustness", "{data}/ckpt/seed-1111.pt", "--dataset", "{data}/ok.pkl", "--protocol", "intra",
         "--output", "run/results.json/curves"], ["run/results.json", "is a file"]),
    "a bad data.label_range": (
        ["train", "text_only", "--dataset", "{data}/ok.pkl", "--set", "data.label_range=3",
         "--output", "run"], ["data.label_range", "3"]),
}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(inputs: Path, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """Each case run as `python -m msakit.cli -q ARGS` in its own folder holding a finished run:
    the process, and the folder's files before and after."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def one(name: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
        args, _ = CASES[name]
        folder = tmp_path_factory.mktemp("case")
        for source in (inputs / "ckpt").iterdir():  # a finished run that a bad rerun must leave alone
            (folder / "run").mkdir(exist_ok=True)
            (folder / "run" / source.name).write_bytes(source.read_bytes())
        before = _files(folder)
        process = subprocess.run(
            [sys.executable, "-m", "msakit.cli", "-q", *(a.format(data=inputs) for a in args)],
            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        return process, before, _files(folder)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(name: str, outcomes, inputs: Path):
    process, before, after = outcomes[name]
    everything = process.stdout + process.stderr
    assert "Traceback" not in everything, everything
    assert process.returncode == 2, everything
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msakit: error: "), process.stderr
    for needle in CASES[name][1]:
        assert needle in lines[0], (needle, lines[0])
    assert after == before, "the run folder changed"
    assert not (inputs / "pwned").exists(), "the malicious pickle ran its command"


# --- in-process: what needs no subprocess --------------------------------------------------------------


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(monkeypatch, capsys):
    def broken() -> list:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "describe_models", broken)
    monkeypatch.setattr(sys, "argv", ["msakit", "models"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msakit: internal error: ZeroDivisionError: a bug")
    path = Path(lines[0].rsplit("full traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in path.read_text() and "broken" in path.read_text()
    path.unlink()


def test_validation_warnings_are_kept_and_land_in_results(inputs: Path, tmp_path, caplog):
    raw = tiny_raw()
    raw["train"]["vision"] = raw["train"]["vision"].copy()
    raw["train"]["vision"][2] = 0.0  # a clip whose face tracker found nothing
    raw["valid"]["text_bert"] = raw["valid"]["text_bert"].copy()
    raw["valid"]["text_bert"][1, 1] = 0  # a transcript without a token
    raw["test"]["regression_labels"] = raw["test"]["regression_labels"].copy()
    raw["test"]["regression_labels"][0] = 1000.0  # right, on the user's own scale
    path = save_mmsa(raw, tmp_path / "mine.pkl")
    with caplog.at_level("WARNING"):
        run = api.train("text_only", str(path), epochs=1, progress=False, output=tmp_path / "run",
                        overrides=["model.text_source=features", "model.hidden=8",
                                   "data.label_range=-1000,1000"])
    expected = [f"{path}: split 'train', key 'vision': 1 clip(s) whose features are all zeros "
                f"(first: id {raw['train']['id'][2]!r})",
                f"{path}: split 'valid', key 'text_bert': 1 transcript(s) without a token (attention mask "
                f"all 0; first: id {raw['valid']['id'][1]!r})"]
    assert run["warnings"][:2] == expected
    assert caplog.text.count("whose features are all zeros") == 1, "logged once, at load"
    assert run["config"]["data"]["label_range"] == [-1000.0, 1000.0]


def test_clips_with_nothing_present_and_constant_labels_are_warnings():
    raw = tiny_raw()
    for split in ("train", "valid", "test"):
        raw[split]["presence"] = np.ones((len(raw[split]["id"]), 3), dtype=np.int64)
    raw["test"]["presence"][3] = 0
    raw["valid"]["regression_labels"] = np.full(6, 0.5, dtype=np.float32)
    data = dataset_from_raw(raw, source="x.pkl", family=None, name="x")
    assert data.warnings == [
        "x.pkl: split 'valid', key 'regression_labels': every label is 0.5, so correlation and F1 are "
        "undefined",
        f"x.pkl: split 'test', key 'presence': 1 clip(s) with no modality present, scored on zeros "
        f"(first: id {raw['test']['id'][3]!r})"]


def test_a_good_dataset_has_no_warnings():
    assert dataset_from_raw(tiny_raw(), source="x.pkl", family=None, name="x").warnings == []


def test_scoring_takes_the_label_range_the_checkpoint_was_trained_with(inputs: Path, tmp_path):
    run = tmp_path / "run"
    api.train("text_only", str(inputs / "labels.pkl"), epochs=1, output=run, progress=False,
              overrides=["model.text_source=features", "model.hidden=8", "data.label_range=-1000,1000"])
    assert api.evaluate(run / "seed-1111.pt", str(inputs / "labels.pkl"))["metrics"]
    with pytest.raises(MsakitError, match=r"outside \[-3, 3\]"):
        api.evaluate(run / "seed-1111.pt", str(inputs / "labels.pkl"), overrides=["data.label_range=-3,3"])
    with pytest.raises(MsakitError, match="not data.normalize"):
        api.evaluate(run / "seed-1111.pt", str(inputs / "ok.pkl"), overrides=["data.normalize=zscore"])


def test_empty_rates_are_an_error_not_the_default(inputs: Path):
    result = CliRunner().invoke(cli.cli, ["robustness", str(inputs / "ckpt" / "seed-1111.pt"), "--dataset",
                                          str(inputs / "ok.pkl"), "--protocol", "intra", "--rates", ""])
    assert result.exit_code == 2 and "msakit: error: bad rate list ''" in result.output


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail] PytorchStreamWriter failed writing file")])
def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "seed-1.pt"
    target.write_bytes(b"old")

    def fail(handle) -> None:
        handle.write(b"half")
        raise error

    with pytest.raises(MsakitError, match=f"cannot write {target}"):
        atomic_write_bytes(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["seed-1.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_without_write_permission_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(MsakitError, match="is not writable"):
            check_output(locked / "run")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda p: p.pop("state_dict"), "has no 'state_dict'"),
    (lambda p: p.update(model_config=[1]), "has a list as 'model_config'"),
    (lambda p: p.update(dims={"width": 3}), "its 'dims' do not fit"),
    (lambda p: p.update(normalization={"audio": 5}), "its 'normalization' is not a mean and std"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_key(inputs: Path, tmp_path, change, needle):
    payload = torch.load(inputs / "ckpt" / "seed-1111.pt", weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "damaged.pt")
    result = CliRunner().invoke(cli.cli, ["evaluate", str(tmp_path / "damaged.pt"), "--dataset",
                                          str(inputs / "ok.pkl")])
    assert result.exit_code == 2, result.output
    assert f"msakit: error: {tmp_path / 'damaged.pt'} is a damaged checkpoint" in result.output
    assert needle in result.output


@pytest.mark.parametrize("text", ["{not json", '{"model": "tfn"}', "[]"])
def test_a_damaged_robustness_json_is_one_line(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "robustness.json").write_text(text)
    result = CliRunner().invoke(cli.cli, ["compare", str(tmp_path / "run"),
                                          "--output", str(tmp_path / "cmp")])
    assert result.exit_code == 2, result.output
    assert f"msakit: error: {tmp_path / 'run' / 'robustness.json'} is not a robustness.json" in result.output
    assert not (tmp_path / "cmp").exists()
