"""The loop side of an fd table: every connected rt fd is a realtime session's client.

`SessionHost` owns one task group in the event loop. ``CONNECT`` (in the guest's thread)
posts the fd to it; a dispatcher task starts ``SessionManager.serve(link, request)`` for it,
so a WASM task's session is routed through the registry and run by the same manager and
backends as a WebSocket's. ``rt_close`` posts a cancel of that session's scope; cancelling
the host (server shutdown, guest exit) cancels every session and hangs up every fd.

`FdLink` is the in-memory `ClientLink` of one fd: `receive` takes what the guest queued
(audio as ``input_audio_buffer.append`` events, control events as they are), and every
server event the session queues lands in the fd's recv queue for `rt_read`.

Threads: the guest never waits for the loop. Posting a command or waking a session's
reader schedules one callback into the loop (``TrioToken.run_sync_soon`` /
``loop.call_soon_threadsafe``) that only sets an `anyio.Event`; it is coalesced (one per
wait), so a burst of writes costs one wake-up. Loop-side updates take the table lock briefly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import anyio.abc
import sniffio

from spear_rt.hostcalls.fdtable import FdTable, RtFd
from spear_rt.protocol.settings import Dialect, SessionKind
from spear_rt.session.admission import ConnectRequest
from spear_rt.session.machine import Timeouts
from spear_rt.session.manager import SessionManager
from spear_rt.session.runner import ClientMessage

log = logging.getLogger(__name__)

Waker = Callable[[Callable[[], object]], None]


def loop_waker() -> Waker:
    """A thread-safe, non-blocking way to run a callback in the current event loop."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    loop = asyncio.get_running_loop()

    def call_soon(fn: Callable[[], object]) -> None:
        loop.call_soon_threadsafe(fn)

    return call_soon


class _Message:
    """One client message, as the session runner reads it."""

    __slots__ = ("data", "text")
    data: bytes
    text: bool

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.text = True


class FdLink:
    """One rt fd as the session's client connection (a `ClientLink`)."""

    def __init__(self, host: SessionHost, rt: RtFd) -> None:
        self.rt = rt
        self.scope = anyio.CancelScope()
        self.closed_by_peer = False
        self.dropped = False  # a guest's fd never drops: closing it ends the session
        self._host = host
        self._table = host.table
        self._wake = anyio.Event()
        self._input = anyio.Event()
        self._closing = False
        self._drain_asked = False

    async def receive(self) -> list[ClientMessage] | None:
        """What the guest queued since the last call; None once the fd or session is done."""
        while True:
            if self._closing:
                return None
            self._input = event = anyio.Event()
            batch = self._table.take_input(self.rt, partial(self._host.call_soon, event.set))
            if batch.eof:
                return None
            if batch.messages:
                return [_Message(m) for m in batch.messages]
            if batch.draining and not self._drain_asked:
                self._drain_asked = True
                self._host.drain(self)
            await event.wait()

    def queue_text(self, data: bytes) -> None:
        """One server event for the guest's recv queue."""
        if not self._table.push_event(self.rt, data) and not self._closing:
            self._table.session_closed(self.rt, 1008, "client is not reading events")
            self._end()

    def wake(self) -> None:
        """Wake the session's writer."""
        self._wake.set()

    def can_write_now(self) -> bool:
        """No: the session's writer hands the events over (see `flush`)."""
        return False

    def write_now(self) -> None:
        """Not used (`can_write_now`)."""

    async def wait_wake(self) -> None:
        """Writer side: wait for `wake()`."""
        await self._wake.wait()
        self._wake = anyio.Event()

    async def flush(self) -> None:
        """Nothing to do: events are in the recv queue as soon as they are queued."""

    async def close(self, code: int, reason: str) -> None:
        """The session closes: the fd hangs up and the 'peer' answers at once."""
        self._table.session_closed(self.rt, code, reason)
        self._end()

    async def abort(self) -> None:
        """Hang up at once (only reached if the session is taken over elsewhere)."""
        self._end()

    def _end(self) -> None:
        self._closing = True
        self.closed_by_peer = True
        self._input.set()


class SessionHost:
    """Runs the sessions of one fd table in its own task group (a `SessionPort`)."""

    def __init__(
        self, manager: SessionManager, table: FdTable, *, client_key_id: str | None = None
    ) -> None:
        self.manager = manager
        self.table = table
        table.port = self
        self._client_key_id = client_key_id
        self._lock = threading.Lock()
        # (True, fd) connect, (False, fd) cancel: one each per fd; (None, fn) start a task
        self._commands: deque[tuple[bool | None, Any]] = deque()
        self._signalled = False
        self._ready = anyio.Event()
        self._links: dict[int, FdLink] = {}
        self._call_soon: Waker | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve connects and closes until cancelled; then every fd hangs up."""
        self._call_soon = loop_waker()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await self._dispatch()
        finally:
            self.table.shutdown()

    # --- SessionPort: called from the guest's thread ----------------------------------------

    def connect(self, fd: RtFd) -> None:
        """Start the fd's session (non-blocking)."""
        self._post(True, fd)

    def cancel(self, fd: RtFd) -> None:
        """Cancel the fd's session (non-blocking)."""
        self._post(False, fd)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run `fn` in the event loop soon (from any thread; never blocks)."""
        if self._call_soon is None:
            return
        try:
            self._call_soon(fn)
        except RuntimeError:  # the loop has finished: nobody is left to wake
            pass

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `fn()` as a task of this host's group (from any thread; never blocks)."""
        self._post(None, fn)

    def _post(self, connect: bool | None, what: Any) -> None:
        with self._lock:
            self._commands.append((connect, what))
            if self._signalled:
                return
            self._signalled = True
            ready = self._ready
        self.call_soon(ready.set)

    # --- loop side --------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._ready.wait()
            with self._lock:
                self._ready = anyio.Event()
                self._signalled = False
                commands = list(self._commands)
                self._commands.clear()
            for connect, rt in commands:
                if connect is None:
                    assert self._tg is not None
                    self._tg.start_soon(rt)
                elif connect:
                    self._start(rt)
                elif (link := self._links.get(rt.fd)) is not None:
                    link.scope.cancel()

    def _start(self, rt: RtFd) -> None:
        assert self._tg is not None
        if rt.closed:
            return
        params = rt.params
        request = ConnectRequest(
            kind=SessionKind.TRANSCRIPTION,
            dialect=Dialect.BETA,
            model=params.model,
            backend=params.backend,
            client_key_id=self._client_key_id,
        )
        link = FdLink(self, rt)
        self._links[rt.fd] = link
        self._tg.start_soon(self._serve, link, request, name=f"rt fd {rt.fd}")

    async def _serve(self, link: FdLink, request: ConnectRequest) -> None:
        try:
            with link.scope:
                await self.manager.serve(link, request)
        except Exception:
            log.exception("WASM session crashed (fd %d)", link.rt.fd)
            self.table.session_closed(link.rt, 1011, "internal error")
        finally:
            self.table.session_closed(link.rt, 1000, "session ended")
            del self._links[link.rt.fd]

    def drain(self, link: FdLink) -> None:
        """SHUTDOWN_WRITE reached the session: finish its turns, then close (loop side)."""
        for runner in self.manager.sessions.values():
            if getattr(runner, "conn", None) is link:  # task runners keep their link
                runner.drain(Timeouts().drain_deadline_s)
                return
