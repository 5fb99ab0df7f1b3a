"""The upstream socket on asyncio: our own `asyncio.Protocol`, driven by callbacks once open.

On trio the connection is an anyio byte stream with a reader and a writer task. On asyncio
that costs a task wake-up and a loop iteration per frame (anyio's `send` yields after every
write, its `receive` re-arms reading), which at 50 appends/s per session is most of a
relayed session's CPU (issue 16's profile). So on asyncio the opening (connect, handshake,
`*.created`) runs as coroutines over `LinkStream`, then `RealtimeTranscription` switches the
link to callbacks: a command is written to the transport where it is sent, and the frames
of each read are decoded in `data_received`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

HIGH_WATER = 256 * 1024  # bytes read during the opening and not taken yet: pause reading


class LinkHandler(Protocol):
    """What the link calls once switched to callbacks (`RealtimeTranscription`)."""

    def link_data(self, data: bytes) -> None: ...
    def link_eof(self) -> None: ...
    def link_lost(self, exc: Exception | None) -> None: ...
    def link_writable(self) -> None: ...


class LinkProtocol(asyncio.Protocol):
    """One upstream TCP (or TLS) connection: buffers for `LinkStream`, or calls a handler."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.handler: LinkHandler | None = None
        self.buffer: deque[bytes] = deque()  # opening phase only: at most HIGH_WATER + 1 read
        self.buffered = 0
        self.eof = False
        self.lost = False
        self.write_paused = False
        self._reader: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.link_data(data)
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        _wake(self._reader)

    def eof_received(self) -> bool | None:
        self.eof = True
        _wake(self._reader)
        if self.handler is not None:
            self.handler.link_eof()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        _wake(self._reader)
        _wake(self._drain)
        if self.handler is not None:
            self.handler.link_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self._drain)
        if self.handler is not None:
            self.handler.link_writable()

    def switch(self, handler: LinkHandler) -> bytes:
        """Hand the connection to `handler`; returns what was read and not taken yet."""
        self.handler = handler
        data = b"".join(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()
        return data

    async def wait_readable(self) -> None:
        self._reader = asyncio.get_running_loop().create_future()
        await self._reader

    async def wait_drained(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class LinkStream(anyio.abc.ByteStream):
    """A coroutine view of a `LinkProtocol` (the opening, and the close at the end)."""

    def __init__(self, protocol: LinkProtocol) -> None:
        self.protocol = protocol

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes received; EndOfStream at EOF."""
        proto = self.protocol
        while not proto.buffer:
            if proto.eof:
                raise anyio.EndOfStream
            await proto.wait_readable()
        data = proto.buffer.popleft()
        if len(data) > max_bytes:
            proto.buffer.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        proto.buffered -= len(data)
        if proto.buffered <= HIGH_WATER // 2 and proto.transport is not None and not proto.lost:
            proto.transport.resume_reading()
        return data

    async def send(self, item: bytes) -> None:
        """Write; waits while the transport's buffer is over its high-water mark."""
        proto = self.protocol
        transport = proto.transport
        if proto.lost or transport is None or transport.is_closing():
            raise anyio.BrokenResourceError
        transport.write(item)
        while proto.write_paused and not proto.lost:
            await proto.wait_drained()
        if proto.lost:
            raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        """Half-close our side."""
        transport = self.protocol.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()

    async def aclose(self) -> None:
        """Close the connection (what is buffered is still written)."""
        transport = self.protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}


def on_asyncio() -> bool:
    """Whether the running loop is asyncio (and so the callback link applies)."""
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


async def connect(host: str, port: int, context: ssl.SSLContext | None) -> LinkStream:
    """Open the TCP (TLS with `context`) connection on the running asyncio loop."""
    loop = asyncio.get_running_loop()
    tls: dict[str, Any] = {"ssl": context, "server_hostname": host} if context else {}
    _, protocol = await loop.create_connection(LinkProtocol, host, port, **tls)
    return LinkStream(protocol)
