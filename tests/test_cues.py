"""MMSLF cue generation: the cue file, the offline backend, and the OpenAI-compatible backend against a
chat-completions server started here (retries, failures, authentication, concurrency, resume, cost)."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from msakit.cues import (
    OfflineBackend,
    generate_cues,
    load_cue_texts,
    make_backend,
    read_cue_records,
    run_cues,
)
from msakit.cues.backend import CueSample, label_phrase
from msakit.cues.cache import CueFileWriter, CueRecord
from msakit.cues.openai_backend import OpenAIBackend, OpenAISettings, resolve_settings, sample_frames
from msakit.cues.prompt import PROMPT_VERSION, parse_cues
from msakit.data import generate_synthetic, save_mmsa
from msakit.data.schema import MultimodalDataset, Split
from msakit.errors import MsakitError

HAS_AV = importlib.util.find_spec("av") is not None
REPLY = "Visual cues: the speaker smiles broadly.\nLanguage cues: 'really good' is strong praise."


# --- a chat-completions server ---------------------------------------------------------------------
Responder = Callable[[str, int], tuple[int, dict[str, str], bytes]]


def completion(content: str = REPLY, prompt_tokens: int = 100, completion_tokens: int = 20) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


def ok(sample_id: str, attempt: int) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, completion()


@dataclass
class ChatServer:
    """Answers POST /v1/chat/completions with `respond(sample id, attempt for that id)`."""

    respond: Responder = ok
    delay: float = 0.0
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict, bytes]:
        if path != "/v1/chat/completions":
            return 404, {}, b'{"error": "not found"}'
        sample_id = re.search(r'transcript of ([^"]+)"', prompt_text(body)).group(1)
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.attempts[sample_id] = self.attempts.get(sample_id, 0) + 1
            attempt = self.attempts[sample_id]
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return self.respond(sample_id, attempt)

    def ids(self) -> list[str]:
        return [re.search(r'transcript of ([^"]+)"', prompt_text(b)).group(1) for b in self.bodies]


def prompt_text(body: dict[str, Any]) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


@pytest.fixture
def server() -> Iterator[ChatServer]:
    state = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, extra, payload = state.handle(self.path, dict(self.headers), body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def backend(server: ChatServer, **options: Any) -> OpenAIBackend:
    settings = dict(base_url=server.url, model="tiny", api_key="sk-test", backoff=0.0, max_retries=3)
    return OpenAIBackend(OpenAISettings(**{**settings, **options}))


def text_dataset(sizes: tuple[int, int, int] = (3, 2, 2)) -> MultimodalDataset:
    """Transcripts naming their clip, so the server can tell which sample a request is for."""
    splits = []
    for name, n in zip(("train", "valid", "test"), sizes, strict=True):
        ids = np.array([f"{name}{i}$_$0" for i in range(n)], dtype=object)
        splits.append(Split(ids=ids, labels=np.array([2.6 - 1.3 * i for i in range(n)], np.float32),
                            raw_text=np.array([f"transcript of {i}" for i in ids], dtype=object)))
    return MultimodalDataset("tiny-text", "mosi", *splits)


# --- the OpenAI-compatible backend -----------------------------------------------------------------
def test_replies_become_records_with_usage_and_cost(server: ChatServer, tmp_path: Path) -> None:
    data = text_dataset()
    report = generate_cues(data, backend(server), tmp_path / "cues.jsonl", price_input=0.15, price_output=0.6)
    assert (report.requested, report.written, report.failed, report.skipped) == (7, 7, 0, 0)
    assert (report.prompt_tokens, report.completion_tokens) == (700, 140)
    assert report.cost == pytest.approx((700 * 0.15 + 140 * 0.6) / 1e6)
    records = read_cue_records(tmp_path / "cues.jsonl")
    assert sorted(records) == sorted(str(i) for s in (data.train, data.valid, data.test) for i in s.ids)
    record = records["valid1$_$0"]
    assert (record["split"], record["backend"], record["model"], record["prompt_version"]) == (
        "valid", "openai", "tiny", PROMPT_VERSION)
    assert record["visual_cues"] == "the speaker smiles broadly."
    assert record["text"] == ("Visual cues: the speaker smiles broadly.\n"
                              "Language cues: 'really good' is strong praise.")
    assert record["usage"] == {"prompt_tokens": 100, "completion_tokens": 20}
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers)
    assert {b["model"] for b in server.bodies} == {"tiny"}


def test_label_goes_to_training_requests_only(server: ChatServer, tmp_path: Path) -> None:
    data = text_dataset()
    generate_cues(data, backend(server), tmp_path / "cues.jsonl")
    prompts = dict(zip(server.ids(), (prompt_text(b) for b in server.bodies), strict=True))
    for i, label in enumerate(data.train.labels):
        assert label_phrase(float(label), "mosi") in prompts[f"train{i}$_$0"]
        assert "Annotated sentiment" in prompts[f"train{i}$_$0"]
    for split in (data.valid, data.test):
        for sample_id, label in zip(split.ids, split.labels, strict=True):
            assert "Annotated sentiment" not in prompts[sample_id]
            assert label_phrase(float(label), "mosi") not in prompts[sample_id]
    assert not any(isinstance(b["messages"][0]["content"], list) for b in server.bodies)  # no media: text


# a 30 s backoff with Retry-After: 0 shows that the server's wait is the one honoured
@pytest.mark.parametrize("status, headers, wait", [(429, {"Retry-After": "0"}, 30.0), (503, {}, 0.0)])
def test_rate_limit_and_server_errors_are_retried(server: ChatServer, tmp_path: Path, status: int,
                                                  headers: dict[str, str], wait: float) -> None:
    def respond(sample_id: str, attempt: int) -> tuple[int, dict[str, str], bytes]:
        if sample_id == "train1$_$0" and attempt == 1:
            return status, headers, b'{"error": "busy"}'
        return ok(sample_id, attempt)

    server.respond = respond
    start = time.perf_counter()
    report = generate_cues(text_dataset(), backend(server, backoff=wait), tmp_path / "cues.jsonl",
                           splits=["train"])
    assert time.perf_counter() - start < 5
    assert (report.written, report.failed) == (3, 0)
    assert server.attempts == {"train0$_$0": 1, "train1$_$0": 2, "train2$_$0": 1}
    assert "train1$_$0" in load_cue_texts(tmp_path / "cues.jsonl")


def test_retries_give_up_and_other_client_errors_fail_at_once(server: ChatServer, tmp_path: Path) -> None:
    def respond(sample_id: str, attempt: int) -> tuple[int, dict[str, str], bytes]:
        if sample_id == "train0$_$0":
            return 500, {}, b"internal error"
        if sample_id == "train1$_$0":
            return 400, {}, b'{"error": {"message": "image too large"}}'
        return ok(sample_id, attempt)

    server.respond = respond
    report = generate_cues(text_dataset(), backend(server, max_retries=2), tmp_path / "cues.jsonl",
                           splits=["train"])
    reasons = {f.id: f.reason for f in report.failures}
    assert set(reasons) == {"train0$_$0", "train1$_$0"} and report.written == 1
    assert "HTTP 500" in reasons["train0$_$0"] and "after 3 attempts" in reasons["train0$_$0"]
    assert "HTTP 400" in reasons["train1$_$0"] and "image too large" in reasons["train1$_$0"]
    assert server.attempts == {"train0$_$0": 3, "train1$_$0": 1, "train2$_$0": 1}
    assert list(load_cue_texts(tmp_path / "cues.jsonl")) == ["train2$_$0"]


@pytest.mark.parametrize("body", [
    b'{"object": "error", "message": "no"}',  # JSON, not a chat completion
    b'{"choices": []}',
    b'{"choices": [{"message": {"role": "assistant", "content": null}}]}',
    completion("I am sorry, I cannot see any video."),  # content without the two sections
    b"<html>gateway</html>",
])
def test_unparseable_replies_fail_that_sample_only(server: ChatServer, tmp_path: Path, body: bytes) -> None:
    server.respond = lambda sample_id, attempt: (200, {}, body) if sample_id == "valid0$_$0" else ok(
        sample_id, attempt)
    report = generate_cues(text_dataset(), backend(server), tmp_path / "cues.jsonl")
    assert [f.id for f in report.failures] == ["valid0$_$0"] and report.written == 6
    assert report.prompt_tokens == 100 * (6 + (b'"usage"' in body))  # a paid reply counts if it fails
    assert "valid0$_$0" not in load_cue_texts(tmp_path / "cues.jsonl")
    assert server.attempts["valid0$_$0"] == 1


def test_authentication_failure_stops_the_run(server: ChatServer, tmp_path: Path) -> None:
    server.respond = lambda sample_id, attempt: ok(sample_id, attempt) if len(server.bodies) <= 2 else (
        401, {}, b'{"error": "invalid api key"}')
    output = tmp_path / "cues.jsonl"
    with pytest.raises(MsakitError, match=r"authentication failed at http://127\.0\.0\.1:\d+/v1/chat/"
                                          r"completions \(HTTP 401\): check MSAKIT_CUES_API_KEY"):
        generate_cues(text_dataset(), backend(server, concurrency=1), output)
    assert len(server.bodies) == 3  # no request after the refusal
    assert sorted(load_cue_texts(output)) == ["train0$_$0", "train1$_$0"]


def test_connection_errors_are_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = OpenAISettings(base_url=f"http://127.0.0.1:{port}/v1", model="tiny", backoff=0.0,
                              max_retries=1)
    report = generate_cues(text_dataset((1, 0, 0)), OpenAIBackend(settings), tmp_path / "cues.jsonl")
    assert report.written == 0 and "connection error" in report.failures[0].reason
    assert "after 2 attempts" in report.failures[0].reason


def test_concurrency_is_bounded(server: ChatServer, tmp_path: Path) -> None:
    server.delay = 0.05
    report = generate_cues(text_dataset((12, 0, 0)), backend(server, concurrency=3), tmp_path / "cues.jsonl")
    assert report.written == 12
    assert 1 < server.max_active <= 3


def test_resume_requests_only_missing_samples(server: ChatServer, tmp_path: Path) -> None:
    data, output = text_dataset(), tmp_path / "cues.jsonl"
    first = generate_cues(data, backend(server), output, limit=1)  # the first sample of each split
    assert first.written == 3 and sorted(server.ids()) == ["test0$_$0", "train0$_$0", "valid0$_$0"]
    with CueFileWriter(output) as writer:  # cues of another model do not count as done
        writer.write(CueRecord("train1$_$0", "train", "openai", "other-model", PROMPT_VERSION, "v", "l"))
    server.bodies.clear()
    second = generate_cues(data, backend(server), output)
    assert (second.requested, second.skipped, second.written) == (4, 3, 4)
    assert sorted(server.ids()) == ["test1$_$0", "train1$_$0", "train2$_$0", "valid1$_$0"]
    server.bodies.clear()
    third = generate_cues(data, backend(server), output)
    assert (third.requested, third.skipped) == (0, 7) and server.bodies == []
    assert read_cue_records(output)["train1$_$0"]["model"] == "tiny"  # the later line wins


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MSAKIT_CUES_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)
    local = resolve_settings()
    assert local.api_key is None and local.base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")
    settings = resolve_settings()
    assert (settings.api_key, settings.key_source, settings.url) == (
        "openai-key", "OPENAI_API_KEY", "http://localhost:8000/v1/chat/completions")
    monkeypatch.setenv("MSAKIT_CUES_API_KEY", "msakit-key")
    assert resolve_settings().api_key == "msakit-key"
    with pytest.raises(MsakitError, match="--api-key-env MY_KEY"):
        resolve_settings(api_key_env="MY_KEY")
    monkeypatch.setenv("MY_KEY", "mine")
    assert resolve_settings(api_key_env="MY_KEY").key_source == "MY_KEY"
    assert resolve_settings(base_url="http://h/v1/chat/completions/").url == "http://h/v1/chat/completions"
    assert resolve_settings(api_key="k").key_source == "the api_key given"
    with pytest.raises(MsakitError, match="base URL 'localhost:8000'"):
        resolve_settings(base_url="localhost:8000")
    with pytest.raises(MsakitError, match="concurrency should be at least 1"):
        resolve_settings(concurrency=0)


def test_reply_sections_are_parsed_from_common_layouts() -> None:
    assert parse_cues("1. **Visual cues:** a frown\n- brows drawn\n2. **Language cues:**\n'awful'") == (
        "a frown brows drawn", "'awful'")
    assert parse_cues("Sure.\n### Visual Cues\nsmile\n### Language cues\nVisual cues suggest joy") == (
        "smile", "Visual cues suggest joy")
    with pytest.raises(ValueError, match="no 'Language cues' section"):
        parse_cues("Visual cues: smile")


# --- frames from raw media -------------------------------------------------------------------------
def write_video(path: Path, levels: list[int]) -> Path:
    """A grey video whose frame k has brightness levels[k]."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for level in levels:
            image = np.full((48, 64, 3), level, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.skipif(not HAS_AV, reason="PyAV (the extract extra) is not installed")
def test_three_frames_first_middle_last(tmp_path: Path) -> None:
    from PIL import Image

    video = write_video(tmp_path / "clip.mp4", [10 * k for k in range(21)])
    frames = sample_frames(video, count=3)
    brightness = [float(np.asarray(Image.open(io.BytesIO(f))).mean()) for f in frames]
    assert brightness == pytest.approx([0, 100, 200], abs=6)


@pytest.mark.skipif(not HAS_AV, reason="PyAV (the extract extra) is not installed")
def test_media_frames_are_sent_as_images(server: ChatServer, tmp_path: Path) -> None:
    (tmp_path / "clips" / "train0").mkdir(parents=True)
    write_video(tmp_path / "clips" / "train0" / "0.mp4", [30] * 12)  # "train0$_$0" as video/clip
    report = generate_cues(text_dataset((2, 0, 0)), backend(server), tmp_path / "cues.jsonl",
                           media=tmp_path / "clips")
    assert report.with_media == 1 and report.written == 2
    by_id = dict(zip(server.ids(), server.bodies, strict=True))
    parts = by_id["train0$_$0"]["messages"][0]["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(images) == 3 and all(u.startswith("data:image/jpeg;base64,/9j/") for u in images)
    base64.b64decode(images[0].split(",", 1)[1], validate=True)
    assert "3 frames" in prompt_text(by_id["train0$_$0"])
    assert isinstance(by_id["train1$_$0"]["messages"][0]["content"], str)
    (tmp_path / "clips" / "train0" / "0.mp4").write_bytes(b"not a video")
    broken = generate_cues(text_dataset((1, 0, 0)), backend(server, model="other"), tmp_path / "cues.jsonl",
                           media=tmp_path / "clips")
    assert broken.written == 0 and "cannot" in broken.failures[0].reason


# --- the cue file ------------------------------------------------------------------------------------
def record(sample_id: str, split: str = "train", visual: str = "v") -> CueRecord:
    return CueRecord(sample_id, split, "offline", "descriptors-1", "descriptors-1", visual, "l")


def test_cut_off_last_line_is_skipped_and_repaired(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cues.jsonl"
    path.write_text(record("a").to_json() + "\n" + record("b").to_json()[:25])
    with caplog.at_level(logging.WARNING):
        assert load_cue_texts(path) == {"a": "Visual cues: v\nLanguage cues: l"}
    assert "cut-off last line 2" in caplog.text
    with CueFileWriter(path) as writer:
        writer.write(record("c"))
    assert list(load_cue_texts(path)) == ["a", "c"]
    assert path.read_text().count("\n") == 2


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "cues.jsonl"
    path.write_text(record("a").to_json() + "\n{not json\n" + record("b").to_json() + "\n")
    with pytest.raises(MsakitError, match=rf"{re.escape(str(path))} line 2: not a JSON object"):
        load_cue_texts(path)
    values = json.loads(record("b").to_json())
    del values["text"]
    path.write_text(record("a").to_json() + "\n" + json.dumps(values) + "\n")
    with pytest.raises(MsakitError, match="line 2: missing key 'text'"):
        load_cue_texts(path)
    with pytest.raises(MsakitError, match="line 2"):  # a run never appends to such a file
        generate_cues(text_dataset((1, 0, 0)), OfflineBackend(text_dataset((1, 0, 0))), path)
    with pytest.raises(MsakitError, match="cue file not found"):
        load_cue_texts(tmp_path / "absent.jsonl")


def test_duplicate_ids_keep_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cues.jsonl"
    path.write_text("\n".join(r.to_json() for r in (record("a", visual="old"), record("b"),
                                                      record("a", visual="new"))) + "\n")
    assert load_cue_texts(path)["a"].startswith("Visual cues: new\n")


# --- the offline backend -----------------------------------------------------------------------------
def test_offline_cues_are_deterministic_and_label_train_only(tiny_dataset: MultimodalDataset,
                                                             tmp_path: Path) -> None:
    first = generate_cues(tiny_dataset, OfflineBackend(tiny_dataset), tmp_path / "a.jsonl")
    generate_cues(tiny_dataset, OfflineBackend(tiny_dataset), tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = read_cue_records(tmp_path / "a.jsonl")
    n = sum(len(s) for s in (tiny_dataset.train, tiny_dataset.valid, tiny_dataset.test))
    assert first.written == n == len(records) == len((tmp_path / "a.jsonl").read_text().splitlines())
    for split in ("train", "valid", "test"):
        part = tiny_dataset.split(split)
        for i, sample_id in enumerate(part.ids):
            text = records[sample_id]["text"]
            assert records[sample_id]["split"] == split
            assert text.startswith("Visual cues: Face (visual features): intensity ")
            assert f'Transcript: "{part.raw_text[i]}"' in text
            phrase = f"The annotated sentiment is {label_phrase(float(part.labels[i]), 'synthetic')}."
            assert (phrase in text) == (split == "train")
            assert ("annotated" in text) == (split == "train")


def test_offline_words_follow_the_features(tiny_dataset: MultimodalDataset) -> None:
    train = tiny_dataset.train
    vision = train.vision.copy()
    vision[0, : train.vision_lengths[0], 3] += 50.0  # far above every other clip
    presence = np.ones((len(train), 3), bool)
    presence[1, 1] = False  # clip 1 recorded no audio
    changed = dataclasses.replace(train, vision=vision, presence=presence)
    data = MultimodalDataset("tiny", "synthetic", changed, tiny_dataset.valid, tiny_dataset.test,
                             features={"names": {"audio": [f"a{i}" for i in range(5)],
                                                 "vision": [f"brow_raise_{i}" for i in range(20)]}})
    cues = OfflineBackend(data)

    def text(i: int) -> str:
        return cues.cues(CueSample(str(train.ids[i]), "train", i, None, 0.0, "synthetic")).text

    assert "intensity very high" in text(0)
    assert re.search(r"Furthest from the typical training clip: brow raise 3 very high \(\+\d", text(0))
    assert "No audio was recorded for this clip." in text(1) and "No transcript is available." in text(1)
    assert "neutral (0 on the 7-point scale" in text(1)


def test_offline_without_audio_or_vision(tmp_path: Path) -> None:
    data = text_dataset()
    generate_cues(data, OfflineBackend(data), tmp_path / "cues.jsonl")
    assert load_cue_texts(tmp_path / "cues.jsonl")["valid0$_$0"] == (
        "Visual cues: The dataset has no vision features.\nLanguage cues: Transcript: "
        '"transcript of valid0$_$0". The dataset has no audio features.')


# --- what the command calls ----------------------------------------------------------------------------
def test_run_cues_by_name_and_its_errors(tmp_path: Path) -> None:
    pickle = str(save_mmsa(generate_synthetic(n_train=20, n_valid=6, n_test=6, text_len=12, audio_len=20,
                                              vision_len=20, text_dim=16), tmp_path / "tiny.pkl"))
    report = run_cues(pickle, tmp_path / "cues.jsonl", splits=["valid", "test"], limit=2, progress=False)
    assert (report.written, report.backend) == (4, "offline")
    assert {r["split"] for r in read_cue_records(tmp_path / "cues.jsonl").values()} == {"valid", "test"}
    assert run_cues(pickle, tmp_path / "cues.jsonl", splits=["valid"], limit=2, progress=False).skipped == 2
    with pytest.raises(MsakitError, match="unknown split 'dev'"):
        run_cues(pickle, tmp_path / "x.jsonl", splits=["dev"], progress=False)
    with pytest.raises(MsakitError, match="the offline backend takes no model 'gpt-4o'"):
        run_cues(pickle, tmp_path / "x.jsonl", model="gpt-4o", progress=False)
    with pytest.raises(MsakitError, match="does not read media"):
        run_cues(pickle, tmp_path / "x.jsonl", media=tmp_path, progress=False)
    with pytest.raises(MsakitError, match="unknown cue backend 'claude'"):
        make_backend("claude", text_dataset())
