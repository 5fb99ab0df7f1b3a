"""HTTP/1.1 on an anyio stream via h11: read requests, write responses (I/O helpers only)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.abc
import h11
import msgspec

from spear_rt.ir import CanonicalError, ErrorCode

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_HEAD_BYTES = 16384  # a request head (request line + headers) over this is refused: 431
# While a request head is awaited, h11 is fed at most HEAD_SLICE bytes at a time, so its
# buffer limit (MAX_HEAD_BYTES - HEAD_SLICE) holds however the bytes arrive (h11 checks it
# only when it needs more data: a 64 kB head in one read would pass).
HEAD_SLICE = 1024
LINGER_S = 2.0  # after refusing a body: read (and drop) what the client still sends, so
LINGER_BYTES = 1 << 20  # closing does not reset the connection before it reads our answer
_H11_DETAIL = re.compile(r":?\s*bytearray\(.*$", re.DOTALL)
_PROTOCOL_CODES = {431: "request_header_too_large", 501: "not_implemented"}

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
    """Answer the current request with this status and an OpenAI-style error body
    (`close`: then close the connection, as when the request body was not read)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = [*(headers or []), *([("Connection", "close")] if close else [])]


class ClientGone(Exception):
    """The client closed the connection before its request was complete."""


class BodyBudget:
    """Request-body bytes held across all connections, bounded (sans-I/O counter).

    Policy: a declared Content-Length is taken in full when the head arrives, a chunked body
    as its chunks arrive; what does not fit is refused with 503 + Retry-After (never queued).
    Bytes are given back once the request is answered.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Hold `size` more bytes; HttpError 503 (and close) when that would pass the limit."""
        if self.held + size > self.limit:
            raise HttpError(
                503,
                "the server is receiving too many request bodies at once; retry shortly",
                "server_busy",
                [("Retry-After", "1")],
                close=True,
            )
        self.held += size

    def give_back(self, size: int) -> None:
        """Release bytes taken earlier."""
        self.held -= size


def protocol_error_response(exc: h11.RemoteProtocolError) -> Response:
    """The answer to a request h11 (or our head checks) refused: 4xx, then close."""
    status = exc.error_status_hint
    detail = _H11_DETAIL.sub("", str(exc)) or "malformed request"  # never echo a repr
    if status == 431:
        detail = f"the request head is over {MAX_HEAD_BYTES} bytes"
    code = _PROTOCOL_CODES.get(status, "bad_request")
    return error_response(status, f"bad request: {detail}", code, [("Connection", "close")])


def _too_large(limit: int) -> HttpError:
    return HttpError(
        413, f"request body over the limit of {limit} bytes", "body_too_large", close=True
    )


def _check_head(request: h11.Request) -> None:
    """Refuse heads h11 accepts but we must not: too large (however they arrived, e.g. pipelined
    behind another request) or framed twice (Content-Length and Transfer-Encoding: smuggling)."""
    size = len(request.method) + len(request.target) + 12
    names = set()
    for name, value in request.headers:
        size += len(name) + len(value) + 4
        names.add(name)
    if size > MAX_HEAD_BYTES:
        raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
    if b"content-length" in names and b"transfer-encoding" in names:
        raise h11.RemoteProtocolError(
            "both Content-Length and Transfer-Encoding; send one", error_status_hint=400
        )


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
    """The HTTP side of one TCP connection (request bodies held count against `budget`)."""

    def __init__(self, stream: anyio.abc.ByteStream, budget: BodyBudget | None = None) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES - HEAD_SLICE)
        self.method = b""  # of the request being answered: a HEAD answer carries no body
        self.request: h11.Request | None = None
        self.budget = budget or BodyBudget(1 << 62)
        self.held = 0  # body bytes of the current request taken from the budget
        self.peer_closed = False
        self._unfed = bytearray()  # read from the stream, not yet given to h11

    async def next_event(self) -> Any:
        """The next h11 event, reading as needed; ConnectionClosed at EOF. Raises
        h11.RemoteProtocolError for what the client got wrong (its `error_status_hint`)."""
        conn = self.h11
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                self.method, self.request = event.method, event
                _check_head(event)
            if event is not h11.NEED_DATA:
                return event
            await self._feed()

    async def _feed(self) -> None:
        """Give h11 more bytes: a slice while it awaits a head, all we have otherwise."""
        conn = self.h11
        if not self._unfed:
            if self.peer_closed:
                conn.receive_data(b"")
                return
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.peer_closed = True
                conn.receive_data(b"")
                return
            if conn.their_state is not h11.IDLE:
                conn.receive_data(data)
                return
            self._unfed += data
        take = HEAD_SLICE if conn.their_state is h11.IDLE else len(self._unfed)
        conn.receive_data(bytes(self._unfed[:take]))
        del self._unfed[:take]

    async def read_body(self, limit: int) -> bytes:
        """The request body: HttpError 413 past `limit` bytes (at once for a declared length),
        503 past the server's body budget, 400 for broken framing; ClientGone if the client
        hangs up. Sends `100 Continue` when the client waits for it."""
        conn = self.h11
        declared = request_header(self.request, b"content-length") if self.request else None
        if declared is not None:  # h11 checked it is a number
            if int(declared) > limit:
                raise _too_large(limit)
            self._take(int(declared))
        if conn.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await self.stream.send(conn.send(go_on))
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError as exc:
                if self.peer_closed:
                    raise ClientGone from None
                detail = _H11_DETAIL.sub("", str(exc))
                raise HttpError(
                    400, f"bad request body: {detail}", "bad_request", close=True
                ) from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _too_large(limit)
                if declared is None:
                    self._take(len(event.data))
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone

    def _take(self, size: int) -> None:
        self.budget.take(size)
        self.held += size

    def release_body(self) -> None:
        """Give the current request's body bytes back to the budget (once it is answered)."""
        self.budget.give_back(self.held)
        self.held = 0

    async def linger(self) -> None:
        """Before closing on a request whose body we did not read: half-close, then drop what
        the client still sends (bounded in time and bytes), so it can read our answer."""
        if self.peer_closed or self.h11.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            return
        with anyio.move_on_after(LINGER_S):
            try:
                try:
                    await self.stream.send_eof()
                except NotImplementedError:  # TLS streams cannot half-close
                    pass
                dropped = 0
                while dropped < LINGER_BYTES:
                    dropped += len(await self.stream.receive(READ_SIZE))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

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
                self.peer_closed = True
                scope.cancel()
                return
            self._unfed += data  # a pipelined next request waits, bounded: past the limit
            if len(self._unfed) > MAX_HEAD_BYTES:  # stop reading (TCP pushes back)
                return

    def upgrade_head(
        self, request: h11.Request, headers: Sequence[tuple[bytes, bytes]] | None = None
    ) -> bytes:
        """The raw request head (plus bytes already read past it) for a WebSocket handshake,
        with `headers` instead of the request's own when given."""
        lines = [b"%s %s HTTP/1.1" % (request.method, request.target)]
        given = request.headers if headers is None else headers
        lines += [name + b": " + value for name, value in given]
        trailing, _closed = self.h11.trailing_data
        return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(trailing) + bytes(self._unfed)
