"""A lean httpx transport for plain-HTTP upstreams: a keep-alive pool of h11 connections.

Why: httpcore's pool checks every pooled connection (`has_expired`, a readability probe through
anyio's typed attributes) on every request and every response close, so its cost per request
grows with the pool; measured on one core it was 0.7 ms per request at one connection and
1.6 ms at sixteen, several times spear_rt's own edge (bench/README.md, "one-shot"). This
transport does the same work once per checkout of one connection: O(1) per request.

What it does (HTTP/1.1 over `http://` only; `openai_http` keeps httpx's own transport for
`https://` and for `trust_env`):

* `max_connections` bounds the connections in use; a request waits up to the `pool` timeout
  for one (`httpx.PoolTimeout`). Idle connections are kept last-in-first-out, at most
  `max_keepalive_connections`, for `keepalive_expiry` seconds; an idle connection the server
  has closed (its socket is readable while idle) is dropped at checkout, not used.
* Timeouts from the request's `timeout` extension: `connect`, `write` (the whole request),
  `read` (each wait for bytes). Errors are httpx's own (`ConnectError`, `ReadTimeout`,
  `RemoteProtocolError`, ...), so callers translate them as they would httpx's.
* A response's body is read only as the caller iterates it, one chunk per socket read (what
  one read brought is relayed at once, not event by event). Closing the response before
  the body ended closes the connection: that is how the server learns the request was
  abandoned. A complete body returns the connection to the pool, unless h11 says the
  connection must close.
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import h11
import httpx

READ_SIZE = 65536


class _Connection:
    """One TCP connection to the upstream and its h11 state."""

    __slots__ = ("h11", "idle_since", "sock", "stream")

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # looked up once
        self.idle_since = 0.0

    def closed_by_peer(self) -> bool:
        """An idle connection with bytes (or EOF) to read was closed or broken by the server."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


class H11Transport(httpx.AsyncBaseTransport):
    """A pool of keep-alive HTTP/1.1 connections to one `http://` origin (see the module)."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._max_connections = limits.max_connections or 1 << 30
        self._max_idle = (
            limits.max_keepalive_connections
            if limits.max_keepalive_connections is not None
            else self._max_connections
        )
        self._expiry = limits.keepalive_expiry
        self._slots = anyio.Semaphore(self._max_connections)
        self._idle: list[_Connection] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        timeouts = request.extensions.get("timeout", {})
        method = request.method.encode("ascii")
        return await self.send(method, request.url, request.headers.raw, body, timeouts)

    async def send(
        self,
        method: bytes,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        """Send one request (`headers` complete: Host, Content-Length...); the response with
        its body unread. Used directly by `openai_http` to skip httpx's client layer."""
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme}:// is not served here")
        await self._acquire_slot(timeouts.get("pool"))
        try:
            conn = await self._checkout(url, timeouts.get("connect"))
        except BaseException:
            self._slots.release()
            raise
        try:
            head = await self._exchange(conn, method, url.raw_path, headers, body, timeouts)
        except BaseException:
            await conn.aclose()
            self._slots.release()
            raise
        return httpx.Response(
            head.status_code,
            headers=head.headers,
            stream=_Body(self, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    # --- the pool ----------------------------------------------------------------------------

    async def _acquire_slot(self, wait_s: float | None) -> None:
        try:
            self._slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        try:
            with anyio.fail_after(wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection came free in time") from None

    async def _checkout(self, url: httpx.URL, connect_s: float | None) -> _Connection:
        now = anyio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if (self._expiry is None or now - conn.idle_since < self._expiry) and (
                not conn.closed_by_peer()
            ):
                return conn
            await conn.aclose()
        try:
            with anyio.fail_after(connect_s):
                stream = await anyio.connect_tcp(url.host, url.port or 80)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {url.host}:{url.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {url.host}:{url.port}: {exc}") from None
        return _Connection(stream)

    def _release(self, conn: _Connection, reusable: bool) -> bool:
        """Take back a connection whose response is over; False when it must be closed."""
        self._slots.release()
        if not reusable or len(self._idle) >= self._max_idle:
            return False
        conn.idle_since = anyio.current_time()
        self._idle.append(conn)
        return True

    # --- one exchange ------------------------------------------------------------------------

    async def _exchange(
        self,
        conn: _Connection,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: dict[str, float | None],
    ) -> h11.Response:
        """Send the request; the response head."""
        h = conn.h11
        try:
            data = h.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += h.send(h11.Data(data=body))
            data += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # h11's message may quote a header value, and so a key: say only what failed
            raise httpx.LocalProtocolError(
                "the request could not be encoded (bad header)"
            ) from None
        try:
            with anyio.fail_after(timeouts.get("write")):
                await conn.stream.send(data)
        except TimeoutError:
            raise httpx.WriteTimeout("sending the request timed out") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"sending the request failed: {exc!r}") from None
        while True:
            event = await _next_event(conn, timeouts.get("read"))
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                unexpected = type(event).__name__
                raise httpx.RemoteProtocolError(f"unexpected {unexpected} before a response")


async def _next_event(conn: _Connection, read_timeout: float | None) -> Any:
    """The connection's next h11 event, reading as needed (each read bounded by the timeout)."""
    h = conn.h11
    while True:
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the server closed the connection mid-response")
            return event
        try:
            with anyio.fail_after(read_timeout):
                data = await conn.stream.receive(READ_SIZE)
        except TimeoutError:
            raise httpx.ReadTimeout("no bytes from the server in time") from None
        except anyio.EndOfStream:
            data = b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"reading the response failed: {exc!r}") from None
        h.receive_data(data)


class _Body(httpx.AsyncByteStream):
    """A response body, read from its connection as the caller iterates it."""

    def __init__(self, pool: H11Transport, conn: _Connection, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._conn is not None and not self._complete:
            try:
                chunk = await self._next_chunk(self._conn)
            except BaseException:
                await self.aclose()
                raise
            if chunk:
                yield chunk

    async def _next_chunk(self, conn: _Connection) -> bytes:
        """The body bytes of the next read (reading only if h11 holds none): what one read
        brought is one chunk, however many h11 events (SSE events, chunks) it held."""
        parts = []
        event = await _next_event(conn, self._read_timeout)
        while True:
            if isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                break
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from None
            if event is h11.NEED_DATA:
                break
        return b"".join(parts)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        h = conn.h11
        reusable = self._complete and h.our_state is h11.DONE and h.their_state is h11.DONE
        if reusable:
            h.start_next_cycle()
        if not self._pool._release(conn, reusable):
            await conn.aclose()
