"""Upstream SPEAR's ``mic_*`` (spear-guests.md §7): a host-side audio source as an fd.

A guest cannot name a file, so the host decides what ``source: "device"`` is: the recording
given to the run (``run-wasm --audio FILE``), played at real-time pace; without one there is
no device, and the fd falls back on the stub (silence, or the guest's looped
``stub_pcm16_base64``) unless ``fallback.to_stub`` is false (then ``-EIO``, ``last_error``
and EPOLLERR).

Rules:

1. Frames are produced in real time, one per ``frame_ms``, from the clock shared with epoll
   (so a `FakeClock` drives tests): a frame is rate * frame_ms / 1000 * channels * 2 bytes
   of little-endian pcm16, the recording resampled to the asked rate and copied to every
   channel. A full queue (``max_queue_bytes``) drops its oldest frame, counted.
2. ``mic_read`` pops one frame (before the size check, as upstream: ``-ENOSPC`` loses it);
   an empty queue is ``-EAGAIN``, or 0 once the recording is over. Readiness: IN queue
   non-empty, ERR ``last_error`` set, HUP closed or ended (rule 4). `next_change` tells
   epoll when the next frame is due, so a waiting guest wakes.
3. Each SET_PARAM restarts the source and clears the queue (``generation`` counts them).
4. When the recording is over, the fd stops producing and `on_end` runs once, with the table
   lock held (the table drains its rtasr sessions: their last turns finish, then they close);
   the mic hangs up (end of stream) once `settled` says no rtasr session is live or holds
   unread events, so a guest like upstream's mic_rtasr, which exits at the first hang-up,
   has read the last transcript by then.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from spear_rt.hostcalls.abi import (
    EAGAIN,
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    EMFILE,
    ENOSPC,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    GuestMemory,
    MemoryFault,
    deliver,
    out_capacity,
    read_input,
    write_u32,
)
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.params import json_object
from spear_rt.hostcalls.rtfd import PlainFd

RATE_HZ = 24000  # the recording's rate (run-wasm --audio gives pcm16 24 kHz mono)
MAX_STUB_BYTES = 10 << 20
MAX_QUEUE_BYTES = 16 << 20
SET_PARAM, GET_STATUS = 1, 2


class MicConfig(msgspec.Struct, frozen=True):
    """A validated SET_PARAM."""

    sample_rate_hz: int = 24000
    channels: int = 1
    format: str = "pcm16"
    frame_ms: int = 20
    source: str = "device"
    max_queue_bytes: int = 524288
    to_stub: bool = True
    stub_pcm: bytes = b""

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame."""
        return self.sample_rate_hz * self.frame_ms // 1000 * self.channels * 2


class MicFd(PlainFd):
    """One ``mic_create`` fd (guarded by the table lock)."""

    def __init__(
        self,
        fd: int,
        clock: Callable[[], float],
        on_end: Callable[[], None],
        settled: Callable[[], bool],
    ) -> None:
        super().__init__(fd)
        self.on_end = on_end
        self.settled = settled
        self.clock = clock
        self.config: MicConfig | None = None
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.dropped = 0
        self.generation = 0
        self.last_error: str | None = None
        self.running = False
        self._pcm = b""  # what the source plays, at the configured rate and channels
        self._loop = False  # the stub loops; a recording ends
        self._pos = 0
        self._started = 0.0
        self._produced = 0
        self.ended = False  # the recording is over (rule 4)

    def start(self, config: MicConfig, recording: bytes | None) -> int:
        """Restart the source with `config` (rule 3): 0, or -EIO when no source opens."""
        self.config, self.generation = config, self.generation + 1
        self.queue.clear()
        self.queue_bytes, self._pos, self._produced = 0, 0, 0
        self.ended, self.last_error = False, None
        self._started = self.clock()
        if config.source == "device" and recording is not None:
            self._pcm, self._loop = _convert(recording, config), False
        elif config.source == "device" and not config.to_stub:
            self.running = False
            self.last_error = "no audio device: the host was given no recording (--audio)"
            self.changed()
            return -EIO
        else:
            self._pcm, self._loop = _convert(config.stub_pcm, config), True
        self.running = True
        self.changed()
        return 0

    def events(self) -> int:
        """Readiness (rule 2), after producing the frames due."""
        self.pump()
        ready = EPOLLIN if self.queue else 0
        if self.last_error is not None:
            ready |= EPOLLERR
        if self.closed or (self.ended and not self.queue and self.settled()):
            ready |= EPOLLHUP
        return ready

    def next_change(self) -> float | None:
        """When the next frame is due (None: no more frames)."""
        if not self.running or self.config is None:
            return None
        return self._started + (self._produced + 1) * self.config.frame_ms / 1000

    def pump(self) -> None:
        """Produce the frames due by now (rules 1 and 4)."""
        config = self.config
        if not self.running or config is None:
            return
        due = math.floor((self.clock() - self._started) * 1000 / config.frame_ms)
        size = config.frame_bytes
        while self._produced < due:
            if not self._loop and self._pos >= len(self._pcm):
                self.running, self.ended = False, True
                self.on_end()
                return
            frame = self._frame(size)
            self._produced += 1
            self.queue.append(frame)
            self.queue_bytes += len(frame)
            while self.queue_bytes > config.max_queue_bytes:
                self.queue_bytes -= len(self.queue.popleft())
                self.dropped += 1

    def _frame(self, size: int) -> bytes:
        if not self._pcm:
            return bytes(size)  # the stub without audio: silence
        frame = self._pcm[self._pos : self._pos + size]
        self._pos += len(frame)
        if self._loop:
            while len(frame) < size:
                self._pos = size - len(frame)
                frame += self._pcm[: self._pos]
        return frame.ljust(size, b"\0")

    def status(self) -> dict[str, Any]:
        """GET_STATUS."""
        config = self.config
        shape = None if config is None else {
            "sample_rate_hz": config.sample_rate_hz, "channels": config.channels,
            "frame_ms": config.frame_ms, "format": config.format}  # fmt: skip
        return {"running": self.running, "last_error": self.last_error,
                "queue_bytes": self.queue_bytes,
                "max_queue_bytes": config.max_queue_bytes if config else 524288,
                "dropped_frames": self.dropped, "generation": self.generation,
                "config": shape}  # fmt: skip


def _convert(pcm: bytes, config: MicConfig) -> bytes:
    """Mono pcm16 at `RATE_HZ` as the configured rate and channels."""
    if not pcm:
        return b""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2")
    if config.sample_rate_hz != RATE_HZ and config is not None:
        from spear_rt.audio import resample

        samples = resample(samples.astype(np.int16), RATE_HZ, config.sample_rate_hz)
    if config.channels > 1:
        samples = np.repeat(samples, config.channels)
    return samples.astype("<i2").tobytes()


def parse_config(raw: bytes) -> MicConfig | None:
    """SET_PARAM's plain JSON object, validated (None: -EINVAL)."""
    given = json_object(raw)
    if given is None:
        return None
    fallback = given.get("fallback", {})
    device = given.get("device", {})
    ints = {k: given.get(k, d) for k, d in (("sample_rate_hz", 24000), ("channels", 1),
            ("frame_ms", 20), ("max_queue_bytes", 524288))}  # fmt: skip
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        return None
    to_stub = fallback.get("to_stub", True) if isinstance(fallback, dict) else None
    source = given.get("source", "device")
    if (
        not 8000 <= ints["sample_rate_hz"] <= 48000
        or ints["channels"] not in (1, 2)
        or not 10 <= ints["frame_ms"] <= 200
        or given.get("format", "pcm16") != "pcm16"
        or not isinstance(source, str)
        or not isinstance(to_stub, bool)
        or not isinstance(device, dict)
    ):
        return None
    try:
        stub = base64.b64decode(given.get("stub_pcm16_base64") or "", validate=True)
    except (binascii.Error, TypeError):
        return None
    config = MicConfig(ints["sample_rate_hz"], ints["channels"], "pcm16", ints["frame_ms"],
                       source, ints["max_queue_bytes"], to_stub, stub)  # fmt: skip
    if len(stub) > MAX_STUB_BYTES or not config.frame_bytes <= config.max_queue_bytes:
        return None
    return config if config.max_queue_bytes <= MAX_QUEUE_BYTES else None


class MicCalls:
    """``mic_create`` .. ``mic_close`` over `table`; `recording` is what "device" plays."""

    def __init__(self, table: FdTable, clock: Callable[[], float], recording: bytes | None):
        self.table = table
        self.clock = clock
        self.recording = recording

    def mic_create(self) -> int:
        """An idle mic fd."""
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            if self.table.down:
                return -EIO
            table = self.table
            mic = MicFd(
                table.alloc(),
                self.clock,
                table.drain_upstream_sessions,
                table.upstream_sessions_settled,
            )
            table.others[mic.fd] = mic
            return mic.fd

    def mic_ctl(self, mem: GuestMemory, fd: int, cmd: int, arg_ptr: int, arg_len_ptr: int) -> int:
        """SET_PARAM (plain JSON object) or GET_STATUS."""
        with self.table.lock:
            mic = self._mic(fd)
            if mic is None:
                return -EBADF
            try:
                if cmd == GET_STATUS:
                    mic.pump()
                    return deliver(mem, arg_ptr, arg_len_ptr, msgspec.json.encode(mic.status()))
                if cmd != SET_PARAM:
                    return -EINVAL
                config = parse_config(read_input(mem, arg_ptr, arg_len_ptr))
            except MemoryFault:
                return -EFAULT
            return -EINVAL if config is None else mic.start(config, self.recording)

    def mic_read(self, mem: GuestMemory, fd: int, out_ptr: int, out_len_ptr: int) -> int:
        """One frame, or -EAGAIN (rule 2)."""
        with self.table.lock:
            mic = self._mic(fd)
            if mic is None:
                return -EBADF
            mic.pump()
            try:
                capacity = out_capacity(mem, out_ptr, out_len_ptr)
                if not mic.queue:
                    result = 0 if mic.ended else -EAGAIN  # 0: the recording is over
                else:
                    frame = mic.queue.popleft()  # upstream pops before the size check
                    mic.queue_bytes -= len(frame)
                    write_u32(mem, out_len_ptr, len(frame))
                    if len(frame) > capacity:
                        result = -ENOSPC
                    else:
                        mem.write(out_ptr, frame)
                        result = len(frame)
            except MemoryFault:
                result = -EFAULT
        return result

    def mic_close(self, fd: int) -> int:
        """Stop the source and close the fd."""
        with self.table.lock:
            mic = self._mic(fd)
            if mic is None:
                return self.table.closed_before(fd)
            mic.running, mic.closed = False, True
            self.table.close_other(fd)
            return 0

    def _mic(self, fd: int) -> MicFd | None:
        mic = self.table.others.get(fd)
        return mic if isinstance(mic, MicFd) else None
