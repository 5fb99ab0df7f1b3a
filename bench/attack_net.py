"""Loopback client helpers of bench/attack.py: raw HTTP, HTTP with h11, WebSocket sessions."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import connect

STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


@dataclass
class Raw:
    """What a raw HTTP exchange returned."""

    statuses: list[int]
    data: bytes
    seconds: float
    closed: bool  # the server closed the connection (EOF) within the wait


async def raw_http(port: int, chunks: list[bytes], wait_s: float = 5.0, keep: int = 4096) -> Raw:
    """Write `chunks` (one write each) and read until EOF or `wait_s`; statuses seen."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        data, closed = b"", False
        deadline = t0 + wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                part = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not part:
                closed = True
                break
            data = (data + part)[-(1 << 20) :]
        statuses = [int(m) for m in STATUS.findall(data)]
        return Raw(statuses, data[:keep], time.monotonic() - t0, closed)
    finally:
        writer.close()


async def first_status(port: int, chunks: list[bytes], wait_s: float) -> tuple[int | None, float]:
    """The first status line's code and when it arrived (None if none within `wait_s`)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        line = await asyncio.wait_for(reader.readline(), wait_s)
        m = STATUS.match(line)
        return (int(m.group(1)) if m else None), time.monotonic() - t0
    except (TimeoutError, ConnectionError):
        return None, time.monotonic() - t0
    finally:
        writer.close()


@dataclass
class Reply:
    """An HTTP answer, body counted (its first 64 KiB kept)."""

    status: int | None
    body_bytes: int
    head: bytes
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)


def request_bytes(method: str, path: str, port: int, headers: dict[str, str], body: bytes) -> bytes:
    """One HTTP/1.1 request with Host, Content-Length and Connection: close."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **headers}
    if body or method == "POST":
        hdrs.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode("latin-1") + b"\r\n" + body


async def http(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    wait_s: float = 30.0,
) -> Reply:
    """A well-formed request; the answer's status, headers and body size (read to EOF)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(request_bytes(method, path, port, headers or {}, body))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait_s)
        m = STATUS.match(head)
        hdrs = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k:
                hdrs[k.decode().lower()] = v.decode(errors="replace").strip()
        kept, total = b"", 0
        while part := await asyncio.wait_for(reader.read(1 << 20), wait_s):
            total += len(part)
            if len(kept) < 65536:
                kept += part[: 65536 - len(kept)]
        return Reply(int(m.group(1)) if m else None, total, kept, time.monotonic() - t0, hdrs)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        return Reply(None, 0, b"", time.monotonic() - t0)
    finally:
        writer.close()


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes]], boundary: str = "attackbench"
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def ws_url(port: int, query: str = "intent=transcription") -> str:
    """The realtime URL."""
    return f"ws://127.0.0.1:{port}/v1/realtime?{query}"


async def ws_open(
    port: int, origin: str | None = None, query: str = "intent=transcription", wait_s: float = 10.0
) -> tuple[Any, int | str]:
    """Open a realtime session; (connection or None, 101 or the refusal's status / error)."""
    try:
        conn = await connect(
            ws_url(port, query),
            origin=origin,
            max_size=None,  # type: ignore[arg-type]
            open_timeout=wait_s,
            ping_interval=None,
            close_timeout=2,
            compression=None,
        )
    except websockets.InvalidStatus as exc:
        return None, exc.response.status_code
    except (OSError, websockets.WebSocketException, TimeoutError) as exc:
        return None, f"{type(exc).__name__}"
    return conn, 101


async def ws_event(conn: Any, wait_s: float) -> dict[str, Any] | None:
    """The next JSON event (None on timeout)."""
    try:
        raw = await asyncio.wait_for(conn.recv(), wait_s)
    except TimeoutError:
        return None
    return json.loads(raw)  # type: ignore[no-any-return]


def close_code(conn: Any) -> int | None:
    """The close code the server sent (None: no close frame / still open)."""
    rcvd = getattr(conn.protocol, "close_rcvd", None)
    return rcvd.code if rcvd is not None else None
