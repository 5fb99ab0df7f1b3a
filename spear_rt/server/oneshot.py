"""One-shot OpenAI-compatible endpoints on the thin request path.

Each request is normalized once, checked against per-key limits and budgets, routed and run
by the executor (fallback, hedging, mirroring as configured), and answered in OpenAI's shape.
Every answer carries `x-spear-instance` (who served it), `x-spear-attempts` and
`x-spear-overhead-ms` (spear_rt's own time: total minus the backend's).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from spear_rt.backend import OneShotRequest, OneShotResponse
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import CanonicalError, ErrorCode, Operation, Usage
from spear_rt.normalize import InvalidInput, Normalized, normalize_json, normalize_transcription
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
from spear_rt.server.multipart import MultipartError, parse_multipart
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
DEFAULT_TIMEOUT_S = 120.0
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

    def routes(self) -> dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]]:
        """(method, path) -> handler (streams are answered through `handle_streaming`)."""
        routes: dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]] = {
            (b"POST", path): self.handle for path in (*JSON_ENDPOINTS, TRANSCRIPTIONS)
        }
        routes[(b"GET", "/v1/models")] = self.models
        return routes

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
            normalized = self._normalize(request)
            self.server.router.admit(normalized.envelope)
            answer = await self._run(normalized, started)
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

    def _normalize(self, request: HttpRequest) -> Normalized:
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
                form = parse_multipart(request.body, request.header("content-type"))
            except MultipartError as exc:
                raise InvalidInput(str(exc), None, "invalid_multipart") from None
            return normalize_transcription(form, **args)
        return normalize_json(JSON_ENDPOINTS[request.path], request.body, **args)

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
        self.server.router.charge(envelope, done.instance, response.usage or _estimate(normalized))
        overhead_ms = max((_stopwatch() - started - backend_time) * 1000, 0.0)
        headers = [
            ("x-spear-instance", done.instance.name),
            ("x-spear-attempts", str(done.attempts)),
            ("x-spear-overhead-ms", f"{overhead_ms:.3f}"),
        ]
        if response.stream is not None:
            return StreamingAnswer(response, headers)
        return Response(response.status, response.body, response.content_type, headers)


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
