"""`BudgetedServerProtocol.receive_frames` gives what websockets' own parser gives, however the
bytes are split (sans-I/O: no sockets)."""

from __future__ import annotations

import os
import random
import struct

import pytest
from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol

from spear_rt.server.ws import BudgetedServerProtocol, FrameBudget, Message, MessageAssembler


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


HANDSHAKE = (
    b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def opened(cls: type[ServerProtocol], **kwargs: object) -> ServerProtocol:
    proto = cls(**kwargs)  # type: ignore[arg-type]
    proto.receive_data(HANDSHAKE)
    request = proto.events_received()[0]
    proto.send_response(proto.accept(request))  # type: ignore[arg-type]
    proto.data_to_send()
    assert proto.state is State.OPEN
    return proto


def reference(stream: bytes, chunks: list[bytes]) -> tuple[list[tuple[bool, bytes]], list[bytes]]:
    """Messages (text?, data) and bytes to send from websockets' parser alone."""
    proto = opened(ServerProtocol, max_size=1000)
    assembler = MessageAssembler()
    out: list[tuple[bool, bytes]] = []
    sent: list[bytes] = []
    for chunk in chunks:
        proto.receive_data(chunk)
        for event in proto.events_received():
            if isinstance(event, Frame) and (m := assembler.feed(event)) is not None:
                out.append((m.text, bytes(m.data)))
        sent += proto.data_to_send()
    return out, sent


def ours(
    chunks: list[bytes], budget: int = 1 << 20
) -> tuple[list[tuple[bool, bytes]], list[bytes], ServerProtocol]:
    proto = opened(BudgetedServerProtocol, budget=FrameBudget(budget), max_size=1000)
    assert isinstance(proto, BudgetedServerProtocol)
    assembler = MessageAssembler()
    out: list[tuple[bool, bytes]] = []
    sent: list[bytes] = []
    for chunk in chunks:
        for item in proto.receive_frames(chunk):
            m = item if isinstance(item, Message) else assembler.feed(item)
            if m is not None:
                out.append((m.text, bytes(m.data)))
        sent += proto.data_to_send()
    return out, sent, proto


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


STREAM = b"".join([
    masked(1, b'{"type":"input_audio_buffer.append","audio":"AAAA"}'),
    masked(2, bytes(range(200))),
    masked(9, b"ping!"),
    masked(1, b"x" * 300),
    masked(1, b"frag-", fin=False),
    masked(9, b"between"),
    masked(0, b"ment-", fin=False),
    masked(0, b"ed", fin=True),
    masked(1, b""),
    masked(1, "é".encode() * 20),
])  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_any_split_gives_what_websockets_gives(seed: int) -> None:
    rng = random.Random(seed)
    chunks = splits(STREAM, rng)
    assert ours(chunks)[:2] == reference(STREAM, chunks)


@pytest.mark.parametrize(
    "bad",
    [
        masked(1, b"y" * 1001),  # over max_size: 1009 at the header
        masked(1, b"z")[:1] + bytes([0x01]) + b"z",  # unmasked: 1002
        bytes([0xC1]) + masked(1, b"z")[1:],  # RSV1 without an extension: 1002
        masked(3, b"?"),  # reserved opcode: 1002
        masked(9, b"p" * 200),  # a control frame over 125 bytes: 1002
        masked(0, b"orphan"),  # a continuation without a start: 1002
        masked(8, struct.pack("!H", 1000) + b"bye") + masked(1, b"after the close"),
    ],
)
def test_what_websockets_refuses_is_refused_the_same(bad: bytes) -> None:
    stream = masked(1, b"first") + bad
    for seed in range(10):
        chunks = splits(stream, random.Random(seed))
        got, sent, proto = ours(chunks)
        assert (got, sent) == reference(stream, chunks)
        assert proto.state is not State.OPEN


def test_a_held_partial_frame_counts_against_the_budget() -> None:
    frame = masked(1, b"w" * 900)
    got, sent, proto = ours([frame[:600]], budget=500)
    assert got == [] and proto.state is State.CLOSING
    assert sent and sent[0][0] == 0x88  # a close frame went out: 1013
    assert struct.unpack("!H", sent[0][2:4])[0] == 1013
    budget = FrameBudget(1000)
    proto2 = opened(BudgetedServerProtocol, budget=budget, max_size=1000)
    assert isinstance(proto2, BudgetedServerProtocol)
    assert proto2.receive_frames(frame[:600]) == [] and budget.held == 600
    assert [bytes(m.data) for m in proto2.receive_frames(frame[600:])] == [b"w" * 900]  # type: ignore[union-attr]
    assert budget.held == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_sent_text_is_what_websockets_writes(size: int) -> None:
    payload = bytes(random.Random(size).choices(b'abc{}":', k=size))
    ours_proto = opened(BudgetedServerProtocol, budget=FrameBudget(1 << 20), max_size=1000)
    theirs = opened(ServerProtocol, max_size=1000)
    for proto in (ours_proto, theirs):
        proto.send_text(payload)
        proto.send_text(b"second")
    ours_bytes, theirs_bytes = ours_proto.data_to_send(), theirs.data_to_send()
    assert b"".join(ours_bytes) == b"".join(theirs_bytes)
    assert b"" not in ours_bytes  # an empty chunk would tell the driver to close the socket


def test_sending_off_the_common_path_is_websockets_own() -> None:
    proto = opened(BudgetedServerProtocol, budget=FrameBudget(1 << 20), max_size=1000)
    proto.send_text(b"part-", fin=False)
    with pytest.raises(Exception, match="continuation"):
        proto.send_text(b"not now")
    proto.send_continuation(b"end", fin=True)
    proto.send_close(1000)
    with pytest.raises(Exception, match="closing"):
        proto.send_text(b"too late")
    assert b"".join(proto.data_to_send()).startswith(bytes([0x01, 5]) + b"part-")


def test_the_fast_path_flag_follows_the_state_and_the_limits() -> None:
    budget = FrameBudget(1 << 20)
    fresh = BudgetedServerProtocol(budget=budget, max_size=1000)
    assert fresh.state is State.CONNECTING and not fresh.fast_open
    proto = opened(BudgetedServerProtocol, budget=budget, max_size=1000)
    assert isinstance(proto, BudgetedServerProtocol) and proto.fast_open
    # a fragment limit (max_size as a pair) keeps every frame on websockets' path
    limited = opened(BudgetedServerProtocol, budget=budget, max_size=(1000, 100))
    assert isinstance(limited, BudgetedServerProtocol) and not limited.fast_open
    proto.receive_frames(masked(8, struct.pack("!H", 1000)))  # the client closes
    assert proto.state is not State.OPEN and not proto.fast_open
    # off the fast path the frames are websockets' own: a text frame now is refused as it is
    with pytest.raises(Exception, match=r"closing|closed"):
        proto.send_text(b"too late")
