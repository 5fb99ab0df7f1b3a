"""Shared fixtures: configs, an in-process server on 127.0.0.1:0, and a small WebSocket client.

The client drives websockets' Sans-I/O `ClientProtocol` over an anyio TCP stream, so the same
code runs on trio (the default here) and on asyncio (the smoke test). It is deliberately
independent of `spear_rt.client`: tests of the server must not rest on our own client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import numpy as np
import pytest
import trio
from numpy.typing import NDArray
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from spear_rt.audio import load_audio, resample
from spear_rt.config import Config, parse_config
from spear_rt.registry import BackendRegistry
from spear_rt.server.app import Server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "audio"
STUB_RATE_HZ = 24000

STUB_BACKEND = """
[[backends]]
name = "stub"
kind = "stub"
"""


def make_config(
    *, server: str = "", realtime: str = "", backends: str = STUB_BACKEND, extra: str = ""
) -> Config:
    """A config listening on 127.0.0.1:0; each argument is TOML for that section."""
    text = (
        f'[server]\nlisten = "127.0.0.1:0"\n{server}\n[realtime]\n{realtime}\n{extra}\n{backends}'
    )
    return parse_config(text, "test")


# The three session drivers: trio tasks, asyncio callbacks (the default on asyncio), asyncio tasks.
DRIVERS = [("trio", "auto"), ("asyncio", "auto"), ("asyncio", "anyio")]
IDS = ["trio", "asyncio-callbacks", "asyncio-tasks"]


def run_on(
    backend: str,
    driver: str,
    scenario: Callable[[Server], Awaitable[Any]],
    server: str = "",
    *,
    realtime: str = "",
    backends: str = STUB_BACKEND,
    registry: Callable[[Config], BackendRegistry] | None = None,
    bound_s: float = 20.0,
) -> Any:
    """Run `scenario(server)` against a fresh server using `driver` on the `backend` loop;
    `server` is extra TOML for its [server] section."""

    async def main() -> Any:
        config = make_config(
            server=f'driver = "{driver}"\n{server}', realtime=realtime, backends=backends
        )
        instance = Server(config, registry(config) if registry else None)
        async with anyio.create_task_group() as tg:
            await tg.start(instance.serve)
            with anyio.fail_after(bound_s):
                result = await scenario(instance)
            tg.cancel_scope.cancel()
        return result

    return anyio.run(main, backend=backend)


def load_fixture_24k(name: str) -> NDArray[np.int16]:
    """A fixture WAV resampled to 24 kHz (the protocol's pcm16 rate)."""
    pcm, rate = load_audio(FIXTURES / name)
    return resample(pcm, rate, STUB_RATE_HZ)


def b64(pcm: NDArray[np.int16] | bytes) -> str:
    """Base64 of pcm16 little-endian samples (or of raw bytes)."""
    data = pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()
    return base64.b64encode(data).decode()


def noise_pcm(samples: int, seed: int = 1) -> NDArray[np.int16]:
    """Loud deterministic noise (distinct blocks give the stub distinct words)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-8000, 8000, samples, dtype=np.int16)


# --- server ---------------------------------------------------------------------------------


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[Server]:
    """A `Server` listening on 127.0.0.1 (port in `server.port`) until the block ends."""
    server = Server(config)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


_T = TypeVar("_T")


@contextlib.contextmanager
def serve_in_thread(
    rig: Callable[[], AbstractAsyncContextManager[_T]],
    timeout_s: float = 90,
    *,
    backend: str = "trio",
    backend_options: dict[str, Any] | None = None,
) -> Iterator[_T]:
    """Run the async context `rig()` in a thread on its own event loop (for clients with
    their own loop, like the SDKs' asyncio); yield what it yields, end it with the block."""
    out: queue.Queue[Any] = queue.Queue()

    async def main() -> None:
        try:
            async with rig() as value:
                stop = anyio.Event()
                out.put((value, stop, anyio.lowlevel.current_token()))
                await stop.wait()
        except BaseException as exc:  # report a failed start instead of hanging the test
            out.put(exc)
            raise

    options = {"backend": backend, "backend_options": backend_options}
    thread = threading.Thread(target=anyio.run, args=(main,), kwargs=options)
    thread.start()
    item = out.get(timeout=timeout_s)
    if isinstance(item, BaseException):
        thread.join(timeout=timeout_s)
        raise item
    value, stop, token = item
    try:
        yield value
    finally:
        anyio.from_thread.run_sync(stop.set, token=token)
        thread.join(timeout=timeout_s)
        assert not thread.is_alive()


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
def serve(nursery: trio.Nursery) -> ServerFactory:
    """Start a server for a config (and registry) in the test's nursery; stops with the test."""

    async def start(config: Config, registry: BackendRegistry | None = None) -> Server:
        server = Server(config, registry)
        await nursery.start(server.serve)
        return server

    return start


@pytest.fixture
async def server(serve: ServerFactory) -> Server:
    """A server with one stub backend and the default limits."""
    return await serve(make_config())


# --- WebSocket client -----------------------------------------------------------------------


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class WsClient:
    """A minimal realtime client: JSON in, JSON out, and the close code at the end."""

    def __init__(self, stream: anyio.abc.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.subprotocol: str | None = None
        self._messages: deque[Frame] = deque()
        self.close_frame: Close | None = None
        self.pongs: list[bytes] = []
        self.eof = False

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/v1/realtime?intent=transcription",
        *,
        headers: Iterable[tuple[str, str]] = (),
        subprotocols: list[str] | None = None,
    ) -> WsClient:
        """Open a WebSocket to the server; raises HandshakeRefused on a non-101 answer."""
        stream = await anyio.connect_tcp("127.0.0.1", port)
        return await cls.over(stream, port, path, headers=headers, subprotocols=subprotocols)

    @classmethod
    async def over(
        cls,
        stream: anyio.abc.SocketStream,
        port: int,
        path: str = "/v1/realtime?intent=transcription",
        *,
        headers: Iterable[tuple[str, str]] = (),
        subprotocols: list[str] | None = None,
    ) -> WsClient:
        """The WebSocket handshake on a connected stream (see `connect`)."""
        uri = parse_uri(f"ws://127.0.0.1:{port}{path}")
        protocol = ClientProtocol(uri, subprotocols=subprotocols, max_size=None)  # type: ignore[arg-type]
        client = cls(stream, protocol)
        request = protocol.connect()
        for name, value in headers:
            if name.lower() == "host":  # replaces the one ClientProtocol wrote
                del request.headers["Host"]
            request.headers[name] = value
        protocol.send_request(request)
        await client._flush()
        while True:
            await client._read()
            events = protocol.events_received()
            if events:
                response = events[0]
                assert isinstance(response, Response)
                if response.status_code != 101:
                    await stream.aclose()
                    raise HandshakeRefused(response)
                client.subprotocol = protocol.subprotocol
                await client._sort(events[1:])  # frames that came with the response
                return client
            if client.eof:
                raise ConnectionError("closed during the handshake")

    async def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                try:
                    await self.stream.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
            else:
                with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await self.stream.send_eof()  # the peer may have reset the connection already

    async def _read(self) -> None:
        try:
            data = await self.stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.eof = True
            self.protocol.receive_eof()
            return
        self.protocol.receive_data(data)

    async def _pump(self) -> None:
        """Read once and sort what arrived; answers control frames."""
        await self._read()
        await self._sort(self.protocol.events_received())

    async def _sort(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Frame):
                if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                    assert event.fin, "the server does not fragment"
                    self._messages.append(event)
                elif event.opcode is Opcode.CLOSE:
                    self.close_frame = self.protocol.close_rcvd
                elif event.opcode is Opcode.PONG:
                    self.pongs.append(event.data)
        await self._flush()

    async def send(self, event: dict[str, Any]) -> None:
        """Send one JSON event."""
        await self.send_text(json.dumps(event))

    async def send_text(self, text: str) -> None:
        """Send one raw text frame."""
        self.protocol.send_text(text.encode())
        await self._flush()

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""
        self.protocol.send_binary(data)
        await self._flush()

    async def recv(self) -> dict[str, Any]:
        """The next server event; raises ConnectionError once the server has closed."""
        while not self._messages:
            if self.close_frame is not None or self.eof:
                raise ConnectionError(f"closed: {self.close_code} {self.close_reason!r}")
            await self._pump()
        frame = self._messages.popleft()
        assert frame.opcode is Opcode.TEXT, "server events are text frames"
        event: dict[str, Any] = json.loads(frame.data)
        return event

    async def recv_bytes(self) -> bytes:
        """The next binary message; raises ConnectionError once the server has closed."""
        while not self._messages:
            if self.close_frame is not None or self.eof:
                raise ConnectionError(f"closed: {self.close_code} {self.close_reason!r}")
            await self._pump()
        frame = self._messages.popleft()
        assert frame.opcode is Opcode.BINARY, "expected a binary message"
        return bytes(frame.data)

    async def recv_until(self, event_type: str) -> list[dict[str, Any]]:
        """Events up to and including the first of `event_type`."""
        events = []
        while True:
            event = await self.recv()
            events.append(event)
            if event["type"] == event_type:
                return events

    async def recv_all(self) -> list[dict[str, Any]]:
        """Every event until the server closes."""
        events = []
        while True:
            try:
                events.append(await self.recv())
            except ConnectionError:
                return events

    async def wait_closed(self) -> tuple[int | None, str]:
        """Read until the connection ends; the close code and reason the server sent."""
        while not self.eof:
            await self._pump()
        # Close our side now: a half-closed uvloop transport dropped unclosed in the same loop
        # turn is freed with its shutdown request pending (uvloop 0.23 use-after-free, segfault).
        await self.stream.aclose()
        return self.close_code, self.close_reason

    @property
    def close_code(self) -> int | None:
        return self.close_frame.code if self.close_frame else None

    @property
    def close_reason(self) -> str:
        return self.close_frame.reason if self.close_frame else ""

    async def close(self) -> None:
        """Start the closing handshake (if open) and drop the TCP connection."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            await self._flush()
        await self.stream.aclose()

    async def __aenter__(self) -> WsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def http_request(port: int, raw: bytes) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(raw)
        chunks = []
        while True:
            try:
                chunks.append(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b"".join(chunks)
