"""One-shot OpenAI-compatible endpoints on the thin request path.

Each request is normalized once, checked against per-key limits and budgets, routed and run
by the executor (fallback, hedging, mirroring as configured), and answered in OpenAI's shape.
Every answer carries `x-spear-instance` (who served it), `x-spear-attempts` and
`x-spear-overhead-ms` (spear_rt's own time: total minus the backend's).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import msgspec

from spear_rt.audio.files import AudioLimits
from spear_rt.backend import OneShotRequest, OneShotResponse
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import CanonicalError, ErrorCode, Operation, Usage
from spear_rt.media import MediaStore, check_http_url, fetch_http_url, sha256_of_uri
from spear_rt.normalize import (
    InvalidInput,
    Normalized,
    normalize_json,
    normalize_transcription,
    transcription_source,
)
from spear_rt.registry import RegisteredInstance
from spear_rt.router.execute import Executor
from spear_rt.server.http import (
    HttpConnection,
    HttpError,
    HttpRequest,
    Response,
    canonical_error_response,
    error_body,
    json_response,
)
from spear_rt.server.media_http import (
    public_base_url,
    serve_headers,
    served_mime,
    sniff_mime,
    upload_of,
)
from spear_rt.server.multipart import OFF_LOOP_BYTES, MultipartError, Part, parse_form
from spear_rt.session.machine import new_id

if TYPE_CHECKING:
    from spear_rt.server.app import Server

JSON_ENDPOINTS = {
    "/v1/chat/completions": Operation.CHAT_COMPLETIONS,
    "/v1/embeddings": Operation.EMBEDDINGS,
    "/v1/audio/speech": Operation.TEXT_TO_SPEECH,
    "/v1/images/generations": Operation.IMAGE_GENERATION,
}
TRANSCRIPTIONS = "/v1/audio/transcriptions"
MEDIA = "/v1/media"
MEDIA_PREFIX = "/v1/media/"  # GET /v1/media/<sha256>: matched by prefix in `Server._route`
FETCH_TIMEOUT_S = 30.0
DEFAULT_TIMEOUT_S = 120.0
DECODE_THREADS = 2  # uploads decoded at once; the others wait their turn
# The overhead header is a measurement, not logic: it reads a monotonic clock of its own,
# since uvloop's loop clock moves in whole milliseconds (the header would read 0 or 1).
_stopwatch = time.perf_counter


class StreamingAnswer:
    """A routed stream: written by the connection, not returned as one Response."""

    def __init__(self, response: OneShotResponse, headers: list[tuple[str, str]]) -> None:
        self.response = response
        self.headers = headers


class OneShotApi:
    """The one-shot endpoints of one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        policy = server.config.policy
        self.executor = Executor(
            lambda: server.router, retry=policy.retry, hedge=policy.hedge, mirror=policy.mirror
        )
        self._media: MediaStore | None = None
        self._decoders: anyio.CapacityLimiter | None = None

    def _decode_limiter(self) -> anyio.CapacityLimiter:
        """Bounds the uploads decoding at once (each holds up to max_audio_samples)."""
        if self._decoders is None:
            self._decoders = anyio.CapacityLimiter(DECODE_THREADS)
        return self._decoders

    @property
    def media(self) -> MediaStore:
        """The server's media store, created on first use from the `[media]` config."""
        if self._media is None:
            cfg = self.server.config.media
            self._media = MediaStore(cfg.root_path, cfg.max_bytes, cfg.max_age_s)
        return self._media

    def routes(self) -> dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]]:
        """(method, path) -> handler (streams are answered through `handle_streaming`)."""
        routes: dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]] = {
            (b"POST", path): self.handle for path in (*JSON_ENDPOINTS, TRANSCRIPTIONS)
        }
        routes[(b"GET", "/v1/models")] = self.models
        routes[(b"POST", MEDIA)] = self.upload_media
        return routes

    async def upload_media(self, request: HttpRequest) -> Response:
        """Store the body, or a multipart form's file part (`upload_of`): 201 with its reference."""
        data, mime = await upload_of(request)
        try:
            stored = await self.media.put(data, mime)
        except CanonicalFailure as exc:
            return canonical_error_response(exc.error)
        return json_response(
            201,
            {"sha256": stored.sha256, "uri": stored.uri, "size": stored.size, "mime": stored.mime},
        )

    async def get_media(self, request: HttpRequest) -> Response:
        """GET /v1/media/<sha256>: the stored bytes, served as a type no browser runs
        (`served_mime`, nosniff; 404 when gone)."""
        sha = request.path[len(MEDIA_PREFIX) :]
        try:
            stat = await self.media.stat(sha)
            data = await self.media.get(stat.sha256)
        except CanonicalFailure as exc:
            return json_response(404, error_body(exc.error.message, "media_not_found"))
        return Response(200, data, served_mime(stat.mime), serve_headers())

    async def models(self, request: HttpRequest) -> Response:
        """OpenAI's model list: each instance's model (or its name when it serves any)."""
        data = []
        for inst in self.server.registry.instances.values():
            if inst.unavailable is None:
                data.append(
                    {
                        "id": inst.model or inst.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": inst.name,
                        "spear": {"ops": sorted(inst.ops)},
                    }
                )
        return json_response(200, {"object": "list", "data": data})

    async def handle(self, request: HttpRequest) -> Response:
        """Normalize, route, run; a stream is handed back to the connection to write."""
        started = _stopwatch()
        try:
            normalized = await self._normalize(request)
            wants_url = _image_url_requested(normalized)
            if wants_url:  # backends answer b64_json; the edge stores it and answers a URL
                req = normalized.request
                payload = {**req.payload, "response_format": "b64_json"}
                normalized = msgspec.structs.replace(
                    normalized, request=msgspec.structs.replace(req, payload=payload, raw_body=None)
                )
            await self.server.router.admit_shared(normalized.envelope)
            answer = await self._run(normalized, started)
            if wants_url and isinstance(answer, Response) and answer.status == 200:
                answer = await self._images_as_urls(answer)
        except InvalidInput as exc:
            return json_response(400, error_body(str(exc), exc.code, param=exc.param))
        except CanonicalFailure as exc:
            return canonical_error_response(exc.error)
        except BackendFailure as exc:
            return _backend_failure_response(exc)
        except TimeoutError:
            return canonical_error_response(
                CanonicalError(
                    ErrorCode.TIMEOUT, "the backend did not answer in time", retryable=True
                )
            )
        return answer  # type: ignore[return-value]

    async def _normalize(self, request: HttpRequest) -> Normalized:
        hints = {
            "backend": request.header("spear-backend"),
            "policy": request.header("spear-policy"),
            "allow": request.header("spear-allow"),
            "deny": request.header("spear-deny"),
            "timeout_ms": request.header("spear-timeout-ms"),
        }
        args = {"request_id": new_id("req"), "hints": hints, "client_key_id": request.client_key_id}
        if request.path == TRANSCRIPTIONS:
            try:
                form = await parse_form(request.body, request.header("content-type"))
            except MultipartError as exc:
                raise InvalidInput(str(exc), None, "invalid_multipart") from None
            source, value = transcription_source(form)
            if value is not None:
                form = {**form, "file": await self._resolve_audio(source, value)}
            # Decoding is CPU-bound (libsndfile and soxr release the GIL): a worker thread,
            # at most DECODE_THREADS at once, within the server's audio limits.
            server = self.server.config.server
            limits = AudioLimits(server.max_audio_seconds, server.max_audio_samples)
            decode = partial(normalize_transcription, form, audio_limits=limits, **args)
            return await anyio.to_thread.run_sync(decode, limiter=self._decode_limiter())
        operation = JSON_ENDPOINTS[request.path]
        if len(request.body) > OFF_LOOP_BYTES:  # decoding and the depth check are CPU-bound
            decode_json = partial(normalize_json, operation, request.body, **args)
            return await anyio.to_thread.run_sync(decode_json)
        return normalize_json(operation, request.body, **args)

    async def _resolve_audio(self, source: str, value: str) -> Part:
        """A `file_ref` (from the media store) or `file_url` (an allowed host) as a file part."""
        if source == "file_ref":
            try:
                sha = sha256_of_uri(value)
                stat = await self.media.stat(sha)
                data = await self.media.get(sha)
            except CanonicalFailure as exc:
                raise InvalidInput(exc.error.message, "file_ref", "media_not_found") from None
            return Part("file", data, sha, stat.mime)
        cfg = self.server.config.media
        if not cfg.allowed_hosts:
            raise InvalidInput(
                "fetching media by URL is disabled on this server (its media.allowed_hosts is "
                "empty); upload the file, or POST it to /v1/media and send `file_ref`",
                "file_url",
                "url_not_allowed",
            )
        try:
            check_http_url(value, cfg.allowed_hosts)
        except CanonicalFailure as exc:
            raise InvalidInput(
                f"{exc.error.message} (media.allowed_hosts)", "file_url", "url_not_allowed"
            ) from None
        try:
            with anyio.fail_after(FETCH_TIMEOUT_S):
                fetched = await fetch_http_url(value, cfg.allowed_hosts, cfg.max_fetch_bytes)
        except CanonicalFailure as exc:
            raise InvalidInput(exc.error.message, "file_url", "media_fetch_failed") from None
        except TimeoutError:
            raise InvalidInput(
                f"media URL did not answer within {FETCH_TIMEOUT_S:g} s",
                "file_url",
                "media_fetch_failed",
            ) from None
        name = urlsplit(value).path.rsplit("/", 1)[-1] or "upload"
        return Part("file", fetched.data, name, fetched.mime)

    async def _images_as_urls(self, answer: Response) -> Response:
        """Store each `b64_json` image of an answer and replace it by a `url` to GET it
        (under `[server] public_url`, never the client's Host header)."""
        try:
            body = msgspec.json.decode(answer.body)
            items: list[dict[str, Any]] = body["data"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return answer  # not the shape we know: pass it through untouched
        base = public_base_url(self.server.config, self.server.port)
        for item in items:
            encoded = item.pop("b64_json", None) if isinstance(item, dict) else None
            if not isinstance(encoded, str):
                continue
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise BackendFailure("the backend answered an image that is not base64") from None
            stored = await self.media.put(data, sniff_mime(data))
            item["url"] = f"{base}{MEDIA_PREFIX}{stored.sha256}"
        return Response(
            answer.status, msgspec.json.encode(body), answer.content_type, answer.headers
        )

    async def _run(self, normalized: Normalized, started: float) -> Response | StreamingAnswer:
        envelope = normalized.envelope
        timeout_s = (
            envelope.timeout_ms / 1000 if envelope.timeout_ms is not None else DEFAULT_TIMEOUT_S
        )
        backend_time = 0.0  # in every attempt, failed ones included: not spear_rt's overhead

        async def call(instance: RegisteredInstance) -> OneShotResponse:
            nonlocal backend_time
            assert instance.kind is not None
            request: OneShotRequest = normalized.for_model(instance.model)
            t0 = _stopwatch()
            try:
                with anyio.fail_after(timeout_s):
                    return await instance.kind.call(instance.info, request)
            finally:
                backend_time += _stopwatch() - t0

        done = await self.executor.run(envelope, call, idempotent=True)
        response = done.result
        await self.server.router.charge_shared(
            envelope, done.instance, response.usage or _estimate(normalized)
        )
        overhead_ms = max((_stopwatch() - started - backend_time) * 1000, 0.0)
        headers = [
            ("x-spear-instance", done.instance.name),
            ("x-spear-attempts", str(done.attempts)),
            ("x-spear-overhead-ms", f"{overhead_ms:.3f}"),
        ]
        if getattr(done.instance.kind, "stub", False):  # its answers are not a model's
            headers.append(("x-spear-stub", "true"))
        if response.stream is not None:
            return StreamingAnswer(response, headers)
        return Response(response.status, response.body, response.content_type, headers)


def _image_url_requested(normalized: Normalized) -> bool:
    request = normalized.request
    return (
        request.operation is Operation.IMAGE_GENERATION
        and request.payload.get("response_format") == "url"
    )


def _backend_failure_response(exc: BackendFailure) -> Response:
    status = exc.status if exc.status is not None and 400 <= exc.status < 500 else 502
    headers = []
    if exc.retry_after_s is not None:
        headers.append(("Retry-After", str(max(1, round(exc.retry_after_s)))))
    code = "rate_limited" if status == 429 else "backend_error"
    return json_response(
        status,
        error_body(str(exc), code, "invalid_request_error" if status < 500 else "server_error"),
        headers,
    )


def _estimate(normalized: Normalized) -> Usage:
    """What was sent, when the backend reported no usage: ~4 characters per token."""
    request = normalized.request
    if request.audio is not None and request.audio.pcm is not None and request.audio.rate_hz:
        return Usage(audio_seconds=request.audio.pcm.size / request.audio.rate_hz)
    size = len(request.raw_body) if request.raw_body is not None else 0
    if request.operation is Operation.IMAGE_GENERATION:
        return Usage(images=int(request.payload.get("n") or 1))
    if request.operation is Operation.TEXT_TO_SPEECH:
        return Usage(characters=len(str(request.payload.get("input", ""))))
    return Usage(input_tokens=size // 4)


async def write_answer(http: HttpConnection, answer: Response | StreamingAnswer) -> bool:
    """Write a one-shot answer; False when a streaming client went away mid-stream."""
    if isinstance(answer, StreamingAnswer):
        response = answer.response
        assert response.stream is not None
        headers = [
            ("Content-Type", response.content_type),
            ("Cache-Control", "no-cache"),
            *answer.headers,
        ]
        return await http.send_stream(response.status, headers, response.stream)
    await http.send(answer)
    return True


__all__ = ["HttpError", "OneShotApi", "StreamingAnswer", "write_answer"]
