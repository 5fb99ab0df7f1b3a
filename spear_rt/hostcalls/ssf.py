"""SSF v1, the frame of upstream SPEAR's user streams (spear-guests.md §8), sans-I/O.

One WebSocket binary message is one frame: a 32-byte little-endian header — magic ``SPST``,
version u16 (1), header_len u16 (>= 32), msg_type u16 (2 = DATA; carried, not interpreted),
flags u16, stream_id u32, seq u64, meta_len u32, data_len u32 — then ``meta`` (JSON by
convention) and ``data``, with meta_len + data_len = length - header_len.
"""

from __future__ import annotations

import struct

import msgspec

MAGIC = b"SPST"
VERSION = 1
HEADER = struct.Struct("<4sHHHHIQII")
HEADER_BYTES = HEADER.size  # 32
MSG_DATA = 2


class SsfError(ValueError):
    """Bytes that are not one valid SSF v1 frame."""


class SsfHeader(msgspec.Struct, frozen=True):
    """The parsed header of one frame."""

    msg_type: int
    flags: int
    stream_id: int
    seq: int
    meta_len: int
    data_len: int
    header_len: int


def parse(frame: bytes) -> SsfHeader:
    """The header of `frame`, after checking the frame is exactly one valid SSF v1 frame."""
    if len(frame) < HEADER_BYTES:
        raise SsfError(f"an SSF frame is at least {HEADER_BYTES} bytes, got {len(frame)}")
    magic, version, header_len, msg_type, flags, stream_id, seq, meta_len, data_len = (
        HEADER.unpack_from(frame)
    )
    if magic != MAGIC:
        raise SsfError("not an SSF frame (magic is not SPST)")
    if version != VERSION:
        raise SsfError(f"SSF version {version} is not supported (only 1)")
    if header_len < HEADER_BYTES or header_len > len(frame):
        raise SsfError(f"bad SSF header_len {header_len}")
    if meta_len + data_len != len(frame) - header_len:
        raise SsfError("SSF meta_len + data_len does not match the frame's length")
    return SsfHeader(msg_type, flags, stream_id, seq, meta_len, data_len, header_len)


def build(stream_id: int, data: bytes, *, meta: bytes = b"{}", seq: int = 0) -> bytes:
    """A DATA frame (clients and tests)."""
    header = HEADER.pack(MAGIC, VERSION, HEADER_BYTES, MSG_DATA, 0, stream_id, seq,
                         len(meta), len(data))  # fmt: skip
    return header + meta + data


def payload(frame: bytes) -> tuple[bytes, bytes]:
    """(meta, data) of a valid frame."""
    head = parse(frame)
    start = head.header_len
    return frame[start : start + head.meta_len], frame[start + head.meta_len :]
