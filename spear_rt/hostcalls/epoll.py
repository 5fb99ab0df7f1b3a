"""``spear_epoll_*``: level-triggered waits on many rt fds from one guest thread.

Rules:

1. An epoll instance watches up to `MAX_WATCHES` fds, and one guest's epfds together up to
   ``policy.max_watches`` (past either: ``-ENOMEM``); an epfd counts against the guest's
   ``policy.max_fds`` like an rt fd (``-EMFILE``). Each watch has a mask of EPOLLIN/EPOLLOUT;
   EPOLLERR and EPOLLHUP are always reported. ``ADD`` of a watched fd merges the masks (an fd
   is watched once); ``MOD``/``DEL`` of an unwatched fd is ``-ENOENT``.
2. Readiness is level-triggered: a wait reports every watched fd whose current events meet
   its mask, one 8-byte record per fd (bits OR-ed), sorted by fd. When more fds are ready
   than the buffer holds, the choice rotates from wait to wait so none starves.
3. A wait blocks only the calling (guest) thread, on a condition of the table lock. It wakes
   when a watched fd's readiness changes, a watched fd is closed (reported once as
   EPOLLHUP, then the watch is gone), its epfd is closed (``-EBADF``), or the host shuts down
   (the hung-up fds are reported; with nothing to report, ``-EINTR``). Spurious wake-ups
   re-check and wait again: the guest never sees them.
4. Timeouts come from an injectable monotonic `Clock`: ``< 0`` forever, ``0`` poll, ``> 0``
   up to that many ms. `FakeClock` jumps straight to a deadline instead of sleeping.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Protocol

from spear_rt.hostcalls.abi import (
    EBADF,
    EFAULT,
    EINTR,
    EINVAL,
    EMFILE,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EPOLL_ALL,
    EPOLLERR,
    EPOLLHUP,
    MAX_WATCHES,
    RECORD_BYTES,
    EpollOp,
    GuestMemory,
    MemoryFault,
    out_capacity,
    write_u32,
)
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.rtfd import Pollable

_RECORD = struct.Struct("<ii")


class Clock(Protocol):
    """Monotonic time and a timed wait on a condition (the lock is held on entry and exit)."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait for a notification, at most `timeout` seconds (None: forever)."""
        ...


class MonotonicClock:
    """The real clock: `time.monotonic` and `Condition.wait`."""

    def now(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Block on `cond` for up to `timeout` seconds."""
        cond.wait(timeout)


class FakeClock:
    """A test clock: timed waits return at once with the time moved to their deadline."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        """The fake time."""
        return self.time

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Forever: really wait for a notification; timed: jump to the deadline."""
        if timeout is None:
            cond.wait()
        else:
            self.time += timeout


class Epoll:
    """One epoll instance: its watches and the condition its waiters block on."""

    def __init__(self, epfd: int, table: FdTable) -> None:
        self.epfd = epfd
        self.table = table  # its watch_count counts this instance's watches too
        self.cond = threading.Condition(table.lock)
        self.watches: dict[int, tuple[Pollable, int]] = {}
        self.closed_fds: set[int] = set()  # closed while watched: one EPOLLHUP each, then gone
        self.closed = False
        self.waiters = 0
        self._cursor = 0  # the last fd reported when not all ready fds fit

    def wake(self) -> None:
        """Readiness may have changed: let the waiters re-check."""
        self.cond.notify_all()

    def fd_closed(self, fd: int) -> None:
        """A watched fd was closed."""
        if self.watches.pop(fd, None) is not None:
            self.table.watch_count -= 1
            self.closed_fds.add(fd)
            self.cond.notify_all()

    def next_change(self) -> float | None:
        """The earliest time a watched fd's readiness changes by itself, if any."""
        changes = [c for p, _mask in self.watches.values() if (c := p.next_change()) is not None]
        return min(changes, default=None)

    def ready(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` (fd, events) records, sorted by fd, rotating when more are ready."""
        ready = [
            (fd, ev)
            for fd, (rt, mask) in self.watches.items()
            if (ev := rt.events() & (mask | EPOLLERR | EPOLLHUP))
        ]
        ready += [(fd, EPOLLHUP) for fd in self.closed_fds]
        ready.sort()
        if len(ready) > limit:
            after = [r for r in ready if r[0] > self._cursor]
            ready = (after + ready[: len(ready) - len(after)])[:limit]
            self._cursor = ready[-1][0]
            ready.sort()
        self.closed_fds.difference_update(fd for fd, _ in ready)
        return ready


class EpollSet:
    """The ``spear_epoll_*`` calls over one fd table."""

    def __init__(self, table: FdTable, clock: Clock | None = None) -> None:
        self.table = table
        self.clock: Clock = clock or MonotonicClock()
        self.epolls: dict[int, Epoll] = {}

    def spear_epoll_create(self) -> int:
        """A new epfd."""
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            ep = Epoll(self.table.alloc(), self.table)
            self.epolls[ep.epfd] = ep
            self.table.watchers.add(ep)
            return ep.epfd

    def spear_epoll_ctl(self, epfd: int, op: int, fd: int, events: int) -> int:
        """0, or -errno: ADD (merges into an existing watch), MOD, DEL."""
        with self.table.lock:
            ep = self.epolls.get(epfd)
            if ep is None:
                return -EBADF
            if op not in (EpollOp.ADD, EpollOp.MOD, EpollOp.DEL) or fd in self.epolls:
                return -EINVAL
            rt = self.table.pollable(fd)
            if rt is None:
                return -EBADF
            if events & ~EPOLL_ALL:
                return -EINVAL
            watch = ep.watches.get(fd)
            if op == EpollOp.ADD:
                if watch is None:
                    if len(ep.watches) >= MAX_WATCHES:
                        return -ENOMEM
                    if self.table.watch_count >= self.table.policy.max_watches:
                        return -ENOMEM
                    self.table.watch_count += 1
                ep.watches[fd] = (rt, events | (watch[1] if watch else 0))
                rt.watchers.add(ep)
            elif watch is None:
                return -ENOENT
            elif op == EpollOp.MOD:
                ep.watches[fd] = (rt, events)
            else:
                del ep.watches[fd]
                self.table.watch_count -= 1
                rt.watchers.discard(ep)
            ep.wake()
            return 0

    def spear_epoll_wait(
        self, mem: GuestMemory, epfd: int, out_ptr: int, out_len_ptr: int, timeout_ms: int
    ) -> int:
        """Records written (8 bytes each, sorted by fd), 0 on timeout, or -errno."""
        clock = self.clock
        with self.table.lock:
            ep = self.epolls.get(epfd)
            if ep is None:
                return -EBADF
            try:
                capacity = out_capacity(mem, out_ptr, out_len_ptr)
                if capacity < RECORD_BYTES:
                    write_u32(mem, out_len_ptr, RECORD_BYTES)
                    return -ENOSPC
            except MemoryFault:
                return -EFAULT
            deadline = clock.now() + timeout_ms / 1000 if timeout_ms > 0 else None
            while True:
                if ep.closed:
                    return -EBADF
                records = ep.ready(capacity // RECORD_BYTES)
                if records or timeout_ms == 0 or self.table.down:
                    break
                remaining = None
                if deadline is not None:
                    remaining = deadline - clock.now()
                    if remaining <= 0:
                        break
                change = ep.next_change()  # a watched source (a mic) becomes ready by itself
                if change is not None:
                    until = max(change - clock.now(), 0.0)
                    remaining = until if remaining is None else min(remaining, until)
                ep.waiters += 1
                self.table.blocked.notify_all()
                try:
                    clock.wait(ep.cond, remaining)
                finally:
                    ep.waiters -= 1
            if not records and self.table.down:
                return -EINTR
            mem.write(out_ptr, b"".join(_RECORD.pack(fd, ev) for fd, ev in records))
            write_u32(mem, out_len_ptr, len(records) * RECORD_BYTES)
            return len(records)

    def spear_epoll_close(self, epfd: int) -> int:
        """0; waiters on the epfd return -EBADF."""
        with self.table.lock:
            ep = self.epolls.pop(epfd, None)
            if ep is None:
                return -EBADF
            ep.closed = True
            self.table.watch_count -= len(ep.watches)
            for rt, _mask in ep.watches.values():
                rt.watchers.discard(ep)
            ep.watches.clear()
            self.table.watchers.discard(ep)
            ep.wake()
            return 0

    def wait_blocked(self, epfd: int, waiters: int = 1, timeout: float = 10.0) -> bool:
        """Block until `waiters` threads are waiting on `epfd` (tests; no sleeping)."""
        with self.table.lock:
            return self.table.blocked.wait_for(
                lambda: (ep := self.epolls.get(epfd)) is not None and ep.waiters >= waiters, timeout
            )
