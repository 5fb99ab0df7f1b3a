"""RESP2, the Redis wire protocol, sans-I/O: commands to bytes, bytes to replies.

Rules:

1. `encode_command(*args)` is one array of bulk strings; `str` goes as UTF-8, `int` and
   `float` as their decimal text, `bytes` as is.
2. `ReplyParser.feed(data)` buffers; `next_reply()` returns one whole reply or `NEED_DATA`.
   Simple string -> `str`, error -> a `RedisError` instance (returned, not raised: one
   command's error does not break the replies after it), integer -> `int`,
   bulk -> `bytes` (`None` for the null bulk), array -> `list` (`None` for the null array).
3. Bounds: a bulk over `MAX_BULK` bytes, an array over `MAX_ARRAY` elements, nesting deeper
   than `MAX_DEPTH`, a line over `MAX_LINE` bytes or an unknown type byte raise
   `ProtocolError`: the connection is then unusable and is dropped by its owner.
"""

from __future__ import annotations

from typing import Final, TypeAlias

MAX_BULK: Final = 16 << 20
MAX_ARRAY: Final = 1 << 20
MAX_DEPTH: Final = 8
MAX_LINE: Final = 64 << 10


class RedisError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`)."""


class ProtocolError(Exception):
    """The byte stream is not RESP2 (or passes a bound)."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
Reply: TypeAlias = "str | int | bytes | RedisError | list[Reply] | None"


def _arg(value: str | bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return repr(value).encode() if isinstance(value, float) else str(value).encode()


def encode_command(*args: str | bytes | int | float) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class ReplyParser:
    """Incremental reply parser (rule 2)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        self._buf += data

    def next_reply(self) -> Reply | NeedData:
        """One whole reply, or NEED_DATA when the buffer holds less than one."""
        parsed = self._parse(0, 0)
        if parsed is None:
            if len(self._buf) > MAX_BULK + MAX_LINE and b"\r\n" not in self._buf[:MAX_LINE]:
                raise ProtocolError("reply line too long")
            return NEED_DATA
        reply, end = parsed
        del self._buf[:end]
        return reply

    def _line(self, pos: int) -> tuple[bytes, int] | None:
        end = self._buf.find(b"\r\n", pos, pos + MAX_LINE + 2)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise ProtocolError("reply line too long")
            return None
        return bytes(self._buf[pos + 1 : end]), end + 2

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int] | None:
        if pos >= len(self._buf):
            return None
        if depth > MAX_DEPTH:
            raise ProtocolError("reply nested too deep")
        kind = self._buf[pos]
        line = self._line(pos)
        if line is None:
            return None
        text, after = line
        if kind == 0x2B:  # +
            return text.decode(errors="replace"), after
        if kind == 0x2D:  # -
            return RedisError(text.decode(errors="replace")), after
        if kind == 0x3A:  # :
            return _int(text), after
        if kind == 0x24:  # $
            return self._bulk(_int(text), after)
        if kind == 0x2A:  # *
            return self._array(_int(text), after, depth)
        raise ProtocolError(f"unknown reply type byte {kind:#04x}")

    def _bulk(self, size: int, pos: int) -> tuple[Reply, int] | None:
        if size < 0:
            return None, pos
        if size > MAX_BULK:
            raise ProtocolError(f"bulk reply of {size} bytes is over {MAX_BULK}")
        end = pos + size
        if len(self._buf) < end + 2:
            return None
        if self._buf[end : end + 2] != b"\r\n":
            raise ProtocolError("bulk reply not terminated by CRLF")
        return bytes(self._buf[pos:end]), end + 2

    def _array(self, count: int, pos: int, depth: int) -> tuple[Reply, int] | None:
        if count < 0:
            return None, pos
        if count > MAX_ARRAY:
            raise ProtocolError(f"array reply of {count} elements is over {MAX_ARRAY}")
        items: list[Reply] = []
        for _ in range(count):
            parsed = self._parse(pos, depth + 1)
            if parsed is None:
                return None
            item, pos = parsed
            items.append(item)
        return items, pos


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"bad integer in reply: {text[:32]!r}") from None
