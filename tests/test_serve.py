"""`msakit serve`: the real app under uvicorn on a free loopback port, spoken to over HTTP.

The model is a tiny checkpoint trained on three synthetic clips; only the concurrency test swaps in
a predictor that blocks until told to finish, so that an extraction lasts as long as the test needs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from msakit import api  # noqa: E402
from msakit.cli import cli  # noqa: E402
from msakit.data.mmsa import load_mmsa  # noqa: E402
from msakit.features import build_dataset, load_feature_config  # noqa: E402
from msakit.inference import Predictor  # noqa: E402
from msakit.serve import Limits, create_app  # noqa: E402
from test_features import needs_extra, truncated, write_clip  # noqa: E402

pytestmark = needs_extra
TOKEN = "s3cret-token"


@contextmanager
def running(app: Any) -> Iterator[httpx.Client]:
    """`app` served by uvicorn in a thread on a free loopback port, and a client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for i, (colour, tone) in enumerate([((200, 40, 40), 180.0), ((40, 200, 40), 260.0),
                                        ((40, 40, 200), 340.0)]):
        write_clip(folder / f"{i}.mp4", seconds=0.5, colour=colour, tone=tone)
    write_clip(folder / "long.mp4", seconds=2.0)
    write_clip(folder / "quiet.mp4", seconds=0.5, amplitude=0.0)  # no face, silence, no words
    truncated(folder / "0.mp4", folder / "cut.mp4")
    (folder / "notes.txt").write_text("not a video at all\n" * 20)
    return folder


@pytest.fixture(scope="module")
def predictor(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    root = tmp_path_factory.mktemp("model")
    labels = root / "label.csv"
    labels.write_text("id,text,label,mode\n0,a bad film,-2,train\n1,a fine film,1.5,valid\n"
                      "2,great,2.8,test\n")
    build_dataset(clips, labels, root / "ds.pkl", load_feature_config(), workers=0, progress=False)
    api.train("tfn", load_mmsa(root / "ds.pkl"), epochs=1, output=root / "run", progress=False)
    return Predictor(root / "run" / "seed-1111.pt")


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def client(predictor: Predictor, uploads: Path) -> Iterator[httpx.Client]:
    limits = Limits(max_upload_mb=0.05, max_duration=1.5, max_batch=3)
    with running(create_app(predictor, limits, upload_dir=uploads)) as client:
        yield client


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", (path.name, path.read_bytes())) for path in paths]


def test_media_text_and_batches_are_scored(client: httpx.Client, clips: Path, uploads: Path) -> None:
    one = client.post("/v1/predict", files=upload(clips / "0.mp4"), data={"text": "a bad film"})
    assert one.status_code == 200, one.text
    result = one.json()
    assert result["file"] == "0.mp4" and result["transcript"] == "a bad film"
    assert result["present"] == {"text": True, "audio": True, "vision": False}
    assert isinstance(result["score"], float) and result["scale"] == "7-point"

    text = client.post("/v1/predict", json={"text": "a fine film"})
    assert text.status_code == 200, text.text
    assert text.json()["transcript"] == "a fine film" and text.json()["used"] == ["text"]

    batch = client.post("/v1/predict/batch", data={"text": ["fine", "cut", "great"]},
                        files=upload(clips / "1.mp4", clips / "cut.mp4", clips / "2.mp4"))
    assert batch.status_code == 200, batch.text
    first, broken, last = batch.json()["results"]
    assert first["file"] == "1.mp4" and last["transcript"] == "great"
    assert (broken["file"], broken["error"], broken["status"]) == ("cut.mp4", "damaged_media", 422)
    texts = client.post("/v1/predict/batch", json=[{"text": "bad"}, {"text": "good"}])
    assert [r["transcript"] for r in texts.json()["results"]] == ["bad", "good"]

    assert client.get("/v1/model").json()["model"] == "tfn"
    assert client.get("/healthz").json() == {"status": "ok", "busy": 0, "max_concurrent": 2}
    assert "/v1/predict/batch" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert not list(uploads.iterdir())  # every upload deleted once scored


def chunks(size: int) -> Iterator[bytes]:
    """A well-formed upload without Content-Length (chunked): only counting as it streams can refuse it."""
    yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n\r\n'
    for _ in range(size // 8192):
        yield b"\0" * 8192


MULTIPART = {"content-type": "multipart/form-data; boundary=xyz"}
JSON = {"content-type": "application/json"}
UNCLOSED = b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi'


@pytest.mark.parametrize(("make_request", "status", "error"), [
    pytest.param(lambda clips: {"files": upload(clips / "notes.txt")}, 415, "not_media", id="not media"),
    pytest.param(lambda clips: {"files": upload(clips / "cut.mp4")}, 422, "damaged_media", id="truncated"),
    pytest.param(lambda clips: {"files": upload(clips / "quiet.mp4")}, 422, "unusable_media",
                 id="nothing the model reads"),
    pytest.param(lambda clips: {"files": upload(clips / "long.mp4")}, 413, "too_long", id="too long"),
    pytest.param(lambda clips: {"content": b"", "headers": MULTIPART}, 422, "empty_body", id="empty form"),
    pytest.param(lambda clips: {"content": b"", "headers": JSON}, 422, "empty_body", id="empty JSON"),
    pytest.param(lambda clips: {"content": b""}, 422, "empty_body", id="empty, no type"),
    pytest.param(lambda clips: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
                 "unsupported_content_type", id="wrong content type"),
    pytest.param(lambda clips: {"content": b"\0" * 60_000, "headers": MULTIPART}, 413, "too_large",
                 id="oversize, declared"),
    pytest.param(lambda clips: {"content": chunks(80_000), "headers": MULTIPART}, 413, "too_large",
                 id="oversize, chunked"),
    pytest.param(lambda clips: {"content": UNCLOSED, "headers": MULTIPART}, 422, "malformed",
                 id="no closing boundary"),
    pytest.param(lambda clips: {"files": {"text": (None, "hello")}}, 422, "malformed", id="no file"),
    pytest.param(lambda clips: {"files": upload(clips / "0.mp4", clips / "1.mp4")}, 422, "malformed",
                 id="two files"),
    pytest.param(lambda clips: {"files": upload(clips / "0.mp4"), "data": {"speaker": "x"}}, 422,
                 "malformed", id="unknown field"),
    pytest.param(lambda clips: {"content": b'{"text": ', "headers": JSON}, 422, "malformed", id="bad JSON"),
    pytest.param(lambda clips: {"json": {"txt": "hi"}}, 422, "malformed", id="JSON without text"),
    pytest.param(lambda clips: {"json": {"text": "hi", "features": {"audio": [[1.0, 2.0]]}}}, 422,
                 "malformed", id="features of the wrong width"),
])
def test_bad_requests_get_their_status_and_a_json_reason(client: httpx.Client, clips: Path, uploads: Path,
                                                         make_request: Any, status: int, error: str) -> None:
    answer = client.post("/v1/predict", **make_request(clips))
    assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    assert answer.json()["message"]
    assert not list(uploads.iterdir())


def test_batch_limits(client: httpx.Client, clips: Path) -> None:
    too_many = client.post("/v1/predict/batch", json=[{"text": "x"}] * 4)
    assert (too_many.status_code, too_many.json()["error"]) == (413, "too_many_items")
    files = client.post("/v1/predict/batch", files=upload(*(clips / f"{i}.mp4" for i in (0, 1, 2, 0))))
    assert (files.status_code, files.json()["error"]) == (413, "too_many_items")
    unpaired = client.post("/v1/predict/batch", files=upload(clips / "0.mp4", clips / "1.mp4"),
                           data={"text": "only one"})
    assert (unpaired.status_code, unpaired.json()["error"]) == (422, "malformed")
    assert client.post("/v1/predict/batch", json={"text": "x"}).status_code == 422


def test_token(predictor: Predictor) -> None:
    with running(create_app(predictor, token=TOKEN)) as client:
        missing = client.post("/v1/predict", json={"text": "fine"})
        assert (missing.status_code, missing.json()["error"]) == (401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/v1/model", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401
        good = client.post("/v1/predict", json={"text": "fine"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200
        assert client.get("/healthz").status_code == 200  # probes need no token


class BlockingPredictor:
    """Extraction that lasts until the test releases it."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def predict(self, path: str | Path, text: str | None = None) -> dict[str, Any]:
        self.started.set()
        assert self.release.wait(30)
        return {"file": str(path), "score": 1.0}

    def predict_text(self, text: str, features: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"score": 0.0, "transcript": text}

    def card(self) -> dict[str, Any]:
        return {"model": "blocking"}


def test_healthz_answers_during_a_long_extraction_and_limits_hold(clips: Path, tmp_path: Path) -> None:
    slow = BlockingPredictor()
    limits = Limits(max_concurrent=1, request_timeout=2.0)
    with running(create_app(slow, limits, upload_dir=tmp_path)) as client:
        answers: list[httpx.Response] = []

        def long_request() -> None:
            answers.append(client.post("/v1/predict", files=upload(clips / "0.mp4")))

        worker = threading.Thread(target=long_request)
        worker.start()
        assert slow.started.wait(10)
        assert client.get("/healthz").json()["busy"] == 1  # answered while the extraction runs
        assert client.post("/v1/predict", json={"text": "short"}).status_code == 200
        busy = client.post("/v1/predict", files=upload(clips / "1.mp4"))
        assert (busy.status_code, busy.json()["error"]) == (429, "busy")
        assert busy.headers["retry-after"] == "1"
        slow.release.set()
        worker.join(10)
        assert answers[0].status_code == 200 and answers[0].json()["file"] == "0.mp4"

        slow.started.clear()
        slow.release.clear()
        late = client.post("/v1/predict", files=upload(clips / "1.mp4"))  # blocks past the time limit
        assert (late.status_code, late.json()["error"]) == (504, "timeout")
        assert client.get("/healthz").json()["busy"] == 1  # the abandoned extraction still holds its slot
        slow.release.set()
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/healthz").json()["busy"] == 0
        assert not list(tmp_path.iterdir())


def test_cli_wires_checkpoint_token_and_limits(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr("msakit.serve.uvicorn.run", lambda app, **where: served.update(app=app, **where))
    monkeypatch.setenv("MSAKIT_TEST_TOKEN", TOKEN)
    result = CliRunner().invoke(cli, ["serve", "--checkpoint", predictor.checkpoint, "--port", "8123",
                                      "--token-env", "MSAKIT_TEST_TOKEN", "--max-concurrent", "1"])
    assert result.exit_code == 0, result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    with running(served["app"]) as client:
        assert client.get("/healthz").json()["max_concurrent"] == 1
        assert client.get("/v1/model").status_code == 401
        card = client.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert card["checkpoint"] == predictor.checkpoint


def test_cli_refuses_an_unset_token_variable() -> None:
    result = CliRunner().invoke(cli, ["serve", "--token-env", "MSAKIT_SURELY_UNSET_VARIABLE"])
    assert result.exit_code == 2
    assert "MSAKIT_SURELY_UNSET_VARIABLE: the environment variable is unset or empty" in result.stderr
