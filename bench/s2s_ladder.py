#!/usr/bin/env python3
"""Relay cost for conversation traffic: spear_rt vs the anchors' bare relay vs direct, per N.

The realtime ladder of realtime_load.py, for speech-to-speech conversations. Per N, one step
per target, fresh processes each:

* ``direct``: the generator talks to the fake upstream itself (the floor);
* ``uvloop``: the anchors' bare relay (``rt_relay_asyncio.py --uvloop``: frames forwarded
  unparsed) in front of the fake;
* ``spear``: ``spear-rt serve --loop L`` with one ``openai_realtime`` instance declaring
  ``supports_audio_output`` pointed at the fake (the relay path of a conversation: the session's
  conversation model, dialect rendering, stamping and replay buffering of every event).

The server under test runs alone on core 0; the fake and the generator share core 1.

The fake speech-to-speech upstream (``--serve-upstream``, in this file: a hand-written asyncio
Protocol on uvloop, GA dialect, kept cheap because it shares core 1) answers
``session.update``, commits (``committed`` + a transcript) and ``response.create``: the first
100 ms audio delta (pcm16 24 kHz, base64: 6.4 KB) at once, then one every ``--chunk-ms``,
``--chunks`` in all, each after a transcript delta, then ``response.done``.

Each generated session (hand-written client frames, masked once in advance) speaks a turn of
``--turn-ms`` as 20 ms appends at real-time pace, commits, sends ``response.create``, reads the
whole answer, and speaks the next turn; sessions start at random phases. Measured over the
window: **first audio** = ``response.create`` written -> first audio delta read; **chunk
latency** = audio delta k read - (``response.create`` written + k x chunk interval), i.e. both
hops' delay on every chunk; answers complete, audio chunks missing, error events, server CPU %
and RSS (psutil, the server's process tree), generator CPU. Added = target - direct at the
same N.

    .venv/bin/python bench/s2s_ladder.py --sessions 50,100,150 --out bench/results/s2s_ladder.json

Not part of spear_rt; 127.0.0.1 only; every step is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realtime_load as rl  # noqa: E402  (helpers: processes, CPU/RSS sampling, host info)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FRAME_BYTES = 960  # 20 ms of pcm16 at 24 kHz
CHUNK_BYTES = 4800  # 100 ms of answer audio
WBUF_LIMIT = 64 * 1024
MODEL = "bench-s2s"


# --- WebSocket framing (RFC 6455), both sides ------------------------------------------------


def frame(payload: bytes, opcode: int = 1, key: bytes | None = None) -> bytes:
    """One whole frame; masked when `key` is given (client side)."""
    n = len(payload)
    bit = 0x80 if key else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if not key:
        return head + payload
    return head + key + rl._mask(payload, key)


class FrameReader:
    """Whole messages out of a byte stream (no fragmentation: neither peer sends any)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append bytes; return the (opcode, payload) of every complete frame."""
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, at = struct.unpack_from("!H", self.buf, 2)[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                n, at = struct.unpack_from("!Q", self.buf, 2)[0], 10
            key = None
            if b1 & 0x80:
                key, at = bytes(self.buf[at : at + 4]), at + 4
            if len(self.buf) < at + n:
                break
            payload = bytes(self.buf[at : at + n])
            del self.buf[: at + n]
            out.append((b0 & 0x0F, rl._mask(payload, key) if key else payload))
        return out


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# --- the fake speech-to-speech upstream ------------------------------------------------------


def _answer_b64(chunks: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    pcm = rng.integers(-3000, 3000, CHUNK_BYTES // 2 * chunks, dtype=np.int16).tobytes()
    return [base64.b64encode(pcm[i : i + CHUNK_BYTES]) for i in range(0, len(pcm), CHUNK_BYTES)]


class UpstreamConn(asyncio.Protocol):
    """One upstream connection: a GA speech-to-speech conversation, answered by rule."""

    count = 0

    def __init__(self, audio: list[bytes], interval: float) -> None:
        UpstreamConn.count += 1
        self.tag = UpstreamConn.count
        self.audio, self.interval = audio, interval
        self.reader = FrameReader()
        self.head = bytearray()
        self.open = False
        self.ids = 0
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def _id(self, prefix: str) -> bytes:
        self.ids += 1
        return f"{prefix}_{self.tag}_{self.ids}".encode()

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame(payload))

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            key = next(ln.split(b":", 1)[1].strip() for ln in self.head[:end].split(b"\r\n")
                       if ln.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                                 + accept_key(key) + b"\r\n\r\n")  # fmt: skip
            self.open = True
            sid = self._id("sess").decode()
            session = {"id": sid, "object": "realtime.session", "type": "realtime", "model": MODEL}
            self.send(msgspec.json.encode({"type": "session.created", "session": session}))
            data, self.head = bytes(self.head[end + 4 :]), bytearray()
        for opcode, payload in self.reader.feed(data):
            if opcode == 1:
                self.message(payload)
            elif opcode == 9:
                self.send_control(10, payload)
            elif opcode == 8:
                self.send_control(8, payload[:2])
                assert self.transport is not None
                self.transport.close()

    def send_control(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame(payload, opcode))

    def message(self, payload: bytes) -> None:
        if b"input_audio_buffer.append" in payload[:64]:
            return  # the cheap path: audio is only counted by the client
        event = msgspec.json.decode(payload)
        kind = event.get("type")
        if kind == "session.update":
            self.send(msgspec.json.encode({"type": "session.updated", "session": event["session"]}))
        elif kind == "input_audio_buffer.commit":
            item = self._id("item").decode()
            self.send(msgspec.json.encode({"type": "input_audio_buffer.committed",
                                           "item_id": item, "previous_item_id": None}))  # fmt: skip
            self.send(msgspec.json.encode({
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item, "content_index": 0, "transcript": "a question"}))  # fmt: skip
        elif kind == "conversation.item.create":
            item = {"id": self._id("item").decode(), **event["item"], "status": "completed"}
            self.send(msgspec.json.encode({"type": "conversation.item.added", "item": item,
                                           "previous_item_id": None}))  # fmt: skip
        elif kind == "response.create":
            self.respond()
        elif kind == "response.cancel" and self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def respond(self) -> None:
        rid, iid = self._id("resp"), self._id("item")
        self.send(b'{"type":"response.created","response":{"id":"' + rid
                  + b'","object":"realtime.response","status":"in_progress",'
                  b'"output":[]}}')  # fmt: skip
        self.send(b'{"type":"response.output_item.added","response_id":"' + rid
                  + b'","output_index":0,"item":{"id":"' + iid + b'","object":"realtime.item",'
                  b'"type":"message","role":"assistant","status":"in_progress",'
                  b'"content":[]}}')  # fmt: skip
        ids = b'"response_id":"' + rid + b'","item_id":"' + iid + b'","output_index":0,' \
              b'"content_index":0'  # fmt: skip
        loop = asyncio.get_running_loop()
        start = loop.time()

        def chunk(k: int) -> None:
            if self.transport is None or self.transport.is_closing():
                return
            if k == len(self.audio):
                self.timer = None
                self.send(b'{"type":"response.done","response":{"id":"' + rid + b'",'
                          b'"object":"realtime.response","status":"completed","output":[],'
                          b'"usage":{"total_tokens":3,"input_tokens":1,'
                          b'"output_tokens":2}}}')  # fmt: skip
                return
            self.send(b'{"type":"response.output_audio_transcript.delta",' + ids
                      + b',"delta":"w "}')  # fmt: skip
            self.send(b'{"type":"response.output_audio.delta",' + ids + b',"delta":"'
                      + self.audio[k] + b'"}')  # fmt: skip
            self.timer = loop.call_at(start + (k + 1) * self.interval, chunk, k + 1)

        chunk(0)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


async def serve_upstream(args: argparse.Namespace) -> None:
    audio = _answer_b64(args.chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamConn(audio, args.chunk_ms / 1000), "127.0.0.1", args.port, backlog=2048
    )
    print(f"fake s2s upstream listening on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


# --- the load generator ----------------------------------------------------------------------


class Stats:
    """Everything the generator measures, over the window only."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.chunk: list[float] = []
        self.answers = self.short_answers = self.errors = self.dropped = 0
        self.connected = self.failed = self.closed_early = 0
        self.first_error = ""
        self.window = (0.0, 0.0)

    def timed(self, t: float) -> bool:
        return self.window[0] <= t <= self.window[1]


class GenSession(asyncio.Protocol):
    """One conversation: speak a turn, ask, hear the whole answer, again."""

    def __init__(self, gen: Gen, phase: float) -> None:
        self.gen, self.phase = gen, phase
        self.reader = FrameReader()
        self.head = bytearray()
        self.state = "handshake"
        self.ready = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0
        self.chunks = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        if self.state == "handshake":
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self._fail(self.head[:end].split(b"\r\n")[0].decode(errors="replace"))
                return
            self.state = "created"
            data = bytes(self.head[end + 4 :])
        for opcode, payload in self.reader.feed(data):
            if opcode == 1:
                self.event(payload)
            elif opcode == 8:
                self._fail("closed by the server")

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        elif self.state != "done":
            self.gen.stats.closed_early += 1
            self.gen.stats.first_error = self.gen.stats.first_error or why
        self.state = "done"
        if self.transport is not None:
            self.transport.abort()

    def event(self, payload: bytes) -> None:
        now = time.monotonic()
        stats = self.gen.stats
        if b'"response.output_audio.delta"' in payload[:80]:
            latency = now - self.sent_at - self.chunks * self.gen.interval  # s
            if self.chunks == 0 and stats.timed(self.sent_at):
                stats.first.append(latency)
            if stats.timed(self.sent_at):
                stats.chunk.append(latency)
            self.chunks += 1
            return
        kind = msgspec.json.decode(payload, type=dict[str, Any]).get("type")
        if kind == "session.created" and self.state == "created":
            self.state = "updating"
            self.write(self.gen.update)
        elif kind == "session.updated" and self.state == "updating":
            self.state = "talking"
            self.ready.set_result(None)
        elif kind == "response.done":
            if stats.timed(self.sent_at):
                stats.answers += 1
                stats.short_answers += self.chunks < self.gen.chunks
            self.chunks = 0
            self.speak()
        elif kind == "error":
            stats.errors += 1
            stats.first_error = stats.first_error or payload[:300].decode(errors="replace")

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > WBUF_LIMIT:
            self.gen.stats.dropped += 1
            return
        self.transport.write(data)

    def speak(self, first: bool = False) -> None:
        """The next turn: appends at real-time pace, then commit and response.create."""
        loop = asyncio.get_running_loop()
        start = loop.time() + (self.phase if first else 0.0)
        frames = self.gen.turn_frames

        def append(k: int) -> None:
            if self.state == "done" or loop.time() > self.gen.stop_at:
                return
            if k < frames:
                self.write(self.gen.append)
                loop.call_at(start + (k + 1) * 0.02, append, k + 1)
                return
            self.write(self.gen.commit)
            self.sent_at = time.monotonic()
            self.write(self.gen.create)

        loop.call_at(start, append, 0)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != "done":
            self._fail(f"connection lost: {exc!r}")


class Gen:
    """Pre-encoded frames and the shared settings of every session."""

    def __init__(self, args: argparse.Namespace, host: str, port: int, path: str) -> None:
        key = os.urandom(4)
        pcm = np.random.default_rng(3).integers(-2000, 2000, FRAME_BYTES // 2, dtype=np.int16)
        audio = base64.b64encode(pcm.tobytes())
        append = b'{"type":"input_audio_buffer.append","audio":"' + audio + b'"}'
        self.append = frame(append, 1, key)
        self.commit = frame(b'{"type":"input_audio_buffer.commit"}', 1, key)
        self.create = frame(b'{"type":"response.create"}', 1, key)
        session = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        self.update = frame(msgspec.json.encode({"type": "session.update", "session": session}),
                            1, key)  # fmt: skip
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()  # fmt: skip
        self.interval = args.chunk_ms / 1000
        self.chunks = args.chunks
        self.turn_frames = max(1, round(args.turn_ms / 20))
        self.stats = Stats()
        self.stop_at = float("inf")


async def run_generator(args: argparse.Namespace) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    gen = Gen(args, host, port, url.path + (f"?{url.query}" if url.query else ""))
    loop = asyncio.get_running_loop()
    cycle = gen.turn_frames * 0.02 + gen.chunks * gen.interval
    sessions: list[GenSession] = []
    sem = asyncio.Semaphore(20)

    async def connect() -> None:
        async with sem:
            try:
                _, s = await asyncio.wait_for(loop.create_connection(
                    lambda: GenSession(gen, random.uniform(0, cycle)), host, port), 10)  # fmt: skip
                await asyncio.wait_for(s.ready, args.connect_timeout)
                gen.stats.connected += 1
                sessions.append(s)
            except Exception as exc:
                gen.stats.failed += 1
                gen.stats.first_error = gen.stats.first_error or repr(exc)[:300]

    await asyncio.gather(*(connect() for _ in range(int(args.sessions))))
    server = rl._tree(args.server_pid)
    me = rl._tree(os.getpid())
    now = time.monotonic()
    gen.stats.window = (now + args.warmup, now + args.warmup + args.seconds)
    gen.stop_at = loop.time() + args.warmup + args.seconds
    for s in sessions:
        s.speak(first=True)
    await asyncio.sleep(args.warmup)
    cpu0, gcpu0, t0 = rl._cpu(server), rl._cpu(me), time.monotonic()
    rss_peak = 0
    while time.monotonic() < gen.stats.window[1]:
        await asyncio.sleep(1.0)
        rss_peak = max(rss_peak, rl._rss(server))
    elapsed = time.monotonic() - t0
    cpu1, gcpu1 = rl._cpu(server), rl._cpu(me)
    await asyncio.sleep(cycle + 1.0)  # the answers asked for in the window come in
    st = gen.stats
    for s in sessions:
        s.state = "done"
        if s.transport is not None:
            s.transport.write(frame(b"\x03\xe8", 8, os.urandom(4)))
            s.transport.close()
    turns = int(args.seconds / cycle * len(sessions))
    return {
        "sessions_connected": st.connected,
        "sessions_failed": st.failed,
        "closed_early": st.closed_early,
        "answers": st.answers,
        "answers_expected_approx": turns,
        "short_answers": st.short_answers,
        "errors": st.errors,
        "dropped_at_source": st.dropped,
        "first_error": st.first_error,
        "first_audio_ms": rl._summary_ms(st.first),
        "chunk_ms": rl._summary_ms(st.chunk),
        "server_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 1) if server else None,
        "server_rss_mb": round(rss_peak / 2**20, 1) if server else None,
        "gen_cpu_pct": round((gcpu1 - gcpu0) / elapsed * 100, 1),
    }


def gen_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run_generator(args))), flush=True)


# --- the ladder --------------------------------------------------------------------------------


def spear_config(up_port: int, n: int) -> str:
    """One speech-to-speech instance on the fake; room for N sessions."""
    return "\n".join([
        "[server]", f"max_sessions = {max(1000, n + 100)}", "",
        "[[backends]]", f'name = "{MODEL}"', 'kind = "openai_realtime"',
        f'base_url = "http://127.0.0.1:{up_port}/v1"',
        'features = ["supports_stream", "supports_bidi_stream", "supports_audio_input", '
        '"supports_audio_output"]', "",
    ])  # fmt: skip


def run_step(args: argparse.Namespace, mode: str, n: int, logdir: Path) -> dict[str, Any]:
    """One N against one target, fresh processes, everything stopped after."""
    step = rl.Step()
    rec: dict[str, Any] = {"target": mode, "n": n}
    tag = f"{mode}-{n}"
    try:
        up_port = rl.free_port()
        up_cmd = [*rl.taskset(args.gen_cpu), sys.executable, __file__, "--serve-upstream",
                  "--port", str(up_port), "--chunks", str(args.chunks),
                  "--chunk-ms", str(args.chunk_ms)]  # fmt: skip
        up = step.spawn(up_cmd, logdir / f"{tag}-upstream.log")
        rl.wait_for_log(logdir / f"{tag}-upstream.log", r"listening on", up, 20)
        server_pid, port = 0, up_port
        if mode == "uvloop":
            port = rl.free_port()
            cmd = [*rl.taskset(args.server_cpu), sys.executable,
                   str(rl.ANCHORS / "rt_relay_asyncio.py"), "--port", str(port),
                   "--upstream", f"ws://127.0.0.1:{up_port}", "--uvloop"]  # fmt: skip
            p = step.spawn(cmd, logdir / f"{tag}-relay.log")
            rl.wait_for_log(logdir / f"{tag}-relay.log", r"relay\(", p, 20)
            server_pid, rec["server_cmd"] = p.pid, shlex.join(cmd)
        elif mode.startswith("spear"):
            cfg = logdir / f"{tag}.toml"
            cfg.write_text(spear_config(up_port, n))
            cmd = [*rl.taskset(args.server_cpu), sys.executable, "-m", "spear_rt.cli",
                   "serve", "--listen", "127.0.0.1:0", "--loop", args.loop,
                   "--config", str(cfg)]  # fmt: skip
            p = step.spawn(cmd, logdir / f"{tag}-server.log")
            m = rl.wait_for_log(logdir / f"{tag}-server.log",
                                r"listening on http://127\.0\.0\.1:(\d+)", p, 60)  # fmt: skip
            server_pid, port, rec["server_cmd"] = p.pid, int(m.group(1)), shlex.join(cmd)
        gen_cmd = [*rl.taskset(args.gen_cpu), sys.executable, __file__, "--gen",
                   "--url", f"ws://127.0.0.1:{port}/v1/realtime?model={MODEL}",
                   "--sessions", str(n), "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup), "--chunks", str(args.chunks),
                   "--chunk-ms", str(args.chunk_ms), "--turn-ms", str(args.turn_ms),
                   "--server-pid", str(server_pid)]  # fmt: skip
        budget = args.connect_timeout + args.warmup + args.seconds + 40
        out = subprocess.run(gen_cmd, capture_output=True, timeout=budget, check=False)
        line = next((ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")), None)
        if line is None:
            rec["error"] = f"generator exit {out.returncode}: {out.stderr.decode()[-800:]}"
        else:
            rec.update(json.loads(line))
    except Exception as exc:
        rec["error"] = repr(exc)[:800]
    finally:
        step.close()
        if mode.startswith("spear"):
            rec["server_log"] = rl.scan_log(logdir / f"{tag}-server.log")
    return rec


def _label(mode: str, loop: str) -> str:
    return {"direct": "direct (fake upstream)", "uvloop": "bare relay (anchor, uvloop)"}.get(
        mode, f"spear_rt/{loop}"
    )


def table(rows: list[dict[str, Any]], loop: str) -> str:
    direct = {r["n"]: r for r in rows if r["target"] == "direct" and "chunk_ms" in r}
    head = ("| target | N | ok/fail/early | answers (short) | first audio p50 / p99 ms "
            "| chunk p50 / p99 ms | +chunk p99 vs direct | server CPU % | RSS MB | errors "
            "| dropped | gen CPU % |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = _label(r["target"], loop)
        if "chunk_ms" not in r:
            lines.append(f"| {name} | {r['n']} | {str(r.get('error'))[:100]} |" + " |" * 9)
            continue
        f, c = r["first_audio_ms"], r["chunk_ms"]
        add = "-"
        if r["target"] != "direct" and r["n"] in direct and c["p99"] is not None:
            add = rl._f(c["p99"] - direct[r["n"]]["chunk_ms"]["p99"])
        lines.append(
            f"| {name} | {r['n']} | {r['sessions_connected']}/{r['sessions_failed']}/"
            f"{r['closed_early']} | {r['answers']} ({r['short_answers']}) "
            f"| {rl._f(f['p50'])} / {rl._f(f['p99'])} | {rl._f(c['p50'])} / {rl._f(c['p99'])} "
            f"| {add} | {rl._f(r['server_cpu_pct'], 0)} | {rl._f(r['server_rss_mb'], 1)} "
            f"| {r['errors']} | {r['dropped_at_source']} | {rl._f(r['gen_cpu_pct'], 0)} |"
        )
    return "\n".join(lines)


def main_ladder(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.targets.split(",") if m.strip()]
    if "uvloop" in modes and not (rl.ANCHORS / "rt_relay_asyncio.py").exists():
        raise SystemExit(f"the bare relay needs {rl.ANCHORS} (set SPEAR_ANCHORS)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="s2s-ladder-") as tmp:
        for n in [int(x) for x in args.sessions.split(",")]:
            for mode in modes:
                rl.log(f"{mode} N={n}")
                rows.append(run_step(args, mode, n, Path(tmp)))
                time.sleep(args.pause)
    print(table(rows, args.loop))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": rl.host_info(), "args": vars(args), "rows": rows}, indent=1))
    rl.log(f"wrote {out}")
    return 0 if all("chunk_ms" in r for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", default="50,100,150", help="N, or a comma list")
    ap.add_argument("--targets", default="direct,uvloop,spear", help="direct,uvloop,spear")
    ap.add_argument("--loop", default="uvloop", help="spear_rt's event loop")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per step")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--chunks", type=int, default=10, help="100 ms audio deltas per answer")
    ap.add_argument("--chunk-ms", type=float, default=100.0, help="upstream pace per chunk")
    ap.add_argument("--turn-ms", type=float, default=1000.0, help="user audio per turn")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--gen-cpu", type=int, default=1)
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--out", default=str(rl.RESULTS / "s2s_ladder.json"))
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--gen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_upstream:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(serve_upstream(args))
        return 0
    if args.gen:
        gen_main(args)
        return 0
    return main_ladder(args)


if __name__ == "__main__":
    sys.exit(main())
