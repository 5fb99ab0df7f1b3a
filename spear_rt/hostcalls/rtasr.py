"""Upstream SPEAR's ``rtasr_*`` (spear-guests.md §6): its names for our rt fds, its ctl codes.

``rtasr_create/write/read/close`` are ``rt_*`` on an fd marked as upstream's (writes queue
before CONNECT; a peer-closed session hangs up only once its events are read). ``rtasr_ctl``
dispatches upstream's own codes — its 7 and 8 are SET/GET_AUTOFLUSH, not our SHUTDOWN_WRITE
and GET_METRICS:

    rtasr cmd          ours
    1 SET_PARAM        1, keys translated (below)
    2 CONNECT          2
    3 GET_STATUS       its own field names and states
    4 SEND_EVENT       4
    5 FLUSH            5 COMMIT
    6 CLEAR            6
    7 SET_AUTOFLUSH    SET_PARAM turn_detection (server_vad / none); client_commit below
    8 GET_AUTOFLUSH    the settings back

SET_PARAM keys: ``backend``, ``model``, the queue bounds as ours; ``transport`` (``websocket``
-> routed as any session, ``stub`` -> the stub instance); ``ws_url`` / ``client_secret`` ->
``-EACCES`` (where a session goes and with what key is host configuration); upstream's stub
tuning and unknown keys -> 0, ignored. ``client_commit`` autoflush commits when the audio
since the last commit reaches ``max_buffer_bytes``, when ``flush_interval_ms`` has passed
since it (both checked at each write), or when no audio came for ``silence_ms`` (a deadline
epoll waits for: `silence_due`), at least ``min_flush_gap_ms`` apart and never without new
audio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from spear_rt.hostcalls.abi import (
    EACCES,
    EBADF,
    EFAULT,
    EINVAL,
    Cmd,
    GuestMemory,
    MemoryFault,
    deliver,
    read_input,
)
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.params import json_object, key_value
from spear_rt.hostcalls.rtfd import FdState, RtFd

SET_PARAM, CONNECT, GET_STATUS, SEND_EVENT, FLUSH, CLEAR, SET_AUTOFLUSH, GET_AUTOFLUSH = range(1, 9)
_SAME = {CONNECT: Cmd.CONNECT, SEND_EVENT: Cmd.SEND_EVENT, FLUSH: Cmd.COMMIT, CLEAR: Cmd.CLEAR}
_STATES = {
    FdState.CONNECTING: "Connecting",
    FdState.OPEN: "Connected",
    FdState.DRAINING: "Draining",
    FdState.CLOSED: "Closed",
    FdState.ERROR: "Error",
}
_OURS = frozenset({"backend", "model", "max_send_queue_bytes", "max_recv_queue_bytes"})
_REFUSED = frozenset({"ws_url", "client_secret"})
_COMMIT = b'{"type":"input_audio_buffer.commit"}'
STRATEGIES = ("manual", "off", "server_vad", "client_commit")
_VAD_FIELDS = (("threshold", "threshold"), ("prefix_padding_ms", "prefix_padding_ms"),
               ("silence_duration_ms", "silence_ms"))  # fmt: skip
_LEGACY_MODES = {"off": "off", "silence": "server_vad"}  # other legacy modes: client_commit


class Autoflush(msgspec.Struct):
    """SET_AUTOFLUSH, normalized; client_commit's bookkeeping beside it."""

    strategy: str = "manual"
    flush_on_close: bool = False
    vad: dict[str, Any] = msgspec.field(default_factory=dict)
    client_commit: dict[str, Any] = msgspec.field(default_factory=dict)
    since_commit: int = 0  # audio bytes written since the last commit
    last_commit: float = 0.0  # monotonic seconds
    last_write: float = 0.0

    def gap_s(self) -> float:
        """The least time between two commits."""
        return float(self.client_commit.get("min_flush_gap_ms", 500)) / 1000

    def silence_due(self) -> float | None:
        """When the silence rule commits, if it is armed (audio uncommitted)."""
        silence_ms = self.client_commit.get("silence_ms")
        if self.strategy != "client_commit" or silence_ms is None or not self.since_commit:
            return None
        return max(self.last_write + float(silence_ms) / 1000, self.last_commit + self.gap_s())


class RtasrCalls:
    """``rtasr_*`` over `table` (module docstring)."""

    def __init__(self, table: FdTable, clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.clock = clock

    def rtasr_create(self) -> int:
        """An rt fd in upstream's flavour."""
        fd = self.table.rt_create()
        if fd > 0:
            with self.table.lock:
                self.table.fds[fd].upstream_family = True
        return fd

    def rtasr_write(self, mem: GuestMemory, fd: int, buf_ptr: int, buf_len: int) -> int:
        """``rt_write``, then client_commit's flush rule."""
        result = self.table.rt_write(mem, fd, buf_ptr, buf_len)
        if result > 0:
            with self.table.lock:
                rt = self.table.fds.get(fd)
                flush = rt is not None and self._written(rt, result)
            if flush:
                self.table.control(fd, Cmd.COMMIT)
        return result

    def rtasr_ctl(self, mem: GuestMemory, fd: int, cmd: int, arg_ptr: int, arg_len_ptr: int) -> int:
        """Upstream's ctl codes (module docstring)."""
        with self.table.lock:
            rt = self.table.fds.get(fd)
            if rt is None or not rt.upstream_family:
                return -EBADF
            try:
                if cmd == GET_STATUS:
                    return deliver(mem, arg_ptr, arg_len_ptr, msgspec.json.encode(_status(rt)))
                if cmd == GET_AUTOFLUSH:
                    flush = rt.autoflush or Autoflush()
                    report = {"strategy": flush.strategy, "flush_on_close": flush.flush_on_close,
                              "vad": flush.vad, "client_commit": flush.client_commit}  # fmt: skip
                    return deliver(mem, arg_ptr, arg_len_ptr, msgspec.json.encode(report))
                raw = read_input(mem, arg_ptr, arg_len_ptr) if cmd in (1, 4, 7) else b""
            except MemoryFault:
                return -EFAULT
        if cmd in _SAME:
            return self.table.control(fd, _SAME[cmd], raw)
        if cmd == SET_PARAM:
            return self._set_param(fd, raw)
        if cmd == SET_AUTOFLUSH:
            return self._set_autoflush(fd, raw)
        return -EINVAL

    def _set_param(self, fd: int, raw: bytes) -> int:
        param = key_value(raw)
        if param is None:
            return -EINVAL
        key, value = param
        if key in _REFUSED:
            return -EACCES
        if key == "transport":
            if value == "stub":
                return self.table.control(fd, Cmd.SET_PARAM, _param("backend", "stub"))
            return 0  # websocket: a realtime session, routed as any other
        if key in _OURS:
            return self.table.control(fd, Cmd.SET_PARAM, raw)
        return 0  # upstream's stub tuning and keys it stores without reading

    def _set_autoflush(self, fd: int, raw: bytes) -> int:
        flush = parse_autoflush(raw)
        if flush is None:
            return -EINVAL
        turn: dict[str, Any] | None = None
        if flush.strategy == "server_vad":
            turn = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                    "silence_duration_ms": 500}  # fmt: skip
            for ours, theirs in _VAD_FIELDS:
                if theirs in flush.vad:
                    turn[ours] = flush.vad[theirs]
        result = self.table.control(fd, Cmd.SET_PARAM, _param("turn_detection", turn))
        if result == 0:
            with self.table.lock:
                rt = self.table.fds.get(fd)
                if rt is not None:
                    flush.last_commit = self.clock()
                    rt.autoflush = flush
                    rt.deadline = flush.silence_due
                    rt.on_deadline = partial(self._silence, rt, flush)
        return result

    def _silence(self, rt: RtFd, flush: Autoflush) -> None:
        """The silence deadline passed (lock held, from epoll): commit what is uncommitted."""
        due = flush.silence_due()
        if rt.state not in (FdState.INIT, FdState.CONNECTING, FdState.OPEN):
            flush.since_commit = 0  # disarmed: nothing more goes to this session
            return
        if due is None or self.clock() + 1e-6 < due:  # a clock may land a hair early
            return
        flush.since_commit, flush.last_commit = 0, self.clock()
        if rt.enqueue(_COMMIT, len(_COMMIT), control=True) == 0:
            rt.wake_reader()

    def _written(self, rt: RtFd, nbytes: int) -> bool:
        """client_commit: whether this write completes a chunk to commit (lock held)."""
        flush = rt.autoflush
        if not isinstance(flush, Autoflush) or flush.strategy != "client_commit":
            return False
        flush.since_commit += nbytes
        rule = flush.client_commit
        now = flush.last_write = self.clock()
        elapsed_ms = (now - flush.last_commit) * 1000
        if elapsed_ms < flush.gap_s() * 1000:
            return False
        by_bytes = flush.since_commit >= int(rule.get("max_buffer_bytes", 1 << 62))
        by_time = elapsed_ms >= float(rule.get("flush_interval_ms", float("inf")))
        if by_bytes or by_time:
            flush.since_commit, flush.last_commit = 0, now
            return True
        return False


def parse_autoflush(raw: bytes) -> Autoflush | None:
    """SET_AUTOFLUSH's JSON (the current form or upstream's legacy one), or None if invalid."""
    given = json_object(raw)
    if given is None:
        return None
    strategy = given.get("strategy")
    if strategy is None:  # legacy: {enabled, mode}
        mode = given.get("mode", "off") if given.get("enabled", True) else "off"
        strategy = _LEGACY_MODES.get(mode, "client_commit") if isinstance(mode, str) else None
    vad, commit = given.get("vad") or {}, given.get("client_commit") or {}
    if strategy not in STRATEGIES or not isinstance(vad, dict) or not isinstance(commit, dict):
        return None
    numbers = [*vad.values(), *commit.values()]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in numbers):
        return None
    return Autoflush(strategy, bool(given.get("flush_on_close", False)), vad, commit)


def _status(rt: RtFd) -> dict[str, Any]:
    """GET_STATUS in upstream's names."""
    state = _STATES.get(rt.state)
    if state is None:
        state = "Configured" if rt.params.model or rt.params.backend or rt.autoflush else "Init"
    return {
        "state": state,
        "last_error": rt.last_error,
        "send_queue_bytes": rt.send_bytes,
        "recv_queue_bytes": rt.recv_bytes,
        "max_send_queue_bytes": rt.params.max_send_queue_bytes,
        "max_recv_queue_bytes": rt.params.max_recv_queue_bytes,
        "dropped_events": rt.dropped,
    }


def _param(key: str, value: Any) -> bytes:
    return msgspec.json.encode({"key": key, "value": value})
