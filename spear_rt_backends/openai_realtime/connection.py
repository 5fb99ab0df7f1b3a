"""One session's upstream WebSocket connection: buffers, and the reader/writer/keepalive tasks."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import msgspec
import numpy as np
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from spear_rt.backend import AppendAudio, BeginTurn, UpstreamCommand, UpstreamEvent
from spear_rt.errors import BackendFailure

from .options import RealtimeOptions
from .translate import _DATA, RATE_HZ, Translator, _Assembler

READ_SIZE = 65536
FRAME_OVERHEAD = 96  # bytes of JSON and framing around an event's payload (an estimate)
_NON_RETRYABLE_CLOSE = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


class UpstreamStatistics(msgspec.Struct, frozen=True):
    """Buffer occupancy of one upstream connection."""

    send_buffer_bytes: int  # queued for the socket or being written
    max_send_buffer_bytes: int
    events_buffered: int  # received, not yet taken by `receive`
    max_pending_events: int


class RealtimeTranscription:
    """One session's upstream connection (see the module docstring for its contract).

    Send buffer: frames are queued on the protocol, bounded in bytes; `send` waits and
    `send_nowait` returns False while `max_send_buffer_bytes` are queued or being written
    (one frame is always accepted into an empty buffer). Events: at most
    `max_pending_events` wait for `receive`; past that the reader stops reading the socket,
    so TCP pushes back on the upstream. Nothing is dropped. One sender at a time.
    """

    input_rate_hz = RATE_HZ

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: ClientProtocol,
        translator: Translator,
        assembler: _Assembler,
        options: RealtimeOptions,
    ) -> None:
        self._stream = stream
        self._proto = protocol
        self._translator = translator
        self._assembler = assembler
        self._options = options
        self._tx, self._rx = anyio.create_memory_object_stream[UpstreamEvent](
            options.max_pending_events
        )
        self._queued = 0  # bytes handed to the protocol since the last write
        self._writing = 0  # bytes of the write in progress
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._pong: anyio.Event | None = None
        self._pings = 0
        self._delivering = False  # the reader waits for `receive`: pongs cannot be read
        self._failure: BackendFailure | None = None
        self._closed = False
        self._io_scope = anyio.CancelScope()
        self._io_done = anyio.Event()

    # --- TranscriptionUpstream ----------------------------------------------------------------

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Queue `command` without waiting; False (nothing done) when the buffer is full."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise anyio.ClosedResourceError
        if self._proto.state is not State.OPEN:  # the peer is closing: the reader will tell
            raise _closed_failure(self._proto)
        size = FRAME_OVERHEAD
        if isinstance(command, AppendAudio):
            pcm = command.pcm
            if pcm.dtype != np.int16 or pcm.ndim != 1:
                raise ValueError("AppendAudio.pcm must be a 1-D int16 array")
            if not pcm.size:
                return True
            size += (pcm.nbytes + 2) // 3 * 4
        elif isinstance(command, BeginTurn):
            size = 0
        used = self._queued + self._writing
        if used and used + size > self._options.max_send_buffer_bytes:
            return False
        frame = self._translator.encode(command)
        if frame is not None:
            self._proto.send_text(frame)
            self._queued += len(frame)
            self._wake.set()
        return True

    async def send(self, command: UpstreamCommand) -> None:
        """Queue `command`; waits while the send buffer is full."""
        while not self.send_nowait(command):
            self._space = anyio.Event()
            await self._space.wait()

    async def receive(self) -> UpstreamEvent:
        """The next event; after a failure, the events before it, then `BackendFailure`."""
        try:
            return await self._rx.receive()
        except anyio.EndOfStream:
            if self._failure is not None:
                raise self._failure from None
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    def statistics(self) -> UpstreamStatistics:
        """Current buffer occupancy."""
        options = self._options
        return UpstreamStatistics(
            send_buffer_bytes=self._queued + self._writing,
            max_send_buffer_bytes=options.max_send_buffer_bytes,
            events_buffered=self._rx.statistics().current_buffer_used,
            max_pending_events=options.max_pending_events,
        )

    # --- I/O tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read, write and keep alive until the connection ends (or `aclose`)."""
        try:
            with self._io_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._writer)
                    if self._options.ping_interval_s > 0:
                        tg.start_soon(self._keepalive)
                    await self._reader()
                    tg.cancel_scope.cancel()
        finally:
            self._io_done.set()

    async def _reader(self) -> None:
        proto = self._proto
        try:
            while proto.state is not State.CLOSED:
                try:
                    data = await self._stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    proto.receive_eof()
                    break
                proto.receive_data(data)
                events, failure = self._frames(proto.events_received())
                await self._deliver(events)  # what came before a failure still counts
                if failure is not None:
                    raise failure
                if proto.parser_exc is not None:
                    exc = proto.parser_exc
                    raise BackendFailure(f"upstream protocol error: {type(exc).__name__}: {exc}")
        except BackendFailure as exc:
            self._fail(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail(BackendFailure("the upstream connection was lost", retryable=True))
        else:
            self._fail(_closed_failure(proto))

    def _frames(self, frames: list[Any]) -> tuple[list[UpstreamEvent], BackendFailure | None]:
        """Our events for the frames of one read, up to the failure among them if any."""
        events: list[UpstreamEvent] = []
        for frame in frames:
            if not isinstance(frame, Frame):
                continue
            opcode = frame.opcode
            if opcode in _DATA:
                try:
                    message = self._assembler.message(frame)
                    if message is not None:
                        events.extend(self._translator.decode(message))
                except BackendFailure as exc:
                    return events, exc
            else:  # websockets queued the answer to a ping or a close: send it
                self._wake.set()
                if opcode is Opcode.PONG and self._pong is not None:
                    self._pong.set()
        return events, None

    async def _deliver(self, events: list[UpstreamEvent]) -> None:
        self._delivering = True
        try:
            for event in events:
                await self._tx.send(event)
        except anyio.BrokenResourceError:
            pass  # closing: nobody reads events any more
        finally:
            self._delivering = False

    async def _writer(self) -> None:
        stream = self._stream
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                chunks = self._proto.data_to_send()
                self._writing, self._queued = self._queued, 0
                data = b"".join(chunks)
                if data:
                    await stream.send(data)
                self._writing = 0
                self._space.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail(BackendFailure("the upstream connection was lost", retryable=True))

    async def _keepalive(self) -> None:
        options = self._options
        while True:
            await anyio.sleep(options.ping_interval_s)
            self._pings += 1
            self._pong = anyio.Event()
            self._proto.send_ping(self._pings.to_bytes(4, "big"))
            self._wake.set()
            with anyio.move_on_after(options.ping_timeout_s):
                await self._pong.wait()
                continue
            if not self._delivering:  # a session that does not read is not a dead upstream
                self._fail(BackendFailure(
                    f"the upstream stopped answering (no pong within {options.ping_timeout_s:g}s)",
                    retryable=True,
                ))  # fmt: skip
                return

    def _fail(self, failure: BackendFailure) -> None:
        """The connection is over: keep the first failure, stop the I/O, wake everyone."""
        if self._failure is None and not self._closed:
            self._failure = failure
        self._io_scope.cancel()
        self._tx.close()
        self._space.set()

    async def aclose(self) -> None:
        """Closing handshake (bounded by close_timeout_s), then stop the I/O tasks."""
        self._closed = True
        self._rx.close()  # the reader now discards events, to see the peer's close
        self._space.set()
        if self._failure is None and self._proto.state is State.OPEN:
            self._proto.send_close(1000)
            self._wake.set()
            with anyio.move_on_after(self._options.close_timeout_s):
                await self._io_done.wait()
        self._io_scope.cancel()
        self._tx.close()


def _closed_failure(proto: ClientProtocol) -> BackendFailure:
    close = proto.close_rcvd
    if close is None:
        return BackendFailure("the upstream connection dropped (no close frame)", retryable=True)
    reason = f": {close.reason}" if close.reason else ""
    return BackendFailure(
        f"the upstream closed the connection ({close.code}{reason})",
        retryable=close.code not in _NON_RETRYABLE_CLOSE and not 4000 <= close.code < 5000,
    )
