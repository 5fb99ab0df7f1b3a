"""One rt fd: its parameters, send and recv queues, state and readiness (no locking here).

`RtFd` is plain state guarded by its table's lock (`spear_rt.hostcalls.fdtable`); every
method here is called with that lock held.

Queues, both bounded in bytes:

* send: client events for the session (audio from `rt_write`, control events from ``rt_ctl``),
  bounded by ``max_send_queue_bytes`` of guest bytes. Overflow: the write is refused whole
  (``-EAGAIN``). Host-made session updates are not counted against the guest.
* recv: server events, one per `rt_read`, bounded by ``max_recv_queue_bytes``. Overflow: the
  drop policy (`DropPolicy`) drops deltas and counts them; completed, error and lifecycle
  events are never dropped. If those alone pass `HARD_LIMIT_FACTOR` times the bound the guest
  is not reading at all: the fd turns ERROR and its session ends.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from spear_rt.hostcalls.abi import (
    EAGAIN,
    ECONNRESET,
    ENOTCONN,
    EPIPE,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
)
from spear_rt.hostcalls.params import DropPolicy, FdParams, HostPolicy

HARD_LIMIT_FACTOR = 4


class FdState(enum.StrEnum):
    """Lifecycle of an rt fd (transitions: `spear_rt.hostcalls.fdtable`)."""

    INIT = "init"
    CONNECTING = "connecting"
    OPEN = "open"
    DRAINING = "draining"
    CLOSED = "closed"
    ERROR = "error"


WRITABLE = (FdState.CONNECTING, FdState.OPEN)
ENDED = (FdState.CLOSED, FdState.ERROR)


class Watcher(Protocol):
    """An epoll instance, as the fds it watches see it."""

    def wake(self) -> None:
        """Readiness of a watched fd may have changed (called with the table lock held)."""
        ...

    def fd_closed(self, fd: int) -> None:
        """A watched fd was closed (called with the table lock held)."""
        ...


class Pollable(Protocol):
    """Any fd epoll can watch: its readiness and the instances watching it."""

    watchers: set[Watcher]

    def events(self) -> int:
        """Current readiness bits (level-triggered; called with the table lock held)."""
        ...

    def next_change(self) -> float | None:
        """When readiness may change by itself (clock seconds), if ever (lock held)."""
        ...


class PlainFd:
    """An fd of the other families: its number, its watchers, whether it is closed; its
    readiness changes only when its owner says so (`changed`), never by itself."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.watchers: set[Watcher] = set()
        self.closed = False

    def events(self) -> int:
        """Readiness bits (level-triggered); subclasses say which."""
        return 0

    def next_change(self) -> float | None:
        """Never by itself."""
        return None

    def changed(self) -> None:
        """Readiness may have changed: wake the watchers (lock held)."""
        for watcher in self.watchers:
            watcher.wake()


class EventHead(msgspec.Struct):
    """The part of an event JSON the fd looks at."""

    type: str = ""
    error: dict[str, Any] | None = None


_head_decoder = msgspec.json.Decoder(EventHead)


def event_head(data: bytes) -> EventHead | None:
    """The type (and error body) of an event, or None if it is not a JSON object."""
    try:
        return _head_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


class _Event:
    __slots__ = ("data", "droppable")

    def __init__(self, data: bytes, droppable: bool) -> None:
        self.data = data
        self.droppable = droppable


class InputBatch(msgspec.Struct, frozen=True):
    """What the session's reader takes from an fd: messages, end of input, or a drain request."""

    messages: list[bytes]
    eof: bool = False
    draining: bool = False


class RtFd:
    """One rt fd (guarded by the table lock)."""

    def __init__(self, fd: int, policy: HostPolicy) -> None:
        self.fd = fd
        self.state = FdState.INIT
        self.params = FdParams(policy)
        self.send: deque[tuple[bytes, int]] = deque()  # (client event JSON, guest bytes)
        self.send_bytes = 0
        self.recv: deque[_Event] = deque()
        self.recv_bytes = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.closed = False  # rt_close was called, or the recv queue overflowed
        self.watchers: set[Watcher] = set()
        self.input_waker: Callable[[], None] | None = None  # left by the session's reader
        # upstream's rtasr_* fds: writes queue before CONNECT, and a peer-closed session
        # hangs up only once its events are read (its guests exit on the first EPOLLHUP)
        self.upstream_family = False
        self.autoflush: Any = None  # rtasr SET_AUTOFLUSH, as the guest gave it
        # a time-driven rule (rtasr's silence autoflush): when it is due, and what it does
        self.deadline: Callable[[], float | None] | None = None
        self.on_deadline: Callable[[], None] | None = None
        self.counters = dict.fromkeys(
            (
                "writes",
                "bytes_written",
                "events_sent",
                "eagain",
                "events_received",
                "events_read",
                "bytes_read",
            ),
            0,
        )

    def events(self) -> int:
        """Current readiness bits (level-triggered), after a due deadline rule ran."""
        if self.on_deadline is not None:
            self.on_deadline()
        ready = EPOLLIN if self.recv else 0
        if self.state in WRITABLE and self.send_bytes <= self.params.max_send_queue_bytes // 2:
            ready |= EPOLLOUT  # at least half the queue free: a frame-sized write will fit
        if self.state is FdState.ERROR:
            ready |= EPOLLERR
        if self.state in ENDED and not (self.upstream_family and self.recv):
            ready |= EPOLLHUP
        return ready

    def next_change(self) -> float | None:
        """A deadline rule's time, if one is armed; else never by itself."""
        return self.deadline() if self.deadline is not None else None

    def status(self) -> dict[str, Any]:
        """The GET_STATUS object."""
        return {
            "state": str(self.state),
            "connected": self.state in (FdState.OPEN, FdState.DRAINING),
            "send_queue_bytes": self.send_bytes,
            "recv_queue_bytes": self.recv_bytes,
            "dropped_events": self.dropped,
            "last_error": self.last_error,
        }

    def metrics(self) -> dict[str, Any]:
        """The GET_METRICS object: counters and queue sizes."""
        return {
            **self.counters,
            "send_queue_bytes": self.send_bytes,
            "recv_queue_bytes": self.recv_bytes,
            "recv_queue_events": len(self.recv),
            "dropped_events": self.dropped,
        }

    def changed(self) -> None:
        """Wake every epoll instance watching this fd."""
        for watcher in self.watchers:
            watcher.wake()

    def wake_reader(self) -> None:
        """Wake the session's reader now, with the lock held: its waker only schedules a
        callback in the event loop, so calling it here never blocks."""
        waker = self.take_waker()
        if waker is not None:
            waker()

    def take_waker(self) -> Callable[[], None] | None:
        """The session reader's waker, if it is waiting (call it outside the lock)."""
        waker, self.input_waker = self.input_waker, None
        return waker

    # --- send queue ---------------------------------------------------------------------------

    def write_error(self) -> int:
        """0 if the fd takes input now, else -ENOTCONN / -EPIPE / -ECONNRESET."""
        match self.state:
            case FdState.INIT:
                return 0 if self.upstream_family else -ENOTCONN
            case FdState.DRAINING | FdState.CLOSED:
                return -EPIPE
            case FdState.ERROR:
                return -ECONNRESET
        return 0

    def enqueue(self, event: bytes, cost: int, *, control: bool) -> int:
        """Queue one client event costing `cost` guest bytes: 0, or -errno (all or nothing)."""
        error = self.write_error()
        if error:
            return error
        if self.send_bytes + cost > self.params.max_send_queue_bytes:
            self.counters["eagain"] += 1
            return -EAGAIN
        self.send.append((event, cost))
        self.send_bytes += cost
        if control:
            self.counters["events_sent"] += 1
        self.changed()
        return 0

    def take_send(self) -> list[bytes]:
        """Everything queued for the session, oldest first."""
        messages = [event for event, _ in self.send]
        self.send.clear()
        self.send_bytes = 0
        self.changed()
        return messages

    # --- recv queue ---------------------------------------------------------------------------

    def push(self, data: bytes, head: EventHead) -> bool:
        """Queue one server event; False when the guest is not reading at all (fd -> ERROR)."""
        if self.state is FdState.CONNECTING and head.type.endswith("session.created"):
            self.state = FdState.OPEN
        if head.type == "error" and head.error is not None:
            self.last_error = str(head.error.get("message", "error"))
        self.counters["events_received"] += 1
        droppable = head.type.endswith(".delta")
        limit = self.params.max_recv_queue_bytes
        if droppable and self.params.drop_policy is DropPolicy.DROP_NEWEST_DELTA:
            if self.recv_bytes + len(data) > limit:
                self.dropped += 1
                return True
        self.recv.append(_Event(data, droppable))
        self.recv_bytes += len(data)
        if self.recv_bytes > limit:
            self._drop_oldest_deltas(limit)
        self.changed()
        if self.recv_bytes > limit * HARD_LIMIT_FACTOR:
            self.closed = True
            self.state = FdState.ERROR
            self.last_error = "the guest is not reading events: recv queue overflow"
            return False
        return True

    def _drop_oldest_deltas(self, limit: int) -> None:
        kept: deque[_Event] = deque()
        for event in self.recv:  # oldest first
            if self.recv_bytes > limit and event.droppable:
                self.recv_bytes -= len(event.data)
                self.dropped += 1
            else:
                kept.append(event)
        self.recv = kept

    def pop(self) -> bytes:
        """Remove the oldest event (after it was copied out)."""
        data = self.recv.popleft().data
        self.recv_bytes -= len(data)
        self.counters["events_read"] += 1
        self.counters["bytes_read"] += len(data)
        self.changed()
        return data

    def end(self, code: int, reason: str) -> None:
        """The session ended: CLOSED after 1000/1001, else ERROR with the reason kept."""
        if self.state in ENDED:
            return
        if code in (1000, 1001):
            self.state = FdState.CLOSED
        else:
            self.state = FdState.ERROR
            self.last_error = f"session closed ({code}): {reason}"
        self.changed()
