"""One session's upstream WebSocket connection: buffers, and the reader/writer/keepalive tasks.

On asyncio the socket is an `aio_link.LinkProtocol` instead: commands are written where they
are sent and reads are decoded in its callbacks (no reader or writer task; see aio_link.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import anyio
import anyio.abc
import msgspec
import numpy as np
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from spear_rt.backend import AppendAudio, BeginTurn, UpstreamCommand, UpstreamEvent, waits_idle
from spear_rt.errors import BackendFailure
from spear_rt.wsframes import FastClientProtocol, direct_socket, send_some

from .aio_link import LinkProtocol, LinkStream
from .options import RealtimeOptions
from .translate import _DATA, RATE_HZ, Translator, _Assembler

READ_SIZE = 65536
FRAME_OVERHEAD = 96  # bytes of JSON and framing around an event's payload (an estimate)
_NON_RETRYABLE_CLOSE = frozenset({1002, 1003, 1007, 1008, 1009, 1010})

log = logging.getLogger(__name__)


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

    On an asyncio link the send buffer is the transport's (its high-water mark is
    `max_send_buffer_bytes`): `send_nowait` returns False while the transport has paused
    writing, so it holds at most that plus one frame. Events of a read that find the queue
    full are held (at most one read's worth) and reading pauses until `receive` takes them.
    """

    input_rate_hz = RATE_HZ

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: FastClientProtocol,
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
        self._writer_busy = False  # the writer task is in a send (of any size)
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._pong: anyio.Event | None = None
        self._pings = 0
        self._delivering = False  # the reader waits for `receive`: pongs cannot be read
        self._failure: BackendFailure | None = None
        self._closed = False
        self._io_scope = anyio.CancelScope()
        self._io_done = anyio.Event()
        self._link: LinkProtocol | None = (
            stream.protocol if isinstance(stream, LinkStream) else None
        )
        # trio, plain TCP: a write the socket takes at once is made by the sender itself, the
        # writer task only sends what it did not take (`_unsent`, first): a task switch and
        # an event less per append (issue 16). Not on asyncio without the link: its
        # transport may hold bytes a direct write would overtake.
        self._direct = direct_socket(stream) if self._link is None else None
        self._unsent = b""
        self._held: deque[UpstreamEvent] = deque()  # link: decoded while the queue was full
        self._end_after_held = False  # link: failed; end the queue once `_held` is delivered
        self._sink: Callable[[UpstreamEvent], bool] | None = None
        self._sink_done: Callable[[], None] | None = None
        self._sunk = False  # the sink took an event of the read being handled
        self._receiving = False  # `receive` is waiting (see `set_sink`)
        self._corked = False  # link: frames wait for `flush` (see `cork`)

    # --- TranscriptionUpstream ----------------------------------------------------------------

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Queue `command` without waiting; False (nothing done) when the buffer is full."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise anyio.ClosedResourceError
        if self._proto.state is not State.OPEN:  # the peer is closing: the reader will tell
            raise _closed_failure(self._proto)
        if isinstance(command, AppendAudio):
            pcm = command.pcm
            if pcm.dtype != np.int16 or pcm.ndim != 1:
                raise ValueError("AppendAudio.pcm must be a 1-D int16 array")
            if not pcm.size:
                return True
        link = self._link
        if link is not None:
            if link.write_paused:
                return False
            frame = self._translator.encode(command)
            if frame is not None:
                self._send_text(link, frame)
            return True
        size = FRAME_OVERHEAD
        if isinstance(command, AppendAudio):
            size += (command.pcm.nbytes + 2) // 3 * 4
        elif isinstance(command, BeginTurn):
            size = 0
        used = self._queued + self._writing
        if used and used + size > self._options.max_send_buffer_bytes:
            return False
        frame = self._translator.encode(command)
        if frame is not None:
            self._proto.send_text(frame)
            self._queued += len(frame)
            if not self._corked:
                self._send_direct()
        return True

    async def send(self, command: UpstreamCommand) -> None:
        """Queue `command`; waits while the send buffer is full."""
        while not self.send_nowait(command):
            self._space = anyio.Event()
            await self._space.wait()

    def set_sink(
        self,
        sink: Callable[[UpstreamEvent], bool] | None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Hand events to `sink` as they are read (by the link's callbacks on asyncio, the
        reader task on trio), instead of queueing them.

        Only while `receive` waits with nothing queued or in flight, so a sunk event never
        overtakes a queued one; `sink` returning False (not now) queues the event as usual.
        Failures still end `receive`. This saves two task switches per event (issue 16).
        `done` is called after the events of one read that `sink` took (write them once).
        """
        self._sink, self._sink_done = sink, done

    async def receive(self) -> UpstreamEvent:
        """The next event; after a failure, the events before it, then `BackendFailure`."""
        self._receiving = True
        try:
            event = await self._rx.receive()
        except anyio.EndOfStream:
            if self._failure is not None:
                raise self._failure from None
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None
        finally:
            self._receiving = False
        if self._held:
            self._release_held()
        return event

    def statistics(self) -> UpstreamStatistics:
        """Current buffer occupancy."""
        options = self._options
        used = self._queued + self._writing
        link = self._link
        if link is not None and link.transport is not None:
            used = link.transport.get_write_buffer_size()
        return UpstreamStatistics(
            send_buffer_bytes=used,
            max_send_buffer_bytes=options.max_send_buffer_bytes,
            events_buffered=self._rx.statistics().current_buffer_used + len(self._held),
            max_pending_events=options.max_pending_events,
        )

    # --- I/O tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read, write and keep alive until the connection ends (or `aclose`)."""
        try:
            with self._io_scope:
                async with anyio.create_task_group() as tg:
                    if self._link is None:
                        tg.start_soon(self._writer)
                    if self._options.ping_interval_s > 0:
                        tg.start_soon(self._keepalive)
                    if self._link is None:
                        await self._reader()
                    else:
                        self._switch_link(self._link)
                        await anyio.sleep_forever()  # until `_fail` cancels `_io_scope`
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
                events, failure = self._frames(proto.receive_frames(data))
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

    def _frames(self, frames: list[Frame]) -> tuple[list[UpstreamEvent], BackendFailure | None]:
        """Our events for the frames of one read, up to the failure among them if any."""
        events: list[UpstreamEvent] = []
        for frame in frames:
            opcode = frame.opcode
            if opcode in _DATA:
                try:
                    message = self._assembler.message(frame)
                    if message is not None:
                        events.extend(self._translator.decode(message))
                except BackendFailure as exc:
                    return events, exc
            else:  # websockets queued the answer to a ping or a close: send it
                self._kick()
                if opcode is Opcode.PONG and self._pong is not None:
                    self._pong.set()
        return events, None

    async def _deliver(self, events: list[UpstreamEvent]) -> None:
        self._delivering = True
        try:
            for event in events:
                if not self._try_sink(event):
                    await self._tx.send(event)
        except anyio.BrokenResourceError:
            pass  # closing: nobody reads events any more
        finally:
            self._delivering = False
        if self._sunk:
            self._sunk = False
            if self._sink_done is not None:
                self._sink_done()

    def _try_sink(self, event: UpstreamEvent) -> bool:
        """Hand `event` to the sink (see `set_sink`); False: queue it."""
        sink = self._sink
        if (
            sink is not None
            and self._receiving
            and not self._closed
            and waits_idle(self._tx)
            and sink(event)
        ):
            self._sunk = True
            return True
        return False

    async def _writer(self) -> None:
        stream = self._stream
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                chunks = self._proto.data_to_send()
                self._writing, self._queued = self._queued, 0
                data, self._unsent = self._unsent + b"".join(chunks), b""
                if data:
                    self._writer_busy = True
                    try:
                        await stream.send(data)
                    finally:
                        self._writer_busy = False
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
            self._kick()
            with anyio.move_on_after(options.ping_timeout_s):
                await self._pong.wait()
                continue
            if not self._delivering:  # a session that does not read is not a dead upstream
                self._fail(BackendFailure(
                    f"the upstream stopped answering (no pong within {options.ping_timeout_s:g}s)",
                    retryable=True,
                ))  # fmt: skip
                return

    # --- the asyncio link (callbacks) ---------------------------------------------------------

    def _kick(self) -> None:
        """Get what the protocol queued onto the wire: write it now, or wake the writer."""
        if self._link is not None:
            self._write()
        else:
            self._wake.set()

    def _send_direct(self) -> None:
        """Task path: what the protocol queued, sent now when the writer is idle and the
        socket takes it (see `_direct`); the rest, or all of it, goes to the writer."""
        sock = self._direct
        if sock is None or self._writer_busy or self._unsent:
            self._wake.set()  # the writer is busy or behind: it sends this after the rest
            return
        data = b"".join(self._proto.data_to_send())
        if data:
            self._unsent = send_some(sock, data)
            if self._unsent:
                self._wake.set()
        self._queued = len(self._unsent)

    def _write(self) -> None:
        link = self._link
        assert link is not None
        data = b"".join(self._proto.data_to_send())
        transport = link.transport
        if data and transport is not None and not link.lost and not transport.is_closing():
            transport.write(data)

    def _send_text(self, link: LinkProtocol, payload: bytes) -> None:
        """One text frame: written now, or at `flush` while corked."""
        transport = link.transport
        if transport is None or link.lost or transport.is_closing():
            return
        self._proto.send_text(payload)
        if not self._corked:
            self._write()

    def cork(self) -> None:
        """Hold the frames `send_nowait` makes until `flush` (asyncio link: the session's read
        of its client sends that read's commands in one write). Always paired with `flush`."""
        self._corked = self._link is not None or self._direct is not None

    def flush(self) -> None:
        """Write what was held since `cork`, and write at once again."""
        self._corked = False
        if self._link is not None:
            self._write()
        elif self._direct is not None:
            self._send_direct()

    def _switch_link(self, link: LinkProtocol) -> None:
        """Take the connection over from the opening's coroutines (see aio_link.py)."""
        if link.transport is not None:
            link.transport.set_write_buffer_limits(high=self._options.max_send_buffer_bytes)
        early = link.switch(self)
        if early:
            self.link_data(early)
        if link.lost:
            self.link_lost(None)
        elif link.eof:
            self.link_eof()

    def _ended(self) -> bool:
        return self._io_scope.cancel_called

    def link_data(self, data: bytes) -> None:
        """One read: parse, decode, queue the events; answer pings and closes."""
        if self._ended():
            return
        proto = self._proto
        try:
            events, failure = self._frames(proto.receive_frames(data))
            self._deliver_now(events)  # what came before a failure still counts
            if self._sunk:
                self._sunk = False
                if self._sink_done is not None:
                    self._sink_done()
        except Exception as exc:  # a callback must not raise: the transport would die silently
            log.exception("an upstream read could not be handled")
            self._fail(BackendFailure(f"upstream read failed: {type(exc).__name__}"))
            return
        if failure is not None:
            self._fail(failure)
        elif (error := proto.parser_exc) is not None:
            message = f"upstream protocol error: {type(error).__name__}: {error}"
            self._fail(BackendFailure(message))
        elif proto.state is State.CLOSED:
            self._fail(_closed_failure(proto))

    def link_eof(self) -> None:
        """The upstream ended the stream."""
        if self._ended():
            return
        self._proto.receive_eof()
        frames = [e for e in self._proto.events_received() if isinstance(e, Frame)]
        events, _ = self._frames(frames)
        self._deliver_now(events)
        self._fail(_closed_failure(self._proto))

    def link_lost(self, exc: Exception | None) -> None:
        """The connection is gone (after `link_eof`, nothing is left to do)."""
        if not self._ended():
            self._fail(BackendFailure("the upstream connection was lost", retryable=True))

    def link_writable(self) -> None:
        """The transport went under its high-water mark: a waiting `send` may go on."""
        self._space.set()

    def _deliver_now(self, events: list[UpstreamEvent]) -> None:
        """Queue `events`; those that do not fit are held and reading pauses."""
        held = self._held
        for event in events:
            if held:
                held.append(event)
                continue
            if self._try_sink(event):
                continue
            try:
                self._tx.send_nowait(event)
            except anyio.WouldBlock:
                held.append(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # closing: nobody reads events any more
        if held:
            self._delivering = True  # the session does not read: pongs wait too
            link = self._link
            if link is not None and link.transport is not None and not link.lost:
                link.transport.pause_reading()

    def _release_held(self) -> None:
        """`receive` made room: queue held events; once none are left, read again."""
        held = self._held
        while held:
            try:
                self._tx.send_nowait(held[0])
            except anyio.WouldBlock:
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                held.clear()
                break
            held.popleft()
        self._delivering = False
        if self._end_after_held:
            self._tx.close()
            return
        link = self._link
        if link is not None and link.transport is not None and not link.lost:
            link.transport.resume_reading()

    def _fail(self, failure: BackendFailure) -> None:
        """The connection is over: keep the first failure, stop the I/O, wake everyone."""
        if self._failure is None and not self._closed:
            self._failure = failure
        self._io_scope.cancel()
        if self._held and not self._closed:
            self._end_after_held = True  # `receive` still gets the held events first
            if self._link is not None and self._link.transport is not None:
                self._link.transport.pause_reading()
        else:
            self._tx.close()
        self._space.set()

    async def aclose(self) -> None:
        """Closing handshake (bounded by close_timeout_s), then stop the I/O tasks."""
        self._closed = True
        self._rx.close()  # the reader now discards events, to see the peer's close
        self._space.set()
        if self._held:
            self._held.clear()
            self._release_held()
        if self._failure is None and self._proto.state is State.OPEN:
            self._proto.send_close(1000)
            self._kick()
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
