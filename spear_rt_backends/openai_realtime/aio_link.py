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
from typing import Any, Protocol

import sniffio

from spear_rt.aio_buffer import BufferedProtocol, BufferStream


class LinkHandler(Protocol):
    """What the link calls once switched to callbacks (`RealtimeTranscription`)."""

    def link_data(self, data: bytes) -> None: ...
    def link_eof(self) -> None: ...
    def link_lost(self, exc: Exception | None) -> None: ...
    def link_writable(self) -> None: ...


class LinkProtocol(BufferedProtocol):
    """One upstream TCP (or TLS) connection: buffers for `LinkStream`, or calls a handler."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: LinkHandler | None = None

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.link_data(data)
            return
        self.keep(data)  # the opening phase only

    def eof_received(self) -> bool | None:
        self.eof = True
        self.wake_reader()
        if self.handler is not None:
            self.handler.link_eof()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.handler is not None:
            self.handler.link_lost(exc)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.handler is not None:
            self.handler.link_writable()

    def switch(self, handler: LinkHandler) -> bytes:
        """Hand the connection to `handler`; returns what was read and not taken yet."""
        self.handler = handler
        data = self.take_buffered()
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()
        return data


class LinkStream(BufferStream):
    """A coroutine view of a `LinkProtocol` (the opening, and the close at the end)."""

    protocol: LinkProtocol

    def __init__(self, protocol: LinkProtocol) -> None:
        super().__init__(protocol)


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
