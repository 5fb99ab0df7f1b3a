"""Upstream SPEAR's imports beyond ``rt_*`` (spear-guests.md): log, time, cchat, stubs.

`link_upstream` defines, on a guest's linker, module ``"spear"``'s ``log``, ``time_now_ms``,
``wall_time_s``, ``random_i64``, ``sleep_ms``, the ``cchat_*`` family (`chatcalls`),
``rtasr_*`` (`rtasr`), ``mic_*`` (`mic`), ``user_stream_*`` (`userstream`), the one-shot
families ``emb_*``, ``asr_*``, ``tts_*``, ``img_*`` (`oneshotfd`), and,
for every other ``"spear"`` import the module lists that this host does not provide, a
stub of the declared type returning ``-ENOSYS``, so any upstream guest instantiates and
learns at its first call what is missing.

Tool callbacks (`ToolCallbacks`): inside ``cchat_send`` the host calls the guest's function
at ``fn_offset`` of its exported function table, re-entrantly on the same store, with the
arguments and output in the guest's tool arena (`arena_layout`, the spec's exact layout).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import wasmtime

from spear_rt.hostcalls.abi import (
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    ENOSPC,
    ENOSYS,
    GuestMemory,
    MemoryFault,
    read_u32,
    write_u32,
)
from spear_rt.hostcalls.cchat import ChatSession, Complete
from spear_rt.hostcalls.chatcalls import ChatCalls, StartStream
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.mic import MicCalls
from spear_rt.hostcalls.oneshotfd import OneShotCalls, Send
from spear_rt.hostcalls.oneshotfd import imports as oneshot_imports
from spear_rt.hostcalls.rtasr import RtasrCalls
from spear_rt.hostcalls.userstream import UserStreams, not_connected

log = logging.getLogger("spear_rt.guest")

MAX_LOG_BYTES = 16384  # one log call; longer -> -EINVAL
LOG_RING = 2048  # entries kept per run
LEVELS = {0: "trace", 1: "debug", 2: "info", 3: "warn", 4: "error"}
_PY_LEVEL = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
             "warn": logging.WARNING, "error": logging.ERROR}  # fmt: skip
_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()

LogSink = Callable[[str, str], None]  # (level name, text)


class GuestLog:
    """A run's ``log`` calls: the last `LOG_RING` kept, each passed to the sink and logger."""

    def __init__(self, sink: LogSink | None = None) -> None:
        self.sink = sink
        self.entries: deque[tuple[str, str]] = deque(maxlen=LOG_RING)
        self.dropped = 0

    def log(self, mem: GuestMemory, level: int, ptr: int, length: int) -> int:
        """0, -EINVAL (length outside 0..16384) or -EFAULT."""
        if not 0 <= length <= MAX_LOG_BYTES:
            return -EINVAL
        try:
            text = mem.read(ptr, length).decode("utf-8", "replace")
        except MemoryFault:
            return -EFAULT
        name = LEVELS.get(level, "info")
        if len(self.entries) == LOG_RING:
            self.dropped += 1
        self.entries.append((name, text))
        log.log(_PY_LEVEL[name], "guest: %s", text.rstrip("\n"))
        if self.sink is not None:
            self.sink(name, text)
        return 0

    def texts(self, level: str | None = None) -> list[str]:
        """The kept texts (of one level)."""
        return [text for name, text in self.entries if level is None or name == level]


def arena_layout(ptr: int, length: int, n: int, limit: int) -> tuple[int, int, int] | int:
    """(out_ptr, capacity, out_len_ptr) for `n` argument bytes in the arena, or -errno."""
    if ptr <= 0 or length <= 0:
        return -EFAULT
    out_ptr = ptr + _round8(n + 1)
    capacity = min(length - (out_ptr - ptr) - 8, limit)
    if capacity <= 0:
        return -ENOSPC
    out_len_ptr = out_ptr + _round8(capacity)
    if out_len_ptr + 4 > ptr + length:
        return -ENOSPC
    return out_ptr, capacity, out_len_ptr


def _round8(value: int) -> int:
    return (value + 7) & ~7


class ToolCallbacks:
    """Calls a guest's tool functions from inside ``cchat_send`` (same thread, same store)."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory  # a WasmMemory: rebound to the caller around each call
        self.caller: wasmtime.Caller | None = None  # set while cchat_send runs

    def __call__(self, fn_offset: int, args: bytes, session: ChatSession) -> tuple[int, bytes]:
        """(rc, output) of the guest's function at `fn_offset`."""
        caller = self.caller
        if caller is None:
            return -EIO, b""
        func = _table_func(caller, fn_offset)
        if func is None:
            return -EIO, b""
        arena_ptr, arena_len = session.arena
        capacity_limit = session.max_tool_output_bytes
        for attempt in range(2):
            layout = arena_layout(arena_ptr, arena_len, len(args), capacity_limit)
            if isinstance(layout, int):
                return layout, b""
            out_ptr, capacity, out_len_ptr = layout
            try:
                self.memory.bind(caller)
                self.memory.write(arena_ptr, args + b"\0")
                write_u32(self.memory, out_len_ptr, capacity)
                rc = func(caller, arena_ptr, len(args), out_ptr, out_len_ptr)
                self.memory.bind(caller)  # the callback may have grown memory
                written = read_u32(self.memory, out_len_ptr)
                if rc == 0:
                    if written > capacity:
                        return -EIO, b""
                    return 0, self.memory.read(out_ptr, written)
            except MemoryFault:
                return -EFAULT, b""
            if rc != -ENOSPC or attempt or written > session.max_tool_output_bytes:
                return int(rc) if isinstance(rc, int) else -EIO, b""
            capacity_limit = written  # retry once with the length the guest asked for
        return -ENOSPC, b""


def _table_func(caller: wasmtime.Caller, index: int) -> wasmtime.Func | None:
    """The funcref at `index` of the guest's exported table, if it has the tool type."""
    table = None
    for name in ("__indirect_function_table", "table"):
        found = caller.get(name)
        if isinstance(found, wasmtime.Table):
            table = found
            break
    if table is None or not 0 <= index < table.size(caller):
        return None
    func = table.get(caller, index)  # type: ignore[arg-type]  # a Caller is a store context
    if not isinstance(func, wasmtime.Func):
        return None
    kind = func.type(caller)
    params = [str(p) for p in kind.params]
    results = [str(r) for r in kind.results]
    if params != ["i32"] * 4 or results != ["i32"]:
        return None
    return func


class UpstreamImports:
    """What one guest's upstream-ABI imports share: its log, chat calls, tool callbacks."""

    def __init__(
        self,
        table: FdTable,
        memory: Any,
        complete: Complete,
        sink: LogSink | None,
        clock: Callable[[], float] = time.monotonic,
        recording: bytes | None = None,
        streams: UserStreams | None = None,
        send: Send | None = None,
        start_stream: StartStream | None = None,
    ) -> None:
        self.memory = memory
        self.oneshot = OneShotCalls(table, send) if send is not None else None
        self.streams = streams  # None: no outside clients (user_stream_* -> -ENOTCONN)
        self.log = GuestLog(sink)
        self.tools = ToolCallbacks(memory)
        self.chat = ChatCalls(table, complete, self.tools, start_stream)
        self.rtasr = RtasrCalls(table, clock)
        self.mic = MicCalls(table, clock, recording)
        self._table = table
        self._sleeping = threading.Condition()

    def sleep_ms(self, ms: int) -> int:
        """Block the guest up to `ms` (woken early when the host shuts down)."""
        deadline = time.monotonic() + max(ms, 0) / 1000
        with self._sleeping:
            while not self._table.down and (left := deadline - time.monotonic()) > 0:
                self._sleeping.wait(min(left, 0.05))
        return 0


Import = tuple[int, bool, Callable[..., int]]  # (arity, takes guest memory, function)


def upstream_imports(imports: UpstreamImports) -> dict[str, Import]:
    """Every i32 import of upstream's families this host provides, by name."""
    chat, rtasr, mic, table = imports.chat, imports.rtasr, imports.mic, imports.chat.table
    found: dict[str, Import] = {
        "log": (3, True, imports.log.log),
        "sleep_ms": (1, False, imports.sleep_ms),
        "cchat_create": (0, False, chat.cchat_create),
        "cchat_write_msg": (5, True, chat.cchat_write_msg),
        "cchat_write_fn": (4, True, chat.cchat_write_fn),
        "cchat_ctl": (4, True, chat.cchat_ctl),
        "cchat_recv": (3, True, chat.cchat_recv),
        "cchat_close": (1, False, chat.cchat_close),
        "rtasr_create": (0, False, rtasr.rtasr_create),
        "rtasr_ctl": (4, True, rtasr.rtasr_ctl),
        "rtasr_write": (3, True, rtasr.rtasr_write),
        "rtasr_read": (3, True, partial(table.rt_read, trace=False)),
        "rtasr_close": (1, False, lambda fd: _upstream_close(table, fd)),
        "mic_create": (0, False, mic.mic_create),
        "mic_ctl": (4, True, mic.mic_ctl),
        "mic_read": (3, True, mic.mic_read),
        "mic_close": (1, False, mic.mic_close),
    }
    streams = imports.streams
    for name, (arity, memory) in _STREAM_CALLS.items():
        fn: Callable[..., int] = getattr(streams, name) if streams is not None else not_connected
        found[name] = (arity, memory, fn)
    if imports.oneshot is not None:
        found.update(oneshot_imports(imports.oneshot))
    return found


def link_upstream(
    linker: wasmtime.Linker,
    module: wasmtime.Module,
    imports: UpstreamImports,
    with_memory: Callable[[str, Callable[..., int]], Callable[..., int]],
    defined: set[str],
) -> None:
    """Define upstream's ``"spear"`` imports, and -ENOSYS stubs for the rest (module doc)."""
    found = upstream_imports(imports)
    for name, (arity, memory, fn) in found.items():
        if memory:
            linker.define_func("spear", name, _ftype(arity), with_memory(name, fn), True)
        else:
            linker.define_func("spear", name, _ftype(arity), guarded(name, fn))
    send, tools = guarded("cchat_send", imports.chat.cchat_send), imports.tools

    def cchat_send(caller: wasmtime.Caller, fd: int, flags: int) -> int:
        outer, tools.caller = tools.caller, caller  # a tool may itself send (re-entrant)
        try:
            return send(fd, flags)
        finally:
            tools.caller = outer

    linker.define_func("spear", "cchat_send", _ftype(2), cchat_send, True)
    clock = wasmtime.FuncType([], [_I64])
    linker.define_func("spear", "time_now_ms", clock, lambda: time.time_ns() // 1_000_000)
    linker.define_func("spear", "wall_time_s", clock, lambda: time.time_ns() // 1_000_000_000)
    linker.define_func("spear", "random_i64", clock, lambda: secrets.randbits(63))
    provided = defined | set(found) | {"cchat_send", "time_now_ms", "wall_time_s", "random_i64"}
    for imp in module.imports:
        if imp.module == "spear" and imp.name not in provided:
            if isinstance(imp.type, wasmtime.FuncType):
                provided.add(imp.name or "")
                linker.define_func("spear", imp.name or "", imp.type, _enosys(imp.type))


_STREAM_CALLS = {  # name -> (arity, takes memory)
    "user_stream_ctl_open": (0, False),
    "user_stream_ctl_read": (3, True),
    "user_stream_open": (2, False),
    "user_stream_read": (3, True),
    "user_stream_write": (3, True),
    "user_stream_close": (1, False),
}


def _upstream_close(table: FdTable, fd: int) -> int:
    """``rtasr_close``: ``rt_close``, but closing a closed fd answers 0 as upstream's does."""
    result = table.rt_close(fd)
    if result == -EBADF:
        with table.lock:
            return table.closed_before(fd)
    return result


def _ftype(arity: int) -> wasmtime.FuncType:
    return wasmtime.FuncType([_I32] * arity, [_I32])


def guarded(name: str, fn: Callable[..., int]) -> Callable[..., int]:
    """`fn` as a host function: an unexpected host error is logged and answered -EIO."""

    def call(*args: int) -> int:
        try:
            return fn(*args)
        except Exception:
            log.exception("hostcall %s failed", name)
            return -EIO

    return call


def _enosys(kind: wasmtime.FuncType) -> Callable[..., Any]:
    """A stub of type `kind` that answers -ENOSYS (or nothing, for a function without result)."""
    results = list(kind.results)

    def stub(*_args: Any) -> Any:
        if not results:
            return None
        return -ENOSYS

    return stub
