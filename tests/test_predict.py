"""Predict beyond `msakit extract` checkpoints: an MMSA-pickle checkpoint scores transcripts with its
audio and vision dropped, text-only requests with optional frame features, and batch prediction over
folders streamed to a file that a killed run resumes."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from msakit import api
from msakit.cli import cli
from msakit.data.batching import make_batch
from msakit.data.schema import Split
from msakit.data.tokens import load_tokenizer
from msakit.errors import MsakitError
from msakit.inference import Predictor, find_media
from msakit.training.checkpoint import load_checkpoint
from test_features import needs_extra, truncated, write_clip


@pytest.fixture(scope="module")
def pickle_checkpoint(tmp_path_factory, tiny_dataset, tiny_bert) -> Path:
    """TFN trained on the synthetic pickle, reading token ids through the tiny BERT."""
    output = tmp_path_factory.mktemp("pickle-run")
    api.train("tfn", tiny_dataset, epochs=1, output=output, progress=False,
              overrides=["model.text_source=encoder", f"model.text_encoder={tiny_bert}"])
    return output / "seed-1111.pt"


def _by_hand(checkpoint: Path, text: str, tiny_bert: str) -> float:
    """The model on one sample assembled here: the transcript's ids, zero audio and vision frames
    marked absent."""
    model, _ = load_checkpoint(checkpoint)
    dims = model.dims
    encoded = load_tokenizer(tiny_bert)(text, padding="max_length", truncation=True,
                                        max_length=dims.text_len, return_tensors="np")
    ids = np.stack([encoded["input_ids"][0], encoded["attention_mask"][0],
                    encoded["token_type_ids"][0]])[None].astype(np.int64)
    split = Split(ids=np.array(["x"], dtype=object), labels=np.zeros(1, np.float32), text_bert=ids,
                  text=np.zeros((1, dims.text_len, dims.text), np.float32),
                  audio=np.zeros((1, dims.audio_len, dims.audio), np.float32),
                  vision=np.zeros((1, dims.vision_len, dims.vision), np.float32),
                  audio_lengths=np.ones(1, np.int64), vision_lengths=np.ones(1, np.int64),
                  presence=np.array([[True, False, False]]))
    with torch.inference_mode():
        return float(model(make_batch(split, np.zeros(1, np.int64))).pred[0])


def test_a_pickle_checkpoint_scores_a_transcript_with_audio_and_vision_dropped(pickle_checkpoint, tiny_bert):
    predictor = Predictor(pickle_checkpoint)
    assert predictor.reads == ("text",) and predictor.unavailable == ("audio", "vision")
    assert "MMSA pickle" in predictor.notice and "marked missing" in predictor.notice
    text = "a wonderful, moving film"
    result = predictor.predict_text(text)
    assert result["used"] == ["text"] and math.isfinite(result["score"])
    assert result["score"] == pytest.approx(_by_hand(pickle_checkpoint, text, tiny_bert), abs=1e-6)
    card = predictor.card()
    assert card["model"] == "tfn" and card["not_computable"] == ["audio", "vision"]

    # the pickle's own kind of frame features, when a caller has them, are used
    dims = predictor.model.dims
    frames = np.random.default_rng(0).normal(size=(7, dims.audio)).round(3).tolist()
    with_audio = predictor.predict_text(text, {"audio": frames})
    assert with_audio["used"] == ["text", "audio"] and with_audio["score"] != result["score"]


@pytest.mark.parametrize(("features", "message"), [
    ({"smell": [[1.0]]}, "unknown modality 'smell'"),
    ({"audio": [[1.0, 2.0]]}, "features.audio must be frames x 5 numbers, not shape (1, 2)"),
    ({"audio": [[1.0, "x", 0, 0, 0]]}, "features.audio must be a list of frames of numbers"),
    ({"vision": [[float("nan")] * 20]}, "features.vision holds a NaN"),
    ([1, 2], "features must be a mapping"),
])
def test_bad_frame_features_are_one_line_errors(pickle_checkpoint, features, message):
    with pytest.raises(MsakitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Predictor(pickle_checkpoint).predict_text("fine", features)


def test_a_checkpoint_that_reads_precomputed_text_is_refused(tmp_path, tiny_dataset):
    api.train("tfn", tiny_dataset, epochs=1, output=tmp_path, progress=False,
              overrides=["model.text_source=features"])
    with pytest.raises(MsakitError, match="reads precomputed features"):
        Predictor(tmp_path / "seed-1111.pt")


def _clips(folder: Path, count: int) -> list[Path]:
    """Short clips with their transcripts beside them (no speech recognition needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(count):
        clip = write_clip(folder / f"clip{i}.mp4", seconds=0.4, tone=200.0 + 40 * i)
        clip.with_suffix(".txt").write_text(["a great film", "a dull, bad film", "it was fine"][i % 3])
        clips.append(clip)
    return clips


@needs_extra
def test_a_pickle_checkpoint_scores_media_from_its_transcript(tmp_path, pickle_checkpoint):
    clip = _clips(tmp_path, 1)[0]
    result = Predictor(pickle_checkpoint).predict(clip)
    assert result["present"] == {"text": True, "audio": True, "vision": True}  # what the file has
    assert result["used"] == ["text"] and result["transcript_source"] == "file"
    assert "vision: video stream found, not read by this model" in result["notes"]


def test_folders_are_walked_for_media_and_named_files_kept(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.mp4", "d/sub/a.wav", "d/notes.txt", "d/.hidden.json"):
        (tmp_path / name).write_bytes(b"")
    found = find_media([tmp_path / "d", tmp_path / "d" / "b.mp4", tmp_path / "x.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/b.mp4", "d/sub/a.wav", "x.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MsakitError, match="no media files in the folder"):
        find_media([tmp_path / "empty"])


# The killed run stops after its second row, so the kill always lands mid-batch however fast the machine.
HANG_AFTER_TWO_ROWS = """
import time
from msakit.cli import main
from msakit.inference.batch import PredictionFile
write = PredictionFile.write
def write_then_hang(self, result):
    write(self, result)
    PredictionFile.rows_written = getattr(PredictionFile, "rows_written", 0) + 1
    if PredictionFile.rows_written == 2:
        time.sleep(3600)
PredictionFile.write = write_then_hang
main()
"""


@needs_extra
def test_batch_prediction_survives_kill_9_and_resumes_without_redoing_finished_files(tmp_path,
                                                                                       pickle_checkpoint):
    folder = tmp_path / "clips"
    good = _clips(folder, 8)
    bad = truncated(good[0], folder / "broken.mp4", 300)
    output = tmp_path / "preds.csv"
    command = [sys.executable, "-c", HANG_AFTER_TWO_ROWS, "predict", str(folder),
               "--checkpoint", str(pickle_checkpoint), "--output", str(output), "--workers", "1",
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.is_file() and output.read_text().count("\n") >= 3:  # the header and two results
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = list(csv.DictReader(output.open()))
    assert len(before) == 2

    runner = CliRunner()
    again = runner.invoke(cli, ["predict", str(folder), "--checkpoint", str(pickle_checkpoint),
                                "--output", str(output), "--workers", "0", "--no-progress"])
    assert again.exit_code == 2, again.output
    assert f"could not be scored: {bad}" in again.stderr
    rows = list(csv.DictReader(output.open()))
    scored = [r for r in rows if not r["error"]]
    assert sorted(r["file"] for r in scored) == sorted(map(str, good))  # every good file, once
    assert [r for r in rows if r["error"]] == [r for r in rows if r["file"] == str(bad)]
    kept = [r for r in before if not r["error"]]
    assert rows[:len(kept)] == kept  # finished rows are kept as they were, not scored again
    assert all(r["used"] == "text" and r["model"] == str(pickle_checkpoint.resolve()) for r in scored)

    # a third run only retries the failure
    retried = api.predict([folder], pickle_checkpoint, output=output, workers=0)
    assert [r["file"] for r in retried] == [str(bad)] and "error" in retried[0]


def test_an_output_of_another_model_or_format_is_refused(tmp_path, pickle_checkpoint):
    output = tmp_path / "preds.jsonl"
    output.write_text(json.dumps({"file": "a.mp4", "score": 1.0, "model": "/other.pt"}) + "\n")
    with pytest.raises(MsakitError, match=r"holds predictions of another model \(/other.pt\)"):
        api.predict([tmp_path / "a.mp4"], pickle_checkpoint, output=output)
    with pytest.raises(MsakitError, match="must end in .csv or .jsonl"):
        api.predict([tmp_path / "a.mp4"], pickle_checkpoint, output=tmp_path / "preds.txt")
    (tmp_path / "other.csv").write_text("id,label\n1,2\n")
    with pytest.raises(MsakitError, match="is not a prediction file of msakit"):
        api.predict([tmp_path / "a.mp4"], pickle_checkpoint, output=tmp_path / "other.csv")
    assert (tmp_path / "other.csv").read_text() == "id,label\n1,2\n"  # nothing written is lost


MOSI_CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "media" / "mosi_Oz06ZWiO20M_6.mp4"


@needs_extra
@pytest.mark.skipif(not MOSI_CLIP.is_file(), reason="../shared/data/media absent")
def test_predict_with_no_checkpoint_scores_a_real_clip_with_the_packaged_model():
    result = CliRunner().invoke(cli, ["predict", str(MOSI_CLIP), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["used"] == ["text"] and row["transcript_source"] == "asr" and row["transcript"]
    assert row["present"] == {"text": True, "audio": True, "vision": True} and math.isfinite(row["score"])
    assert "reads the transcript only" in result.stderr
