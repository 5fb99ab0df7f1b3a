"""The attack classes of bench/attack.py (issue 10), each bounded in count and time.

A class's ``run(ctx)`` attacks ``127.0.0.1:ctx.port`` and returns a Result: its own check
(held, why) and details for the JSON. The harness adds RSS, /healthz stalls, log tracebacks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attack_net as net
import attack_secret
import attack_wasm

Result = attack_wasm.Result


@dataclass
class Context:
    """Where and how hard to attack."""

    port: int
    python: str
    src: Path
    quick: bool
    cap_mb: float
    workdir: Path
    capped: Callable[[], bool] = lambda: False
    log_text: Callable[[], str] = lambda: ""


@dataclass
class AttackClass:
    """One attack class: its coroutine, time limit, whether it needs the server."""

    run: Callable[[Context], Awaitable[Result]]
    limit_s: float = 30.0
    needs_server: bool = True
    default: bool = True
    rss_budget_mb: float = 300.0  # peak - before above this: broke
    rss_keep_mb: float = 100.0  # after - before above this: broke (kept after the class)
    # before the server starts: (its config text, extra env, cleanup)
    setup: Callable[[], tuple[str, dict[str, str], Callable[[], None]]] | None = None


JSON = {"Content-Type": "application/json"}


def wav(rate: int, data: bytes) -> bytes:
    """A mono 16-bit WAV whose header claims `rate`."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def brief(reply: net.Reply) -> str:
    """Status + the first words of the error message."""
    if reply.status is not None and reply.status < 300:
        return str(reply.status)
    msg = ""
    try:
        msg = json.loads(reply.head)["error"]["message"][:60]
    except (ValueError, KeyError, TypeError):
        msg = reply.head[:60].decode(errors="replace")
    return f"{reply.status} {msg}".strip()


async def samplerate(ctx: Context) -> Result:
    """A 6 KB WAV whose header says 1 Hz to /v1/audio/transcriptions, uploaded and by file_ref."""
    noise = bytes((i * 37) & 0xFF for i in range(6000))
    body, ctype = net.multipart({"model": "whisper-1"}, {"file": ("x.wav", wav(1, noise))})
    reply = await net.http(
        ctx.port, "POST", "/v1/audio/transcriptions", body, {"Content-Type": ctype}, wait_s=60
    )
    out: dict[str, Any] = {"upload": reply.status}
    said = [f"upload {brief(reply)} in {reply.seconds:.1f} s"]
    if not ctx.capped():
        stored = await net.http(
            ctx.port, "POST", "/v1/media", wav(1, noise), {"Content-Type": "audio/wav"}
        )
        ref = re.search(rb"spear-media://[0-9a-f]{64}", stored.head)
        if ref is None:
            said.append(f"media store {brief(stored)}")
        else:
            body, ctype = net.multipart(
                {"model": "whisper-1", "file_ref": ref.group().decode()}, {}
            )
            by_ref = await net.http(
                ctx.port,
                "POST",
                "/v1/audio/transcriptions",
                body,
                {"Content-Type": ctype},
                wait_s=60,
            )
            out["file_ref"] = by_ref.status
            said.append(f"file_ref {brief(by_ref)} in {by_ref.seconds:.1f} s")
    held = all(isinstance(v, int) and 400 <= v < 500 for v in out.values())
    return Result(held, "; ".join(said), out)


async def redos(ctx: Context) -> Result:
    """A multipart part whose Content-Disposition is 60 KB of letters."""
    letters = b"a" * (20_000 if ctx.quick else 60_000)
    body = b"--B\r\nContent-Disposition: form-data; " + letters + b"\r\n\r\nx\r\n--B--\r\n"
    reply = await net.http(
        ctx.port,
        "POST",
        "/v1/audio/transcriptions",
        body,
        {"Content-Type": "multipart/form-data; boundary=B"},
        wait_s=60,
    )
    held = reply.status is not None and reply.status < 500 and reply.seconds < 1.0
    return Result(
        held,
        f"{brief(reply)} after {reply.seconds:.1f} s",
        {"status": reply.status, "seconds": reply.seconds},
    )


def deep(levels: int) -> str:
    """`levels` nested JSON arrays."""
    return "[" * levels + "]" * levels


async def deepjson(ctx: Context) -> Result:
    """2000-deep JSON in an HTTP body and in a realtime frame."""
    levels = 2000
    body = ('{"model":"m","messages":' + deep(levels) + "}").encode()
    reply = await net.http(ctx.port, "POST", "/v1/chat/completions", body, JSON, wait_s=20)
    details: dict[str, Any] = {"http_status": reply.status}
    bad = [] if reply.status == 400 else [f"HTTP {brief(reply)}"]
    conn, status = await net.ws_open(ctx.port)
    if conn is None:
        return Result(False, f"ws refused {status}", details)
    await net.ws_event(conn, 5)  # session.created
    sent = 3
    for _ in range(sent):
        await conn.send('{"type":"input_audio_buffer.append","audio":' + deep(levels) + "}")
    errors = 0
    alive = False
    try:
        for _ in range(sent):
            ev = await net.ws_event(conn, 5)
            errors += bool(ev and ev.get("type") == "error")
        await conn.send('{"type":"input_audio_buffer.clear"}')
        ev = await net.ws_event(conn, 5)
        alive = bool(ev and ev.get("type") == "input_audio_buffer.cleared")
    except Exception as exc:
        details["ws_exception"] = type(exc).__name__
    details.update(ws_errors=errors, ws_sent=sent, ws_alive=alive, ws_close=net.close_code(conn))
    await conn.close()
    if errors < sent or not alive:
        bad.append(
            f"ws: {errors}/{sent} error events, session alive={alive}, close={details['ws_close']}"
        )
    return Result(not bad, "; ".join(bad) or "HTTP 400, ws error events, session lives", details)


async def _flood_one(ctx: Context, count: int, id_bytes: int) -> dict[str, Any]:
    conn, status = await net.ws_open(ctx.port)
    if conn is None:
        return {"refused": status}
    await net.ws_event(conn, 5)
    stats: dict[str, Any] = {"errors": 0, "max_echo": 0, "close": None}

    async def reader() -> None:
        while stats["errors"] < count:
            ev = await net.ws_event(conn, 10)
            if ev is None:
                return
            if ev.get("type") == "error":
                stats["errors"] += 1
                echoed = (ev.get("error") or {}).get("event_id") or ""
                stats["max_echo"] = max(stats["max_echo"], len(echoed))

    task = asyncio.ensure_future(reader())
    try:
        for i in range(count):
            eid = f"{i}-" + "x" * id_bytes
            await conn.send(json.dumps({"type": "bogus.event", "event_id": eid}))
        await task
    except Exception as exc:
        stats["exception"] = type(exc).__name__
    task.cancel()
    stats["close"] = net.close_code(conn)
    await conn.close()
    return stats


async def badflood(ctx: Context) -> Result:
    """4 sessions each send bad events with 100 KB event_ids as fast as they can, reading."""
    count = 100 if ctx.quick else 400
    stats = await asyncio.gather(*(_flood_one(ctx, count, 100_000) for _ in range(4)))
    closed = [s.get("close") for s in stats if s.get("close") not in (None, 1000)]
    short = [s.get("errors", 0) for s in stats if s.get("errors", 0) < count]
    echo = max(s.get("max_echo", 0) for s in stats)
    held = not closed and not short
    why = (
        f"{4 - len(short)}/4 sessions got all {count} errors, closes {closed or 'none'},"
        f" echoed event_id ≤ {echo} B"
    )
    return Result(held, why, {"sessions": stats, "count": count})


async def _slow_one(ctx: Context, size: int, sent: list[int], stop: asyncio.Event) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    head = net.request_bytes(
        "POST",
        "/v1/audio/transcriptions",
        ctx.port,
        {"Content-Type": "multipart/form-data; boundary=B"},
        b"",
    )
    head = head.replace(b"Content-Length: 0", f"Content-Length: {size + 1024}".encode())
    status = None
    try:
        writer.write(head)
        chunk = b"--B\r\n" + b"x" * 65531
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent[0] += len(chunk)
            if stop.is_set():
                break
        await stop.wait()
        try:
            line = await asyncio.wait_for(reader.readline(), 0.05)
            m = net.STATUS.match(line)
            status = int(m.group(1)) if m else None
        except TimeoutError:
            pass
    except (TimeoutError, ConnectionError):
        status = status or -1
    finally:
        writer.transport.abort()  # hang up mid-body
    return status


async def slowbody(ctx: Context) -> Result:
    """60 connections × 4 MiB of body in flight, then every client hangs up mid-body."""
    conns, size = (20, 1 << 20) if ctx.quick else (60, 4 << 20)
    sent, stop = [0], asyncio.Event()
    tasks = [asyncio.ensure_future(_slow_one(ctx, size, sent, stop)) for _ in range(conns)]
    deadline = time.monotonic() + 15
    while sent[0] < conns * (size - 65536) * 0.98 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # polls a byte count, not an event
    await asyncio.sleep(1.0)  # hold: the peak
    stop.set()
    statuses = await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)  # the server notices the hang-ups
    refused = sum(1 for s in statuses if s is not None)
    return Result(
        True,
        f"{sent[0] / 1e6:.0f} MB sent on {conns} conns, {refused} answered early",
        {"sent_bytes": sent[0], "statuses": statuses},
    )


async def _frame_in_flight(ctx: Context, size: int, stop: asyncio.Event) -> str:
    """Upgrade, then send all but the last byte of one `size`-byte text frame; hold."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: 127.0.0.1:{ctx.port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 101"):
            return head[9:12].decode(errors="replace")
        writer.write(b"\x81\xff" + struct.pack(">Q", size) + b"\0\0\0\0")  # mask 0
        chunk = b"a" * 65536
        for _ in range(size // len(chunk) - 1):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
        writer.write(chunk[:-1])
        await asyncio.wait_for(writer.drain(), 10)
        await stop.wait()
        return "held"
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    finally:
        writer.transport.abort()


async def slowframes(ctx: Context) -> Result:
    """300 sessions each with one 1 MiB frame in flight (all but its last byte)."""
    conns, size = (60, 1 << 20) if ctx.quick else (300, (1 << 20) - 64)
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(_frame_in_flight(ctx, size, stop)) for _ in range(conns)]
    await asyncio.sleep(8.0)  # time to send them (the RSS peak is sampled meanwhile)
    stop.set()
    outcomes = await asyncio.gather(*tasks)
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    return Result(True, f"{conns} frames of {size >> 10} KiB: {counts}", {"outcomes": counts})


def _host() -> bytes:
    return b"Host: 127.0.0.1\r\n"


async def httpedge(ctx: Context) -> Result:
    """CL+TE smuggling, bad chunk sizes, a 64 KB header in one read, Expect + oversize body."""
    out: dict[str, Any] = {}
    smuggle = (
        b"POST /v1/embeddings HTTP/1.1\r\n"
        + _host()
        + b"Content-Type: application/json\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /v1/backends HTTP/1.1\r\n" + _host() + b"\r\n"
    )
    r = await net.raw_http(ctx.port, [smuggle], 3)
    out["cl_te"] = r.statuses
    for name, size in (("chunk_zz", b"zz"), ("chunk_neg", b"-2")):
        req = (
            b"POST /v1/embeddings HTTP/1.1\r\n" + _host() + b"Content-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n"
        )
        out[name] = (await net.raw_http(ctx.port, [req], 3)).statuses
    big = b"GET /healthz HTTP/1.1\r\n" + _host() + b"X-Big: " + b"a" * 64_000 + b"\r\n\r\n"
    out["header_64k"] = (await net.raw_http(ctx.port, [big], 3)).statuses
    expect = (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\n"
        + _host()
        + b"Content-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
    )
    code, took = await net.first_status(ctx.port, [expect], 3)
    out["expect_oversize"] = [code, round(took, 2)]
    wrong = []
    if out["cl_te"] != [400]:
        wrong.append(f"CL+TE {out['cl_te']}")
    for k in ("chunk_zz", "chunk_neg"):
        if out[k][:1] != [400]:
            wrong.append(f"{k} {out[k]}")
    if out["header_64k"][:1] != [431]:
        wrong.append(f"64 KB header {out['header_64k']}")
    if code != 413:
        wrong.append(f"Expect+1 GB: {code}")
    return Result(not wrong, "; ".join(wrong) or "400, 400/400, 431, 413 at once", out)


def stub_only() -> tuple[str, dict[str, str], Callable[[], None]]:
    """A config whose one backend is the stub (espeak would take TTS first)."""
    return '[[backends]]\nname = "stub"\nkind = "stub"\n', {}, lambda: None


async def tts(ctx: Context) -> Result:
    """4 KB of long words at speed 0.25 to the stub TTS (a 4.2 KB request)."""
    words = "ab " * 1365  # 4095 characters, OpenAI's limit is 4096
    speech = {
        "model": "tts-1",
        "voice": "alloy",
        "input": words,
        "speed": 0.25,
        "response_format": "wav",
    }
    body = json.dumps(speech).encode()
    reply = await net.http(
        ctx.port, "POST", "/v1/audio/speech", body, {**JSON, "spear-backend": "stub"}, wait_s=60
    )
    ratio = reply.body_bytes / len(body)
    held = reply.body_bytes < 5_000_000
    return Result(
        held,
        f"{brief(reply)[:40]} {reply.body_bytes / 1e6:.1f} MB out ({ratio:.0f}x)",
        {"status": reply.status, "bytes": reply.body_bytes},
    )


async def browser(ctx: Context) -> Result:
    """Foreign / null Origin upgrades, a text/plain chat POST, a rebinding Host."""
    out: dict[str, Any] = {}
    for name, origin in (("ws_evil", "https://evil.example"), ("ws_null", "null")):
        conn, status = await net.ws_open(ctx.port, origin=origin)
        out[name] = status
        if conn is not None:
            await conn.close()
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = await net.http(
        ctx.port,
        "POST",
        "/v1/chat/completions",
        chat,
        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    out["chat_text_plain"] = r.status
    evil = {"Host": "evil.example:8787"}
    out["rebind_backends"] = (await net.http(ctx.port, "GET", "/v1/backends", b"", evil)).status
    r = await net.http(ctx.port, "POST", "/admin/reload", b"", evil)
    out["rebind_admin_reload"] = r.status
    open_ = [k for k, v in out.items() if v in (101, 200)]
    return Result(not open_, f"open: {', '.join(open_)}" if open_ else "all refused", out)


def speech_pcm24(seconds: float) -> bytes:
    """`seconds` of LibriVox lines joined, as 24 kHz pcm16."""
    import numpy as np
    import soundfile as sf
    import soxr

    parts, total = [], 0
    for path in sorted(Path("/work/shared/audio").glob("librivox_*.wav")):
        data, rate = sf.read(path, dtype="float32")
        parts.append(data)
        total += len(data) / rate
    audio = np.concatenate(parts)
    while len(audio) / 16000 < seconds:
        audio = np.concatenate([audio, audio])
    audio = audio[: int(seconds * 16000)]
    out = soxr.resample(audio, 16000, 24000)
    return bytes((np.clip(out, -1, 1) * 32767).astype("<i2").tobytes())


async def longspeech(ctx: Context) -> Result:
    """70 s of joined speech, server VAD, 2x real time, then 2 s of silence; ≤ 120 s wait."""
    seconds = 30.0 if ctx.quick else 70.0
    pcm = speech_pcm24(seconds) + b"\0" * 96_000
    conn, status = await net.ws_open(ctx.port)
    if conn is None:
        return Result(False, f"ws refused {status}")
    await net.ws_event(conn, 5)
    t0 = time.monotonic()
    seen: dict[str, Any] = {"first_delta_s": None, "completed": [], "errors": []}

    async def reader() -> None:
        while True:
            ev = await net.ws_event(conn, 130)
            if ev is None:
                return
            kind = ev.get("type", "")
            if kind.endswith("transcription.delta") and seen["first_delta_s"] is None:
                seen["first_delta_s"] = round(time.monotonic() - t0, 1)
            elif kind.endswith("transcription.completed"):
                seen["completed"].append(round(time.monotonic() - t0, 1))
            elif kind in ("error", "conversation.item.input_audio_transcription.failed"):
                seen["errors"].append(json.dumps(ev)[:200])

    task = asyncio.ensure_future(reader())
    step = 4800  # 100 ms
    for i in range(0, len(pcm), step):
        frame = base64.b64encode(pcm[i : i + step]).decode()
        await conn.send(json.dumps({"type": "input_audio_buffer.append", "audio": frame}))
        await asyncio.sleep(0.05)
    sent_s = time.monotonic() - t0
    try:
        await asyncio.wait_for(task, 120)
    except (TimeoutError, Exception):
        pass
    seen["close"] = net.close_code(conn)
    await conn.close()
    seen["audio_sent_s"] = round(sent_s, 1)
    done = seen["completed"]
    held = seen["first_delta_s"] is not None and bool(done)
    why = (
        f"first delta {seen['first_delta_s']} s, {len(done)} completed"
        f" (last {done[-1] if done else '–'} s), {len(seen['errors'])} errors"
    )
    return Result(held, why, seen)


async def wasm(ctx: Context) -> Result:
    """A guest looping over a host call; a guest creating 200k fds + 100k epolls."""
    return await attack_wasm.run(ctx.python, ctx.src, ctx.workdir, ctx.quick)


def secret_setup() -> tuple[str, dict[str, str], Callable[[], None]]:
    """The echoing upstream, and a config that sends chat to it with a key."""
    up = attack_secret.Upstream()
    return attack_secret.config(up.port), {attack_secret.ENV: attack_secret.KEY}, up.close


async def secret(ctx: Context) -> Result:
    """An upstream echoing the key: near the error cut, upper-cased, in a 2xx body."""
    return await attack_secret.run(ctx.port, ctx.log_text)


CLASSES: dict[str, AttackClass] = {
    "samplerate": AttackClass(samplerate, 60, rss_budget_mb=200),
    "redos": AttackClass(redos, 60),
    "deepjson": AttackClass(deepjson, 60),
    "badflood": AttackClass(badflood, 60, rss_budget_mb=200),
    "slowbody": AttackClass(slowbody, 45, rss_budget_mb=150),
    "slowframes": AttackClass(slowframes, 45, rss_budget_mb=150),
    "httpedge": AttackClass(httpedge, 30),
    "tts": AttackClass(tts, 60, rss_budget_mb=200, setup=stub_only),
    "browser": AttackClass(browser, 30),
    "secret": AttackClass(secret, 30, setup=secret_setup),
    "wasm": AttackClass(wasm, 90, needs_server=False),
    "longspeech": AttackClass(longspeech, 200, default=False),
}
