"""`msakit serve`: one checkpoint, loaded once, scoring uploaded media and transcripts over HTTP.

FastAPI + uvicorn (the `serve` extra). Uploads are streamed into a temporary folder of their own,
counted against the size limit as they arrive and deleted once scored. Media extraction runs in
worker threads, so the event loop (and `/healthz`) stays responsive while a long clip is processed.
Every refusal is a JSON body `{"error": CODE, "message": TEXT}`; bad input is never a 500. The
status of each refusal, and why 504 for the time limit: docs/serve.md.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

from msakit import __version__
from msakit.errors import MsakitError
from msakit.features.media import MEDIA_SUFFIXES, MediaError, media_duration
from msakit.fileio import strict_json
from msakit.inference import Predictor

try:
    import anyio
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as missing:
    raise MsakitError(f"msakit serve needs FastAPI, uvicorn and python-multipart ({missing.name} is "
                      "absent): pip install 'msakit[serve]'") from None

log = logging.getLogger("msakit.serve")

MAX_FIELD_BYTES = 64 * 1024  # a form field other than a file: a transcript, never megabytes
# first bytes of the containers FFmpeg reads: an upload that starts like one but cannot be opened is
# damaged media (422), anything else that cannot be opened is not media at all (415)
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/MOV"), (0, b"RIFF", "WAV/AVI"), (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (0, b"OggS", "Ogg"), (0, b"fLaC", "FLAC"), (0, b"ID3", "MP3"), (0, b"FLV", "FLV"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"), (0, b"\x30\x26\xb2\x75", "ASF/WMV"),
)


class Scorer(Protocol):
    """What the service needs from a model: `msakit.inference.Predictor` is one."""

    def predict(self, path: str | Path, text: str | None = None) -> dict[str, Any]: ...

    def predict_text(self, text: str, features: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def card(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the service."""

    max_upload_mb: float = 50.0  # the whole request body (a batch's files together)
    max_duration: float = 120.0  # seconds of media, as the container states it
    max_concurrent: int = 2  # media requests being extracted at once; more are answered 429
    max_batch: int = 16  # items in one batch request
    request_timeout: float = 120.0  # seconds from the request's headers to its answer

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_duration", "request_timeout"):
            if not getattr(self, name) > 0:
                raise MsakitError(f"serve limit {name} must be positive, not {getattr(self, name)}")
        for name in ("max_concurrent", "max_batch"):
            if getattr(self, name) < 1:
                raise MsakitError(f"serve limit {name} must be at least 1, not {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Refusal(Exception):
    """A request the service answers with a 4xx/5xx status and a JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. too_large, not_media, busy")
    message: str = Field(description="what was wrong, in one line")


class TextRequest(BaseModel):
    """A transcript to score, with optional precomputed frame features."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_FIELD_BYTES, description="the transcript")
    features: dict[Literal["audio", "vision"], list[list[float]]] | None = Field(
        default=None, description="optional frame features, one row per frame, as the model was trained on")


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(strict_json({"error": code, "message": message}), status_code=status,
                    media_type="application/json", headers=headers)


def _json_response(document: Any) -> Response:
    return Response(strict_json(document), media_type="application/json")


@dataclass
class Upload:
    """One uploaded file, saved under the request's temporary folder by its position, not its name."""

    filename: str
    path: Path
    size: int = 0
    head: bytes = b""


@dataclass
class _FormReader:
    """multipart/form-data parts as they stream in: files written to `folder`, other fields kept."""

    folder: Path
    max_files: int
    files: list[Upload] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    complete: bool = False
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _header_name: bytes = b""
    _header_value: bytes = b""
    _name: str = ""
    _value: bytearray = field(default_factory=bytearray)
    _handle: Any = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field, "on_header_value": self._header_value_data,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._header_name, self._header_value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise Refusal(422, "malformed", "a multipart part without a Content-Disposition: form-data name")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._value = bytearray()
        if b"filename" not in options:
            return
        if len(self.files) >= self.max_files == 1:
            raise Refusal(422, "malformed", "one file per request here: send several to /v1/predict/batch")
        if len(self.files) >= self.max_files:
            raise Refusal(413, "too_many_items", f"more than {self.max_files} files in one batch")
        filename = options[b"filename"].decode("utf-8", "replace")
        suffix = Path(filename).suffix.lower()
        # FFmpeg probes the content; the suffix only helps it, and the client's name never makes a path
        path = self.folder / f"upload-{len(self.files)}{suffix if suffix in MEDIA_SUFFIXES else ''}"
        self.files.append(Upload(filename or path.name, path))
        self._handle = open(path, "wb")  # noqa: SIM115 - closed at the part's end or by close()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._handle is not None:
            upload = self.files[-1]
            if len(upload.head) < 16:
                upload.head += chunk[:16 - len(upload.head)]
            upload.size += len(chunk)
            self._handle.write(chunk)
        elif len(self._value) + len(chunk) > MAX_FIELD_BYTES:
            raise Refusal(413, "too_large",
                          f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")
        else:
            self._value += chunk

    def _part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            if self._name != "file":
                raise Refusal(422, "malformed", f"file field {self._name!r}: upload files as field 'file'")
        else:
            self.fields.setdefault(self._name, []).append(self._value.decode("utf-8", "replace"))

    def _end(self) -> None:
        self.complete = True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _container_name(head: bytes) -> str | None:
    """The media container the first bytes announce, if any."""
    for offset, magic, name in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio / ADTS frame sync
        return "MPEG audio"
    return None


def _request_content_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    return kind.decode("latin-1").lower(), options


class _Claim:
    """Who frees a media request's slot and folder: its worker thread once it starts, else the request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken


class _Service:
    """The state behind the routes: the model, the limits, the extraction slots, the token."""

    def __init__(self, predictor: Scorer, limits: Limits, token: str | None, upload_dir: Path | None) -> None:
        self.predictor, self.limits, self.token = predictor, limits, token
        self.upload_dir = upload_dir
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)  # released by the worker thread
        self.busy = 0
        self.busy_lock = threading.Lock()
        self.media_threads = anyio.CapacityLimiter(limits.max_concurrent)
        self.text_threads = anyio.CapacityLimiter(limits.max_concurrent)

    # --- the request body ------------------------------------------------------------------------
    async def _body_chunks(self, request: Request) -> Any:
        """The body as it arrives; refused once it passes the size limit."""
        limit = self.limits.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Refusal(413, "too_large", f"request body of {int(declared)} bytes is over the limit of "
                          f"{limit} bytes ({self.limits.max_upload_mb:g} MB)")
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise Refusal(413, "too_large", f"request body passed the limit of {limit} bytes "
                                  f"({self.limits.max_upload_mb:g} MB)")
                if chunk:
                    yield chunk
        except ClientDisconnect:
            raise Refusal(400, "client_disconnected", "the client closed the connection during the upload") \
                from None

    async def _read_json(self, request: Request) -> Any:
        body = b"".join([chunk async for chunk in self._body_chunks(request)])
        if not body.strip():
            raise Refusal(422, "empty_body", "the request body is empty")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refusal(422, "malformed", f"the body is not valid JSON ({exc})") from None

    async def _read_form(self, request: Request, folder: Path, max_files: int) -> _FormReader:
        _, options = _request_content_type(request)
        boundary = options.get(b"boundary")
        if not boundary:
            raise Refusal(422, "malformed", "multipart/form-data without a boundary in its Content-Type")
        reader = _FormReader(folder, max_files)
        received = 0
        try:
            parser = MultipartParser(boundary, reader.callbacks())
            async for chunk in self._body_chunks(request):
                received += len(chunk)
                parser.write(chunk)
            parser.finalize()
        except (MultipartParseError, ValueError) as exc:
            raise Refusal(422, "malformed", f"malformed multipart body ({exc})") from None
        finally:
            reader.close()
        if not received:
            raise Refusal(422, "empty_body", "the request body is empty")
        if not reader.complete:
            raise Refusal(422, "malformed", "the multipart body ends before its closing boundary")
        unknown = sorted(set(reader.fields) - {"text"})
        if unknown:
            raise Refusal(422, "malformed", f"unknown form field(s) {', '.join(unknown)}: send 'file' "
                          "(the media) and optionally 'text' (its transcript)")
        if not reader.files:
            raise Refusal(422, "malformed", "no file in the form: upload the media as field 'file'")
        return reader

    def _refuse_unsupported(self, request: Request, kind: str) -> NoReturn:
        if request.headers.get("content-length") == "0":
            raise Refusal(422, "empty_body", "the request body is empty: upload media as multipart/form-data "
                          "field 'file', or send JSON {\"text\": ...}")
        raise Refusal(415, "unsupported_content_type", f"Content-Type {kind or '(none)'} is not accepted: "
                      "send multipart/form-data (field 'file') or application/json ({\"text\": ...})")

    # --- scoring -------------------------------------------------------------------------------------
    def _score_file(self, upload: Upload, text: str | None) -> dict[str, Any]:
        """Runs in a worker thread: probe the container, check its duration, extract and score."""

        def reason(exc: MsakitError) -> str:  # the message with the client's name, not the server's path
            return str(exc).replace(f"{upload.path}: ", "").replace(str(upload.path), upload.filename)

        try:
            if not upload.size:
                raise Refusal(422, "empty_body", f"{upload.filename}: the uploaded file is empty")
            try:
                duration = media_duration(upload.path)
            except MediaError as exc:
                container = _container_name(upload.head)
                if container is None:
                    raise Refusal(415, "not_media", f"{upload.filename}: not an audio or video file "
                                  f"({reason(exc)})") from None
                raise Refusal(422, "damaged_media", f"{upload.filename}: starts like {container} but "
                              f"{reason(exc)}: truncated or damaged?") from None
            if duration is not None and duration > self.limits.max_duration:
                raise Refusal(413, "too_long", f"{upload.filename}: {duration:.1f} s of media is over the "
                              f"limit of {self.limits.max_duration:g} s")
            try:
                result = self.predictor.predict(upload.path, text)
            except MediaError as exc:
                raise Refusal(422, "damaged_media", f"{upload.filename}: {reason(exc)}") from None
            except MsakitError as exc:
                raise Refusal(422, "unusable_media", f"{upload.filename}: {reason(exc)}") from None
            return {**result, "file": upload.filename}
        finally:
            upload.path.unlink(missing_ok=True)

    def _release(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        with self.busy_lock:
            self.busy -= 1
        self.slots.release()

    def _score_files(self, claim: _Claim, folder: Path, uploads: list[Upload], texts: list[str | None],
                     batch: bool) -> list[dict[str, Any]]:
        """Runs in a worker thread holding one extraction slot; frees the slot and the folder after."""
        if not claim.take():
            return []  # the request gave up (timed out) before this thread started, and freed both
        try:
            results = []
            for upload, text in zip(uploads, texts, strict=True):
                try:
                    results.append(self._score_file(upload, text))
                except Refusal as refusal:
                    if not batch:
                        raise
                    results.append({"file": upload.filename, "error": refusal.code, "status": refusal.status,
                                    "message": refusal.message})
            return results
        finally:
            self._release(folder)

    async def _media(self, request: Request, batch: bool) -> list[dict[str, Any]]:
        folder = Path(tempfile.mkdtemp(prefix="msakit-serve-", dir=self.upload_dir))
        try:
            form = await self._read_form(request, folder, self.limits.max_batch if batch else 1)
            texts: list[str | None] = list(form.fields.get("text", []))
            if len(texts) > len(form.files) or (batch and texts and len(texts) != len(form.files)):
                raise Refusal(422, "malformed", f"{len(texts)} 'text' field(s) for {len(form.files)} "
                              "file(s): give one transcript per file, in the same order, or none")
            texts += [None] * (len(form.files) - len(texts))
            if not self.slots.acquire(blocking=False):
                raise Refusal(429, "busy", f"all {self.limits.max_concurrent} extraction slots are busy; "
                              "retry shortly", {"Retry-After": "1"})
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self.busy_lock:
            self.busy += 1
        claim = _Claim()
        try:
            # abandoned on timeout: a thread that started finishes on its own, then frees slot and folder
            return await anyio.to_thread.run_sync(self._score_files, claim, folder, form.files, texts, batch,
                                                  abandon_on_cancel=True, limiter=self.media_threads)
        finally:
            if claim.take():
                self._release(folder)

    def _text_item(self, document: Any, where: str) -> TextRequest:
        try:
            return TextRequest.model_validate(document)
        except ValidationError as exc:
            first = exc.errors()[0]
            location = ".".join(str(part) for part in first["loc"]) or "body"
            raise Refusal(422, "malformed", f"{where}{location}: {first['msg']}") from None

    def _score_texts(self, items: list[TextRequest]) -> list[dict[str, Any]]:
        results = []
        for item in items:
            features = None if item.features is None else dict(item.features)
            try:
                result = self.predictor.predict_text(item.text, features)
            except MsakitError as exc:
                raise Refusal(422, "malformed", str(exc)) from None
            results.append({key: value for key, value in result.items() if key != "file"})  # no file here
        return results

    async def _texts(self, request: Request, batch: bool) -> list[dict[str, Any]]:
        document = await self._read_json(request)
        if batch:
            if not isinstance(document, list) or not document:
                raise Refusal(422, "malformed", "a JSON batch is a non-empty list of {\"text\": ...} objects")
            if len(document) > self.limits.max_batch:
                raise Refusal(413, "too_many_items", f"a batch of {len(document)} items is over the limit of "
                              f"{self.limits.max_batch}")
            items = [self._text_item(entry, f"item {i}: ") for i, entry in enumerate(document)]
        else:
            items = [self._text_item(document, "")]
        return await anyio.to_thread.run_sync(self._score_texts, items, abandon_on_cancel=True,
                                              limiter=self.text_threads)

    async def score(self, request: Request, batch: bool) -> Response:
        kind, _ = _request_content_type(request)
        try:
            with anyio.fail_after(self.limits.request_timeout):
                if kind == "multipart/form-data":
                    results = await self._media(request, batch)
                elif kind == "application/json":
                    results = await self._texts(request, batch)
                else:
                    self._refuse_unsupported(request, kind)
        except TimeoutError:
            raise Refusal(504, "timeout", f"the request took longer than the limit of "
                          f"{self.limits.request_timeout:g} s") from None
        return _json_response({"results": results} if batch else results[0])

    # --- access ------------------------------------------------------------------------------------------
    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refusal(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer ...)",
                          {"WWW-Authenticate": "Bearer"})


UPLOAD_FORM = {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "an audio or video file"},
    "text": {"type": "string", "description": "its transcript (default: speech recognition)"}}}
BATCH_FORM = {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "media files"},
    "text": {"type": "array", "items": {"type": "string"},
             "description": "one transcript per file, in order (optional)"}}}
REFUSALS = {status: {"model": ErrorBody, "description": description} for status, description in [
    (401, "missing or wrong bearer token"), (413, "body, media duration or batch over the limit"),
    (415, "not multipart/form-data or JSON, or the upload is not media"),
    (422, "empty or malformed request, damaged media, nothing the model reads"),
    (429, "every extraction slot is busy"), (504, "over the request time limit")]}


def create_app(predictor: Scorer, limits: Limits | None = None, token: str | None = None,
               upload_dir: str | Path | None = None) -> FastAPI:
    """The service around a loaded model; `token`, when given, is required as a bearer token on /v1/*.

    `upload_dir` is where each request's temporary folder is made (default: the system's temp dir).
    """
    limits = limits or Limits()
    service = _Service(predictor, limits, token, None if upload_dir is None else Path(upload_dir))
    bearer = HTTPBearer(auto_error=False, description="the token the server reads from --token-env")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        service.authorize(credentials)

    app = FastAPI(title="msakit", version=__version__,
                  description="Multimodal sentiment of media files and transcripts with one msakit model.")

    @app.exception_handler(Refusal)
    async def refusal(_: Request, exc: Refusal) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def framework_refusal(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        location = ".".join(str(part) for part in first["loc"])
        return _error_response(422, "malformed", f"{location}: {first['msg']}")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        log.exception("internal error", exc_info=exc)
        return _error_response(500, "internal_error", f"{type(exc).__name__} inside msakit (a bug, not your "
                               "request); the server log has the traceback")

    @app.get("/healthz", summary="liveness: answers while extractions run")
    async def healthz() -> Response:
        return _json_response({"status": "ok", "busy": service.busy, "max_concurrent": limits.max_concurrent})

    @app.get("/v1/model", summary="the loaded model's card", dependencies=[Depends(authorized)],
             responses={401: REFUSALS[401]})
    async def model() -> Response:
        return _json_response(predictor.card())

    @app.post("/v1/predict", summary="sentiment of one media upload, or of a transcript",
              dependencies=[Depends(authorized)], responses=REFUSALS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": UPLOAD_FORM},
                  "application/json": {"schema": TextRequest.model_json_schema()}}}})
    async def predict(request: Request) -> Response:
        return await service.score(request, batch=False)

    @app.post("/v1/predict/batch", summary="sentiment of several uploads, or of a list of transcripts",
              dependencies=[Depends(authorized)], responses=REFUSALS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": BATCH_FORM},
                  "application/json": {"schema": {"type": "array",
                                                   "items": TextRequest.model_json_schema()}}}}})
    async def predict_batch(request: Request) -> Response:
        return await service.score(request, batch=True)

    return app


def read_token(token_env: str | None) -> str | None:
    """The bearer token from the environment variable `token_env` (never from the command line)."""
    if token_env is None:
        return None
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise MsakitError(f"--token-env {token_env}: the environment variable is unset or empty")
    return token


def run(checkpoint: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000,
        token_env: str | None = None, limits: Limits | None = None, device: str = "cpu") -> None:
    """Load the checkpoint (None: the packaged default model) and answer HTTP until interrupted."""
    limits = limits or Limits()
    token = read_token(token_env)
    predictor = Predictor(None if checkpoint is None else str(checkpoint), device=device)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log.info("serving %s (%s); limits: %s; token: %s", predictor.checkpoint, predictor.model_name,
             ", ".join(f"{name}={value:g}" for name, value in dataclasses.asdict(limits).items()),
             f"from ${token_env}" if token else "none")
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("listening on %s without a token: anyone who reaches the port can use the service "
                    "(set --token-env, or put it behind a reverse proxy that authenticates)", host)
    uvicorn.run(create_app(predictor, limits, token), host=host, port=port, log_level="info")
