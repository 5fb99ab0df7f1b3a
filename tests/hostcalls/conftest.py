"""Fixtures for the hostcall tests: guest memory, an fd table with a recording session port."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.hostcalls.abi import BytesMemory, Cmd, write_u32
from spear_rt.hostcalls.epoll import EpollSet, FakeClock
from spear_rt.hostcalls.fdtable import FdTable, RtFd

T = TypeVar("T")

# Guest memory layout used by the pure-Python tests.
LEN = 0  # the u32 length slot
ARG = 64  # input arguments
OUT = 4096  # output buffers
OUT_CAP = 8192
CREATED = b'{"type":"transcription_session.created","session":{}}'


class RecordingPort:
    """A SessionPort that only records what the table asked for."""

    def __init__(self) -> None:
        self.connected: list[int] = []
        self.cancelled: list[int] = []

    def connect(self, fd: RtFd) -> None:
        self.connected.append(fd.fd)

    def cancel(self, fd: RtFd) -> None:
        self.cancelled.append(fd.fd)


@pytest.fixture
def mem() -> BytesMemory:
    return BytesMemory(65536)


@pytest.fixture
def port() -> RecordingPort:
    return RecordingPort()


@pytest.fixture
def table(port: RecordingPort) -> FdTable:
    return FdTable(port)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def epolls(table: FdTable, clock: FakeClock) -> EpollSet:
    return EpollSet(table, clock)


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def ctl(table: FdTable, mem: BytesMemory, fd: int, cmd: Cmd, arg: bytes = b"") -> int:
    """rt_ctl with `arg` placed at ARG and its length at LEN."""
    mem.put(ARG, arg)
    write_u32(mem, LEN, len(arg))
    return table.rt_ctl(mem, fd, cmd, ARG, LEN)


def set_param(table: FdTable, mem: BytesMemory, fd: int, key: str, value: Any) -> int:
    """SET_PARAM {"key": key, "value": value}."""
    return ctl(table, mem, fd, Cmd.SET_PARAM, json.dumps({"key": key, "value": value}).encode())


def get(table: FdTable, mem: BytesMemory, fd: int, cmd: Cmd, cap: int = OUT_CAP) -> dict[str, Any]:
    """A GET command's JSON object."""
    mem.set_u32(LEN, cap)
    n = table.rt_ctl(mem, fd, cmd, OUT, LEN)
    assert n > 0, n
    result: dict[str, Any] = json.loads(mem.read(OUT, n))
    return result


def read(table: FdTable, mem: BytesMemory, fd: int, cap: int = OUT_CAP) -> bytes | int:
    """One rt_read: the event bytes, or the (negative or zero) result."""
    mem.set_u32(LEN, cap)
    n = table.rt_read(mem, fd, OUT, LEN)
    if n <= 0:
        return n
    assert mem.get_u32(LEN) == n
    return mem.read(OUT, n)


def write(table: FdTable, mem: BytesMemory, fd: int, data: bytes) -> int:
    """rt_write of `data` placed at OUT."""
    mem.put(OUT, data)
    return table.rt_write(mem, fd, OUT, len(data))


def connected(table: FdTable, mem: BytesMemory) -> int:
    """A fd past CONNECT whose session said `created` (state open)."""
    fd = table.rt_create()
    assert ctl(table, mem, fd, Cmd.CONNECT) == 0
    assert table.push_event(table.fds[fd], CREATED)
    assert read(table, mem, fd) == CREATED
    return fd


def event(kind: str, **fields: Any) -> bytes:
    """A server event as the session encodes it."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()


def delta(text: str) -> bytes:
    return event("conversation.item.input_audio_transcription.delta", item_id="i", delta=text)


def completed(text: str) -> bytes:
    return event(
        "conversation.item.input_audio_transcription.completed", item_id="i", transcript=text
    )


def in_thread(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run `fn` in a worker thread (for calls that block, such as epoll waits)."""
    return pool.submit(fn, *args)


def lcg_pcm(samples: int, seed: int) -> NDArray[np.int16]:
    """The example guests' own audio: x = x*1664525 + 1013904223 (mod 2^32), sample = x >> 16."""
    x = seed
    out = np.empty(samples, dtype=np.uint16)
    for i in range(samples):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        out[i] = x >> 16
    return out.view(np.int16)
