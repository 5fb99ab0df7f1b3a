"""The ``cchat_*`` hostcalls on one guest's fd table (spear-guests.md §5; rules in `cchat`).

Every call but `cchat_send` returns at once, holding the table lock briefly. `cchat_send`
runs the request (and the tool loop) without the lock: the completion goes through the
`Complete` the binding gives (spear_rt's one-shot path, in the event loop) and tool calls
through its `CallTool` (the guest's own function, in the guest's thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spear_rt.hostcalls.abi import (
    EAGAIN,
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    EMFILE,
    GuestMemory,
    MemoryFault,
    deliver,
    read_input,
)
from spear_rt.hostcalls.cchat import (
    FLAG_AUTO_TOOL_CALL,
    FLAG_METRICS,
    FLAG_STREAM,
    MAX_STREAM_UNREAD,
    CallTool,
    ChatResponse,
    ChatSession,
    ChatStream,
    Complete,
    run_send,
)
from spear_rt.hostcalls.fdtable import FdTable

SET_PARAM = 1
GET_METRICS = 2
MAX_PARAM_BYTES = 65536
_ANY_RESPONSE = ChatResponse | ChatStream

# (request body, session, the stream fd, the feed) -> None: starts the request, returns at once
StartStream = Callable[[dict[str, Any], ChatSession, ChatStream, "StreamFeed"], None]


class StreamFeed:
    """The event loop's side of a `ChatStream` (each call takes the table lock briefly)."""

    def __init__(self, table: FdTable) -> None:
        self.table = table

    def text(self, stream: ChatStream, text: str) -> bool:
        """Append answer text; False when the guest stopped reading (cancel the request)."""
        with self.table.lock:
            if stream.closed or len(stream.unread) > MAX_STREAM_UNREAD:
                return False
            stream.unread += text.encode()
            stream.changed()
            return True

    def end(self, stream: ChatStream, usage: dict[str, Any], error: bytes | None = None) -> None:
        """The answer is complete (or failed with the error JSON `error`)."""
        with self.table.lock:
            stream.usage, stream.done = usage, True
            if error is not None:
                stream.failed = True
                stream.unread += error
            stream.changed()


class ChatCalls:
    """``cchat_create`` .. ``cchat_close`` over `table`."""

    def __init__(
        self,
        table: FdTable,
        complete: Complete,
        call_tool: CallTool,
        start_stream: StartStream | None = None,
    ) -> None:
        self.table = table
        self.complete = complete
        self.call_tool = call_tool
        self.start_stream = start_stream
        self.feed = StreamFeed(table)

    def cchat_create(self) -> int:
        """A new chat session fd."""
        table = self.table
        with table.lock:
            if table.down:
                return -EIO
            if table.full():
                return -EMFILE
            session = ChatSession(table.alloc())
            table.others[session.fd] = session
            return session.fd

    def cchat_write_msg(
        self, mem: GuestMemory, fd: int, role_ptr: int, role_len: int, ptr: int, length: int
    ) -> int:
        """Append a ``{role, content}`` message; 0 or -errno."""
        try:
            role = _text(mem, role_ptr, role_len)
            content = _text(mem, ptr, length)
        except MemoryFault:
            return -EFAULT
        with self.table.lock:
            session = self._session(fd)
            return -EBADF if session is None else session.write_msg(role, content)

    def cchat_write_fn(
        self, mem: GuestMemory, fd: int, fn_offset: int, json_ptr: int, json_len: int
    ) -> int:
        """Register a tool whose callback is the guest's function at `fn_offset`."""
        try:
            raw = mem.read(json_ptr, json_len)
        except MemoryFault:
            return -EFAULT
        with self.table.lock:
            session = self._session(fd)
            return -EBADF if session is None else session.write_fn(fn_offset, raw)

    def cchat_ctl(self, mem: GuestMemory, fd: int, cmd: int, arg_ptr: int, arg_len_ptr: int) -> int:
        """SET_PARAM on a session (0 on a response: ignored) or GET_METRICS on a response."""
        with self.table.lock:
            target = self.table.others.get(fd)
            if not isinstance(target, ChatSession | _ANY_RESPONSE):
                return -EBADF
            try:
                if cmd == SET_PARAM:
                    raw = read_input(mem, arg_ptr, arg_len_ptr)
                    if isinstance(target, _ANY_RESPONSE):
                        return 0
                    return -EINVAL if len(raw) > MAX_PARAM_BYTES else target.set_param(raw)
                if cmd == GET_METRICS:
                    if isinstance(target, ChatSession):
                        return -EBADF
                    return deliver(mem, arg_ptr, arg_len_ptr, target.metrics())
            except MemoryFault:
                return -EFAULT
            return -EINVAL

    def cchat_send(self, fd: int, flags: int) -> int:
        """Run the request; a new response fd (readable at once), or -errno for a bad fd."""
        if flags & FLAG_STREAM:
            return self._send_streaming(fd, flags)
        with self.table.lock:
            session = self._session(fd)
            if session is None:
                return -EBADF
        outcome = run_send(session, flags, self.complete, self.call_tool)
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            usage = outcome.usage if flags & FLAG_METRICS else None
            response = ChatResponse(self.table.alloc(), outcome.body, usage)
            self.table.others[response.fd] = response
            return response.fd

    def _send_streaming(self, fd: int, flags: int) -> int:
        """FLAG_STREAM: a `ChatStream` fd at once; the request runs in the event loop."""
        with self.table.lock:
            session = self._session(fd)
            if session is None:
                return -EBADF
            if flags & FLAG_AUTO_TOOL_CALL or self.start_stream is None:
                return -EINVAL  # the tool loop answers whole; no loop to stream from
            if self.table.full():
                return -EMFILE
            stream = ChatStream(self.table.alloc())
            self.table.others[stream.fd] = stream
            body = {**session.request(), "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
        self.start_stream(body, session, stream, self.feed)
        return stream.fd

    def cchat_recv(self, mem: GuestMemory, fd: int, out_ptr: int, out_len_ptr: int) -> int:
        """The whole response body (not consumed); -ENOSPC with its length when too small.
        On a stream: the text since the last read (consumed), -EAGAIN, or 0 at the end."""
        with self.table.lock:
            response = self.table.others.get(fd)
            try:
                if isinstance(response, ChatStream):
                    if not response.unread:
                        return 0 if response.done else -EAGAIN
                    n = deliver(mem, out_ptr, out_len_ptr, bytes(response.unread))
                    if n > 0:
                        response.unread.clear()
                    return n
                if not isinstance(response, ChatResponse):
                    return -EBADF
                return deliver(mem, out_ptr, out_len_ptr, response.body)
            except MemoryFault:
                return -EFAULT

    def cchat_close(self, fd: int) -> int:
        """Close a session or response fd."""
        with self.table.lock:
            target = self.table.others.get(fd)
            if not isinstance(target, ChatSession | _ANY_RESPONSE):
                return self.table.closed_before(fd)
            target.closed = True
            cancel = target.cancel if isinstance(target, ChatStream) else None
            self.table.close_other(fd)
        if cancel is not None:
            cancel()
        return 0

    def _session(self, fd: int) -> ChatSession | None:
        session = self.table.others.get(fd)
        return session if isinstance(session, ChatSession) else None


def _text(mem: GuestMemory, ptr: int, length: int) -> str:
    """UTF-8 text from guest memory, decoded lossily (as upstream does)."""
    return mem.read(ptr, length).decode("utf-8", "replace")
