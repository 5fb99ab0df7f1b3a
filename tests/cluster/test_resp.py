"""RESP2 encoding and incremental parsing (spear_rt/cluster/resp.py), no server."""

from __future__ import annotations

import pytest

from spear_rt.cluster.resp import (
    MAX_BULK,
    NEED_DATA,
    ProtocolError,
    RedisError,
    ReplyParser,
    encode_command,
)


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command("SET", "k", b"v\r\n", 5, 0.25) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n5\r\n$4\r\n0.25\r\n"
    )


def test_every_reply_type_parses_even_one_byte_at_a_time() -> None:
    wire = (
        b"+OK\r\n-NOSCRIPT No matching script\r\n:42\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n"
        b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n+x\r\n"
    )
    parser = ReplyParser()
    replies = []
    for byte in wire:
        parser.feed(bytes([byte]))
        while (reply := parser.next_reply()) is not NEED_DATA:
            replies.append(reply)
    error = replies[1]
    assert isinstance(error, RedisError) and str(error).startswith("NOSCRIPT")
    assert replies[0] == "OK" and replies[2:] == [42, b"he\r\no", None, None, [1, [b"a", b""], "x"]]


@pytest.mark.parametrize(
    "wire",
    [
        b"?what\r\n",
        b":12x\r\n",
        b"$%d\r\n" % (MAX_BULK + 1),
        b"$3\r\nabcd\r\n",
        b"*1\r\n" * 10 + b":1\r\n",
    ],
    ids=["unknown type", "bad integer", "bulk too big", "unterminated bulk", "too deep"],
)
def test_what_is_not_resp_is_a_protocol_error(wire: bytes) -> None:
    parser = ReplyParser()
    parser.feed(wire)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_an_endless_line_is_refused_before_it_fills_memory() -> None:
    parser = ReplyParser()
    parser.feed(b"+" + b"x" * (70 << 10))
    with pytest.raises(ProtocolError, match="too long"):
        parser.next_reply()
