"""A small realtime client: websockets' Sans-I/O `ClientProtocol` over an anyio TCP stream.

Runs on trio and asyncio alike. One task may `receive()` while another sends; writes are
serialised by a lock, so the pong or close reply the reader owes goes out between two appends.
There is no background task and no inbox beyond the messages of the last read: a client that
stops calling `receive()` stops reading the socket, and TCP pushes back on the server.

Every failure a user can cause or meet (bad URL, refused connection, rejected handshake,
server close) is a `RealtimeError` with a one-line message; nothing from websockets or the
socket layer leaks out.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import msgspec
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from spear_rt.errors import SpearError

__all__ = [
    "ConnectError",
    "ConnectionClosed",
    "RealtimeClient",
    "RealtimeError",
    "ResumeError",
    "ServerError",
]

READ_SIZE = 65536
HANDSHAKE_TIMEOUT_S = 10.0  # TCP connect plus the HTTP upgrade
CLOSE_GRACE_S = 2.0  # how long `aclose` waits for the server's close frame
MAX_MESSAGE_BYTES = 4 << 20

_CLOSE_NAMES = {
    1000: "normal closure",
    1001: "going away",
    1006: "connection lost",
    1008: "policy violation",
    1011: "server error",
    1013: "try again later",
}


class RealtimeError(SpearError):
    """Root of the realtime client's errors."""


class ConnectError(RealtimeError):
    """The WebSocket could not be opened: bad URL, no server, or the upgrade was refused."""


class ConnectionClosed(RealtimeError):
    """The server closed the WebSocket; `code` and `reason` are what it sent."""

    def __init__(self, code: int, reason: str) -> None:
        name = _CLOSE_NAMES.get(code, "closed")
        super().__init__(
            f"server closed the connection: {code} ({name})" + (f": {reason}" if reason else "")
        )
        self.code = code
        self.reason = reason


class ResumeError(ConnectionClosed):
    """A dropped session could not be resumed; `code` is the server's close code (1006 if none)."""

    def __init__(self, message: str, code: int = 1006, reason: str = "") -> None:
        RealtimeError.__init__(self, f"cannot resume the session: {message}")
        self.detail = message
        self.code = code
        self.reason = reason


class ServerError(RealtimeError):
    """The server sent an `error` event; `error` is its `error` object."""

    def __init__(self, error: dict[str, Any]) -> None:
        code = error.get("code") or error.get("type") or "error"
        super().__init__(f"server error: {code}: {error.get('message', '(no message)')}")
        self.error = error


def _decode_json(data: bytes) -> dict[str, Any]:
    try:
        event = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise RealtimeError(f"server sent a message that is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise RealtimeError("server sent a JSON message that is not an object")
    return event


def _rejection(response: Response) -> str:
    """One line for an HTTP answer that refused the upgrade, with the server's own message."""
    message = f"HTTP {response.status_code}"
    try:
        body = msgspec.json.decode(response.body or b"{}")
        detail = body["error"]["message"]
    except (msgspec.DecodeError, KeyError, TypeError):
        detail = (response.body or b"").decode("utf-8", "replace").strip()[:200]
    return f"{message}: {detail}" if detail else message


class RealtimeClient:
    """One open realtime WebSocket; use `RealtimeClient.connect(...)` to get one."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: ClientProtocol) -> None:
        self._stream = stream
        self._protocol = protocol
        self._inbox: deque[dict[str, Any]] = deque()
        self._fragments: list[bytes] = []
        self._write_lock = anyio.Lock()
        self._eof = False
        self._torn = False  # a write was interrupted: the byte stream is no longer framed

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        key: str | None = None,
        beta: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> RealtimeClient:
        """Open `url` (ws:// or wss://) and shake hands; the caller owes an `aclose()`."""
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise ConnectError(f"invalid realtime URL {url!r}: {exc}") from None
        protocol = ClientProtocol(uri, max_size=MAX_MESSAGE_BYTES)
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                if uri.secure:
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        uri.host, uri.port, tls=True
                    )
                else:
                    stream = await anyio.connect_tcp(uri.host, uri.port)
        except TimeoutError:
            raise ConnectError(f"cannot connect to {url}: timed out") from None
        except OSError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # anyio wraps
            raise ConnectError(f"cannot connect to {url}: {cause.strerror or cause}") from None
        client = cls(stream, protocol)
        opened = False
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                await client._handshake(key, beta, headers or {})
            opened = True
        except TimeoutError:
            raise ConnectError(f"cannot connect to {url}: no WebSocket handshake answer") from None
        except ConnectError as exc:
            raise ConnectError(f"cannot connect to {url}: {exc}") from None
        finally:
            if not opened:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        return client

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        key: str | None = None,
        beta: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[RealtimeClient]:
        """Open `url` (ws:// or wss://), yield the client, close it on exit."""
        client = await cls.open(url, key=key, beta=beta, headers=headers)
        try:
            yield client
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _handshake(self, key: str | None, beta: bool, headers: Mapping[str, str]) -> None:
        protocol = self._protocol
        request = protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        if beta:
            request.headers["OpenAI-Beta"] = "realtime=v1"
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        protocol.send_request(request)
        await self._flush()
        while True:
            if not await self._read_some():
                raise ConnectError("the server closed the connection during the handshake")
            events = protocol.events_received()
            if events:
                break
        response, rest = events[0], events[1:]
        if protocol.handshake_exc is not None:
            exc = protocol.handshake_exc
            if isinstance(exc, InvalidStatus):
                raise ConnectError(f"upgrade refused: {_rejection(exc.response)}")
            raise ConnectError(f"invalid WebSocket handshake: {exc}")
        assert isinstance(response, Response)
        self._absorb(rest)

    # --- sending ------------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        """Send one client event (a JSON object with a `type`)."""
        await self.send_raw(msgspec.json.encode(event))

    async def send_raw(self, message: bytes) -> None:
        """Send one client event already encoded as JSON (a text frame)."""
        if self._protocol.state is not State.OPEN:
            raise self._closed_error()
        self._protocol.send_text(message)
        if not await self._flush():
            raise self._closed_error()

    async def send_audio(self, pcm16: bytes) -> None:
        """Append raw pcm16 audio to the input buffer (`input_audio_buffer.append`)."""
        audio = base64.b64encode(pcm16).decode("ascii")
        await self.send({"type": "input_audio_buffer.append", "audio": audio})

    async def commit(self) -> None:
        """Commit the input buffer (`input_audio_buffer.commit`)."""
        await self.send({"type": "input_audio_buffer.commit"})

    async def _flush(self) -> bool:
        """Write what the protocol has queued; False if the connection is broken.

        A broken send changes no state: the reader still drains what the server sent before
        it went away (often an `error` event saying why) and then meets the end of stream.
        A write cancelled midway may have sent part of a frame; `_torn` records that.
        """
        async with self._write_lock:
            data = b"".join(self._protocol.data_to_send())
            if not data:
                return True
            if self._torn:
                return False
            self._torn = True
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return False
            self._torn = False
            return True

    # --- receiving ----------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The next server event; raises `ConnectionClosed` once the server has closed."""
        while not self._inbox:
            if self._protocol.close_rcvd is not None or self._eof:
                raise self._closed_error()
            await self._read_some()
            self._absorb(self._protocol.events_received())
            await self._flush()  # pong or close reply
        return self._inbox.popleft()

    async def _read_some(self) -> bool:
        """Read once into the protocol; False at end of stream."""
        try:
            data = await self._stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._protocol.receive_eof()
            self._eof = True
            return False
        self._protocol.receive_data(data)
        return True

    def _absorb(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, Frame):
                continue
            if event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY:
                self._fragments = [bytes(event.data)]
            elif event.opcode is Opcode.CONT:
                self._fragments.append(bytes(event.data))
            else:
                continue  # ping/pong/close: the protocol answers on its own
            if event.fin:
                data, self._fragments = b"".join(self._fragments), []
                self._inbox.append(_decode_json(data))

    def _closed_error(self) -> ConnectionClosed:
        close = self._protocol.close_rcvd
        if close is None:
            return ConnectionClosed(1006, "the connection ended without a close frame")
        return ConnectionClosed(close.code, close.reason)

    # --- closing ------------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (waits up to CLOSE_GRACE_S for the server's answer)."""
        protocol = self._protocol
        if protocol.state is State.OPEN:
            protocol.send_close(code, reason)
        # our close frame, or the answer still owed to the server's
        if self._torn or not await self._flush():
            await self._stream.aclose()
            return
        with anyio.move_on_after(CLOSE_GRACE_S):
            while protocol.state is not State.CLOSED and not self._eof:
                if not await self._read_some():
                    break
                protocol.events_received()
                await self._flush()
        await self._stream.aclose()

    async def abort(self) -> None:
        """Drop the socket at once, without a closing handshake (a reader meets end of stream)."""
        self._eof = True
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
