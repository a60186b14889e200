"""Feature extraction, dataset building and predict: configuration, labels and padding everywhere;
the extractors themselves only where the `extract` extra is installed (and the real MOSI clips only
where ../shared/data is present)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from msakit import api
from msakit.cli import cli
from msakit.data.mmsa import load_mmsa, save_mmsa
from msakit.data.normalize import normalize_dataset
from msakit.errors import MsakitError
from msakit.features import FeaturePipeline, build_dataset, load_feature_config, read_labels
from msakit.features.config import apply_overrides, check_compatible
from msakit.features.dataset import assemble, index_media
from msakit.features.extractors import GEOMETRY, face_geometry
from msakit.inference import Predictor
from msakit.metrics import sentiment_classes
from msakit.training.checkpoint import load_checkpoint
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer

EXTRA = all(importlib.util.find_spec(m) for m in ("av", "mediapipe", "opensmile", "faster_whisper"))
needs_extra = pytest.mark.skipif(not EXTRA, reason="the extract extra is not installed")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIDEO = SHARED / "media" / "mosi_Oz06ZWiO20M_6.mp4"
WAV = SHARED / "media" / "mosi_03bSnISJMiM_1.wav"
needs_media = pytest.mark.skipif(not (VIDEO.is_file() and WAV.is_file()),
                                 reason="../shared/data/media absent")
WER_THRESHOLD = 0.3  # Whisper tiny.en on a 7.5 s MOSI clip; its errors here are spelling-level


# --- helpers -----------------------------------------------------------------------------------------
def write_clip(path: Path, seconds: float = 1.0, colour: tuple[int, int, int] = (40, 120, 200),
               tone: float | None = 220.0, amplitude: float = 0.3, fps: int = 15) -> Path:
    """A plain-colour video (no face) with a sine tone, a silent track (amplitude 0) or no audio."""
    import av

    size = (96, 64)
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = None
        if tone is not None:
            audio = out.add_stream("aac", rate=16000)
            audio.layout = "mono"
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[:] = colour
        for _ in range(int(seconds * fps)):
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            wave = (amplitude * np.sin(2 * np.pi * tone * t)).astype(np.float32)
            for start in range(0, len(wave), 1024):
                chunk = wave[None, start:start + 1024]
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate = 16000
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)
    return path


def truncated(source: Path, target: Path, keep: int = 4000) -> Path:
    target.write_bytes(source.read_bytes()[:keep])
    return target


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference length, on lower-case words without punctuation."""
    ref, hyp = (re.sub(r"[^a-z0-9' ]+", " ", s.lower()).split() for s in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / max(len(ref), 1)


def fake_result(n_audio: int, n_vision: int, present: dict[str, bool], config, names) -> dict:
    rng = np.random.default_rng(n_audio)
    tokens = config.text.max_tokens
    ids = np.zeros((3, tokens), dtype=np.int64)
    ids[0, :3], ids[1, :3] = [101, 2204, 102], 1
    return {
        "transcript": "good" if present["text"] else "", "transcript_source": "given",
        "text_bert": ids, "text": rng.normal(size=(tokens, 384)).astype(np.float32),
        "audio": rng.normal(size=(n_audio, len(names["audio"]))).astype(np.float32),
        "vision": rng.normal(size=(n_vision, len(names["vision"]))).astype(np.float32),
        "present": present, "duration": 1.0, "notes": [], "stats": {}, "seconds": {},
    }


# --- configuration, labels, classes: no extra needed -----------------------------------------------------
def test_default_config_and_overrides(tmp_path: Path) -> None:
    config = load_feature_config()
    assert config.acoustic.backend == "opensmile" and config.visual.fps == 10.0
    assert load_feature_config(overrides=["visual.fps=5"]).visual.fps == 5
    user = tmp_path / "features.yaml"
    user.write_text("text:\n  max_tokens: 32\n")
    assert load_feature_config(user).text.max_tokens == 32
    for bad, message in [(["visual.speed=3"], "unknown visual setting"),
                         (["camera.fps=3"], "unknown feature section"), (["visual.fps=0"], "visual.fps"),
                         (["acoustic.backend=praat"], "acoustic.backend"), (["visual.fps"], "bad --set")]:
        with pytest.raises(MsakitError, match=message):
            load_feature_config(overrides=bad)
    with pytest.raises(MsakitError, match="not found"):
        load_feature_config(tmp_path / "absent.yaml")


def test_compatibility_ignores_only_the_transcript_source() -> None:
    config = load_feature_config()
    check_compatible(config, apply_overrides(config, ["transcript.source=asr"]), "ckpt")
    with pytest.raises(MsakitError, match=r"visual.fps 10.0 -> 5.*text.max_tokens 50 -> 20|"
                                          r"text.max_tokens 50 -> 20.*visual.fps 10.0 -> 5"):
        check_compatible(config, apply_overrides(config, ["visual.fps=5", "text.max_tokens=20"]), "ckpt")


def test_read_labels_layouts(tmp_path: Path) -> None:
    fet = tmp_path / "label.csv"
    fet.write_text("video_id,clip_id,text,label,mode,annotation\nv1,3,hello,1.5,train,x\nv1,4,,-2,valid,y\n")
    rows = read_labels(fet)
    assert [(r.id, r.split, r.label, r.text) for r in rows] == [
        ("v1$_$3", "train", 1.5, "hello"), ("v1$_$4", "valid", -2.0, "")]
    assert rows[0].keys == ("v1/3", "v1_3")
    single = tmp_path / "ids.csv"
    single.write_text("id,label\na_1,0.5\nb_2,1\n")  # no text, no mode: a stable split from the id
    assert [r.split for r in read_labels(single)] == [r.split for r in read_labels(single)]
    for content, message in [("video_id,clip_id,label,mode\nv,1,x,train\n", "line 2: label 'x'"),
                             ("id,label,mode\na,1,train\na,2,test\n", "already on line 2"),
                             ("id,label,mode\na,1,holdout\n", "unknown mode"),
                             ("id,text\na,b\n", "no column 'label'")]:
        path = tmp_path / "bad.csv"
        path.write_text(content)
        with pytest.raises(MsakitError, match=message):
            read_labels(path)


def test_media_found_by_video_and_clip(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    for name in ("v1/3.mp4", "v1/3.wav", "v1_4.wav", "5.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    index = index_media(tmp_path)
    assert index["v1/3"].name == "3.mp4"  # a video before an audio-only file of the same clip
    assert index["v1_4"].name == "v1_4.wav" and "notes" not in index
    with pytest.raises(MsakitError, match="clip folder not found"):
        index_media(tmp_path / "absent")


def test_sentiment_classes() -> None:
    assert sentiment_classes(-2.6, "mosi") == {"class": "negative", "label": -3,
                                               "label_name": "strongly negative", "scale": "7-point"}
    assert sentiment_classes(0.4, "mosei")["class"] == "neutral"
    assert sentiment_classes(0.5, "mosi")["label"] == 0  # round half to even, as Acc-7 scores it
    assert sentiment_classes(9.0, "mosi")["label"] == 3
    assert sentiment_classes(0.35, "sims") == {"class": "positive", "label": 1,
                                               "label_name": "weakly positive", "scale": "5-point"}


def test_face_geometry_ignores_position_size_and_turn_but_measures_pose() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(scale=20, size=(468, 3)).astype(np.float32)
    points[33], points[263] = (-30, 0, 0), (30, 0, 0)  # eye corners on the x axis
    points[10], points[152] = (0, -60, 0), (0, 60, 0)  # forehead above, chin below
    frontal = face_geometry(points, 640)
    pose = [GEOMETRY.index(k) for k in ("yaw", "pitch", "roll", "face_size")]
    shape = [i for i in range(len(GEOMETRY)) if i not in pose]
    assert np.allclose(frontal[pose[:3]], 0, atol=1e-5)
    angle = 0.4
    cos, sin = math.cos(angle), math.sin(angle)
    turn = np.array([[cos, 0, sin], [0, 1, 0], [-sin, 0, cos]])
    moved = (points @ turn.T.astype(np.float32)) * 1.7 + np.float32([100, 50, 3])
    turned = face_geometry(moved, 640)
    assert np.allclose(turned[shape], frontal[shape], atol=1e-4)
    assert abs(abs(turned[GEOMETRY.index("yaw")]) - angle) < 1e-4
    assert turned[GEOMETRY.index("face_size")] == pytest.approx(frontal[GEOMETRY.index("face_size")] * 1.7)


def test_assembled_pickle_loads_trains_and_its_checkpoint_guards_predict(tmp_path: Path,
                                                                         tiny_dataset) -> None:
    config = load_feature_config(overrides=["text.max_tokens=8", "acoustic.max_frames=6"])
    names = {"audio": [f"a{i}" for i in range(4)], "vision": [f"v{i}" for i in range(3)]}
    all_present = {"text": True, "audio": True, "vision": True}
    rows, results = [], {}
    for i, split in enumerate(["train"] * 6 + ["valid"] * 3 + ["test"] * 3):
        row = read_labels_row(f"c{i}", split, float(i % 5 - 2))
        rows.append(row)
        present = {**all_present, "vision": i % 3 != 0}
        results[row.id] = fake_result(3 + i, 2 * i if present["vision"] else 0, present, config, names)
    raw = assemble(rows, results, config, names)
    save_mmsa(raw, tmp_path / "ds.pkl")
    data = load_mmsa(tmp_path / "ds.pkl")
    assert data.features["config"] == config.to_dict() and data.features["names"] == names
    assert data.dims.audio == 4 and data.dims.vision == 3 and data.dims.text_len == 8
    assert data.dims.audio_len == 6  # the longest clip (14 frames) cut to acoustic.max_frames
    assert data.train.audio_lengths.tolist() == [3, 4, 5, 6, 6, 6]
    assert data.train.vision_lengths.tolist() == [1, 2, 4, 1, 8, 10]  # no face: one zero frame
    assert not data.train.vision[0].any() and raw["train"]["presence"][:, 2].tolist() == [
        False, True, True, False, True, True]
    np.testing.assert_array_equal(data.train.audio[1, :4], results["c1"]["audio"])

    run = api.train("tfn", data, epochs=1, output=tmp_path / "run", progress=False,
                    overrides=["model.text_source=features"])
    meta = torch.load(tmp_path / "run" / run["seeds"][0]["checkpoint"], weights_only=True)
    assert meta["dataset"]["features"]["config"] == config.to_dict()
    with pytest.raises(MsakitError, match="trained on other features than requested: visual.fps 10.0 -> 5"):
        Predictor(tmp_path / "run" / "seed-1111.pt", overrides=["visual.fps=5"])

    api.train("tfn", tiny_dataset, epochs=1, output=tmp_path / "synthetic", progress=False,
              overrides=["model.text_source=features"])
    with pytest.raises(MsakitError, match="records no feature configuration"):
        api.predict(["x.mp4"], tmp_path / "synthetic" / "seed-1111.pt")


def read_labels_row(clip_id: str, split: str, label: float):
    from msakit.features.dataset import LabelRow

    return LabelRow(clip_id, (clip_id,), "good", label, split)


# --- the extractors: need the extract extra -----------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> FeaturePipeline:
    torch.set_num_threads(1)
    return FeaturePipeline(load_feature_config())  # transcripts: the given text, else speech recognition


@needs_extra
def test_decode_audio_and_frames(tmp_path: Path) -> None:
    from msakit.features.media import decode_audio, video_frames

    clip = write_clip(tmp_path / "c.mp4", seconds=2.0, fps=15)
    audio = decode_audio(clip)
    assert audio.dtype == np.float32 and abs(len(audio) / 16000 - 2.0) < 0.15  # + AAC's priming frame
    frames = list(video_frames(clip, 5))
    assert len(frames) == 10 and frames[0][1].shape == (64, 96, 3)
    assert np.allclose(np.diff([t for t, _ in frames]), 0.2, atol=0.04)
    assert len(list(video_frames(clip, 30))) == 30  # a slower source yields all its frames


@needs_extra
def test_clip_without_face_silence_or_audio_keeps_what_it_has(tmp_path: Path, pipeline) -> None:
    no_face = pipeline.extract(write_clip(tmp_path / "plain.mp4"), text="a sunny day")
    assert no_face["present"] == {"text": True, "audio": True, "vision": False}
    assert no_face["vision"].shape == (0, len(GEOMETRY)) and no_face["stats"]["frames_sampled"] == 10
    assert any("no face" in note for note in no_face["notes"])
    assert np.isfinite(no_face["audio"]).all() and len(no_face["audio"]) > 20
    silent = pipeline.extract(write_clip(tmp_path / "silent.mp4", amplitude=0.0))
    assert silent["present"] == {"text": False, "audio": False, "vision": False}
    assert any("silent" in note for note in silent["notes"])
    mute = pipeline.extract(write_clip(tmp_path / "mute.mp4", tone=None), text="hi")
    assert mute["present"]["audio"] is False and "audio: no audio track" in mute["notes"]


@needs_extra
def test_corrupt_and_empty_files_raise_media_error(tmp_path: Path, pipeline) -> None:
    from msakit.features.media import MediaError

    clip = write_clip(tmp_path / "c.mp4")
    for bad in (truncated(clip, tmp_path / "cut.mp4"), truncated(clip, tmp_path / "empty.mp4", 0)):
        with pytest.raises(MediaError, match="cannot open as audio/video"):
            pipeline.extract(bad)


@needs_extra
@needs_media
def test_real_mosi_clip(pipeline) -> None:
    result = pipeline.extract(VIDEO)
    with (SHARED / "mosi-text" / "label.csv").open(newline="") as f:
        reference = next(row["text"] for row in csv.DictReader(f) if row["id"] == "Oz06ZWiO20M_6")
    wer = word_error_rate(reference, result["transcript"])
    assert result["transcript_source"] == "asr" and wer <= WER_THRESHOLD, (wer, result["transcript"])
    assert result["present"] == {"text": True, "audio": True, "vision": True}
    duration = result["duration"]
    assert duration == pytest.approx(7.5, abs=0.1)
    assert abs(len(result["audio"]) - duration * 25) <= 3  # eGeMAPS 10 ms frames pooled by 4
    assert abs(result["stats"]["frames_sampled"] - duration * 10) <= 2
    assert result["stats"]["face_fraction"] >= 0.9
    for key in ("audio", "vision", "text"):
        assert np.isfinite(result[key]).all()
    assert result["vision"].std(axis=0)[GEOMETRY.index("mouth_open")] > 0  # the speaker's mouth moves


@needs_extra
@needs_media
def test_real_wav_clip_has_no_vision(pipeline) -> None:
    result = pipeline.extract(WAV)
    assert result["present"] == {"text": True, "audio": True, "vision": False}
    assert "vision: no video stream" in result["notes"]
    assert word_error_rate("anyhow it was really good", result["transcript"]) <= WER_THRESHOLD


@needs_extra
def test_extract_resume_train_predict(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    (clips / "v1").mkdir(parents=True)
    for i, (colour, tone) in enumerate([((200, 40, 40), 180.0), ((40, 200, 40), 260.0),
                                        ((40, 40, 200), 340.0), ((90, 90, 90), 420.0)]):
        write_clip(clips / "v1" / f"{i}.mp4", colour=colour, tone=tone)
    truncated(clips / "v1" / "0.mp4", clips / "v1_broken.mp4")
    labels = tmp_path / "label.csv"
    labels.write_text("video_id,clip_id,text,label,mode\n"
                      "v1,0,a bad film,-2,train\nv1,1,a fine film,1.5,train\nv1,2,so so,0.2,valid\n"
                      "v1,3,great,2.8,test\nv1,broken,x,0,test\nv1,gone,x,0,test\n")
    report = build_dataset(clips, labels, tmp_path / "ds.pkl", load_feature_config(), workers=0,
                           progress=False)
    assert report["extracted"] == 4 and report["from_cache"] == 0
    reasons = {f["id"]: f["reason"] for f in report["failures"]}
    assert "cannot open as audio/video" in reasons["v1$_$broken"] and "no media file" in reasons["v1$_$gone"]
    assert len(report["absent"]["vision"]) == 4 and not report["absent"]["audio"]
    assert (tmp_path / "ds.report.json").is_file()
    data = load_mmsa(tmp_path / "ds.pkl")
    assert [len(data.split(s)) for s in ("train", "valid", "test")] == [2, 1, 1]
    assert data.train.raw_text.tolist() == ["a bad film", "a fine film"]

    again = build_dataset(clips, labels, tmp_path / "ds.pkl", load_feature_config(), workers=0,
                          progress=False)
    assert again["from_cache"] == 4 and again["failed"] == 2

    api.train("tfn", data, epochs=1, output=tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "seed-1111.pt"
    results = api.predict([clips / "v1" / "3.mp4", clips / "v1_broken.mp4"], checkpoint)
    assert results[0]["present"]["audio"] and not results[0]["present"]["vision"]
    assert math.isfinite(results[0]["score"]) and results[0]["scale"] == "7-point"
    assert "cannot open" in results[1]["error"]
    with pytest.raises(MsakitError, match="applies to one file"):
        api.predict([clips / "v1" / "1.mp4", clips / "v1" / "2.mp4"], checkpoint, text="hi")
    cli_run = CliRunner().invoke(cli, ["predict", str(clips / "v1" / "3.mp4"), str(clips / "v1_broken.mp4"),
                                       "--checkpoint", str(checkpoint), "--json"])
    assert cli_run.exit_code == 2
    assert json.loads(cli_run.stdout)[0]["present"]["audio"]
    assert "1 of 2 file(s) could not be scored" in cli_run.stderr

    # a checkpoint trained on z-scored features scores a new file with the training statistics
    api.train("tfn", data, epochs=1, output=tmp_path / "zscore", progress=False,
              overrides=["data.normalize=zscore"])
    normalized_checkpoint = tmp_path / "zscore" / "seed-1111.pt"
    score = api.predict([clips / "v1" / "3.mp4"], normalized_checkpoint, text="great")[0]["score"]
    model, meta = load_checkpoint(normalized_checkpoint)
    trainer = Trainer(model, TrainConfig(device="cpu"), "mosi", progress=False)
    expected, _ = trainer.predict(normalize_dataset(data, meta["normalization"]).test)  # clip 3
    assert score == pytest.approx(float(expected[0]), abs=1e-5)


@needs_extra
def test_worker_processes_report_failures_and_go_on(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a", "b", "c"):
        write_clip(clips / f"{name}.mp4", seconds=0.5)
    shutil.copy(clips / "a.mp4", clips / "d.mp4")
    truncated(clips / "a.mp4", clips / "d.mp4", 100)
    labels = tmp_path / "label.csv"
    labels.write_text("id,text,label,mode\na,x,1,train\nb,y,2,valid\nc,z,0,test\nd,w,0,test\n")
    report = build_dataset(clips, labels, tmp_path / "ds.pkl", load_feature_config(), workers=1,
                           progress=False)
    assert report["extracted"] == 3 and [f["id"] for f in report["failures"]] == ["d"]
    assert load_mmsa(tmp_path / "ds.pkl").test.ids.tolist() == ["c"]


@needs_extra
def test_a_clip_with_nothing_usable_is_a_failure_not_a_sample_or_a_score(tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a", "b", "c"):
        write_clip(clips / f"{name}.mp4", seconds=0.5)
    write_clip(clips / "quiet.mp4", seconds=0.5, amplitude=0.0)  # no face, silence, no words
    labels = tmp_path / "label.csv"
    labels.write_text("id,text,label,mode\na,fine,1,train\nb,bad,-1,valid\nc,ok,0,test\nquiet,,2,test\n")
    report = build_dataset(clips, labels, tmp_path / "ds.pkl", load_feature_config(), workers=0,
                           progress=False)
    assert [f["id"] for f in report["failures"]] == ["quiet"]
    assert "nothing usable" in report["failures"][0]["reason"]
    assert load_mmsa(tmp_path / "ds.pkl").test.ids.tolist() == ["c"]
    # the cache holds arrays and JSON only; a damaged entry is extracted again
    entries = sorted((tmp_path / "ds.cache").glob("*.npz"))
    assert len(entries) == 3
    entries[0].write_bytes(b"not a zip")
    again = build_dataset(clips, labels, tmp_path / "ds.pkl", load_feature_config(), workers=0,
                          progress=False)
    assert (again["from_cache"], again["extracted"]) == (2, 3)

    api.train("tfn", load_mmsa(tmp_path / "ds.pkl"), epochs=1, output=tmp_path / "run", progress=False)
    result = CliRunner().invoke(cli, ["predict", str(clips / "quiet.mp4"), "--checkpoint",
                                      str(tmp_path / "run" / "seed-1111.pt"), "--json"])
    assert result.exit_code == 2
    row = json.loads(result.stdout)[0]
    assert "score" not in row and "nothing this model reads" in row["error"]
