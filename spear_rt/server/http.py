"""HTTP/1.1 on an anyio stream via h11: read requests, write responses (I/O helpers only)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import h11
import msgspec

from spear_rt.ir import CanonicalError, ErrorCode

READ_SIZE = 65536
MAX_HEAD_BYTES = 16384

STATUS_BY_CODE = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.MISSING_CAPABILITIES: 404,
    ErrorCode.NO_CANDIDATE_BACKEND: 503,
    ErrorCode.BACKEND_NOT_ENABLED: 503,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BUDGET_EXCEEDED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.BACKEND_ERROR: 502,
}

_json = msgspec.json.Encoder()


def request_header(request: h11.Request, name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def keys_from_env(env_names: list[str]) -> list[str]:
    """The keys held by the named environment variables (unset or empty ones skipped)."""
    return [value for name in env_names if (value := os.environ.get(name))]


def match_key(keys: list[str], offered: str | None) -> str | None:
    """A short hash naming the key `offered` matches (constant-time compare), or None."""
    if offered is None:
        return None
    for key in keys:
        if hmac.compare_digest(key.encode(), offered.encode()):
            return hashlib.sha256(key.encode()).hexdigest()[:12]
    return None


class HttpError(Exception):
    """Answer the current request with this status and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, code: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or []


class HttpRequest(msgspec.Struct):
    """One complete HTTP request, as handlers see it."""

    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer_is_loopback: bool = True
    client_key_id: str | None = None  # a hash of the client's key, never the key

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def bearer(self) -> str | None:
        """The token of an `Authorization: Bearer` header, or None."""
        auth = self.header("authorization")
        if auth is None or not auth.lower().startswith("bearer "):
            return None
        return auth[7:].strip()


class Response(msgspec.Struct):
    """A complete HTTP response."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)


def json_response(
    status: int, payload: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A JSON response."""
    return Response(status, _json.encode(payload), headers=headers or [])


def error_body(
    message: str, code: str, error_type: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope: {"error": {message, type, code, param}}."""
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def error_response(
    status: int, message: str, code: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """An OpenAI-style JSON error response."""
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return json_response(status, error_body(message, code, error_type), headers)


def canonical_error_response(error: CanonicalError) -> Response:
    """Map a CanonicalError to its HTTP status (429 carries Retry-After)."""
    status = STATUS_BY_CODE.get(error.code, 500)
    headers = []
    if error.retry_after_s is not None:
        headers.append(("Retry-After", str(max(1, round(error.retry_after_s)))))
    body = error_body(
        error.message, str(error.code), "invalid_request_error" if status < 500 else "server_error"
    )
    body["error"]["spear"] = msgspec.to_builtins(error)
    return json_response(status, body, headers)


class HttpConnection:
    """The HTTP side of one TCP connection."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.method = b""  # of the request being answered: a HEAD answer carries no body

    async def next_event(self) -> Any:
        """The next h11 event, reading as needed; ConnectionClosed at EOF."""
        conn = self.h11
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                self.method = event.method
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            conn.receive_data(data)

    async def read_body(self, limit: int) -> bytes:
        """The request body; raises HttpError 413 past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(
                        413, f"request body over the limit of {limit} bytes", "body_too_large"
                    )
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError(400, "connection closed mid-body", "incomplete_body")

    async def send(
        self, response: Response, extra_headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Write one complete response."""
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
            *(extra_headers or []),
        ]
        conn = self.h11
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if self.method != b"HEAD":
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await self.stream.send(data)

    async def send_stream(
        self, status: int, headers: list[tuple[str, str]], chunks: AsyncIterator[bytes]
    ) -> bool:
        """Send a chunked response, one chunk at a time (backpressure: the next chunk is
        pulled only after the previous one was written). Returns False when the client went
        away first; the chunk iterator is closed either way, which cancels its upstream."""
        conn = self.h11
        complete = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, tg.cancel_scope)
                await self.stream.send(conn.send(h11.Response(status_code=status, headers=headers)))
                async for chunk in chunks:
                    if chunk:
                        await self.stream.send(conn.send(h11.Data(data=chunk)))
                await self.stream.send(conn.send(h11.EndOfMessage()))
                complete = True
                tg.cancel_scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            complete = False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        return complete

    async def _watch_disconnect(self, scope: anyio.CancelScope) -> None:
        """While streaming, notice a client that hangs up (bytes it sends are kept for h11)."""
        while True:
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                scope.cancel()
                return
            self.h11.receive_data(data)  # a pipelined next request waits in h11's buffer

    def upgrade_head(self, request: h11.Request) -> bytes:
        """The raw request head (plus bytes already read past it) for a WebSocket handshake."""
        lines = [b"%s %s HTTP/1.1" % (request.method, request.target)]
        lines += [name + b": " + value for name, value in request.headers]
        trailing, _closed = self.h11.trailing_data
        return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(trailing)
