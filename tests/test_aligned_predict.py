"""Predict with checkpoints trained on word-aligned input: audio and vision averaged over each word's
time span, one row per transcript word; given transcripts timed by forced alignment (or refused
when they cannot be); precomputed features refused unless they have one row per word."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from msakit import api
from msakit.cli import cli
from msakit.data.mmsa import load_mmsa, save_mmsa
from msakit.data.synthetic import synthetic_dataset
from msakit.data.tokens import load_tokenizer
from msakit.errors import MsakitError
from msakit.features import FeaturePipeline, build_dataset, feature_names, load_feature_config
from msakit.features.alignment import word_average
from msakit.features.config import FeatureConfig
from msakit.features.dataset import LabelRow, _cache_key, assemble
from msakit.inference import Predictor, predict_many
from test_features import SHARED, VIDEO, needs_extra, needs_media, write_clip

WORDS = ("a", "fine", "film", "bad", "so", "great", "plot", "dull")
TIMED = [("a", 0.0, 0.3), ("fine", 0.3, 0.62), ("film", 0.62, 0.9)]


def test_word_average_is_the_mean_of_the_frames_overlapping_each_word() -> None:
    frames = np.arange(12, dtype=np.float32).reshape(6, 2)  # frame k spans [0.1 k, 0.1 (k + 1))
    spans = np.stack([np.arange(6) * 0.1, np.arange(1, 7) * 0.1], axis=1)
    words = np.array([[0.0, 0.15],   # frames 0, 1
                      [0.25, 0.25],  # an instant: frame 2 holds it
                      [0.32, 0.58],  # frames 3, 4, 5
                      [0.9, 1.2]])   # after the last frame: zeros
    expected = np.array([(frames[0] + frames[1]) / 2, frames[2],
                         (frames[3] + frames[4] + frames[5]) / 3, [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(word_average(frames, spans, words), expected, rtol=1e-6)
    assert word_average(frames[:0], spans[:0], words).shape == (4, 2)
    assert word_average(frames, spans, words[:0]).shape == (0, 2)


def test_word_alignment_is_a_feature_setting_that_keys_the_cache(tmp_path: Path) -> None:
    frame = load_feature_config()
    word = load_feature_config(overrides=["alignment.unit=word"])
    assert not frame.word_aligned and word.word_aligned
    recorded = frame.to_dict()
    del recorded["alignment"]  # recorded before the section existed: frame-rate features
    assert FeatureConfig.from_dict(recorded) == frame
    with pytest.raises(MsakitError, match="alignment.unit must be one of frame, word, not 'token'"):
        load_feature_config(overrides=["alignment.unit=token"])
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"x")
    assert _cache_key(frame, media, "hi") != _cache_key(word, media, "hi")


@needs_extra
def test_extract_builds_word_aligned_datasets(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        write_clip(clips / f"{i}.mp4", seconds=0.5, tone=200.0 + 100 * i)
    labels = tmp_path / "label.csv"
    labels.write_text("id,text,label,mode\n0,a bad film,-2,train\n1,so so,0.2,valid\n2,great,2.8,test\n")
    word = load_feature_config(overrides=["alignment.unit=word", "text.max_tokens=8"])
    report = build_dataset(clips, labels, tmp_path / "ds.pkl", word, workers=0, progress=False)
    assert report["extracted"] == 3 and all(c["transcript_source"] == "given" for c in report["clips_detail"])
    data = load_mmsa(tmp_path / "ds.pkl")
    assert data.dims.audio_len == data.dims.vision_len == data.dims.text_len == 8
    assert [data.split(s).audio_lengths[0] for s in ("train", "valid", "test")] == [3, 2, 1]  # words
    assert data.features["config"]["alignment"] == {"unit": "word"}
    again = build_dataset(clips, labels, tmp_path / "ds.pkl", word, workers=0, progress=False)
    assert again["from_cache"] == 3  # and a frame configuration misses these entries (test above)


# --- an aligned checkpoint trained on a word-aligned `msakit extract` dataset -------------------------
@pytest.fixture(scope="module")
def aligned_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Path:
    """MAG-BERT (through the tiny BERT) on twelve word-aligned clips: every row one word."""
    root = tmp_path_factory.mktemp("aligned")
    config = load_feature_config(overrides=["alignment.unit=word", "text.max_tokens=8",
                                             "text.features=false"])
    names = feature_names(config)
    tokenizer = load_tokenizer(config.text.encoder)
    rng = np.random.default_rng(0)
    rows, results = [], {}
    for i, split in enumerate(["train"] * 6 + ["valid"] * 3 + ["test"] * 3):
        transcript = " ".join(rng.choice(WORDS, size=2 + i % 4))
        encoded = tokenizer(transcript, padding="max_length", truncation=True, max_length=8,
                            return_tensors="np")
        words = len(transcript.split())
        rows.append(LabelRow(f"c{i}", (f"c{i}",), transcript, float(i % 5 - 2), split))
        results[f"c{i}"] = {
            "transcript": transcript, "transcript_source": "given",
            "text_bert": np.stack([encoded["input_ids"][0], encoded["attention_mask"][0],
                                   encoded["token_type_ids"][0]]).astype(np.int64),
            "text": None,
            "audio": rng.normal(size=(words, len(names["audio"]))).astype(np.float32),
            "vision": rng.normal(size=(words, len(names["vision"]))).astype(np.float32),
            "present": {"text": True, "audio": True, "vision": True},
        }
    save_mmsa(assemble(rows, results, config, names), root / "ds.pkl")
    data = load_mmsa(root / "ds.pkl")
    assert data.dims.audio_len == data.dims.vision_len == data.dims.text_len == 8  # as aligned pickles
    assert data.train.audio_lengths.tolist() == [len(r.text.split()) for r in rows[:6]]
    api.train("mag_bert", data, epochs=1, output=root / "run", progress=False,
              overrides=[f"model.text_encoder={tiny_bert}"])
    return root / "run" / "seed-1111.pt"


@needs_extra
def test_a_given_transcript_that_cannot_be_timed_is_refused_in_one_line(tmp_path: Path,
                                                                         aligned_checkpoint: Path) -> None:
    clip = write_clip(tmp_path / "long.mp4", seconds=31.0, fps=2)
    (tmp_path / "long.txt").write_text("a fine film\n")
    result = CliRunner().invoke(cli, ["predict", str(clip), "--checkpoint", str(aligned_checkpoint),
                                      "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)[0]["error"]
    assert "\n" not in error and str(clip) in error and "needs word timings" in error
    assert "no .txt" in error and "30 s" in error


@needs_extra
def test_word_timings_give_one_row_per_word_averaged_from_the_frames(
        tmp_path: Path, aligned_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = write_clip(tmp_path / "clip.mp4", seconds=1.0)  # a tone, no face, no transcript file
    predictor = Predictor(aligned_checkpoint)
    assert predictor.word_aligned and predictor.card()["word_aligned"]
    with pytest.raises(MsakitError, match="alignment.unit 'word' -> 'frame'"):
        Predictor(aligned_checkpoint, overrides=["alignment.unit=frame"])
    monkeypatch.setattr(predictor.pipeline.transcript, "recognise_words", lambda waveform: list(TIMED))

    features = predictor.pipeline.extract(clip)
    assert features["transcript"] == "a fine film" and features["words"] == [list(w) for w in TIMED]
    assert features["audio"].shape == (3, 25) and features["vision"].shape == (3, 14)
    assert features["present"] == {"text": True, "audio": True, "vision": False}  # no face
    frames = FeaturePipeline(load_feature_config(), reads=("audio",)).extract(clip, text="x")["audio"]
    frame_spans = np.stack([np.arange(len(frames)) * 0.04, np.arange(1, len(frames) + 1) * 0.04], axis=1)
    by_hand = [frames[(frame_spans[:, 0] < end) & (frame_spans[:, 1] > start)].mean(axis=0)
               for _, start, end in TIMED]
    np.testing.assert_allclose(features["audio"], np.stack(by_hand), rtol=1e-5, atol=1e-6)

    single = predictor.predict(clip)
    assert single["words"] == [list(w) for w in TIMED] and single["used"] == ["text", "audio"]
    batch = predict_many(predictor, [clip], output=tmp_path / "out.jsonl", workers=0)
    assert batch.results[0]["score"] == pytest.approx(single["score"], abs=1e-6)
    assert json.loads((tmp_path / "out.jsonl").read_text())["words"] == single["words"]


@needs_extra
def test_precomputed_features_need_one_row_per_word(aligned_checkpoint: Path, tiny_bert: str,
                                                     tmp_path: Path) -> None:
    predictor = Predictor(aligned_checkpoint)
    rows = np.ones((2, 25)).tolist()
    with pytest.raises(MsakitError, match=r"features.audio has 2 rows, but mag_bert was trained on word-"
                                          r"aligned input: give one row per word of the text \(3 words\)"):
        predictor.predict_text("a fine film", {"audio": rows})
    scored = predictor.predict_text("a fine film", {"audio": np.ones((3, 25)).tolist()})
    assert scored["used"] == ["text", "audio"] and math.isfinite(scored["score"])

    pytest.importorskip("fastapi")
    from msakit.serve import Limits, create_app
    from test_serve import running

    with running(create_app(predictor, Limits(), upload_dir=tmp_path)) as client:
        refused = client.post("/v1/predict", json={"text": "a fine film", "features": {"audio": rows}})
        assert refused.status_code == 422 and "3 words" in refused.text
        ok = client.post("/v1/predict", json={"text": "a fine film",
                                              "features": {"audio": np.ones((3, 25)).tolist()}})
        assert ok.status_code == 200, ok.text

    # an aligned pickle records no feature configuration: its equal step counts say it is aligned
    data = synthetic_dataset(n_train=8, n_valid=4, n_test=4, text_len=8, audio_dim=5, vision_dim=20,
                             text_dim=32, aligned=True, seed=0)
    api.train("tfn", data, epochs=1, output=tmp_path / "pickle", progress=False,
              overrides=["model.text_source=encoder", f"model.text_encoder={tiny_bert}"])
    pickle_predictor = Predictor(tmp_path / "pickle" / "seed-1111.pt")
    assert pickle_predictor.word_aligned and pickle_predictor.unavailable == ("audio", "vision")
    with pytest.raises(MsakitError, match="features.vision has 4 rows.*2 words"):
        pickle_predictor.predict_text("fine film", {"vision": np.ones((4, 20)).tolist()})


@needs_extra
@needs_media
def test_a_real_clip_is_timed_by_speech_recognition_or_by_forced_alignment_of_its_transcript() -> None:
    pipeline = FeaturePipeline(load_feature_config(overrides=["alignment.unit=word"]))
    with (SHARED / "mosi-text" / "label.csv").open(newline="") as f:
        reference = next(row["text"] for row in csv.DictReader(f) if row["id"] == "Oz06ZWiO20M_6")
    recognised = pipeline.extract(VIDEO)
    forced = pipeline.extract(VIDEO, text=reference)
    assert forced["transcript"] == " ".join(reference.split())
    for result in (recognised, forced):
        words = result["words"]
        assert [w for w, _, _ in words] == result["transcript"].split()
        assert result["audio"].shape == (len(words), 25) and result["vision"].shape == (len(words), 14)
        starts, ends = np.array([s for _, s, _ in words]), np.array([e for _, _, e in words])
        assert (np.diff(starts) >= 0).all() and (ends >= starts).all()
        assert ends[-1] <= result["duration"] + 0.1
        assert result["present"] == {"text": True, "audio": True, "vision": True}
    # the same word, timed both ways, starts at about the same moment
    start = {source: next(s for w, s, _ in result["words"] if w.strip(".,").lower() == "idiosyncratic")
             for source, result in (("asr", recognised), ("forced", forced))}
    assert abs(start["asr"] - start["forced"]) < 0.3, start
