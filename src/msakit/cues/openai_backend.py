"""Cues from an MLLM behind an OpenAI-compatible chat-completions endpoint (hosted, vLLM, llama.cpp
server, Ollama's /v1), as MMSLF writes them with GPT-4o-mini.

Each sample is one `POST {base_url}/chat/completions`: the instructions and transcript (and the
label, for training clips) as text, plus three evenly spaced frames of the clip's video as base64
JPEG images when a video file was found. Up to `concurrency` requests are in flight. 429, 5xx and
connection errors are retried with exponential backoff (or after the server's `Retry-After`);
401/403 stop the whole run; any other error, or a reply without the two cue sections, fails that
sample only.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np

from msakit.cues.backend import CueFailure, CueSample
from msakit.cues.cache import CueRecord
from msakit.cues.prompt import PROMPT_VERSION, build_prompt, parse_cues
from msakit.errors import MsakitError
from msakit.features.media import MediaError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"  # the MLLM of the paper
KEY_VARIABLES = ("MSAKIT_CUES_API_KEY", "OPENAI_API_KEY")


class AuthenticationError(MsakitError):
    """The endpoint refused the API key: no further request can succeed."""


@dataclass(frozen=True)
class OpenAISettings:
    """Where and how to ask. `backoff` is the wait before the first retry, doubled for each next one."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = None  # None: no Authorization header (local servers)
    key_source: str = KEY_VARIABLES[0]  # named when the key is refused
    concurrency: int = 4
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 120.0
    max_tokens: int = 600
    frames: int = 3
    frame_size: int = 512  # longest side of a frame sent, in pixels

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise MsakitError(f"base URL {self.base_url!r} should start with http:// or https://")
        if not self.model.strip():
            raise MsakitError("the model name is empty")
        for name, low in (("concurrency", 1), ("max_retries", 0), ("frames", 0), ("max_tokens", 1),
                          ("frame_size", 16)):
            if getattr(self, name) < low:
                raise MsakitError(f"{name} should be at least {low}, got {getattr(self, name)}")
        for name in ("backoff", "max_backoff", "timeout"):
            if not getattr(self, name) >= 0:
                raise MsakitError(f"{name} should be a number of seconds >= 0, got {getattr(self, name)}")

    @property
    def url(self) -> str:
        # a base URL given with the endpoint's path still names the same endpoint
        return self.base_url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"


def resolve_settings(
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    **options: Any,
) -> OpenAISettings:
    """Settings from arguments, else the environment: the key from `api_key_env` (which must be set)
    or MSAKIT_CUES_API_KEY, then OPENAI_API_KEY; the URL from OPENAI_BASE_URL, then OpenAI's."""
    source = "the api_key given" if api_key is not None else api_key_env or KEY_VARIABLES[0]
    if api_key is None:
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise MsakitError(f"--api-key-env {api_key_env}: that environment variable is not set")
        else:
            source, api_key = next(
                ((name, os.environ[name]) for name in KEY_VARIABLES if os.environ.get(name)), (source, None)
            )
    return OpenAISettings(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                          model=model or DEFAULT_MODEL, api_key=api_key, key_source=source, **options)


def _frame_libraries() -> tuple[ModuleType, ModuleType]:
    """PyAV and Pillow's Image, imported late so that text-only runs need neither."""
    try:
        import av
        from PIL import Image
    except ImportError:
        raise MsakitError("sending frames needs PyAV and Pillow: pip install 'msakit[extract]'") from None
    return av, Image


def sample_frames(path: Path, count: int = 3, max_side: int = 512) -> list[bytes]:
    """JPEG images of `count` frames at evenly spaced frame indices, first to last; [] without video."""
    av, Image = _frame_libraries()
    if count == 0:
        return []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return []
            total = container.streams.video[0].frames
        if not total:  # the container does not say: count them
            with av.open(str(path)) as container:
                total = sum(1 for _ in container.decode(video=0))
        wanted = sorted(set(np.linspace(0, max(total - 1, 0), count).astype(int).tolist()))
        images: dict[int, Any] = {}
        last = None
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                last = frame
                if index in wanted:
                    images[index] = frame.to_image()
                if index >= wanted[-1]:
                    break
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"{path}: cannot read video frames ({type(exc).__name__}: {exc})") from None
    if last is None:
        return []
    encoded = []
    for index in wanted:  # a stated frame count can overshoot: the last decoded frame stands in
        image = images.get(index) or last.to_image()
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
        encoded.append(buffer.getvalue())
    return encoded


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _usage(reply: Any) -> dict[str, int] | None:
    usage = reply.get("usage") if isinstance(reply, dict) else None
    if not isinstance(usage, dict):
        return None
    counts = {key: usage.get(key) for key in ("prompt_tokens", "completion_tokens")}
    if not all(isinstance(value, int) for value in counts.values()):
        return None
    return {key: int(value) for key, value in counts.items()}


def _content(reply: Any) -> str:
    """The text of the first choice of a chat completion, else ValueError saying what is wrong."""
    if not isinstance(reply, dict) or "choices" not in reply:
        raise ValueError("the reply is not a chat completion (no 'choices')")
    choices = reply["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError("the reply has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the reply's message has no content")
    return content


class OpenAIBackend:
    """Asks an OpenAI-compatible chat-completions endpoint for each sample's cues."""

    name = "openai"
    reads_media = True

    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self.model = settings.model
        self.prompt_version = PROMPT_VERSION
        self._stop = threading.Event()

    def _payload(self, sample: CueSample) -> dict[str, Any]:
        frames = (sample_frames(sample.media, self.settings.frames, self.settings.frame_size)
                  if sample.media is not None else [])
        text = build_prompt(sample, len(frames))
        content: str | list[dict[str, Any]] = text
        if frames:  # plain-string content for text-only requests: older local servers accept only that
            content = [{"type": "text", "text": text}] + [
                {"type": "image_url",
                 "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")}}
                for jpeg in frames
            ]
        return {"model": self.settings.model, "max_tokens": self.settings.max_tokens,
                "messages": [{"role": "user", "content": content}]}

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        delay = min(self.settings.max_backoff, self.settings.backoff * 2 ** attempt)
        return delay * (1 + 0.25 * random.random())  # spread the retries of parallel requests

    def _record(self, sample: CueSample, body: bytes) -> CueRecord | CueFailure:
        try:
            reply = json.loads(body)
        except ValueError:
            text = _one_line(body.decode("utf-8", "replace"))
            return CueFailure(sample.id, sample.split, f"the reply is not JSON: {text}")
        usage = _usage(reply)
        try:
            visual, language = parse_cues(_content(reply))
        except ValueError as exc:
            return CueFailure(sample.id, sample.split, str(exc), usage)
        return CueRecord(sample.id, sample.split, self.name, self.model, self.prompt_version, visual,
                         language, usage)

    def _ask(self, client: httpx.Client, sample: CueSample) -> CueRecord | CueFailure | None:
        """The sample's record or failure; None when the run stopped before it was done."""
        try:
            payload = self._payload(sample)
        except MsakitError as exc:
            return CueFailure(sample.id, sample.split, str(exc))
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            if self._stop.is_set():
                return None
            retry_after = None
            try:
                response = client.post(self.settings.url, json=payload, headers=headers)
            except httpx.TransportError as exc:
                reason = f"connection error ({type(exc).__name__}: {_one_line(str(exc))})"
            else:
                status = response.status_code
                if status in (401, 403):
                    raise AuthenticationError(
                        f"authentication failed at {self.settings.url} (HTTP {status}): "
                        f"check {self.settings.key_source}"
                    )
                if 200 <= status < 300:
                    return self._record(sample, response.content)
                reason = f"HTTP {status}: {_one_line(response.text)}"
                if status != 429 and status < 500:
                    return CueFailure(sample.id, sample.split, reason)
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt < attempts and self._stop.wait(self._delay(attempt - 1, retry_after)):
                return None
        return CueFailure(sample.id, sample.split, f"{reason} (gave up after {attempts} attempts)")

    def describe(self, samples: Sequence[CueSample]) -> Iterator[CueRecord | CueFailure]:
        """Records and failures as requests finish; raises AuthenticationError at the first 401/403."""
        if self.settings.frames and any(s.media is not None for s in samples):
            _frame_libraries()  # fail before the first request, not once per sample
        limit = self.settings.concurrency
        self._stop.clear()
        todo = iter(samples)
        pending: set[Future[CueRecord | CueFailure | None]] = set()
        client = httpx.Client(timeout=self.settings.timeout,
                              limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="msakit-cues")
        try:
            while True:
                # only `limit` samples are taken at a time, so frames are read just before their request
                while len(pending) < limit and (sample := next(todo, None)) is not None:
                    pending.add(pool.submit(self._ask, client, sample))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    if result is not None:
                        yield result
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            client.close()
