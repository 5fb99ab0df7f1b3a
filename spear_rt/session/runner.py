"""The I/O around one session machine: its tasks, in the session's task group and its links'.

A session outlives its client connection ("link") when the socket drops without a close
frame: it goes DETACHED and a resuming connection attaches a new link. Per session, in the
session's task group (owned by the first connection's handler):

* upstream reader: turns upstream events into client events;
* timer: idle / max-age / drain / resume-grace deadlines from the event loop's clock;
* responder (conversations): composes the responses the machine starts (`responder.py`).

Per link, in a task group of the handler that owns that connection:

* reader (the handler's task): reads the client socket, feeds every message of a read to
  the machine, then sends the resulting upstream commands. Sending waits when the upstream
  is full, so the reader stops reading and TCP pushes back on the client: audio is never
  dropped. Likewise, before each message it waits while the outbound queue holds more than
  `max_outbound_bytes` (the writer has not sent the answers to earlier messages yet): a
  client flooding bad events is slowed to the pace it reads its errors, never closed for it;
  one whose socket takes nothing for WRITE_STALL_S meanwhile is closed 1008.
  A message whose handling raises is logged once and ends the session with an `error` event
  and close 1011 (never a silently dead connection).
* writer: the only task that sends on the link; it drains the outbound queue in one write
  per wake-up and performs the closing handshake.

Whoever changes the machine calls `_after()`, which wakes the writer. Once the machine asks
to close, the connection gets `CLOSE_GRACE_S` to finish the handshake before the session
is cancelled, so a client that stops reading cannot keep a session alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio
import anyio.abc

from spear_rt.backend import TranscriptionUpstream, UpstreamCommand, UpstreamEvent
from spear_rt.errors import BackendFailure
from spear_rt.protocol.client_events import ProtocolError, decode_client_event
from spear_rt.session.machine import CloseAction, SessionMachine, State
from spear_rt.session.responder import Responder, ResponseHost

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0
# A client whose socket takes none of our writes for this long while its own events wait for
# room in the outbound queue is not reading: close 1008 (both runners).
WRITE_STALL_S = 30.0
NOT_READING = CloseAction(1008, "client is not reading events")
_BINARY = ProtocolError(
    "binary_frame_not_supported",
    "binary frames are not accepted: send JSON events as text frames (audio base64 in "
    "input_audio_buffer.append)",
)


class ClientMessage(Protocol):
    """One complete message from the client."""

    @property
    def data(self) -> bytes | bytearray | memoryview:
        """The payload."""
        ...

    @property
    def text(self) -> bool:
        """True for a text frame."""
        ...


class ClientLink(Protocol):
    """What the runner needs of a client connection (the edge's WebSocketConnection)."""

    closed_by_peer: bool  # the connection is over for reading: close frame, EOF or error
    dropped: bool  # ...and it ended without a closing handshake (a resume may follow)

    async def receive(self) -> Sequence[ClientMessage] | None:
        """The messages of one read, or None once the client is gone."""
        ...

    def queue_text(self, data: bytes) -> None:
        """Queue one text message."""
        ...

    def wake(self) -> None:
        """Wake the writer."""
        ...

    def can_write_now(self) -> bool:
        """Whether `write_now` may send without the writer (nothing of the writer's waits)."""
        ...

    def write_now(self) -> None:
        """Send what is queued now, without the writer (after `can_write_now`); what the
        socket does not take at once goes to the writer."""
        ...

    async def wait_wake(self) -> None:
        """Wait for a wake-up."""
        ...

    async def flush(self) -> None:
        """Send what is queued."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake."""
        ...

    async def abort(self) -> None:
        """Drop the connection without a handshake (it was lost, or a resume replaced it)."""
        ...


def handle_message(
    machine: SessionMachine, message: ClientMessage, now: float | None = None
) -> None:
    """Decode one client message and apply it; never raises (shared by both runners).

    `now`: the session clock's time, when the caller has it at hand. A failure in the
    handling itself (a bug) is logged with its traceback once per session,
    answered with an `error` event and closes the session 1011.
    """
    try:
        event = decode_client_event(message.data) if message.text else _BINARY
        machine.client_event(event, anyio.current_time() if now is None else now)
    except Exception:
        if machine.close is None:
            log.exception("session %s: handling a client event failed", machine.session_id)
            fail_session(machine)


def fail_session(machine: SessionMachine) -> None:
    """An internal error in `machine`'s session: tell the client, close 1011 (no traceback)."""
    try:
        machine.error(
            "internal_error", "the server failed to handle an event", error_type="server_error"
        )
    finally:
        machine.close = machine.close or CloseAction(1011, "internal error")


def send_taken(
    machine: SessionMachine,
    send_nowait: Callable[[UpstreamCommand], bool],
    corking: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> bool:
    """Send, in order, the machine's upstream commands the upstream takes at once (each leaves
    the list once sent); False when the upstream failed (the machine is told, the rest go).
    With the upstream's (cork, flush), the commands go in one write."""
    commands = machine.upstream
    sent = 0
    if corking is not None:
        corking[0]()
    try:
        for command in commands:
            if not send_nowait(command):
                break
            sent += 1
    except BackendFailure as exc:
        machine.upstream_failed(f"upstream failed: {exc}")
        commands.clear()
        return False
    finally:
        if corking is not None:
            corking[1]()
    del commands[:sent]
    return True


def upstream_corking(upstream: object) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """The upstream's (cork, flush) pair, if it has one (see `send_taken`)."""
    cork = getattr(upstream, "cork", None)
    flush = getattr(upstream, "flush", None)
    return (cork, flush) if cork is not None and flush is not None else None


class SessionRunner:
    """Runs one machine against its client links and one upstream."""

    def __init__(
        self,
        machine: SessionMachine,
        conn: ClientLink,
        upstream: TranscriptionUpstream,
        *,
        resume_grace_s: float = 0.0,
        responder: Callable[[ResponseHost], Responder] | None = None,
    ) -> None:
        self.machine = machine
        self.conn: ClientLink | None = conn
        self.upstream = upstream
        self._responder = responder(self) if responder is not None else None
        self._first = conn
        self._resume_grace_s = resume_grace_s
        self._upstream_lock = anyio.Lock()
        self._send_nowait: Callable[[UpstreamCommand], bool] | None = getattr(
            upstream, "send_nowait", None
        )
        self._corking = upstream_corking(upstream)
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._link_scope: anyio.CancelScope | None = None
        self._link_done = anyio.Event()
        self._timer_sleep: anyio.CancelScope | None = None  # cancel to recompute the deadline
        self._room = anyio.Event()  # set by the writer each time it empties the outbound queue
        self.parked = False  # the responder waits for a resume (the session is detached)

    async def run(self) -> None:
        """Run until the session closes (it may outlive this first connection)."""
        set_sink: Callable[[Callable[[UpstreamEvent], bool], Callable[[], None]], None] | None = (
            getattr(self.upstream, "set_sink", None)
        )
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if set_sink is not None:
                # the events of one upstream read applied, then written once (`_after`)
                set_sink(self._upstream_now, self._after)
            tg.start_soon(self._upstream_reader)
            tg.start_soon(self._timer)
            if self._responder is not None:
                tg.start_soon(self._responder.run)
            self.machine.start(anyio.current_time())
            await self._serve_link(self._first, ())
            await anyio.sleep_forever()  # detached or resumed elsewhere: `_cancel` ends it

    async def attach(self, conn: ClientLink, last_seq: int) -> None:
        """Resume the session on `conn`; returns when that link is over.

        Raises `ResumeError` (nothing changed) when the session cannot be resumed. A link still
        attached (the server had not noticed the old socket die) is dropped first.
        """
        machine = self.machine
        if self.conn is not None and self._link_scope is not None:
            machine.detach(anyio.current_time(), self._resume_grace_s)
            self._link_scope.cancel()
            await self._link_done.wait()
        replay = machine.resume(anyio.current_time(), last_seq)
        self._rearm_timer()
        await self._serve_link(conn, replay)

    def drain(self, deadline_s: float) -> None:
        """Server shutdown: finish turns in flight, then close 1001 (from any task)."""
        self.machine.drain(anyio.current_time(), deadline_s)
        self._rearm_timer()  # the drain deadline may come before the timer's wake-up
        self._after()
        if self._tg is not None:
            self._tg.start_soon(self._send_upstream)

    # --- links --------------------------------------------------------------------------------

    async def _serve_link(self, conn: ClientLink, first: Sequence[bytes]) -> None:
        self.conn = conn
        self._room.set()  # a responder parked while the session was detached goes on
        self._link_done = anyio.Event()
        try:
            with anyio.CancelScope() as self._link_scope:
                async with anyio.create_task_group() as link:
                    for data in first:
                        conn.queue_text(data)
                    conn.wake()
                    link.start_soon(self._writer, conn)
                    self._after()
                    await self._reader(conn)
        finally:
            self.conn = self._link_scope = None
            self._link_done.set()
            if self.machine.state is State.DETACHED:
                with anyio.CancelScope(shield=True):
                    await conn.abort()

    def _detached(self, conn: ClientLink) -> bool:
        """`conn` dropped: True if the session now waits for a resume (this link is over)."""
        if conn is not self.conn:
            return True  # a resume replaced it already
        if self.machine.close is None and self.machine.detach(
            anyio.current_time(), self._resume_grace_s
        ):
            self._rearm_timer()
            if self._link_scope is not None:
                self._link_scope.cancel()
            return True
        return False

    # --- tasks --------------------------------------------------------------------------------

    async def _reader(self, conn: ClientLink) -> None:
        machine = self.machine
        while True:
            messages = await conn.receive()
            if messages is None:
                break
            for message in messages:
                if machine.outbound.nbytes > machine.outbound.max_bytes:
                    await self._send_upstream()
                    self._after()
                    await self._wait_room()
                handle_message(machine, message)
                if machine.close is not None:
                    break
            await self._send_upstream()
            self._after()
        if conn.dropped and self._detached(conn):
            return
        if machine.close is None:
            machine.client_gone()
        # The writer answers the peer's close frame, then ends the session; if it cannot
        # (a dead socket), the grace timer does.
        conn.wake()
        self._start_force_close()

    async def _writer(self, conn: ClientLink) -> None:
        machine = self.machine
        close_sent = False
        while True:
            await conn.wait_wake()
            for data in machine.outbound.take_all():
                conn.queue_text(data)
            self._room.set()
            if machine.close is not None and not close_sent:
                close_sent = True
                await conn.close(machine.close.code, machine.close.reason)
            else:
                await conn.flush()
            if conn.closed_by_peer:
                if conn.dropped and self._detached(conn):
                    return
                await conn.flush()  # the answer to the peer's close frame
                self._cancel()
                return

    def _upstream_now(self, event: UpstreamEvent) -> bool:
        """An event handed over by the upstream's reader (`set_sink`), applied as
        `_upstream_reader` would, without its task switches; False: it takes it instead
        (a relayed conversation: its answers wait for room and may send commands)."""
        machine = self.machine
        if machine.relayed or self._tg is None or self._tg.cancel_scope.cancel_called:
            return False
        machine.upstream_event(event)
        if machine.upstream:  # not expected outside a relay: sent in order by a task
            self._tg.start_soon(self._send_upstream)
        return True  # `_after` follows the read's last event (`set_sink`'s done)

    async def _upstream_reader(self) -> None:
        machine = self.machine
        relayed = machine.relayed
        try:
            while True:
                if relayed:  # answer audio is never dropped: a slow client slows the upstream
                    await self._wait_room()
                event = await self.upstream.receive()
                machine.upstream_event(event)
                if machine.upstream:  # a relayed conversation answers the upstream
                    await self._send_upstream()
                self._after()
        except anyio.EndOfStream:
            message = "the upstream closed the session"
        except BackendFailure as exc:
            message = f"upstream failed: {exc}"
        self.machine.upstream_failed(message)
        self._after()

    async def _timer(self) -> None:
        machine = self.machine
        while machine.close is None:
            with anyio.CancelScope() as self._timer_sleep:
                await anyio.sleep_until(machine.next_deadline())
            machine.tick(anyio.current_time())
            await self._send_upstream()
            self._after()

    # --- the responder's host -----------------------------------------------------------------

    def after(self) -> None:
        """The machine changed outside a client or upstream event: wake the writer."""
        self._after()

    async def wait_room(self) -> None:
        """Return once the outbound queue is back under its bound (or the session closes)."""
        await self._wait_room()

    # --- helpers ------------------------------------------------------------------------------

    async def _wait_room(self) -> None:
        """Wait until the writer has taken the outbound queue (or the session is closing).

        While the session is detached nobody reads: this waits for a resume (a link sets
        `_room`), so an answer does not outgrow the replay buffer; the grace ends it otherwise.
        """
        machine = self.machine
        while machine.close is None:
            if machine.state is State.DETACHED:
                if self._room.is_set():  # others may wait on the current one: share it
                    self._room = anyio.Event()
                self.parked = True
                try:
                    await self._room.wait()
                finally:
                    self.parked = False
                continue
            if machine.outbound.nbytes <= machine.outbound.max_bytes:
                return
            if self._room.is_set():  # others may wait on the current one: share it
                self._room = anyio.Event()
            self._after()
            with anyio.move_on_after(WRITE_STALL_S) as stalled:
                await self._room.wait()
            if stalled.cancelled_caught:
                machine.close = machine.close or NOT_READING
                self._after()

    async def _send_upstream(self) -> None:
        """Send the machine's queued upstream commands in order (one sender at a time).

        A command leaves the list only once sent (upstream sends are all-or-nothing), so a
        link cancelled mid-send loses nothing. While nobody else sends, commands the upstream
        takes at once go without a coroutine or the lock (two scheduler round trips each).
        """
        commands = self.machine.upstream
        fast = self._send_nowait
        if fast is not None and commands and not self._upstream_lock.locked():
            if not send_taken(self.machine, fast, self._corking) or not commands:
                return
        async with self._upstream_lock:
            commands = self.machine.upstream
            while commands:
                try:
                    await self.upstream.send(commands[0])
                except BackendFailure as exc:
                    self.machine.upstream_failed(f"upstream failed: {exc}")
                    commands.clear()
                    break
                del commands[0]

    def _after(self) -> None:
        machine, conn = self.machine, self.conn
        if machine.outbound.overflowed and machine.close is None:
            machine.close = NOT_READING
        if conn is None:
            if machine.close is not None:
                self._cancel()  # detached: there is no connection to close
            return
        if machine.close is not None:
            conn.wake()
            self._start_force_close()
        elif len(machine.outbound):
            if not conn.can_write_now():
                conn.wake()
                return
            # the writer's work, done here when the link can write at once (trio, plain
            # TCP): a task switch less per batch of events. When it cannot (the socket is
            # full), events stay in the bounded outbound queue as before.
            for data in machine.outbound.take_all():
                conn.queue_text(data)
            self._room.set()
            conn.write_now()

    def _rearm_timer(self) -> None:
        if self._timer_sleep is not None:
            self._timer_sleep.cancel()

    def _start_force_close(self) -> None:
        if not self._closing and self._tg is not None:
            self._closing = True
            self._tg.start_soon(self._force_close)

    async def _force_close(self) -> None:
        await anyio.sleep(CLOSE_GRACE_S)
        self._cancel()

    def _cancel(self) -> None:
        """End the session: its task group and the current link's."""
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if self._link_scope is not None:
            self._link_scope.cancel()
