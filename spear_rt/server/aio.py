"""The asyncio driver: our own `asyncio.Protocol` per connection (chosen by measurement).

anyio's asyncio socket stream re-arms reading (`resume_reading`/`pause_reading`) on every
`receive`, and a coroutine per read costs a loop iteration; at hundreds of sessions × 50
frames/s that is what limits a Python relay (../shared/NOTES.md). So on asyncio:

* plain HTTP and the WebSocket handshake run unchanged, as coroutines over `ProtocolStream`
  (an anyio `ByteStream` fed by the protocol's callbacks);
* once a realtime session starts, the connection switches to callbacks (`CallbackRunner`):
  `data_received` -> websockets' Sans-I/O parser -> the session machine -> the upstream's
  `send_nowait` -> one `transport.write` per batch. No task switch per frame. Upstream events,
  timers and upstreams without a fast path still use tasks in the session's task group.

Flow control: a session whose upstream cannot take more (no fast path, queue full) pauses
reading the client socket (TCP backpressure); a client that does not read pauses our writes
(`pause_writing`) and the outbound queue's overflow policy applies. As on the task runner,
client messages are applied only while the outbound queue holds at most `max_outbound_bytes`:
past it, the frames already parsed wait (at most one read's worth) and reading pauses until
the transport takes writes again, so a client flooding bad events but reading its errors is
slowed, never closed 1008. No exception escapes a callback: a failure handling a message is
logged once and ends the session with an `error` event and close 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
from websockets.frames import Frame
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

from spear_rt.aio_buffer import BufferedProtocol, BufferStream
from spear_rt.backend import TranscriptionUpstream, UpstreamCommand, UpstreamEvent
from spear_rt.errors import BackendFailure
from spear_rt.server.ws import BudgetedServerProtocol, Message, MessageAssembler
from spear_rt.session import runner as task_runner
from spear_rt.session.machine import SessionMachine, State
from spear_rt.session.responder import Responder, ResponseHost
from spear_rt.session.runner import CLOSE_GRACE_S, NOT_READING, fail_session, handle_message

log = logging.getLogger(__name__)


class ConnectionProtocol(BufferedProtocol):
    """One TCP connection: feeds a `ProtocolStream`, or a `CallbackRunner` once switched."""

    def __init__(self, on_connect: Callable[[ProtocolStream], None]) -> None:
        super().__init__()
        self._on_connect = on_connect
        self.session: CallbackRunner | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_connect(ProtocolStream(self))

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)
            return
        self.keep(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.session is not None:
            self.session.eof_received()
            self.wake_reader()
            return None  # let the transport close
        self.wake_reader()
        # HTTP: a client may half-close after its request and still read the answer (as on
        # the anyio drivers); the connection's handler closes the transport when it is done.
        # (SSL transports cannot stay half-open; asyncio would only warn.)
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.session is not None:
            self.session.connection_lost()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.session is not None:
            self.session.writable()


class ProtocolStream(BufferStream):
    """A coroutine view of a `ConnectionProtocol` (for HTTP and the handshake)."""

    protocol: ConnectionProtocol

    def __init__(self, protocol: ConnectionProtocol) -> None:
        super().__init__(protocol)

    async def aclose(self) -> None:
        """Close the connection (unless a callback session now owns it)."""
        if self.protocol.session is None and self.protocol.transport is not None:
            self.protocol.transport.close()

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        transport = self.protocol.transport
        assert transport is not None
        return {
            anyio.abc.SocketAttribute.remote_address: lambda: transport.get_extra_info("peername"),
            anyio.abc.SocketAttribute.local_address: lambda: transport.get_extra_info("sockname"),
        }


class CallbackRunner:
    """Runs one session from the protocol's callbacks (see the module docstring).

    The session outlives a connection that drops without a close frame (DETACHED, see
    `SessionMachine`); `attach` moves it onto the resuming connection.
    """

    def __init__(
        self,
        machine: SessionMachine,
        connection: ConnectionProtocol,
        ws: ServerProtocol,
        upstream: TranscriptionUpstream,
        *,
        resume_grace_s: float = 0.0,
        responder: Callable[[ResponseHost], Responder] | None = None,
    ) -> None:
        self.machine = machine
        self._responder = responder(self) if responder is not None else None
        # set each time flush empties the outbound queue; asyncio's events here (this is the
        # asyncio driver): anyio's wrapper costs a call more at every client read
        self._room = asyncio.Event()
        self.parked = False  # the responder waits for a resume (the session is detached)
        self.connection: ConnectionProtocol | None = connection
        self.ws = ws
        self.upstream = upstream
        self._resume_grace_s = resume_grace_s
        self._send_nowait: Callable[[UpstreamCommand], bool] | None = getattr(
            upstream, "send_nowait", None
        )
        self._corking = task_runner.upstream_corking(upstream)
        # Commands the upstream could not take at once. Reading the client pauses as soon as
        # this is non-empty and resumes when the pump has sent them all, so it never holds
        # more than the commands of one read (bounded by the frame size): nothing is dropped.
        self._backlog: deque[UpstreamCommand] = deque()
        self._pump_wake = anyio.Event()
        self._timer_scope: anyio.CancelScope | None = None
        self._done = asyncio.Event()
        self._link_done = anyio.Event()
        self._assembler = MessageAssembler()
        self._close_sent = False
        self._grace: asyncio.TimerHandle | None = None
        # Complete messages not applied yet: the outbound queue was over max_outbound_bytes.
        # At most one read's worth: reading stays paused while any wait.
        self._waiting: deque[Message] = deque()
        self._reading_paused = False
        self._stall: asyncio.TimerHandle | None = None  # messages wait, the socket takes nothing
        # anyio.current_time() is this loop's time, found anew (a getpid() each) per call
        self._clock = asyncio.get_running_loop().time

    async def run(self) -> None:
        """Own the session until it ends (its first connection may be replaced by resumes)."""
        connection = self.connection
        assert connection is not None
        self.machine.start(anyio.current_time())
        set_sink: Callable[[Callable[[UpstreamEvent], bool], Callable[[], None]], None] | None = (
            getattr(self.upstream, "set_sink", None)
        )
        if set_sink is not None:
            set_sink(self._upstream_now, self.after)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._upstream_reader)
                tg.start_soon(self._timer)
                tg.start_soon(self._pump)
                if self._responder is not None:
                    tg.start_soon(self._responder.run)
                self._take_over(connection, ())
                await self._done.wait()
                tg.cancel_scope.cancel()
        finally:
            if self._grace is not None:
                self._grace.cancel()
            if self._stall is not None:
                self._stall.cancel()
            self._release(abort=False)

    async def attach(
        self, connection: ConnectionProtocol, ws: ServerProtocol, last_seq: int
    ) -> None:
        """Resume on `connection`; returns when that link is over (`ResumeError`: refused)."""
        machine = self.machine
        if self.connection is not None:  # the old socket's death went unnoticed so far
            machine.detach(anyio.current_time(), self._resume_grace_s)
            self._release(abort=True)
        replay = machine.resume(anyio.current_time(), last_seq)
        self.ws = ws
        self._assembler = MessageAssembler()
        self._waiting.clear()
        self._close_sent = False
        self._rearm_timer()
        self._take_over(connection, replay)
        link_done = self._link_done
        await link_done.wait()

    def drain(self, deadline_s: float) -> None:
        """Server shutdown: finish turns in flight, then close 1001."""
        self.machine.drain(anyio.current_time(), deadline_s)
        self._rearm_timer()
        self._push_upstream()
        self.flush()

    # --- links --------------------------------------------------------------------------------

    def _take_over(self, connection: ConnectionProtocol, replay: Sequence[bytes]) -> None:
        """Make `connection` the session's link: send `replay`, then what it already read."""
        self.connection = connection
        self._link_done = anyio.Event()
        connection.session = self
        self._reading_paused = True  # unknown (the HTTP phase may have paused it): settle it
        self._update_reading()
        for data in replay:
            self.ws.send_text(data)
        early = connection.take_buffered()
        if early:
            self.data_received(early)
        else:
            self._apply_frames()  # frames that arrived with the handshake
        if connection.lost:
            self.connection_lost()
        self.flush()
        if connection.eof and not connection.lost and connection.transport is not None:
            connection.transport.close()  # half-closed before the switch: as at EOF in a session

    def _release(self, *, abort: bool) -> None:
        """Let go of the current connection (closing it) and wake whoever waits on the link."""
        connection, self.connection = self.connection, None
        self._link_done.set()
        if connection is None:
            return
        connection.session = None
        if connection.transport is not None and not connection.lost:
            if abort:
                connection.transport.abort()
            else:
                connection.transport.close()

    # --- callbacks ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse, apply every complete message, forward upstream, write what resulted."""
        try:
            ws = self.ws
            if isinstance(ws, BudgetedServerProtocol):  # parses the common frames itself
                assembler, waiting = self._assembler, self._waiting
                for item in ws.receive_frames(data):
                    if isinstance(item, Message):
                        waiting.append(item)
                    elif (message := assembler.feed(item)) is not None:
                        waiting.append(message)
                self._apply_waiting()
            else:
                ws.receive_data(data)
                self._apply_frames()
        except Exception:  # a callback must not raise: the transport would die silently
            self._crashed()

    def _apply_frames(self) -> None:
        for frame in self.ws.events_received():
            # ping/pong/close give no message: websockets queued any answer itself
            if isinstance(frame, Frame) and (message := self._assembler.feed(frame)) is not None:
                self._waiting.append(message)
        self._apply_waiting()

    def _apply_waiting(self) -> None:
        """Apply waiting messages while the outbound queue has room; write what resulted."""
        machine, waiting = self.machine, self._waiting
        while waiting:
            if machine.outbound.nbytes > machine.outbound.max_bytes:
                self.flush()  # may take the queue at once if the transport is not paused
                if machine.outbound.nbytes > machine.outbound.max_bytes:
                    break
            handle_message(machine, waiting.popleft(), self._clock())
        self._push_upstream()
        self.flush()
        self._update_reading()
        if self._stall is not None:
            self._stall.cancel()  # progress: the transport took writes
            self._stall = None
        if waiting:
            stall_s = task_runner.WRITE_STALL_S
            self._stall = asyncio.get_running_loop().call_later(stall_s, self._stalled)

    def _stalled(self) -> None:
        """Messages waited WRITE_STALL_S for a socket that took nothing: close 1008."""
        self._stall = None
        self._waiting.clear()
        self.machine.close = self.machine.close or NOT_READING
        try:
            self.flush()
        except Exception:
            self._crashed()

    def _crashed(self) -> None:
        log.exception("session %s: a connection callback failed", self.machine.session_id)
        self._waiting.clear()
        if self.machine.close is None:
            fail_session(self.machine)
        with contextlib.suppress(Exception):
            self.flush()
        if not self._close_sent:  # not even a close frame could be sent
            self._abort()

    def _update_reading(self) -> None:
        """Pause reading while the upstream backlog or unapplied messages wait, else resume."""
        connection = self.connection
        if connection is None or connection.transport is None or connection.lost:
            return
        pause = bool(self._backlog or self._waiting)
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                connection.transport.pause_reading()
            else:
                connection.transport.resume_reading()

    def eof_received(self) -> None:
        """The client half-closed: let websockets conclude, then end."""
        try:
            self.ws.receive_eof()
            self.flush()
        except Exception:
            self._crashed()

    def writable(self) -> None:
        """The transport takes writes again: send what waits, then apply waiting messages."""
        try:
            self.flush()
            if self._waiting:
                self._apply_waiting()
        except Exception:
            self._crashed()

    def connection_lost(self) -> None:
        """The TCP connection is gone: a drop detaches the session, anything else ends it."""
        machine = self.machine
        ws = self.ws
        if isinstance(ws, BudgetedServerProtocol):
            ws.release_budget()  # its partial frame will never complete
        dropped = ws.close_rcvd is None and ws.close_sent is None and machine.close is None
        if dropped and machine.detach(anyio.current_time(), self._resume_grace_s):
            self._release(abort=False)
            self._rearm_timer()
            return
        if machine.close is None:
            machine.client_gone()
        self._done.set()

    def flush(self) -> None:
        """Write queued events (unless the client is not reading) and any close or pong."""
        machine, ws, connection = self.machine, self.ws, self.connection
        outbound = machine.outbound
        if (
            not outbound.nbytes
            and machine.close is None
            and not ws.writes
            and connection is not None
        ):
            self._room.set()  # nothing to write (most client reads: appends answer nothing)
            return
        if machine.outbound.overflowed and machine.close is None:
            machine.close = NOT_READING
        if connection is None:
            self._room.set()  # detached: events go to the replay buffer only
            if machine.close is not None:
                self._done.set()  # detached: there is no connection to close
            return
        if not connection.write_paused and ws.state is WsState.OPEN:
            for data in machine.outbound.take_all():
                ws.send_text(data)
            self._room.set()
        if machine.close is not None and not self._close_sent:
            self._close_sent = True
            if ws.state is WsState.OPEN:
                ws.send_close(machine.close.code, machine.close.reason[:120])
            self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._abort)
        chunks = ws.data_to_send()
        transport = connection.transport
        if not chunks or transport is None or connection.lost:
            return
        data = b"".join(chunks)
        if data:
            transport.write(data)
        if chunks[-1] == b"":
            transport.close()

    def after(self) -> None:
        """The responder changed the machine: write what resulted."""
        try:
            self.flush()
        except Exception:
            self._crashed()

    async def wait_room(self) -> None:
        """Return once the outbound queue is back under its bound (or the session closes);
        while detached, once a resume attached a connection (see `SessionRunner`)."""
        machine = self.machine
        while machine.close is None and (
            machine.state is State.DETACHED or machine.outbound.nbytes > machine.outbound.max_bytes
        ):
            if self._room.is_set():  # others may wait on the current one: share it
                self._room = asyncio.Event()
            self.parked = machine.state is State.DETACHED
            try:
                await self._room.wait()
            finally:
                self.parked = False

    def _abort(self) -> None:
        connection = self.connection
        if connection is not None and connection.transport is not None:
            connection.transport.abort()
        self._done.set()

    def _rearm_timer(self) -> None:
        if self._timer_scope is not None:
            self._timer_scope.cancel()

    # --- upstream -----------------------------------------------------------------------------

    def _push_upstream(self) -> None:
        commands = self.machine.upstream
        if not commands:
            return
        fast = self._send_nowait
        if fast is not None and not self._backlog:
            # the commands of this read in one write
            sent = task_runner.send_taken(self.machine, fast, self._corking)
            if not sent or not commands:
                return
        self._backlog.extend(commands)
        commands.clear()
        self._update_reading()  # backpressure until the pump catches up
        self._pump_wake.set()

    async def _pump(self) -> None:
        while True:
            await self._pump_wake.wait()
            self._pump_wake = anyio.Event()
            try:
                while self._backlog:
                    # Sent before it leaves the backlog: while the send waits (a reconnecting
                    # upstream), the backlog is not empty, so newer commands queue behind it
                    # instead of taking the fast path ahead of it.
                    await self.upstream.send(self._backlog[0])
                    self._backlog.popleft()
            except BackendFailure as exc:
                self._backlog.clear()
                self.machine.upstream_failed(f"upstream failed: {exc}")
                self.flush()
            self._update_reading()

    def _upstream_now(self, event: UpstreamEvent) -> bool:
        """An event from the upstream's own callbacks (`set_sink`): applied as
        `_upstream_reader` would, without its task switches; False when it would wait.
        The upstream calls `after` once the events of its read are applied."""
        machine = self.machine
        if self._done.is_set():
            return False
        if (
            machine.relayed
            and machine.close is None
            and (
                machine.state is State.DETACHED
                or machine.outbound.nbytes > machine.outbound.max_bytes
            )
        ):
            return False  # `_upstream_reader` takes it once there is room
        try:
            machine.upstream_event(event)
            self._push_upstream()
            if machine.outbound.nbytes > machine.outbound.max_bytes // 2:
                self.flush()  # else once for the whole read (`after`): one write, not one each
        except Exception:
            self._crashed()
        return True

    async def _upstream_reader(self) -> None:
        machine = self.machine
        relayed = machine.relayed
        try:
            while True:
                if relayed:  # answer audio is never dropped: a slow client slows the upstream
                    await self.wait_room()
                event = await self.upstream.receive()
                machine.upstream_event(event)
                self._push_upstream()  # a relayed conversation answers the upstream
                self.flush()
        except anyio.EndOfStream:
            message = "the upstream closed the session"
        except BackendFailure as exc:
            message = f"upstream failed: {exc}"
        self.machine.upstream_failed(message)
        self.flush()

    async def _timer(self) -> None:
        machine = self.machine
        while machine.close is None:
            with anyio.CancelScope() as self._timer_scope:
                await anyio.sleep_until(machine.next_deadline())
            machine.tick(anyio.current_time())
            self._push_upstream()
            self.flush()


async def serve_asyncio(
    host: str,
    port: int,
    tg: anyio.abc.TaskGroup,
    handle: Callable[[ProtocolStream], Any],
    started: Callable[[int], None],
    accepting: anyio.CancelScope,
    *,
    ssl_context: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float = 10.0,
    reuse_port: bool = False,
    unix_path: str | None = None,
) -> None:
    """Listen with `ConnectionProtocol`; each connection's handler runs as a task in `tg`.

    With `ssl_context` the loop does TLS (asyncio's and uvloop's SSL transports drive the same
    protocol callbacks, pause/resume reading and writing included). With `unix_path` it
    listens there instead of host:port (a worker's socket for forwarded resumes).
    """
    loop = asyncio.get_running_loop()
    # Accepted connections waiting to become tasks: drained on the next loop turn, so it holds
    # at most what one accept burst (the listen backlog) brings.
    pending: deque[ProtocolStream] = deque()
    arrived = asyncio.Event()

    def on_connect(stream: ProtocolStream) -> None:
        pending.append(stream)  # handed to a task below: tasks cannot start in a callback
        arrived.set()

    tls: dict[str, Any] = (
        {"ssl": ssl_context, "ssl_handshake_timeout": ssl_handshake_timeout} if ssl_context else {}
    )
    if unix_path is not None:
        server = await loop.create_unix_server(
            lambda: ConnectionProtocol(on_connect), unix_path, backlog=4096
        )
        started(0)
    else:
        server = await loop.create_server(
            lambda: ConnectionProtocol(on_connect),
            host,
            port,
            backlog=4096,
            reuse_port=reuse_port,
            **tls,
        )
        started(server.sockets[0].getsockname()[1])
    try:
        with accepting:
            while True:
                await arrived.wait()
                arrived.clear()
                while pending:
                    tg.start_soon(handle, pending.popleft())
    finally:
        server.close()
