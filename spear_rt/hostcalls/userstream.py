"""Upstream SPEAR's user streams (spear-guests.md §8): an outside client talks to a guest.

One `UserStreams` per guest run (its *execution*), on the guest's fd table and lock. The
client side is one WebSocket (`spear_rt.server.streams_ws`) whose binary messages are SSF
frames routed by ``stream_id``; the guest side is fds: a ctl fd per ``user_stream_ctl_open``
(records ``(stream_id u32, kind u32)``: 1 STREAM_CONNECTED on every inbound frame, as
upstream; 2 SESSION_CLOSED when the socket closes) and stream fds per ``user_stream_open``.

Rules:

1. A channel per stream_id: inbound and outbound queues of `QUEUE_BYTES` each, frames of at
   most `MAX_FRAME_BYTES`. An inbound overflow or an oversize frame turns the channel to
   error (EPOLLERR on its fds). Connected from the client's first frame on it.
2. A malformed frame, or any frame before the guest opened a ctl or stream fd, ends the
   socket (`ClientFrameRefused`). Text messages are ignored.
3. ``user_stream_read`` pops one whole frame (header included) before its size check, as
   upstream (``-ENOSPC`` loses it); ``user_stream_write`` takes one valid frame of the fd's
   stream_id and returns 0: ``-ENOTCONN`` before the client connected it, ``-EPIPE`` once
   closed or in error, ``-EAGAIN`` when the outbound queue is full, ``-EINVAL`` for a bad
   frame, a wrong stream_id, an oversize frame or an IN-only fd.
4. Readiness: IN inbound non-empty (readable fd); OUT connected, writable fd, outbound room;
   ERR channel error; HUP fd or channel closed. Ctl fds: IN records pending (at most
   `MAX_RECORDS`, the oldest dropped), HUP closed.
5. The socket closing closes every channel and queues SESSION_CLOSED; a later socket starts
   afresh. The loop side's writer takes outbound frames with `take_outbound` (leaving a waker
   when there are none).
"""

from __future__ import annotations

import secrets
import struct
from collections import deque
from collections.abc import Callable

from spear_rt.hostcalls.abi import (
    EAGAIN,
    EBADF,
    EFAULT,
    EINVAL,
    EMFILE,
    ENOSPC,
    ENOTCONN,
    EPIPE,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    GuestMemory,
    MemoryFault,
    out_capacity,
    write_u32,
)
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.rtfd import PlainFd
from spear_rt.hostcalls.ssf import SsfError, parse

QUEUE_BYTES = 2 << 20
MAX_FRAME_BYTES = 256 << 10
MAX_RECORDS = 1024
STREAM_CONNECTED, SESSION_CLOSED = 1, 2
IN, OUT, BIDI = 1, 2, 3
_RECORD = struct.Struct("<II")


class ClientFrameRefused(Exception):
    """The client sent what ends its socket (rule 2); the message says why."""


class _Channel:
    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.inbound: deque[bytes] = deque()
        self.inbound_bytes = 0
        self.outbound_bytes = 0  # this channel's share of the execution's outbound queue
        self.connected = False
        self.closed = False
        self.error = False
        self.fds: set[StreamFd] = set()

    def changed(self) -> None:
        for fd in self.fds:
            fd.changed()


class StreamFd(PlainFd):
    """A ``user_stream_open`` fd."""

    def __init__(self, fd: int, channel: _Channel, direction: int) -> None:
        super().__init__(fd)
        self.channel = channel
        self.direction = direction

    def events(self) -> int:
        """Rule 4."""
        channel, ready = self.channel, 0
        if self.direction & IN and channel.inbound:
            ready |= EPOLLIN
        live = channel.connected and not (channel.closed or channel.error)
        if self.direction & OUT and live and channel.outbound_bytes < QUEUE_BYTES:
            ready |= EPOLLOUT
        if channel.error:
            ready |= EPOLLERR
        if self.closed or channel.closed:
            ready |= EPOLLHUP
        return ready


class CtlFd(PlainFd):
    """A ``user_stream_ctl_open`` fd."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.records: deque[bytes] = deque(maxlen=MAX_RECORDS)

    def events(self) -> int:
        """Rule 4."""
        return (EPOLLIN if self.records else 0) | (EPOLLHUP if self.closed else 0)


class UserStreams:
    """One execution's user streams (module docstring); every call takes the table lock."""

    def __init__(self, table: FdTable, execution_id: str | None = None) -> None:
        self.table = table
        self.execution_id = execution_id or "exec_" + secrets.token_hex(16)
        self._channels: dict[int, _Channel] = {}
        self._ctls: list[CtlFd] = []
        self._ready = False  # the guest opened a ctl or stream fd (rule 2)
        self._outbound: deque[tuple[_Channel, bytes]] = deque()
        self._writer_waker: Callable[[], None] | None = None
        self.socket_open = False
        self.ended = False  # the guest's run is over: the socket closes

    # --- guest side ---------------------------------------------------------------------------

    def user_stream_ctl_open(self) -> int:
        """A ctl fd."""
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            ctl = CtlFd(self.table.alloc())
            self.table.others[ctl.fd] = ctl
            self._ctls.append(ctl)
            self._ready = True
            return ctl.fd

    def user_stream_ctl_read(self, mem: GuestMemory, fd: int, out_ptr: int, out_len: int) -> int:
        """One 8-byte record, or -EAGAIN."""
        with self.table.lock:
            ctl = self.table.others.get(fd)
            if not isinstance(ctl, CtlFd):
                return -EBADF
            try:
                capacity = out_capacity(mem, out_ptr, out_len)
                if not ctl.records:
                    return -EAGAIN
                record = ctl.records.popleft()
                write_u32(mem, out_len, len(record))
                if capacity < len(record):
                    return -ENOSPC
                mem.write(out_ptr, record)
            except MemoryFault:
                return -EFAULT
            return len(record)

    def user_stream_open(self, stream_id: int, direction: int) -> int:
        """A stream fd on channel `stream_id` (created if needed)."""
        if stream_id < 0 or direction not in (IN, OUT, BIDI):
            return -EINVAL
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            channel = self._channel(stream_id)
            stream = StreamFd(self.table.alloc(), channel, direction)
            channel.fds.add(stream)
            self.table.others[stream.fd] = stream
            self._ready = True
            return stream.fd

    def user_stream_read(self, mem: GuestMemory, fd: int, out_ptr: int, out_len: int) -> int:
        """One whole inbound frame (rule 3)."""
        with self.table.lock:
            stream = self._stream(fd)
            if stream is None:
                return -EBADF
            if not stream.direction & IN:
                return -EINVAL
            channel = stream.channel
            try:
                capacity = out_capacity(mem, out_ptr, out_len)
                if not channel.inbound:
                    return -EAGAIN
                frame = channel.inbound.popleft()  # upstream pops before the size check
                channel.inbound_bytes -= len(frame)
                channel.changed()
                write_u32(mem, out_len, len(frame))
                if capacity < len(frame):
                    return -ENOSPC
                mem.write(out_ptr, frame)
            except MemoryFault:
                return -EFAULT
            return len(frame)

    def user_stream_write(self, mem: GuestMemory, fd: int, ptr: int, length: int) -> int:
        """Queue one frame for the client: 0 or -errno (rule 3)."""
        if not 0 <= length <= MAX_FRAME_BYTES:
            return -EINVAL
        try:
            frame = mem.read(ptr, length)
        except MemoryFault:
            return -EFAULT
        with self.table.lock:
            stream = self._stream(fd)
            if stream is None:
                return -EBADF
            channel = stream.channel
            try:
                head = parse(frame)
            except SsfError:
                return -EINVAL
            if not stream.direction & OUT or head.stream_id != channel.stream_id:
                return -EINVAL
            if channel.closed or channel.error or stream.closed:
                return -EPIPE
            if not channel.connected or not self.socket_open:
                return -ENOTCONN
            if channel.outbound_bytes + len(frame) > QUEUE_BYTES:
                return -EAGAIN
            channel.outbound_bytes += len(frame)
            self._outbound.append((channel, frame))
            channel.changed()
            waker, self._writer_waker = self._writer_waker, None
        if waker is not None:
            waker()
        return 0

    def user_stream_close(self, fd: int) -> int:
        """Close a stream or ctl fd."""
        with self.table.lock:
            target = self.table.others.get(fd)
            if isinstance(target, StreamFd):
                target.channel.fds.discard(target)
            elif isinstance(target, CtlFd):
                self._ctls.remove(target)
            else:
                return self.table.closed_before(fd)
            target.closed = True
            self.table.close_other(fd)
            return 0

    # --- loop side ----------------------------------------------------------------------------

    def socket_opened(self) -> bool:
        """A client socket arrived; False when one is already connected (one per execution)."""
        with self.table.lock:
            if self.socket_open or self.ended:
                return False
            self.socket_open = True
            self._channels = {sid: ch for sid, ch in self._channels.items() if ch.fds}
            for channel in self._channels.values():
                channel.closed = channel.error = channel.connected = False
                channel.inbound.clear()
                channel.inbound_bytes = 0
                channel.changed()
            return True

    def client_frame(self, frame: bytes) -> None:
        """One binary message from the client (rules 1, 2); raises ClientFrameRefused."""
        try:
            head = parse(frame)
        except SsfError as exc:
            raise ClientFrameRefused(str(exc)) from None
        with self.table.lock:
            if not self._ready:
                raise ClientFrameRefused("the guest has not opened its user streams yet")
            channel = self._channel(head.stream_id)
            channel.connected = True
            if len(frame) > MAX_FRAME_BYTES or channel.inbound_bytes + len(frame) > QUEUE_BYTES:
                channel.error = True
            elif not channel.error:
                channel.inbound.append(frame)
                channel.inbound_bytes += len(frame)
            channel.changed()
            self._record(head.stream_id, STREAM_CONNECTED)

    def take_outbound(self, waker: Callable[[], None]) -> list[bytes] | None:
        """Frames for the client, oldest first; with none, `waker` is left for the next write.
        None once the table is down (the writer stops)."""
        with self.table.lock:
            if self.ended:
                return None
            if not self._outbound:
                self._writer_waker = waker
                return []
            frames = []
            while self._outbound:
                channel, frame = self._outbound.popleft()
                channel.outbound_bytes -= len(frame)
                channel.changed()
                frames.append(frame)
            return frames

    def end(self) -> None:
        """The guest's run is over: the client's socket closes (its writer wakes)."""
        with self.table.lock:
            self.ended = True
            waker, self._writer_waker = self._writer_waker, None
        if waker is not None:
            waker()

    def socket_closed(self) -> None:
        """The client's socket is gone (rule 5)."""
        with self.table.lock:
            if not self.socket_open:
                return
            self.socket_open = False
            for channel in self._channels.values():
                channel.closed = True
                channel.changed()
            self._outbound.clear()
            for channel in self._channels.values():
                channel.outbound_bytes = 0
            self._record(0, SESSION_CLOSED)

    def _record(self, stream_id: int, kind: int) -> None:
        record = _RECORD.pack(stream_id, kind)
        for ctl in self._ctls:
            ctl.records.append(record)  # a full deque drops its oldest
            ctl.changed()

    def _channel(self, stream_id: int) -> _Channel:
        channel = self._channels.get(stream_id)
        if channel is None:
            channel = self._channels[stream_id] = _Channel(stream_id)
        return channel

    def _stream(self, fd: int) -> StreamFd | None:
        stream = self.table.others.get(fd)
        return stream if isinstance(stream, StreamFd) else None


class Executions:
    """The running guests whose user streams this server serves, by execution id."""

    def __init__(self) -> None:
        self._running: dict[str, UserStreams] = {}

    def add(self, streams: UserStreams) -> None:
        """Serve `streams` at its execution's path."""
        self._running[streams.execution_id] = streams

    def remove(self, streams: UserStreams) -> None:
        """The guest ended."""
        self._running.pop(streams.execution_id, None)

    def get(self, execution_id: str) -> UserStreams | None:
        """The running execution, if any."""
        return self._running.get(execution_id)


def not_connected(*_args: int) -> int:
    """``user_stream_*`` of a guest run without an execution (no outside clients)."""
    return -ENOTCONN
