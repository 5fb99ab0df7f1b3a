"""An asyncio connection read by coroutines until callbacks take it over (both directions).

`BufferedProtocol` keeps what the transport reads for `BufferStream` (an anyio byte stream over
it: HTTP and the WebSocket handshake on the server side, the upstream's opening on the client
side); past `high_water` unread bytes it pauses reading, so TCP pushes back and the buffer holds
at most `high_water` plus one read. A subclass switches the connection to callbacks (a session
runner, an upstream link) and takes what was buffered with `take_buffered`. Writes go straight
to the transport; `send` waits while the transport is over its own high-water mark.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import anyio
import anyio.abc
import anyio.lowlevel

HIGH_WATER = 256 * 1024


class BufferedProtocol(asyncio.Protocol):
    """A connection's bytes kept for `BufferStream` (module docstring)."""

    high_water = HIGH_WATER

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.lost = False
        self.write_paused = False
        self._reader: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def keep(self, data: bytes) -> None:
        """Buffer `data` for the stream (pausing reading past the high-water mark)."""
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > self.high_water and self.transport is not None:
            self.transport.pause_reading()
        self.wake_reader()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.eof = True
        self.wake_reader()
        self.wake_drain()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_drain()

    def wake_reader(self) -> None:
        """Wake a stream waiting to read."""
        _wake(self._reader)

    def wake_drain(self) -> None:
        """Wake a stream waiting for the transport to take writes."""
        _wake(self._drain)

    async def wait_readable(self) -> None:
        """Wait for data, EOF or loss."""
        self._reader = asyncio.get_running_loop().create_future()
        await self._reader

    async def wait_drained(self) -> None:
        """Wait until the transport takes writes again."""
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def take_buffered(self) -> bytes:
        """Everything read but not yet consumed (callbacks take over; they decide whether
        the transport reads)."""
        data = b"".join(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        return data


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class BufferStream(anyio.abc.ByteStream):
    """A coroutine view of a `BufferedProtocol`."""

    def __init__(self, protocol: BufferedProtocol) -> None:
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
        transport = proto.transport
        if proto.buffered <= proto.high_water // 2 and transport is not None and not proto.lost:
            transport.resume_reading()
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
