"""Fixtures shared by the client tests: the client's own TCP streams, to kill one on cue."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import pytest

from spear_rt.client import RealtimeClient


class Sockets:
    """Every TCP stream the client opens (anyio.connect_tcp is wrapped), and ways to kill one."""

    def __init__(self) -> None:
        self.streams: list[anyio.abc.SocketStream] = []
        self.kills = 0
        self.before_send: dict[bytes, int] = {}  # kill before the n-th event naming this type
        self._seen: dict[bytes, int] = {}

    def kill_latest(self) -> None:
        """Drop the client's newest connection without a close frame (FIN both ways)."""
        sock = self.streams[-1].extra(anyio.abc.SocketAttribute.raw_socket)
        sock.shutdown(socket.SHUT_RDWR)
        self.kills += 1

    def sending(self, message: bytes) -> None:
        """Called with each client event about to be sent; kills first if it is the chosen one."""
        for marker, nth in self.before_send.items():
            if marker in message:
                self._seen[marker] = self._seen.get(marker, 0) + 1
                if self._seen[marker] == nth:
                    self.kill_latest()


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sockets]:
    """Record the client's TCP streams (the server only accepts, so only the client's)."""
    record = Sockets()
    real_connect, real_send = anyio.connect_tcp, RealtimeClient.send_raw

    async def connect_tcp(*args: Any, **kwargs: Any) -> anyio.abc.SocketStream:
        stream = await real_connect(*args, **kwargs)
        record.streams.append(stream)
        return stream

    async def send_raw(self: RealtimeClient, message: bytes) -> None:
        record.sending(message)
        await real_send(self, message)

    monkeypatch.setattr(anyio, "connect_tcp", connect_tcp)
    monkeypatch.setattr(RealtimeClient, "send_raw", send_raw)
    yield record
