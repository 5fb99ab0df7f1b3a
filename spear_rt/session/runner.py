"""The I/O around one session machine: its tasks, all in the session's own task group.

* reader (the calling task): reads the client socket, feeds every message of a read to the
  machine, then sends the resulting upstream commands. Sending waits when the upstream
  is full, so the reader stops reading and TCP pushes back on the client: audio is never
  dropped.
* writer: the only task that sends on the client socket; it drains the outbound queue in one
  write per wake-up and performs the closing handshake.
* upstream reader: turns upstream events into client events.
* timer: idle / max-age / drain deadlines from the event loop's clock.

Whoever changes the machine calls `_after()`, which wakes the writer. Once the machine asks
to close, the connection gets `CLOSE_GRACE_S` to finish the handshake before the group is
cancelled, so a client that stops reading cannot keep a session alive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import anyio
import anyio.abc

from spear_rt.backend import TranscriptionUpstream
from spear_rt.errors import BackendFailure
from spear_rt.protocol.client_events import ProtocolError, decode_client_event
from spear_rt.session.machine import CloseAction, SessionMachine

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0
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

    closed_by_peer: bool

    async def receive(self) -> Sequence[ClientMessage] | None:
        """The messages of one read, or None once the client is gone."""
        ...

    def queue_text(self, data: bytes) -> None:
        """Queue one text message."""
        ...

    def wake(self) -> None:
        """Wake the writer."""
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


class SessionRunner:
    """Runs one machine against one client connection and one upstream."""

    def __init__(
        self, machine: SessionMachine, conn: ClientLink, upstream: TranscriptionUpstream
    ) -> None:
        self.machine = machine
        self.conn = conn
        self.upstream = upstream
        self._upstream_lock = anyio.Lock()
        self._peer_closed = anyio.Event()
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._timer_sleep: anyio.CancelScope | None = None  # cancel to recompute the deadline

    async def run(self) -> None:
        """Run until the session closes or the client goes away."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._writer)
            tg.start_soon(self._upstream_reader)
            tg.start_soon(self._timer)
            self.machine.start(anyio.current_time())
            self._after()
            await self._reader()

    def drain(self, deadline_s: float) -> None:
        """Server shutdown: finish turns in flight, then close 1001 (from any task)."""
        self.machine.drain(anyio.current_time(), deadline_s)
        if self._timer_sleep is not None:
            self._timer_sleep.cancel()  # the drain deadline may come before the timer's wake-up
        self._after()
        if self._tg is not None:
            self._tg.start_soon(self._send_upstream)

    # --- tasks --------------------------------------------------------------------------------

    async def _reader(self) -> None:
        machine, conn = self.machine, self.conn
        while True:
            messages = await conn.receive()
            if messages is None:
                break
            now = anyio.current_time()
            for message in messages:
                event = decode_client_event(message.data) if message.text else _BINARY
                machine.client_event(event, now)
            await self._send_upstream()
            self._after()
        self._peer_closed.set()
        if machine.close is None:
            machine.client_gone()
        # The writer answers the peer's close frame, then ends the session; if it cannot
        # (a dead socket), the grace timer does.
        conn.wake()
        self._start_force_close()

    async def _writer(self) -> None:
        conn, machine = self.conn, self.machine
        close_sent = False
        while True:
            await conn.wait_wake()
            for data in machine.outbound.take_all():
                conn.queue_text(data)
            if machine.close is not None and not close_sent:
                close_sent = True
                await conn.close(machine.close.code, machine.close.reason)
            else:
                await conn.flush()
            if conn.closed_by_peer:
                await conn.flush()  # the answer to the peer's close frame
                self._cancel()
                return

    async def _upstream_reader(self) -> None:
        try:
            while True:
                event = await self.upstream.receive()
                self.machine.upstream_event(event)
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

    # --- helpers ------------------------------------------------------------------------------

    async def _send_upstream(self) -> None:
        """Send the machine's queued upstream commands in order (one sender at a time)."""
        async with self._upstream_lock:
            commands = self.machine.upstream
            while commands:
                command = commands.pop(0)
                try:
                    await self.upstream.send(command)
                except BackendFailure as exc:
                    self.machine.upstream_failed(f"upstream failed: {exc}")
                    commands.clear()

    def _after(self) -> None:
        machine = self.machine
        if machine.outbound.overflowed and machine.close is None:
            machine.close = CloseAction(1008, "client is not reading events")
        if len(machine.outbound) or machine.close is not None:
            self.conn.wake()
        if machine.close is not None:
            self._start_force_close()

    def _start_force_close(self) -> None:
        if not self._closing and self._tg is not None:
            self._closing = True
            self._tg.start_soon(self._force_close)

    async def _force_close(self) -> None:
        await anyio.sleep(CLOSE_GRACE_S)
        self._cancel()

    def _cancel(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
