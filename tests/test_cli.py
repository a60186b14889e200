"""The command line end to end on tiny data: train, evaluate, robustness, compare, and bad input."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from msakit.cli import cli
from msakit.data import generate_synthetic, save_mmsa
from resume_check import Interrupted, interrupt_training

TINY = {"n_train": 40, "n_valid": 12, "n_test": 20, "text_len": 12, "audio_len": 20,
        "vision_len": 16, "text_dim": 24}
FAST = ["--set", "model.text_source=features", "--set", "model.hidden=8", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_pickle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.pkl"
    save_mmsa(generate_synthetic(seed=3, **TINY), path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_pickle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(cli, ["train", "text_only", "--dataset", str(tiny_pickle),
                                      "--epochs", "2", "--seeds", "7 8", "--output", str(out),
                                      *FAST])
    assert result.exit_code == 0, result.output
    return out


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_lists_models_and_datasets():
    code, out = run("models")
    assert code == 0 and all(m in out for m in ("tfn", "lmf", "mult", "text_only"))
    code, out = run("datasets")
    assert code == 0 and all(d in out for d in ("synthetic", "mosi", "sims", "mosi-text"))


def test_train_writes_results_csv_and_checkpoints(trained: Path):
    results = json.loads((trained / "results.json").read_text())
    assert [r["seed"] for r in results["seeds"]] == [7, 8]
    assert set(results["mean"]) == {"valid", "test"} and "mae" in results["mean"]["test"]
    mean_mae = sum(r["test"]["mae"] for r in results["seeds"]) / 2
    assert results["mean"]["test"]["mae"] == pytest.approx(mean_mae)
    assert results["config"]["training"]["epochs"] == 2
    assert results["command"].startswith("msakit train text_only")
    assert "validation" in results["selection"]
    rows = list(csv.DictReader((trained / "results.csv").open()))
    assert [r["seed"] for r in rows] == ["7", "8", "mean", "std"]
    assert {p.name for p in trained.glob("*.pt")} == {"seed-7.pt", "seed-8.pt"}


def test_evaluate_reproduces_the_test_metrics(trained: Path, tiny_pickle: Path):
    code, out = run("evaluate", str(trained / "seed-7.pt"), "--dataset", str(tiny_pickle), "--json")
    assert code == 0, out
    metrics = json.loads(out)["metrics"]
    saved = json.loads((trained / "results.json").read_text())["seeds"][0]["test"]
    assert metrics["mae"] == pytest.approx(saved["mae"], rel=1e-5)


def test_robustness_writes_table_json_csv_and_plot(trained: Path, tiny_pickle: Path, tmp_path):
    code, out = run("robustness", str(trained / "seed-7.pt"), "--dataset", str(tiny_pickle),
                    "--protocol", "intra", "--rates", "0:0.9:0.3", "--output", str(tmp_path))
    assert code == 0, out
    assert "mean" in out and "0.60" in out
    result = json.loads((tmp_path / "robustness.json").read_text())
    assert [r["condition"] for r in result["rows"]] == ["0.00", "0.30", "0.60", "0.90"]
    assert len(list(csv.DictReader((tmp_path / "robustness.csv").open()))) == 5
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_overlays_runs(trained: Path, tiny_pickle: Path, tmp_path):
    for seed in ("7", "8"):
        code, out = run("robustness", str(trained / f"seed-{seed}.pt"), "--dataset",
                        str(tiny_pickle), "--protocol", "fixed", "--subsets", "t,tav",
                        "--output", str(tmp_path / f"s{seed}"))
        assert code == 0, out
    code, out = run("compare", str(tmp_path / "s7"), str(tmp_path / "s8"),
                    "--output", str(tmp_path / "cmp"))
    assert code == 0, out
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"text_only ({tmp_path / 's7'})" in table and f"text_only ({tmp_path / 's8'})" in table
    assert (tmp_path / "cmp" / "compare.png").is_file()


def _one_line_error(code: int, out: str, *needles: str) -> None:
    assert code == 2, out
    lines = [line for line in out.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("msakit: error:"), out
    for needle in needles:
        assert needle in lines[0], out


def test_unknown_model_lists_the_real_ones(tiny_pickle):
    _one_line_error(*run("train", "nope", "--dataset", str(tiny_pickle)), "'nope'", "tfn", "mult")


def test_unknown_setting_is_named(tiny_pickle):
    _one_line_error(*run("train", "tfn", "--dataset", str(tiny_pickle), "--set", "model.wings=2"),
                    "wings")


def test_missing_dataset_file_is_named(tmp_path):
    _one_line_error(*run("train", "tfn", "--dataset", str(tmp_path / "absent.pkl")), "absent.pkl")


def test_checkpoint_on_other_features_is_refused(trained: Path, tmp_path):
    other = tmp_path / "other.pkl"
    save_mmsa(generate_synthetic(seed=3, **{**TINY, "text_dim": 10}), other)
    _one_line_error(*run("evaluate", str(trained / "seed-7.pt"), "--dataset", str(other)),
                    "text width")


@pytest.mark.parametrize(("args", "needle"), [
    (["--protocol", "intra", "--rates", "0.5,1.0"], "1.0"),
    (["--protocol", "fixed", "--subsets", "tx"], "tx"),
])
def test_bad_protocol_arguments(trained: Path, tiny_pickle: Path, args, needle, tmp_path):
    _one_line_error(*run("robustness", str(trained / "seed-7.pt"), "--dataset", str(tiny_pickle),
                         *args, "--output", str(tmp_path)), needle)
    assert not (tmp_path / "robustness.json").exists()


def test_compare_refuses_runs_that_do_not_line_up(trained: Path, tiny_pickle: Path, tmp_path):
    for name, rates in (("a", "0,0.5"), ("b", "0,0.5,0.9")):
        code, out = run("robustness", str(trained / "seed-7.pt"), "--dataset", str(tiny_pickle),
                        "--protocol", "intra", "--rates", rates, "--output", str(tmp_path / name))
        assert code == 0, out
    _one_line_error(*run("compare", str(tmp_path / "a"), str(tmp_path / "b")), "conditions")
    _one_line_error(*run("compare", str(tmp_path / "a"), str(tmp_path / "a")), "twice")


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "lmf", "--seeds", "3 3"], "distinct"),
    (["train", "lmf", "--reproduce"], "reproduce"),
    (["train", "lmf", "--set", "training.batch_size=0"], "training.batch_size"),
    (["evaluate", "CKPT", "--split", "dev"], "dev"),
    (["robustness", "CKPT", "--protocol", "sideways"], "sideways"),
    (["robustness", "CKPT", "--protocol", "fixed", "--rates", "0.5"], "subsets"),
])
def test_bad_options_give_one_line(args, needle, trained: Path, tiny_pickle: Path):
    args = [str(trained / "seed-7.pt") if a == "CKPT" else a for a in args]
    _one_line_error(*run(*args, "--dataset", str(tiny_pickle)), needle)


def test_synthetic_writes_a_pickle_that_train_reads(tmp_path):
    path = tmp_path / "syn.pkl"
    code, out = run("synthetic", str(path), "--seed", "2", "--size", "n_train=30",
                    "--size", "n_valid=10", "--size", "n_test=12", "--size", "audio_len=20",
                    "--size", "vision_len=20", "--size", "text_dim=16")
    assert code == 0, out
    assert "30/10/12" in out
    code, out = run("train", "text_only", "--dataset", str(path), "--epochs", "1",
                    "--output", str(tmp_path / "run"), *FAST)
    assert code == 0, out
    _one_line_error(*run("synthetic", str(path), "--size", "n_trian=3"), "n_trian")
    _one_line_error(*run("synthetic", str(path), "--size", "n_train=many"), "n_train=many")


def test_cues_writes_one_record_per_sample_and_resumes(tiny_pickle: Path, tmp_path):
    output = tmp_path / "cues.jsonl"
    code, out = run("cues", str(tiny_pickle), "--output", str(output), "--no-progress")
    assert code == 0, out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    samples = TINY["n_train"] + TINY["n_valid"] + TINY["n_test"]
    assert len(lines) == len({r["id"] for r in lines}) == samples
    code, out = run("cues", str(tiny_pickle), "--output", str(output), "--no-progress")
    assert code == 0 and output.read_text().count("\n") == len(lines)
    code, out = run("cues", str(tiny_pickle), "--output", str(output), "--model", "gpt-4o-mini")
    assert code == 2 and "offline backend takes no model" in out


def test_dg_between_datasets_writes_the_gap_and_says_what_transfers(tiny_pickle: Path, tmp_path):
    other = tmp_path / "other.pkl"
    save_mmsa(generate_synthetic(seed=4, **{**TINY, "audio_dim": 3}), other)
    out_dir = tmp_path / "dg"
    code, out = run("dg", "text_only", "--sources", str(tiny_pickle), "--target", str(other),
                    "--epochs", "1", "--output", str(out_dir), *FAST)
    assert code == 0, out
    assert "out-of-domain: other" in out and "gap (out - in)" in out
    assert "audio left out: widths differ: 5 (tiny), 3 (other)" in out
    result = json.loads((out_dir / "dg.json").read_text())
    assert result["command"].startswith("msakit dg text_only --sources")
    assert result["task"]["modalities"] == ["text", "vision"]
    assert (out_dir / "dg.csv").is_file() and "| gap (out - in) |" in (out_dir / "dg.md").read_text()
    _one_line_error(*run("dg", "tfn", "--sources", str(tiny_pickle), "--target", str(other),
                         "--output", str(out_dir / "tfn"), *FAST[:2]), "needs audio", "widths differ")
    assert not (out_dir / "tfn").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--target", "PKL"], "source datasets"),
    (["--target", "3", "--dataset", "PKL"], "no domain labels"),
    (["--target", "9", "--dataset", "PKL", "--group-by", "video", "--groups", "2"],
     "unknown target domain '9'"),
    (["--target", "PKL", "--sources", "PKL", "--group-by", "video"], "needs the dataset"),
    (["--target", "1", "--dataset", "PKL", "--target-splits", ","], "--target-splits is empty"),
])
def test_dg_bad_input_gives_one_line(tiny_pickle: Path, args, needle):
    args = [str(tiny_pickle) if a == "PKL" else a for a in args]
    _one_line_error(*run("dg", "lmf", *args, *FAST[:2]), needle)


def test_synthetic_writes_domains_with_a_shift(tmp_path):
    import pickle

    path = tmp_path / "dg.pkl"
    code, out = run("synthetic", str(path), "--size", "n_train=100", "--size", "n_valid=60",
                    "--size", "n_test=60", "--size", "text_dim=8", "--size", "domains=2",
                    "--size", "domain_shift=0.5")
    assert code == 0, out
    with path.open("rb") as handle:
        raw = pickle.load(handle)
    assert set(raw["valid"]["domains"].tolist()) == {0, 1}
    _one_line_error(*run("synthetic", str(path), "--size", "domain_shift=lots"), "domain_shift=lots")


def test_scoring_can_change_test_time_settings_but_not_weights_or_training(trained: Path, tiny_pickle: Path):
    checkpoint = str(trained / "seed-7.pt")
    code, out = run("evaluate", checkpoint, "--dataset", str(tiny_pickle), "--json",
                    "--set", "model.hidden=8")
    assert code == 0, out
    assert json.loads(out)["overrides"] == ["model.hidden=8"]
    code, out = run("evaluate", checkpoint, "--dataset", str(tiny_pickle), "--set", "model.hidden=16")
    assert code == 2 and "weights do not fit" in out and len(out.strip().splitlines()) == 1
    code, out = run("robustness", checkpoint, "--dataset", str(tiny_pickle), "--protocol", "intra",
                    "--set", "training.lr=0.1")
    assert code == 2 and "not training.lr" in out
    code, out = run("evaluate", checkpoint, "--dataset", str(tiny_pickle), "--set", "model.no_such=1")
    assert code == 2 and "no_such" in out


def test_an_interrupted_train_resumes_with_the_seeds_it_finished(tiny_pickle: Path, tmp_path, monkeypatch,
                                                                   caplog):
    # the state is written every epoch so the resumed run continues exactly where the kill was
    args = ["train", "text_only", "--dataset", str(tiny_pickle), "--epochs", "3", "--seeds", "7 8", *FAST,
            "--set", "training.state_every=1"]
    code, out = run(*args, "--output", str(tmp_path / "straight"))
    assert code == 0, out
    epochs = interrupt_training(monkeypatch, after=4)  # seed 7 trained its 3 epochs, seed 8 one: a kill
    out_dir = tmp_path / "resumed"
    result = CliRunner().invoke(cli, [*args, "--output", str(out_dir)])
    assert isinstance(result.exception, Interrupted)
    assert {p.name for p in out_dir.iterdir()} == {"seed-7.pt", "seed-8.state.pt"}
    epochs.clear()
    with caplog.at_level(logging.INFO, logger="msakit.training.trainer"):
        code, out = run(*args, "--output", str(out_dir), "--resume")
    assert code == 0, out
    assert "seed-8.state.pt: stage main, 1 epoch(s) done" in caplog.text
    assert epochs == [2, 3], "seed 7 read back, seed 8 from its epoch 2"
    assert {p.name for p in out_dir.iterdir()} == {"seed-7.pt", "seed-8.pt", "results.json", "results.csv"}
    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text())
                         for d in ("straight", "resumed"))
    assert resumed["seeds"] == straight["seeds"] and resumed["mean"] == straight["mean"]
    code, out = run(*args, "--set", "model.hidden=6", "--output", str(out_dir), "--resume")
    _one_line_error(code, out, "model.hidden")
    assert "seed-7.pt" in out and "other settings" in out
