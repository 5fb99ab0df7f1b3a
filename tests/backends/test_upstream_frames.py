"""`FastClientProtocol` (the upstream side) reads and writes what websockets' client protocol
does, however the bytes are split (sans-I/O: no sockets)."""

from __future__ import annotations

import random
import struct

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from spear_rt.wsframes import FastClientProtocol, frame_head
from tests.server.test_ws_fast_frames import splits  # the same random cuts

URI = parse_uri("ws://127.0.0.1/v1/realtime")


def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return frame_head((0x80 if fin else 0) | opcode, len(payload)) + payload


def opened(cls: type[ClientProtocol]) -> ClientProtocol:
    proto = cls(URI, state=State.OPEN, max_size=1000)
    assert proto.state is State.OPEN
    return proto


def sent_frames(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """(opcode, payload) of what a client sent, read back by websockets' server protocol."""
    server = ServerProtocol(state=State.OPEN, max_size=None)
    server.receive_data(b"".join(chunks))
    return [(int(e.opcode), e.data) for e in server.events_received() if isinstance(e, Frame)]


Run = tuple[list[tuple[int, bytes, bool]], list[tuple[int, bytes]], ClientProtocol]


def run(cls: type[ClientProtocol], chunks: list[bytes], eof: bool = False) -> Run:
    """Frames read (opcode, data, fin), frames sent back (pongs, closes), the protocol."""
    proto = opened(cls)
    got: list[tuple[int, bytes, bool]] = []
    sent: list[bytes] = []
    for chunk in chunks:
        if isinstance(proto, FastClientProtocol):
            frames = proto.receive_frames(chunk)
        else:
            proto.receive_data(chunk)
            frames = [e for e in proto.events_received() if isinstance(e, Frame)]
        got += [(int(f.opcode), bytes(f.data), f.fin) for f in frames]
        sent += proto.data_to_send()
    if eof:
        proto.receive_eof()
        got += [(int(f.opcode), bytes(f.data), f.fin) for f in proto.events_received()]  # type: ignore[union-attr]
        sent += proto.data_to_send()
    return got, sent_frames(sent), proto


STREAM = b"".join([
    unmasked(1, b'{"type":"input_audio_buffer.committed","item_id":"item_1"}'),
    unmasked(1, b"x" * 300),
    unmasked(9, b"ping!"),
    unmasked(2, bytes(range(200))),
    unmasked(1, b"frag-", fin=False),
    unmasked(9, b"between"),
    unmasked(0, b"ment-", fin=False),
    unmasked(0, b"ed", fin=True),
    unmasked(1, b"after the fragments"),
    unmasked(1, b""),
])  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_any_split_reads_what_websockets_reads(seed: int) -> None:
    chunks = splits(STREAM, random.Random(seed))
    got, sent, _ = run(FastClientProtocol, chunks)
    want, want_sent, _ = run(ClientProtocol, chunks)
    assert (got, sent) == (want, want_sent)
    assert (int(Opcode.PONG), b"ping!") in sent  # the pings were answered


@pytest.mark.parametrize(
    "bad",
    [
        unmasked(1, b"y" * 1001),  # over max_size: 1009 at the header
        bytes([0x81, 0x81]) + b"\0\0\0\0z",  # masked by the server: 1002
        bytes([0xC1, 0x01]) + b"z",  # RSV1 without an extension: 1002
        unmasked(3, b"?"),  # reserved opcode: 1002
        unmasked(9, b"p" * 200),  # a control frame over 125 bytes: 1002
        unmasked(0, b"orphan"),  # a continuation without a start: 1002
        unmasked(8, struct.pack("!H", 1000) + b"bye") + unmasked(1, b"after the close"),
    ],
)
def test_what_websockets_refuses_is_refused_the_same(bad: bytes) -> None:
    stream = unmasked(1, b"first") + bad
    for seed in range(10):
        chunks = splits(stream, random.Random(seed))
        got, sent, proto = run(FastClientProtocol, chunks)
        want, want_sent, ref = run(ClientProtocol, chunks)
        assert (got, sent) == (want, want_sent)
        assert proto.state is ref.state is not State.OPEN
        assert type(proto.parser_exc) is type(ref.parser_exc)


def test_an_end_inside_a_frame_is_judged_by_websockets() -> None:
    frame = unmasked(1, b"w" * 500)
    got, sent, proto = run(FastClientProtocol, [unmasked(1, b"ok"), frame[:100]], eof=True)
    want, want_sent, ref = run(ClientProtocol, [unmasked(1, b"ok"), frame[:100]], eof=True)
    assert (got, sent) == (want, want_sent) and got == [(1, b"ok", True)]
    assert type(proto.parser_exc) is type(ref.parser_exc) and proto.parser_exc is not None


def test_a_partial_frame_left_by_the_opening_is_not_lost() -> None:
    """The opening reads with websockets' parser: a frame it holds half of must complete."""
    proto = opened(FastClientProtocol)
    assert isinstance(proto, FastClientProtocol)
    frame = unmasked(1, b"session.created" * 10)
    proto.receive_data(frame[:40])
    assert proto.events_received() == []
    frames = proto.receive_frames(frame[40:] + unmasked(1, b"next"))
    assert [bytes(f.data) for f in frames] == [b"session.created" * 10, b"next"]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_sent_text_is_a_masked_frame_websockets_reads(size: int) -> None:
    proto = opened(FastClientProtocol)
    payload = bytes(random.Random(size).choices(b'abc{}":', k=size))
    proto.send_text(payload)
    proto.send_text(b"second")
    chunks = proto.data_to_send()
    assert all(c[1] & 0x80 for c in chunks)  # masked, as a client must
    assert sent_frames(chunks) == [(1, payload), (1, b"second")]
    keys = {
        bytes(c[len(frame_head(0x81, len(p), 0x80)) :][:4])
        for c, p in zip(chunks, [payload, b"second"], strict=True)
    }
    assert len(keys) == 2  # a fresh key a frame


def test_sending_falls_back_to_websockets_off_the_common_path() -> None:
    proto = opened(FastClientProtocol)
    proto.send_text(b"part-", fin=False)  # a fragment: websockets frames it
    with pytest.raises(Exception, match="continuation"):
        proto.send_text(b"not now")
    proto.send_continuation(b"end", fin=True)
    proto.send_close(1000)
    with pytest.raises(Exception, match="closing"):
        proto.send_text(b"too late")
    assert sent_frames(proto.data_to_send())[:2] == [(1, b"part-"), (0, b"end")]
