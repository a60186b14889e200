"""Decode media files with PyAV (FFmpeg): the audio track as 16 kHz mono, video frames at a chosen rate.

Any container FFmpeg reads works (mp4, mkv, webm, avi, mov, wav, mp3, flac, ...). A file FFmpeg
cannot open or decode raises `MediaError`, which the dataset builder reports per clip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from msakit.errors import MsakitError, one_line

SAMPLE_RATE = 16_000
MEDIA_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                  ".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac")


class MediaError(MsakitError):
    """A media file that cannot be opened or decoded."""


def _av() -> ModuleType:
    """PyAV, imported late so that msakit works without the extract extra."""
    try:
        import av
    except ImportError:
        raise MsakitError(
            "reading media needs PyAV: install the extract extra (pip install 'msakit[extract]')"
        ) from None
    return av


def _open(path: Path) -> Any:
    """An open PyAV container (a context manager)."""
    av = _av()
    if not path.is_file():
        raise MediaError(f"media file not found: {path}")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"{path}: cannot open as audio/video ({one_line(exc)})") from None


def media_duration(path: Path) -> float | None:
    """The container's duration in seconds, when it states one."""
    with _open(path) as container:
        return None if container.duration is None else container.duration / 1_000_000


def decode_audio(path: Path) -> np.ndarray | None:
    """The first audio track as float32 mono at 16 kHz in [-1, 1], or None when there is none."""
    av = _av()
    with _open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        except av.FFmpegError as exc:
            if not chunks:
                raise MediaError(f"{path}: cannot decode the audio track ({one_line(exc)})") from None
            # a damaged tail: keep what decoded, as players do
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def has_video(path: Path) -> bool:
    with _open(path) as container:
        return bool(container.streams.video)


def video_frames(path: Path, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, RGB uint8 frame (H, W, 3)) at about `fps` frames per second.

    Every frame is decoded (codecs need them) but only the first one at or after each 1/fps step is
    converted to RGB. A source slower than `fps` yields all its frames. A damaged tail ends the
    stream early; an undecodable start raises MediaError.
    """
    av = _av()
    step = 1.0 / fps
    with _open(path) as container:
        if not container.streams.video:
            return
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        next_time = 0.0
        decoded = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded += 1
                time = frame.time if frame.time is not None else index / rate
                if time + 1e-6 < next_time:
                    continue
                while next_time <= time + 1e-6:
                    next_time += step
                yield time, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            if not decoded:
                raise MediaError(f"{path}: cannot decode the video track ({one_line(exc)})") from None
