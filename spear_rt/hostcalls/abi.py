"""The `rt_*` ABI (spec/hostcalls.md): errno values, commands, epoll flags, guest memory.

Every hostcall returns an ``i32``: a count or fd on success, ``-errno`` on failure (Linux
numbers). Pointers and lengths arrive as wasm ``i32`` (Python may see them negative) and are
read as unsigned 32-bit values. Guest memory is reached only through `GuestMemory`, whose
accesses are bounds-checked: an out-of-bounds range raises `MemoryFault`, which every call
turns into ``-EFAULT`` before touching any state.

Output buffers follow the ``(out_ptr, out_len_ptr)`` convention (`deliver`): ``*out_len_ptr``
holds the capacity on entry and the written (or required) length on return; too small ->
the required length is written back and the call returns ``-ENOSPC``.
"""

from __future__ import annotations

import enum
import struct
from typing import Protocol

from spear_rt.errors import SpearError

# errno values (Linux)
EPERM = 1
ENOENT = 2
EINTR = 4
EIO = 5
EBADF = 9
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EINVAL = 22
EMFILE = 24
ENOSPC = 28
EPIPE = 32
ENOSYS = 38
ECONNRESET = 104
ENOTCONN = 107
ETIMEDOUT = 110

# readiness bits
EPOLLIN = 0x001
EPOLLOUT = 0x004
EPOLLERR = 0x008
EPOLLHUP = 0x010
EPOLL_ALL = EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP

RECORD_BYTES = 8  # one epoll record: fd i32, events i32, little-endian
MAX_WATCHES = 4096  # per epfd; one more -> -ENOMEM

_U32 = 0xFFFF_FFFF
_LE_U32 = struct.Struct("<I")


class Cmd(enum.IntEnum):
    """`rt_ctl` commands."""

    SET_PARAM = 1
    CONNECT = 2
    GET_STATUS = 3
    SEND_EVENT = 4
    COMMIT = 5
    CLEAR = 6
    SHUTDOWN_WRITE = 7
    GET_METRICS = 8


class EpollOp(enum.IntEnum):
    """`spear_epoll_ctl` operations."""

    ADD = 1
    MOD = 2
    DEL = 3


class MemoryFault(SpearError):
    """A guest pointer or length reaches outside the guest's linear memory."""


class GuestMemory(Protocol):
    """Bounds-checked access to one guest's linear memory (raises `MemoryFault`)."""

    def read(self, ptr: int, length: int) -> bytes:
        """`length` bytes at `ptr`."""
        ...

    def write(self, ptr: int, data: bytes) -> None:
        """Store `data` at `ptr`."""
        ...

    def check(self, ptr: int, length: int) -> None:
        """Raise `MemoryFault` unless ``[ptr, ptr + length)`` lies inside memory."""
        ...


def u32(value: int) -> int:
    """A wasm i32 argument read as unsigned."""
    return value & _U32


class BytesMemory:
    """A `GuestMemory` over a bytearray: what tests of the pure-Python layer use."""

    def __init__(self, size: int = 65536) -> None:
        self.data = bytearray(size)

    def check(self, ptr: int, length: int) -> None:
        """Raise `MemoryFault` unless the range is inside the buffer."""
        ptr, length = u32(ptr), u32(length)
        if ptr + length > len(self.data):
            raise MemoryFault(f"[{ptr}, {ptr + length}) is outside {len(self.data)} bytes")

    def read(self, ptr: int, length: int) -> bytes:
        """Bytes at `ptr`."""
        self.check(ptr, length)
        ptr = u32(ptr)
        return bytes(self.data[ptr : ptr + u32(length)])

    def write(self, ptr: int, data: bytes) -> None:
        """Store bytes at `ptr`."""
        self.check(ptr, len(data))
        ptr = u32(ptr)
        self.data[ptr : ptr + len(data)] = data

    def put(self, ptr: int, data: bytes) -> int:
        """Test helper: store `data` and return its length."""
        self.write(ptr, data)
        return len(data)

    def get_u32(self, ptr: int) -> int:
        """Test helper: the u32 at `ptr`."""
        return read_u32(self, ptr)

    def set_u32(self, ptr: int, value: int) -> None:
        """Test helper: store a u32 at `ptr`."""
        write_u32(self, ptr, value)


def read_u32(mem: GuestMemory, ptr: int) -> int:
    """The little-endian u32 at `ptr`."""
    value: int = _LE_U32.unpack(mem.read(ptr, 4))[0]
    return value


def write_u32(mem: GuestMemory, ptr: int, value: int) -> None:
    """Store a little-endian u32 at `ptr`."""
    mem.write(ptr, _LE_U32.pack(value & _U32))


def read_input(mem: GuestMemory, ptr: int, len_ptr: int) -> bytes:
    """An input argument given as ``(arg_ptr, arg_len_ptr)``: ``*arg_len_ptr`` bytes at `ptr`."""
    return mem.read(ptr, read_u32(mem, len_ptr))


def out_capacity(mem: GuestMemory, out_ptr: int, out_len_ptr: int) -> int:
    """The capacity in ``*out_len_ptr``, after checking the whole output range is in bounds."""
    capacity = read_u32(mem, out_len_ptr)
    mem.check(out_ptr, capacity)
    return capacity


def deliver(mem: GuestMemory, out_ptr: int, out_len_ptr: int, data: bytes) -> int:
    """Copy `data` out under the buffer contract: its length, or -ENOSPC (required length back)."""
    capacity = out_capacity(mem, out_ptr, out_len_ptr)
    if len(data) > capacity:
        write_u32(mem, out_len_ptr, len(data))
        return -ENOSPC
    mem.write(out_ptr, data)
    write_u32(mem, out_len_ptr, len(data))
    return len(data)
