"""A small Redis client on anyio streams: the same code on trio, asyncio and uvloop.

Why our own: redis-py's asyncio client needs a running asyncio loop and fails under trio
(../shared/NOTES.md), and its sync client would cost a thread per call. What spear_rt needs
of Redis is a handful of commands and Lua scripts, each a request and one reply, which is
`resp.py` (RESP2, sans-I/O) plus a connection pool here.

Each call takes an idle connection (or opens one, at most `pool_size`), writes the
command(s), reads as many replies, and puts the connection back. A call is bounded by
`timeout_s`; a timeout, a broken connection or a protocol error drops that connection and
raises `RedisUnavailable` (the caller decides what a missing Redis means). Error replies
come back as `RedisError` values, or are raised by `call`.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc

from spear_rt.cluster.resp import (
    NeedData,
    ProtocolError,
    RedisError,
    Reply,
    ReplyParser,
    encode_command,
)

Arg = str | bytes | int | float
READ_SIZE = 65536
# what a call that cannot complete raises: the connection is dropped, Redis is unavailable
_UNREACHABLE = (OSError, TimeoutError, ProtocolError, anyio.EndOfStream,
                anyio.BrokenResourceError, anyio.ClosedResourceError)  # fmt: skip


class RedisUnavailable(Exception):
    """Redis could not be reached or did not answer in time."""


class RedisAddress:
    """Where Redis is: from ``redis://host:port/db`` (the password comes separately)."""

    def __init__(self, url: str, password: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("only redis:// URLs are supported (no TLS to Redis yet)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a redis URL is a number, got {path!r}")
        self.db = int(path or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = password

    def __repr__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"  # never the password


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.parser = ReplyParser()

    def gone(self) -> bool:
        """Whether the server closed this idle connection (a restart, its idle timeout): a
        peek that never blocks, so a restarted Redis costs no failed call."""
        fd = self.stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
        peek = socket.socket(fileno=fd)  # a view of the same descriptor (asyncio wraps its own)
        try:
            return peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # nothing to read: alive
        except OSError:
            return True
        finally:
            peek.detach()  # the descriptor stays the stream's

    async def roundtrip(self, payload: bytes, count: int) -> list[Reply]:
        await self.stream.send(payload)
        replies: list[Reply] = []
        while len(replies) < count:
            reply = self.parser.next_reply()
            if isinstance(reply, NeedData):
                self.parser.feed(await self.stream.receive(READ_SIZE))
                continue
            replies.append(reply)
        return replies


class Redis:
    """A pool of connections to one Redis server (see the module docstring)."""

    def __init__(self, address: RedisAddress, timeout_s: float = 1.0, pool_size: int = 8) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._slots = anyio.Semaphore(pool_size)
        self._scripts: dict[str, str] = {}  # sha1 -> source
        self._closed = False

    async def call(self, *args: Arg) -> Reply:
        """One command's reply; raises RedisError for an error reply."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Send `commands` in one write and read their replies (errors as values)."""
        payload = b"".join(encode_command(*c) for c in commands)
        conn: _Connection | None = None
        try:
            # the bound covers waiting for a free connection too: a slow Redis is a missing one
            with anyio.fail_after(self.timeout_s):
                async with self._slots:
                    conn = await self._idle_connection() or await self._connect()
                    replies = await conn.roundtrip(payload, len(commands))
                    if self._closed:
                        await _close(conn)
                    else:
                        self._idle.append(conn)
                    return replies
        except _UNREACHABLE as exc:
            if conn is not None:
                await _close(conn)
            raise RedisUnavailable(f"{self.address!r}: {_reason(exc)}") from None
        except BaseException:  # cancelled mid-reply: the stream is out of step
            if conn is not None:
                await _close(conn)
            raise

    async def _idle_connection(self) -> _Connection | None:
        """A pooled connection still open at the server's end, if any (the rest closed)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.gone():
                return conn
            await _close(conn)
        return None

    async def script(self, source: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """Run a Lua script by its SHA1, loading it once when Redis does not know it."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._scripts[sha] = source
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", source, len(keys), *keys, *args)

    async def _connect(self) -> _Connection:
        stream = await anyio.connect_tcp(self.address.host, self.address.port)
        conn = _Connection(stream)
        setup: list[list[Arg]] = []
        if self.address.password is not None:
            user = [self.address.username] if self.address.username else []
            setup.append(["AUTH", *user, self.address.password])
        if self.address.db:
            setup.append(["SELECT", self.address.db])
        if setup:
            payload = b"".join(encode_command(*c) for c in setup)
            for reply in await conn.roundtrip(payload, len(setup)):
                if isinstance(reply, RedisError):
                    await _close(conn)
                    # the reply names the problem (WRONGPASS...), never the password
                    raise OSError(str(reply).split("\n")[0])
        return conn

    async def aclose(self) -> None:
        """Close idle connections; those in use close when their call ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close(conn)


async def _close(conn: _Connection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.stream.aclose()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
