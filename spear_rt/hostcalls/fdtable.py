"""The fd table: ``rt_*`` file descriptors over realtime sessions (pure Python, thread-safe).

Rules:

1. fds and epfds share one namespace of positive ints, never reused within a table, so a
   stale number can only ever give ``-EBADF``.
2. Guest-side calls (``rt_*``, from the guest's thread) never block: they hold the table lock
   for a few microseconds. Loop-side calls (`push_event`, `take_input`, `session_closed`,
   from the event loop) never block either. Whoever changes an fd's readiness wakes the
   epoll instances watching it; waking the session's reader goes through the waker the
   loop side left on the fd (``input_waker``), called outside the lock.
3. The send queue holds client events for the session (audio from `rt_write`, control events
   from ``rt_ctl``), bounded by ``max_send_queue_bytes`` of guest bytes: a write that does not
   fit is refused whole with ``-EAGAIN``; one larger than the bound is ``-EINVAL``.
4. The recv queue holds server events (one per `rt_read`), bounded by ``max_recv_queue_bytes``
   with the fd's drop policy: deltas are dropped and counted; completed, error and lifecycle
   events never are. If those alone pass 4x the bound the guest is not reading: the fd turns
   ERROR and its session ends, so nothing grows without bound.
5. A guest holds at most ``policy.max_fds`` descriptors (rt fds and epfds together):
   one more is ``-EMFILE`` until it closes some.
6. A read with an empty queue: ``-ENOTCONN`` before ``CONNECT``, ``0`` (end of file) once the
   session has ended, else ``-EAGAIN``.

Transitions:

    state       input                       next        effect
    INIT        CONNECT                     CONNECTING  the session starts (routed like any other)
    CONNECTING  *session.created            OPEN        -
    CONN/OPEN   SHUTDOWN_WRITE              DRAINING    writes -> -EPIPE; pending turns finish
    any live    session closed 1000/1001    CLOSED      EPOLLHUP
    any live    session closed otherwise    ERROR       EPOLLHUP | EPOLLERR, last_error kept
    any         rt_close                    (gone)      session cancelled, watchers get EPOLLHUP
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Protocol

import msgspec

from spear_rt.hostcalls.abi import (
    EAGAIN,
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    EMFILE,
    ENOSPC,
    ENOSYS,
    ENOTCONN,
    EPIPE,
    Cmd,
    GuestMemory,
    MemoryFault,
    deliver,
    out_capacity,
    read_input,
    write_u32,
)
from spear_rt.hostcalls.params import DEFAULT_POLICY, HostPolicy, apply_param, session_update
from spear_rt.hostcalls.rtfd import (
    ENDED,
    WRITABLE,
    EventHead,
    FdState,
    InputBatch,
    Pollable,
    RtFd,
    Watcher,
    event_head,
)

__all__ = ["FdState", "FdTable", "InputBatch", "RtFd", "SessionPort", "Watcher"]

MAX_PARAM_BYTES = 65536
_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":"'
_COMMIT = b'{"type":"input_audio_buffer.commit"}'
_CLEAR = b'{"type":"input_audio_buffer.clear"}'
_WAKING = (Cmd.SET_PARAM, Cmd.SEND_EVENT, Cmd.COMMIT, Cmd.CLEAR, Cmd.SHUTDOWN_WRITE)


class SessionPort(Protocol):
    """The loop side that runs the fds' sessions; both calls are thread-safe and non-blocking."""

    def connect(self, fd: RtFd) -> None:
        """Start the session of a fd that just got CONNECT."""
        ...

    def cancel(self, fd: RtFd) -> None:
        """Cancel the session of a closed fd."""
        ...


class FdTable:
    """One guest's fds (its own namespace), shared by its thread and the event loop."""

    def __init__(
        self, port: SessionPort | None = None, policy: HostPolicy = DEFAULT_POLICY
    ) -> None:
        self.lock = threading.Lock()
        self.blocked = threading.Condition(self.lock)  # notified when a waiter blocks (tests)
        self.fds: dict[int, RtFd] = {}
        self.others: dict[int, Pollable] = {}  # fds of the other families (cchat_*, ...)
        self.port = port
        self.policy = policy
        self.down = False
        self.watchers: set[Watcher] = set()  # every live epoll instance, woken at shutdown
        self.on_read: Callable[[int, bytes], None] | None = None  # a tracer (run-wasm prints)
        self.watch_count = 0  # epoll watches over all of this guest's epfds
        self._next = 1

    def full(self) -> bool:
        """Whether the guest holds `policy.max_fds` descriptors, rt fds and epfds (lock held)."""
        return len(self.fds) + len(self.others) + len(self.watchers) >= self.policy.max_fds

    def alloc(self) -> int:
        """A fresh descriptor number (call with the lock held)."""
        number, self._next = self._next, self._next + 1
        return number

    def pollable(self, fd: int) -> Pollable | None:
        """The fd of any family, for epoll (lock held)."""
        return self.fds.get(fd) or self.others.get(fd)

    def closed_before(self, fd: int) -> int:
        """What closing `fd` again answers in upstream's families: 0 for a number this table
        gave out and closed (numbers are never reused), -EBADF for any other (lock held)."""
        live = fd in self.fds or fd in self.others
        live = live or any(getattr(w, "epfd", None) == fd for w in self.watchers)
        return 0 if 0 < fd < self._next and not live else -EBADF

    def close_other(self, fd: int) -> bool:
        """Close an fd of another family: its watchers get EPOLLHUP (lock held)."""
        other = self.others.pop(fd, None)
        if other is None:
            return False
        for watcher in other.watchers:
            watcher.fd_closed(fd)
        other.watchers.clear()
        return True

    # --- guest side -------------------------------------------------------------------------

    def rt_create(self) -> int:
        """A new fd in state INIT."""
        with self.lock:
            if self.down:
                return -EIO
            if self.full():
                return -EMFILE
            fd = RtFd(self.alloc(), self.policy)
            self.fds[fd.fd] = fd
            return fd.fd

    def rt_ctl(self, mem: GuestMemory, fd: int, cmd: int, arg_ptr: int, arg_len_ptr: int) -> int:
        """0, or the bytes written for GET commands; -errno on failure."""
        if cmd in (Cmd.GET_STATUS, Cmd.GET_METRICS):
            with self.lock:
                rt = self.fds.get(fd)
                if rt is None:
                    return -EBADF
                report = rt.status() if cmd == Cmd.GET_STATUS else rt.metrics()
                try:
                    return deliver(mem, arg_ptr, arg_len_ptr, msgspec.json.encode(report))
                except MemoryFault:
                    return -EFAULT
        raw = b""
        if cmd in (Cmd.SET_PARAM, Cmd.SEND_EVENT):
            try:
                raw = read_input(mem, arg_ptr, arg_len_ptr)
            except MemoryFault:
                return -EBADF if fd not in self.fds else -EFAULT
        return self.control(fd, cmd, raw)

    def control(self, fd: int, cmd: int, raw: bytes = b"") -> int:
        """An ``rt_ctl`` command other than the GET ones, its argument already read."""
        waker: Callable[[], None] | None = None
        connect: RtFd | None = None
        with self.lock:
            rt = self.fds.get(fd)
            if rt is None:
                return -EBADF
            match cmd:
                case Cmd.SET_PARAM:
                    result = self._set_param(rt, raw)
                case Cmd.CONNECT:
                    result = self._connect(rt)
                    connect = rt if result == 0 else None
                case Cmd.SEND_EVENT:
                    result = self._send_event(rt, raw)
                case Cmd.COMMIT | Cmd.CLEAR:
                    event = _COMMIT if cmd == Cmd.COMMIT else _CLEAR
                    result = rt.enqueue(event, len(event), control=True)
                case Cmd.SHUTDOWN_WRITE:
                    result = self._shutdown_write(rt)
                case _:
                    return -EINVAL
            if result >= 0 and cmd in _WAKING:
                waker = rt.take_waker()
        if connect is not None and self.port is not None:
            self.port.connect(connect)
        if waker is not None:
            waker()
        return result

    def rt_write(self, mem: GuestMemory, fd: int, buf_ptr: int, buf_len: int) -> int:
        """`buf_len` (all or nothing) of audio in the fd's input format, or -errno."""
        with self.lock:
            rt = self.fds.get(fd)
            if rt is None:
                return -EBADF
            width = rt.params.input_format.bytes_per_sample
            if buf_len < 0 or buf_len % width or buf_len > rt.params.max_send_queue_bytes:
                return -EINVAL
            error = rt.write_error()
            if error:
                return error
            try:
                audio = mem.read(buf_ptr, buf_len)
            except MemoryFault:
                return -EFAULT
            if not buf_len:
                return 0
            event = _APPEND_HEAD + base64.b64encode(audio) + b'"}'
            result = rt.enqueue(event, buf_len, control=False)
            if result == 0:
                rt.counters["writes"] += 1
                rt.counters["bytes_written"] += buf_len
                result = buf_len
            waker = rt.take_waker()
        if waker is not None:
            waker()
        return result

    def rt_read(
        self, mem: GuestMemory, fd: int, out_ptr: int, out_len_ptr: int, *, trace: bool = True
    ) -> int:
        """The bytes of exactly one event (UTF-8 JSON); -EAGAIN when none; 0 at end of file."""
        with self.lock:
            rt = self.fds.get(fd)
            if rt is None:
                return -EBADF
            try:
                capacity = out_capacity(mem, out_ptr, out_len_ptr)
                if not rt.recv:
                    if rt.state is FdState.INIT:
                        return -ENOTCONN
                    return 0 if rt.state in ENDED else -EAGAIN
                data = rt.recv[0].data
                write_u32(mem, out_len_ptr, len(data))
                if len(data) > capacity:
                    return -ENOSPC
                mem.write(out_ptr, data)
            except MemoryFault:
                return -EFAULT
            rt.pop()
        if trace and self.on_read is not None:
            self.on_read(fd, data)
        return len(data)

    def rt_close(self, fd: int) -> int:
        """0; cancels the fd's session and wakes its watchers with EPOLLHUP."""
        with self.lock:
            rt = self.fds.pop(fd, None)
            if rt is None:
                return -EBADF
            connected = rt.state is not FdState.INIT
            rt.closed = True
            if rt.state not in ENDED:
                rt.state = FdState.CLOSED
            for watcher in rt.watchers:
                watcher.fd_closed(fd)
            rt.watchers.clear()
            rt.input_waker = None
        if connected and self.port is not None:
            self.port.cancel(rt)
        return 0

    # --- rt_ctl commands (lock held) --------------------------------------------------------

    def _set_param(self, rt: RtFd, raw: bytes) -> int:
        if len(raw) > MAX_PARAM_BYTES:
            return -EINVAL
        connected = rt.state is not FdState.INIT
        result, session_changed = apply_param(rt.params, raw, self.policy, connected=connected)
        if result == 0 and session_changed and connected:
            update = session_update(rt.params)
            if update is not None and rt.state in WRITABLE:
                rt.send.append((update, 0))  # host-made: not counted against the guest's bound
        rt.changed()  # queue bounds may have moved
        return result

    def _connect(self, rt: RtFd) -> int:
        if rt.state is not FdState.INIT:
            return -EINVAL
        if self.port is None:
            return -ENOSYS
        if self.down:
            return -EIO
        rt.state = FdState.CONNECTING
        update = session_update(rt.params)
        if update is not None:
            rt.send.append((update, 0))
        rt.changed()
        return 0

    def _send_event(self, rt: RtFd, raw: bytes) -> int:
        head = event_head(raw)
        if head is None or not head.type or len(raw) > rt.params.max_send_queue_bytes:
            return -EINVAL
        return rt.enqueue(raw, len(raw), control=True)

    def _shutdown_write(self, rt: RtFd) -> int:
        if rt.state is FdState.INIT:
            return -ENOTCONN
        if rt.state in ENDED:
            return -EPIPE
        rt.state = FdState.DRAINING
        rt.changed()
        return 0

    # --- loop side --------------------------------------------------------------------------

    def push_event(self, rt: RtFd, data: bytes) -> bool:
        """Queue one server event for `rt_read`; False when the session should end."""
        head = event_head(data) or EventHead()
        with self.lock:
            if rt.closed:
                return False  # closed by the guest, or it stopped reading
            return rt.push(data, head)

    def take_input(self, rt: RtFd, waker: Callable[[], None]) -> InputBatch:
        """Everything the guest queued for the session; with none, leave `waker` for the next."""
        with self.lock:
            if rt.closed or rt.state in ENDED:
                return InputBatch([], eof=True)
            if rt.send:
                return InputBatch(rt.take_send())
            rt.input_waker = waker
            return InputBatch([], draining=rt.state is FdState.DRAINING)

    def session_closed(self, rt: RtFd, code: int, reason: str) -> None:
        """The session ended: EPOLLHUP, plus EPOLLERR unless it closed normally."""
        with self.lock:
            rt.end(code, reason)

    def drain_upstream_sessions(self) -> None:
        """A host recording ended: rtasr sessions finish their turns, then close (lock held)."""
        for rt in self.fds.values():
            if rt.upstream_family and rt.state in WRITABLE:
                self._shutdown_write(rt)  # as the guest's SHUTDOWN_WRITE would
                rt.wake_reader()

    def upstream_sessions_settled(self) -> bool:
        """No rtasr session is still live or holds unread events (lock held)."""
        return all(
            rt.state in ENDED and not rt.recv for rt in self.fds.values() if rt.upstream_family
        )

    def shutdown(self) -> None:
        """Host shutdown: every live fd hangs up and every waiter wakes."""
        with self.lock:
            self.down = True
            for rt in self.fds.values():
                if rt.state not in ENDED:
                    rt.state = FdState.CLOSED
                    rt.last_error = rt.last_error or "host shut down"
            for watcher in self.watchers:
                watcher.wake()
