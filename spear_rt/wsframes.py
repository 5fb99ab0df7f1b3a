"""WebSocket frames read and written by hand on the common path, websockets' Sans-I/O for the rest.

websockets' parser is a generator that costs several µs a frame and its `send_text` goes through
a generic serializer (and one `os.urandom(4)` a masked frame); a relayed session moves every
append and every event through them (issue 16's profile). Rules, for both sides:

* only a connection that is OPEN, has no extension and no message in progress takes the fast
  path; the frames taken are complete, unfragmented data frames within the size limit, with
  the mask bit the peer must use (RFC 6455 5.1) and no RSV bit;
* every other complete frame goes to websockets whole, so its parser always stands at a
  frame boundary; anything websockets must judge (a bad or oversized header, a fragment, the
  closing handshake) hands it everything from then on: it fails the connection as it would;
* frames written by hand are what `Frame.serialize` writes (FIN, the opcode, the length,
  a random key on the client side).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import anyio.abc
import sniffio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, State

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "OPCODES",
    "FastClientProtocol",
    "FastOpenProtocol",
    "apply_mask",
    "direct_socket",
    "frame_head",
    "frame_header",
    "send_some",
]

OPCODES = frozenset({0, 1, 2, 8, 9, 10})  # RFC 6455's: others fail the connection
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_TEXT_FIN = 0x81
_DATA_OPCODES = {1: Opcode.TEXT, 2: Opcode.BINARY}  # a lookup: the enum's call is slow
_KEY_POOL_BYTES = 4096


def frame_header(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int, int, int] | None:
    """The frame at `buf[pos:end]`: (first byte, second byte, header length without the mask
    key, payload length), or None while the header is incomplete."""
    if end - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    length, head = b1 & 0x7F, 2
    if length == 126:
        if end - pos < 4:
            return None
        length, head = int.from_bytes(buf[pos + 2 : pos + 4]), 4
    elif length == 127:
        if end - pos < 10:
            return None
        length, head = int.from_bytes(buf[pos + 2 : pos + 10]), 10
    return b0, b1, head, length


def frame_head(first: int, length: int, mask_bit: int = 0) -> bytes:
    """The header of a frame of `length` payload bytes (`mask_bit` 0x80: a key follows)."""
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return _HEAD16.pack(first, mask_bit | 126, length)
    return _HEAD64.pack(first, mask_bit | 127, length)


class FastOpenProtocol(Protocol):
    """A websockets protocol whose `fast_open` says whether it may read or write data frames
    by hand (module docstring); kept by the `state` setter, which every change goes through,
    so the per-frame check is an attribute, not a property and three tests."""

    fast_open = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._update_fast_open()  # the limits are set after the initial state

    @property
    def state(self) -> State:
        """State of the connection (websockets' own)."""
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        if self.debug:
            self.logger.debug("= connection is %s", state.name)
        self._state = state
        self._update_fast_open()

    def _update_fast_open(self) -> None:
        self.fast_open = (
            self._state is State.OPEN
            and not getattr(self, "extensions", None)
            and getattr(self, "max_fragment_size", None) is None
        )


class FastClientProtocol(FastOpenProtocol, ClientProtocol):
    """websockets' client protocol with the common frames read and written here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tail: bytes | None = b""  # an incomplete frame; None: websockets parses all
        self._keys = b""  # random masking keys, 4 bytes a frame

    def send_text(self, data: Any, fin: bool = True) -> None:
        """Queue one text frame (masked with a key from a pool of `os.urandom` bytes)."""
        if not fin or self.expect_continuation_frame or not self.fast_open or self.debug:
            super().send_text(data, fin)
            return
        keys = self._keys
        if len(keys) < 4:
            keys = os.urandom(_KEY_POOL_BYTES)
        key, self._keys = keys[:4], keys[4:]
        self.writes.append(frame_head(_TEXT_FIN, len(data), 0x80) + key + apply_mask(data, key))

    def receive_frames(self, data: bytes) -> list[Frame]:
        """Parse `data`: what `receive_data` + `events_received` give (frames only)."""
        tail = self._tail
        if (
            tail is None
            or not self.fast_open
            or self.current_size is not None
            or self.reader.buffer  # the opening's last read ended inside a frame
        ):
            return self._give_up([], data)
        buf = tail + data if tail else data
        out: list[Frame] = []
        pos, end = 0, len(buf)
        limit = self.max_message_size
        while (header := frame_header(buf, pos, end)) is not None:
            b0, b1, head, length = header
            opcode = b0 & 0x0F
            if (
                b0 & 0x70
                or b1 & 0x80
                or opcode not in OPCODES
                or (limit is not None and length > limit)
            ):
                return self._give_up(out, buf[pos:])  # websockets fails it at the header
            stop = pos + head + length
            if stop > end:
                break
            if b0 & 0x80 and (data_opcode := _DATA_OPCODES.get(opcode)) is not None:
                out.append(Frame(data_opcode, buf[pos + head : stop]))
            else:  # a control frame or a fragment, complete: websockets handles it
                self.receive_data(buf[pos:stop])
                out.extend(e for e in self.events_received() if isinstance(e, Frame))
                if not self.fast_open or self.parser_exc is not None:
                    return self._give_up(out, buf[stop:]) if stop < end else out
                if self.current_size is not None:  # a fragmented message began
                    return self._give_up(out, buf[stop:])
            pos = stop
        self._tail = buf[pos:] if pos else buf
        return out

    def _slow(self, data: bytes) -> list[Frame]:
        self.receive_data(data)
        return [e for e in self.events_received() if isinstance(e, Frame)]

    def _give_up(self, out: list[Frame], rest: bytes) -> list[Frame]:
        """Let websockets parse from `rest` on (it judges what is wrong with it)."""
        self._tail = None
        if rest:
            out.extend(self._slow(rest))
        return out

    def receive_eof(self) -> None:
        """The peer ended the stream: an incomplete frame held here goes to websockets first."""
        tail, self._tail = self._tail, None
        if tail:
            self.receive_data(tail)
        super().receive_eof()


def direct_socket(stream: anyio.abc.ByteStream) -> socket.socket | None:
    """The socket under `stream` when a sender may write to it itself, without a writer task
    (trio, plain TCP: a task switch less per write); None otherwise. Not TLS (the bytes must
    be encrypted), not asyncio (its transports buffer writes a direct one would overtake).
    Whoever uses it writes only while its writer task is not in a send (see `send_some`)."""
    if not isinstance(stream, anyio.abc.SocketStream):
        return None
    try:
        if sniffio.current_async_library() != "trio":
            return None
    except sniffio.AsyncLibraryNotFoundError:
        return None
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return raw


def send_some(sock: socket.socket, data: bytes) -> bytes:
    """Send what non-blocking `sock` takes of `data` now; the rest, for the writer task (a
    full or broken socket takes nothing: the writer waits, or fails as it would have)."""
    try:
        sent = sock.send(data)
    except OSError:
        return data
    return data[sent:]
