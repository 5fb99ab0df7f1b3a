"""A WebSocket connection on an anyio byte stream, driven through websockets' Sans-I/O layer.

One reader and one writer per connection. The reader feeds whatever bytes arrive to the
protocol and returns every complete message of that read in one batch (no coroutine per
message). Only the writer touches the socket for sending: anyone may queue frames on the
protocol (a sync call) and `wake()` the writer, which sends everything pending in one write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import h11
from websockets.frames import Frame, Opcode
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from spear_rt.server.http import HttpConnection
from spear_rt.wsframes import (
    OPCODES,
    FastOpenProtocol,
    apply_mask,
    direct_socket,
    frame_head,
    frame_header,
    send_some,
)

READ_SIZE = 65536
CONTROL_OPCODES = frozenset({Opcode.PING, Opcode.PONG, Opcode.CLOSE})
TRY_AGAIN_LATER = 1013
OVER_BUDGET = "the server is receiving too many large frames at once; retry shortly"


class FrameBudget:
    """Bytes of incomplete WebSocket frames held across all connections, bounded (a counter).

    `max_frame_bytes` bounds one connection; without this, many connections each holding a
    frame just short of complete hold sessions x max_frame_bytes. Policy: a connection whose
    partial frame (or fragmented message) would take the total past `limit` is closed 1013
    (refused, never queued); its bytes are given back as its frames complete or when it ends.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def update(self, before: int, after: int) -> bool:
        """One connection's partial bytes go from `before` to `after`; False (and nothing
        changed) when growing to `after` would pass the limit."""
        if after > before and self.held + after - before > self.limit:
            return False
        self.held += after - before
        return True


class BudgetedServerProtocol(FastOpenProtocol, ServerProtocol):
    """websockets' server protocol, its partial-frame bytes counted against a `FrameBudget`.

    Both drivers feed bytes through `receive_data`, so both get the same bound; an over-budget
    connection is failed like an oversized frame (close frame, then EOF), which they handle.
    """

    def __init__(self, budget: FrameBudget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._budget: FrameBudget | None = budget
        self._partial = 0
        # `receive_frames`: an incomplete frame held here, not in websockets' reader; None
        # once websockets parses everything itself (it was given a partial frame).
        self._tail: bytes | None = b""

    def receive_frames(self, data: bytes) -> list[Frame | Message]:
        """Parse `data`: complete messages and websockets' frames (control frames, fragments),
        in order. What `receive_data` + `events_received` give, with the common case done here.

        A complete, unfragmented, masked data frame within `max_message_size` is unmasked here
        and becomes a `Message` (websockets' generator-based parser costs several µs a frame:
        this is every append of a realtime session). Every other complete frame goes to
        websockets whole, so its parser always stands at a frame boundary; an incomplete
        frame is kept here, counted in the budget like websockets' own partial bytes. Anything
        websockets must judge (an oversized or invalid header, a message being fragmented,
        the closing handshake, extensions) hands it everything from then on.
        """
        tail = self._tail
        if tail is None or not self.fast_open:
            return self._slow(data)
        buf = tail + data if tail else data
        out: list[Frame | Message] = []
        pos, end = 0, len(buf)
        while (header := frame_header(buf, pos, end)) is not None:
            b0, b1, head, length = header
            opcode, current = b0 & 0x0F, self.current_size
            limit = self.max_message_size
            if limit is not None and current is not None:
                limit -= current
            if (
                b0 & 0x70
                or not b1 & 0x80
                or opcode not in OPCODES
                or (limit is not None and length > limit)
            ):
                return self._give_up(out, buf[pos:])  # websockets fails it at the header
            stop = pos + head + 4 + length
            if stop > end:
                break
            if b0 & 0x80 and opcode in (1, 2) and current is None:
                key = buf[pos + head : pos + head + 4]
                out.append(Message(apply_mask(buf[pos + head + 4 : stop], key), opcode == 1))
            else:  # a control frame or a fragment, complete: websockets handles it
                super().receive_data(buf[pos:stop])
                out.extend(e for e in self.events_received() if isinstance(e, Frame))
                if self.state is not WsState.OPEN or self.parser_exc is not None:
                    self._count(0)
                    return self._give_up(out, buf[stop:]) if stop < end else out
            pos = stop
        rest = buf[pos:] if pos else buf
        self._tail = rest
        held = len(rest) + (self.current_size or 0)  # as `receive_data` counts
        # nothing held before or now (the common read): the budget stands as it was
        if (held or self._partial) and not self._count(held):
            self._tail = None
        return out

    def send_text(self, data: Any, fin: bool = True) -> None:
        """Queue one text frame; a whole message on an open connection is framed here
        (`Frame.serialize`'s bytes, without its generic path: every event goes through it)."""
        if not fin or self.expect_continuation_frame or not self.fast_open or self.debug:
            super().send_text(data, fin)
            return
        self.writes.append(frame_head(0x81, len(data)) + data)  # one chunk: b"" means EOF

    def _slow(self, data: bytes) -> list[Frame | Message]:
        self.receive_data(data)
        return [e for e in self.events_received() if isinstance(e, Frame)]

    def _give_up(self, out: list[Frame | Message], rest: bytes) -> list[Frame | Message]:
        """Let websockets parse from `rest` on (it judges what is wrong with it)."""
        self._tail = None
        out.extend(self._slow(rest))
        return out

    def _count(self, size: int) -> bool:
        """Our held partial frame is `size` bytes; False (failed 1013) past the budget."""
        budget = self._budget
        if budget is None or budget.update(self._partial, size):
            self._partial = size if budget is not None else 0
            return True
        self.release_budget()
        self.fail(TRY_AGAIN_LATER, OVER_BUDGET)
        return False

    def receive_data(self, data: bytes | bytearray) -> None:
        """Parse `data`; fail the connection 1013 if its partial frame passes the budget."""
        super().receive_data(data)
        budget = self._budget
        if budget is None:
            return
        partial = len(self.reader.buffer) + (self.current_size or 0)
        if budget.update(self._partial, partial):
            self._partial = partial
            return
        self.release_budget()
        self.fail(TRY_AGAIN_LATER, OVER_BUDGET)

    def receive_eof(self) -> None:
        """The peer ended the stream: no partial frame will complete, so give its bytes back."""
        self.release_budget()
        super().receive_eof()

    def release_budget(self) -> None:
        """Give back this connection's bytes and stop counting (the connection is over)."""
        if self._budget is not None:
            self._budget.update(self._partial, 0)
            self._budget, self._partial = None, 0


class Message:
    """One complete WebSocket data message."""

    __slots__ = ("data", "text")

    def __init__(self, data: bytes | bytearray | memoryview, text: bool) -> None:
        self.data = data
        self.text = text


class MessageAssembler:
    """Joins fragmented data frames into messages (sans-I/O; shared by both drivers)."""

    def __init__(self) -> None:
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._text = False

    def feed(self, frame: Frame) -> Message | None:
        """The message `frame` completes, or None (a fragment, or a control frame)."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                return Message(frame.data, opcode is Opcode.TEXT)
            self._fragments, self._text = [frame.data], opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self._fragments.append(frame.data)
            if frame.fin:
                message = Message(b"".join(self._fragments), self._text)
                self._fragments = []
                return message
        return None


class WebSocketConnection:
    """The data phase of an accepted WebSocket."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: ServerProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self._wake = anyio.Event()
        self._assembler = MessageAssembler()
        self.closed_by_peer = False
        self.dropped = False  # ended without a close frame from the peer
        # `write_now` (trio, plain TCP): what the socket did not take, sent first by `flush`
        self._direct = direct_socket(stream)
        self._unsent = b""
        self._flushing = False  # the writer is in a send: a direct write would overtake it

    async def receive(self) -> Sequence[Message] | None:
        """Read once; the complete messages it carried, or None when the connection ended."""
        proto = self.protocol
        if self.closed_by_peer:
            return None  # the close came in the same read as the last messages
        try:
            data = await self._read()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            # a drop only if no closing handshake had begun (we may have failed the connection)
            self.dropped = proto.close_sent is None and proto.close_rcvd is None
            proto.receive_eof()
            self.closed_by_peer = True
            return None
        if isinstance(proto, BudgetedServerProtocol):  # parses the common frames itself
            events: list[Any] = proto.receive_frames(data)
        else:
            proto.receive_data(data)
            events = proto.events_received()
        messages: list[Message] = []
        control = False
        for event in events:
            if isinstance(event, Message):
                messages.append(event)
                continue
            if not isinstance(event, Frame):
                continue
            if event.opcode in CONTROL_OPCODES:
                control = True  # ping, pong or close: the protocol may have queued an answer
                self.closed_by_peer |= event.opcode is Opcode.CLOSE
            elif (message := self._assembler.feed(event)) is not None:
                messages.append(message)
        if control or proto.close_expected():
            self.wake()
        if self.closed_by_peer and not messages:
            return None
        return messages

    async def _read(self) -> bytes:
        """One read of the client's bytes (EndOfStream at its end)."""
        sock = self._direct
        if sock is None:
            return await self.stream.receive(READ_SIZE)
        # trio, plain TCP: a client's next message is seldom there yet (one every 20 ms), so
        # wait, then read once, instead of a read that fails, a wait and a read
        await anyio.wait_readable(sock)
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:  # woken with nothing to read after all
            return await self.stream.receive(READ_SIZE)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    def queue_text(self, data: bytes) -> None:
        """Queue one text message (already UTF-8 JSON); call `wake()` to send.

        Once the closing handshake has begun, messages are dropped: the peer will not read them.
        """
        if self.protocol.state is WsState.OPEN:
            self.protocol.send_text(data)

    def wake(self) -> None:
        """Tell the writer there is something to send."""
        self._wake.set()

    def can_write_now(self) -> bool:
        """The socket is ours to write (`direct_socket`), the connection open (so no
        end-of-stream chunk can come) and nothing of the writer's waits or is in a send."""
        return (
            self._direct is not None
            and not self._flushing
            and not self._unsent
            and self.protocol.state is WsState.OPEN
        )

    def write_now(self) -> None:
        """Send what is queued now (after `can_write_now`); the rest goes to the writer."""
        sock = self._direct
        assert sock is not None
        data = b"".join(self.protocol.data_to_send())
        if data:
            self._unsent = send_some(sock, data)
            if self._unsent:
                self.wake()

    async def wait_wake(self) -> None:
        """Writer side: wait until someone calls `wake()`."""
        await self._wake.wait()
        self._wake = anyio.Event()

    async def flush(self) -> None:
        """Send everything the protocol has queued, in one write."""
        chunks = self.protocol.data_to_send()
        if not chunks and not self._unsent:
            return
        data, self._unsent = self._unsent + b"".join(chunks), b""
        if data:
            self._flushing = True
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.dropped |= not self.closed_by_peer and self.protocol.close_sent is None
                self.closed_by_peer = True
                return
            finally:
                self._flushing = False
        if chunks and chunks[-1] == b"":
            # websockets asks for the TCP connection to close with an empty chunk
            await self._close_transport()

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake and flush; the transport closes when it completes."""
        if self.protocol.state is WsState.OPEN:
            self.protocol.send_close(code, reason[:120])
        await self.flush()

    async def abort(self) -> None:
        """Close the TCP connection now, without a closing handshake."""
        self.closed_by_peer = True
        await self._close_transport()

    async def _close_transport(self) -> None:
        if isinstance(self.protocol, BudgetedServerProtocol):
            self.protocol.release_budget()  # no more bytes will come on this connection
        try:
            await self.stream.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


async def accept(
    stream: anyio.abc.ByteStream, http: HttpConnection, request: h11.Request, protocol: Any
) -> WebSocketConnection | None:
    """Answer the opening handshake on `protocol`; the connection, or None when refused (the
    refusal has been sent)."""
    protocol.receive_data(http.upgrade_head(request))
    ws_request = next(iter(protocol.events_received()), None)
    if ws_request is None:
        return None
    response = protocol.accept(ws_request)
    protocol.send_response(response)
    conn = WebSocketConnection(stream, protocol)
    await conn.flush()
    return conn if response.status_code == 101 else None
