"""``user_stream_*`` on an fd table, without WASM or sockets (rules in `userstream`)."""

from __future__ import annotations

import struct

import pytest

from spear_rt.hostcalls import ssf
from spear_rt.hostcalls.abi import (
    EAGAIN,
    EINVAL,
    ENOSPC,
    ENOTCONN,
    EPIPE,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    BytesMemory,
    write_u32,
)
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.userstream import (
    BIDI,
    IN,
    MAX_FRAME_BYTES,
    MAX_RECORDS,
    ClientFrameRefused,
    UserStreams,
)
from tests.hostcalls.conftest import LEN, OUT

OUT_CAP = 32768


def read(streams: UserStreams, mem: BytesMemory, fd: int, cap: int = OUT_CAP) -> bytes | int:
    write_u32(mem, LEN, cap)
    n = streams.user_stream_read(mem, fd, OUT, LEN)
    return mem.read(OUT, n) if n > 0 else n


def write(streams: UserStreams, mem: BytesMemory, fd: int, frame: bytes) -> int:
    mem.put(OUT, frame)
    return streams.user_stream_write(mem, fd, OUT, len(frame))


def records(streams: UserStreams, mem: BytesMemory, ctl: int) -> list[tuple[int, int]]:
    found = []
    while True:
        write_u32(mem, LEN, 8)
        if streams.user_stream_ctl_read(mem, ctl, OUT, LEN) != 8:
            return found
        found.append(struct.unpack("<II", mem.read(OUT, 8)))


@pytest.fixture
def rig() -> tuple[UserStreams, BytesMemory]:
    streams = UserStreams(FdTable())
    assert streams.socket_opened()
    return streams, BytesMemory(1 << 20)


def test_frames_before_the_guest_opens_anything_end_the_socket(
    rig: tuple[UserStreams, BytesMemory],
) -> None:
    streams, _mem = rig
    with pytest.raises(ClientFrameRefused, match="not opened"):
        streams.client_frame(ssf.build(1, b"early"))
    streams.user_stream_ctl_open()
    with pytest.raises(ClientFrameRefused, match="magic"):
        streams.client_frame(b"X" * 40)
    with pytest.raises(ClientFrameRefused, match="does not match"):
        streams.client_frame(ssf.build(1, b"abc")[:-1])


def test_a_stream_connects_on_the_clients_first_frame(rig: tuple[UserStreams, BytesMemory]) -> None:
    streams, mem = rig
    ctl = streams.user_stream_ctl_open()
    fd = streams.user_stream_open(5, BIDI)
    stream = streams.table.others[fd]
    assert stream.events() == 0
    assert write(streams, mem, fd, ssf.build(5, b"too soon")) == -ENOTCONN
    frame = ssf.build(5, b"hi")
    streams.client_frame(frame)
    streams.client_frame(frame)
    assert records(streams, mem, ctl) == [(5, 1), (5, 1)]  # on every frame, as upstream
    assert stream.events() == EPOLLIN | EPOLLOUT
    assert read(streams, mem, fd, cap=10) == -ENOSPC  # popped before the check: lost
    assert read(streams, mem, fd) == frame
    assert read(streams, mem, fd) == -EAGAIN
    assert write(streams, mem, fd, ssf.build(6, b"wrong id")) == -EINVAL
    assert write(streams, mem, fd, b"SPST" + bytes(10)) == -EINVAL
    assert write(streams, mem, fd, ssf.build(5, b"back")) == 0
    assert streams.take_outbound(lambda: None) == [ssf.build(5, b"back")]
    reader = streams.user_stream_open(5, IN)
    assert write(streams, mem, reader, ssf.build(5, b"x")) == -EINVAL
    streams.socket_closed()
    assert stream.events() & EPOLLHUP
    assert records(streams, mem, ctl) == [(0, 2)]
    assert write(streams, mem, fd, ssf.build(5, b"late")) == -EPIPE


def test_an_oversize_or_overflowing_stream_turns_to_error(
    rig: tuple[UserStreams, BytesMemory],
) -> None:
    streams, _mem = rig
    fd = streams.user_stream_open(2, BIDI)
    streams.client_frame(ssf.build(2, b"z" * (MAX_FRAME_BYTES + 1)))
    assert streams.table.others[fd].events() & EPOLLERR


def test_ctl_records_are_bounded_oldest_dropped(rig: tuple[UserStreams, BytesMemory]) -> None:
    streams, mem = rig
    ctl = streams.user_stream_ctl_open()
    for stream_id in range(MAX_RECORDS + 10):
        streams.client_frame(ssf.build(stream_id, b""))
    got = records(streams, mem, ctl)
    assert len(got) == MAX_RECORDS and got[0] == (10, 1)


def test_bad_open_arguments_and_one_socket_at_a_time(rig: tuple[UserStreams, BytesMemory]) -> None:
    streams, _mem = rig
    assert streams.user_stream_open(-1, BIDI) == -EINVAL
    assert streams.user_stream_open(1, 4) == -EINVAL
    assert not streams.socket_opened()  # one is open already
    streams.end()
    assert streams.take_outbound(lambda: None) is None  # the writer stops
