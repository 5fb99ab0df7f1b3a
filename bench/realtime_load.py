#!/usr/bin/env python3
"""Realtime load bench: N concurrent transcription sessions against spear_rt at real-time pace.

What one step does (one N, one target):

1. start a fresh server pinned to core 0 (``taskset -c 0``): spear_rt on ``--loop`` with a temp
   config that holds only ``--backend``; or, with ``--compare``, the anchors' bare relay
   (``rt_relay_asyncio.py --uvloop``) in front of the anchors' fake upstream (``rt_upstream.py``,
   core 1), and ``direct`` (generator straight to ``rt_upstream.py``);
2. run the load generator in its own process pinned to core 1: N sessions in one uvloop
   process, each a hand-written WebSocket client whose frames were masked once in advance;
3. stop the server, record one JSON object.

Each session connects to ``/v1/realtime?intent=transcription`` (``OpenAI-Beta: realtime=v1``),
sends ``transcription_session.update`` (``turn_detection: null``, or server VAD with ``--vad``),
waits for ``transcription_session.updated``, then streams the fixture audio (16 kHz WAVs
resampled once to pcm16 24 kHz, looped, each session at its own offset) as 20 ms appends
(960 bytes -> base64 JSON, encoded and masked once) every 20 ms. Session phases are spread
over 1 ms slots; commit phases are spread over the turn. Every ``--turn-seconds`` a session
sends ``input_audio_buffer.commit``.

Measured over the window (after ``--warmup``; late answers are awaited ``--drain`` seconds):

* delta latency: from writing the append that completes a 200 ms block of turn audio to
  reading the transcription delta it triggers (stub backend: one delta per 10 appends of a
  turn; anchors' upstream: one per 10 appends of the connection), matched FIFO per session;
  with ``--vad`` the block is located from ``speech_started.audio_start_ms`` instead, and
  blocks that were already complete when the turn opened are not timed;
* commit -> ``...transcription.completed`` latency (``--vad``: speech_stopped -> completed);
* sessions connected / failed / closed early, ``error`` events, appends dropped at the source
  because a session's write buffer held more than 64 KiB (that is backpressure);
* server CPU % and RSS (psutil, server process tree, RSS sampled every second), generator CPU %,
  per-core busy %.

Fault mode (``--fault none,client:T,upstream:T,...``): drop client sockets and/or spear_rt's
upstream connections while N sessions stream; reports events lost, resume time and RSS per
session. It lives in faults.py, fault_client.py and fault_net.py next to this file.

Relay table (``--compare --load anchors``, bench/anchor_load.py): issue 16's side-by-side run.
The anchors' own generator and fake upstream for every target; spear_rt relays through an
``openai_realtime`` instance.

Conversations (``--kind conversation``): the same two runs for speech-to-speech sessions.
The ladder (with ``--compare``: side by side with the bare relay and direct) is s2s_ladder.py:
user turns as appends, answers of 100 ms audio deltas from a fake speech-to-speech upstream,
chunk latency per answer. ``--fault`` is s2s_faults.py: N conversations through
tests/fakes/s2s_upstream.py, ``client:T`` one random client killed every T s, ``upstream:T``
one random upstream connection reset every T s; audio lost/duplicated, items restored.

Not part of spear_rt: a bench. Binds and connects to 127.0.0.1 only; every step is bounded in
time. See bench/README.md for commands and how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import glob
import json
import os
import platform
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ANCHORS = Path(os.environ.get("SPEAR_ANCHORS", "/work/shared/anchors"))
DEFAULT_FIXTURE = str(REPO / "fixtures" / "audio" / "speech_*.wav")

RATE_HZ = 24000
FRAME_MS = 20
FRAME_SAMPLES = RATE_HZ * FRAME_MS // 1000  # 480 samples = 960 bytes of pcm16
BLOCK_SAMPLES = RATE_HZ * 200 // 1000  # the stub's block: one delta per 200 ms of turn audio
BLOCK_APPENDS = BLOCK_SAMPLES // FRAME_SAMPLES  # 10
PERIOD = FRAME_MS / 1000
SLOTS = 20  # 1 ms slots per 20 ms period
WBUF_LIMIT = 64 * 1024
TS_RING = 1024  # write times kept per session for --vad matching (~20 s of appends)

perf = time.perf_counter


# =============================================================================================
# load generator (runs in its own process: `realtime_load.py --gen ...`)
# =============================================================================================


def _mask(payload: bytes, key: bytes) -> bytes:
    import numpy as np

    data = np.frombuffer(payload, dtype=np.uint8)
    keys = np.resize(np.frombuffer(key, dtype=np.uint8), data.size)
    return (data ^ keys).tobytes()


def client_frame(payload: bytes, opcode: int = 1, key: bytes | None = None) -> bytes:
    """One complete, masked client frame (RFC 6455)."""
    key = key or os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


def fixture_pcm(pattern: str) -> tuple[list[bytes], list[str]]:
    """The fixture clips end to end at 24 kHz, as raw pcm16 bytes of one 20 ms frame each."""
    import numpy as np

    from spear_rt.audio import load_audio, pcm16_to_bytes, resample

    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no fixture matches {pattern!r}")
    parts = []
    for f in files:
        pcm, rate = load_audio(f)
        parts.append(resample(pcm, rate, RATE_HZ))
    pcm = np.concatenate(parts)
    pcm = pcm[: len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES]
    raw = [pcm16_to_bytes(pcm[i : i + FRAME_SAMPLES]) for i in range(0, len(pcm), FRAME_SAMPLES)]
    return raw, [os.path.basename(f) for f in files]


def append_frame(pcm: bytes, key: bytes) -> bytes:
    """One masked `input_audio_buffer.append` frame of raw pcm16 bytes."""
    payload = b'{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(pcm) + b'"}'
    return client_frame(payload, 1, key)


def fixture_frames(pattern: str, key: bytes) -> tuple[list[bytes], list[str], float]:
    """Pre-encoded, pre-masked append frames of the fixture clips, end to end (looped by caller)."""
    raw, files = fixture_pcm(pattern)
    return [append_frame(pcm, key) for pcm in raw], files, len(raw) * FRAME_MS / 1000


class Gen:
    """Shared settings and counters of one generator run."""

    def __init__(self, args: argparse.Namespace, frames: list[bytes]) -> None:
        self.frames = frames
        self.nframes = len(frames)
        self.protocol = args.protocol  # "spear" | "anchor"
        self.vad = args.vad
        self.manual = not args.vad
        # stub and the anchors' upstream answer one delta per 10 appends: time each one
        self.block_match = args.protocol == "anchor" or args.backend == "stub"
        self.block_scope_turn = (
            args.protocol == "spear"
        )  # stub counts per turn, anchor per connection
        self.expect_completed = args.protocol == "spear"
        self.turn_appends = max(1, round(args.turn_seconds * 1000 / FRAME_MS))
        key = os.urandom(4)
        # early_deltas: a turn's deltas as they are decoded (what this bench times), not held
        # until its commit announces the item (the SDKs' default since the delta-order fix)
        session: dict[str, Any] = {"input_audio_format": "pcm16", "turn_detection": None,
                                   "spear": {"early_deltas": True}}  # fmt: skip
        if args.vad:
            session["turn_detection"] = {"type": "server_vad"}
        self.update_frame = client_frame(
            json.dumps({"type": "transcription_session.update", "session": session}).encode(),
            1,
            key,
        )
        self.commit_frame = client_frame(b'{"type":"input_audio_buffer.commit"}', 1, key)
        # counters (window only unless named otherwise)
        self.lat: list[float] = []
        self.commit_lat: list[float] = []
        self.expected = 0
        self.commits_expected = 0
        self.sent_win = 0
        self.dropped_win = 0
        self.throttled_win = 0
        self.missing_deltas = 0
        self.unexpected_deltas = 0
        self.deltas_all = 0
        self.vad_retro = 0
        self.vad_unmatched = 0
        self.speech_started = 0
        self.completed_all = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.other_msgs = 0
        self.closed_early = 0
        self.close_codes: collections.Counter[str] = collections.Counter()
        self.late_slots = 0


class Session(asyncio.Protocol):
    """One realtime session: a hand-written WebSocket client on an asyncio Protocol."""

    def __init__(self, gen: Gen, request: bytes, offset: int) -> None:
        self.g = gen
        self.request = request
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.hs = False
        self.t: asyncio.Transport | None = None
        self.closed = False
        self.pos = offset
        self.turn_n = 0
        self.turn_len = gen.turn_appends
        self.turn_no = 0
        self.total_n = 0
        self.pending: collections.deque[tuple[float, bool, int]] = collections.deque()
        self.pending_commit: collections.deque[tuple[float, bool, int]] = collections.deque()
        # --vad bookkeeping: write time of the w-th written append, ring-indexed
        self.written = 0
        self.ts = [0.0] * TS_RING
        self.ts_meas = [False] * TS_RING
        self.vad_item: str | None = None
        self.vad_start = 0
        self.vad_k = 0
        self.vad_t0 = 0.0
        self.stopped: collections.deque[tuple[float, bool]] = collections.deque()

    # --- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if self.hs:
                self.g.closed_early += 1
                self.g.close_codes["eof"] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during setup: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = perf()
        buf = self.buf
        buf += data
        if not self.hs:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if not status.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(status.decode("latin-1")))
                self.closed = True
                self.t.close()
                return
            del buf[: i + 4]
            self.hs = True
            self.t.write(self.g.update_frame)
            if self.g.protocol == "anchor" and not self.ready.done():
                self.ready.set_result(True)  # the fake upstream answers nothing to the update
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            h = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                h = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                h = 10
            if b1 & 0x80:
                h += 4  # a masked server frame is a protocol error; skip it
            end = pos + h + n
            if end > size:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                self._text(buf, pos + h, end, now)
            elif op == 9:
                self.t.write(client_frame(bytes(buf[pos + h : end]), 0xA))
            elif op == 8:
                code = str(int.from_bytes(buf[pos + h : pos + h + 2], "big")) if n >= 2 else "1005"
                if not self.closed:
                    self.closed = True
                    self.g.closed_early += 1
                    self.g.close_codes[code] += 1
                    self.t.write(client_frame(bytes(buf[pos + h : pos + h + 2]), 0x8))
                    self.t.close()
                else:
                    self.g.close_codes[code + " (answer)"] += 1
                pos = end
                break
            else:
                self.g.other_msgs += 1
            pos = end
        if pos:
            del buf[:pos]

    # --- events ------------------------------------------------------------------------------

    def _text(self, buf: bytearray, start: int, end: int, now: float) -> None:
        g = self.g
        i = buf.find(b'"type":"', start, min(end, start + 80))
        if i < 0:
            g.other_msgs += 1
            return
        j = buf.find(b'"', i + 8, end)
        kind = bytes(buf[i + 8 : j])
        if kind == b"conversation.item.input_audio_transcription.delta":
            g.deltas_all += 1
            if g.vad:
                self._vad_delta(json.loads(bytes(buf[start:end])), now)
            elif g.block_match:
                if self.pending:
                    t0, meas, _turn = self.pending.popleft()
                    if meas:
                        g.lat.append(now - t0)
                else:
                    g.unexpected_deltas += 1
        elif kind == b"conversation.item.input_audio_transcription.completed":
            g.completed_all += 1
            if g.vad:
                if self.stopped:
                    t0, meas = self.stopped.popleft()
                    if meas:
                        g.commit_lat.append(now - t0)
            elif self.pending_commit:
                t0, meas, turn = self.pending_commit.popleft()
                if meas:
                    g.commit_lat.append(now - t0)
                # every delta of that turn comes before its completed: the rest never will
                while self.pending and self.pending[0][2] <= turn:
                    _, m, _ = self.pending.popleft()
                    if m:
                        g.missing_deltas += 1
        elif kind == b"input_audio_buffer.speech_started":
            ev = json.loads(bytes(buf[start:end]))
            g.speech_started += 1
            self.vad_item = ev.get("item_id")
            self.vad_start = int(ev.get("audio_start_ms", 0)) * RATE_HZ // 1000
            self.vad_k = 0
            self.vad_t0 = now
        elif kind == b"input_audio_buffer.speech_stopped":
            meas = self.ts_meas[(self.written - 1) % TS_RING]
            self.stopped.append((now, meas))
            if meas:
                g.commits_expected += 1
        elif kind in (b"transcription_session.updated", b"session.updated"):
            if not self.ready.done():
                self.ready.set_result(True)
        elif kind == b"error":
            g.errors += 1
            if len(g.first_errors) < 3:
                g.first_errors.append(
                    bytes(buf[start : min(end, start + 400)]).decode("utf-8", "replace")
                )
        else:
            g.other_msgs += 1

    def _vad_delta(self, ev: dict[str, Any], now: float) -> None:
        g = self.g
        if ev.get("item_id") != self.vad_item:
            g.vad_unmatched += 1
            return
        self.vad_k += 1
        if not g.block_match:
            return
        block_end = self.vad_start + self.vad_k * BLOCK_SAMPLES
        w = (block_end + FRAME_SAMPLES - 1) // FRAME_SAMPLES - 1  # written append holding it
        if w < 0 or w >= self.written or self.written - w > TS_RING:
            g.vad_unmatched += 1
            return
        t0 = self.ts[w % TS_RING]
        if t0 < self.vad_t0:
            g.vad_retro += 1  # complete before the turn opened: sent in one go, not timed
            return
        if self.ts_meas[w % TS_RING]:
            g.lat.append(now - t0)

    # --- sending -----------------------------------------------------------------------------

    def tick(self, meas: bool) -> None:
        """Real-time pace: one append now; over 64 KiB buffered it is dropped (audio lost)."""
        g = self.g
        t = self.t
        if self.closed or t.get_write_buffer_size() > WBUF_LIMIT:
            self.pos = (self.pos + 1) % g.nframes
            if meas:
                g.dropped_win += 1
            return
        self._send(t, g, meas)

    def tick_fast(self, meas: bool, count: int) -> None:
        """Fast pace: `count` appends now; over 64 KiB buffered the session waits (no loss)."""
        g = self.g
        t = self.t
        for _ in range(count):
            if self.closed or t.get_write_buffer_size() > WBUF_LIMIT:
                if meas:
                    g.throttled_win += 1
                return
            self._send(t, g, meas)

    def _send(self, t: asyncio.Transport, g: Gen, meas: bool) -> None:
        t.write(g.frames[self.pos])
        self.pos += 1
        if self.pos == g.nframes:
            self.pos = 0
        if meas:
            g.sent_win += 1
        if g.vad:
            w = self.written % TS_RING
            self.ts[w] = perf()
            self.ts_meas[w] = meas
            self.written += 1
            return
        self.turn_n += 1
        if g.block_match:
            if g.block_scope_turn:
                due = self.turn_n % BLOCK_APPENDS == 0
            else:
                self.total_n += 1
                due = self.total_n % BLOCK_APPENDS == 0
            if due:
                self.pending.append((perf(), meas, self.turn_no))
                if meas:
                    g.expected += 1
        if self.turn_n >= self.turn_len:
            t.write(g.commit_frame)
            if g.expect_completed:
                self.pending_commit.append((perf(), meas, self.turn_no))
                if meas:
                    g.commits_expected += 1
            self.turn_no += 1
            self.turn_n = 0
            self.turn_len = g.turn_appends

    def close(self) -> None:
        if not self.closed and self.t is not None:
            self.closed = True
            try:
                self.t.write(client_frame(struct.pack("!H", 1000), 0x8))
            except Exception:
                pass


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def _summary_ms(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    out: dict[str, float | None] = {"count": len(values)}  # type: ignore[dict-item]
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        v = _pct(values, q)
        out[name] = None if v is None else round(1000 * v, 2)
    return out


def _tree(pid: int) -> list[Any]:
    import psutil

    if not pid:
        return []
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def _rss(procs: list[Any]) -> int:
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


async def run_generator(args: argparse.Namespace) -> dict[str, Any]:
    from urllib.parse import urlsplit

    import psutil

    loop = asyncio.get_running_loop()
    key = os.urandom(4)
    frames, files, fixture_s = fixture_frames(args.fixture, key)
    g = Gen(args, frames)
    n = args.sessions_n
    u = urlsplit(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    headers = "".join(f"{h}\r\n" for h in ["OpenAI-Beta: realtime=v1", *args.header])
    sessions: list[Session] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(64)

    async def open_one(i: int) -> None:
        ws_key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
        s = Session(g, request, (i * 997) % g.nframes)
        async with sem:
            try:
                await asyncio.wait_for(loop.create_connection(lambda: s, host, port), 10)
                await asyncio.wait_for(s.ready, 15)
                sessions.append(s)
            except Exception as exc:
                failures.append(repr(exc)[:300])
                if s.t is not None:
                    s.t.abort()

    t0 = perf()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(open_one(i) for i in range(n))), args.connect_timeout
        )
    except TimeoutError:
        failures.append("connect phase timed out")
    connect_s = perf() - t0
    await asyncio.sleep(0.3)

    # spread commit phases over the turn (first turns are 10..turn_appends appends long)
    m = max(1, len(sessions))
    for k, s in enumerate(sessions):
        first = g.turn_appends - (k * g.turn_appends // m) // BLOCK_APPENDS * BLOCK_APPENDS
        s.turn_len = first if first > 0 else g.turn_appends
    buckets = [sessions[k::SLOTS] for k in range(SLOTS)]

    server = _tree(args.server_pid)
    upstream = _tree(args.upstream_pid)
    me = psutil.Process()
    rss_series: list[tuple[float, int]] = []

    async def sampler() -> None:
        while True:
            rss_series.append((perf(), _rss(server)))
            await asyncio.sleep(1.0)

    fast = args.pace == "fast"
    per_tick = args.fast_factor
    t_start = loop.time() + 0.05
    t_meas0 = t_start + args.warmup
    t_meas1 = t_meas0 + args.seconds
    snap: dict[str, Any] = {}
    samp = None
    k = 0
    while sessions:
        due = t_start + k * (PERIOD / SLOTS)
        if due >= t_meas1:
            break
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.005:
            g.late_slots += 1
        meas = due >= t_meas0
        if meas and not snap:
            snap = {
                "t": perf(),
                "server": _cpu(server),
                "up": _cpu(upstream),
                "me": me.cpu_times(),
                "cores": psutil.cpu_times(percpu=True),
            }
            samp = asyncio.ensure_future(sampler())
        if fast:
            for s in buckets[k % SLOTS]:
                s.tick_fast(meas, per_tick)
        else:
            for s in buckets[k % SLOTS]:
                s.tick(meas)
        k += 1
    if not snap:  # nothing connected
        snap = {
            "t": perf(),
            "server": _cpu(server),
            "up": _cpu(upstream),
            "me": me.cpu_times(),
            "cores": psutil.cpu_times(percpu=True),
        }
    t_end = perf()
    server_cpu = _cpu(server)
    up_cpu = _cpu(upstream)
    me_cpu = me.cpu_times()
    cores = psutil.cpu_times(percpu=True)
    rss_series.append((perf(), _rss(server)))
    if samp:
        samp.cancel()
    win = max(1e-9, t_end - snap["t"])

    def outstanding() -> bool:
        if g.vad:
            return any(s.stopped for s in sessions if not s.closed)
        return (len(g.lat) + g.missing_deltas < g.expected and g.block_match) or (
            g.expect_completed and len(g.commit_lat) < g.commits_expected
        )

    deadline = perf() + args.drain
    while perf() < deadline and outstanding():  # noqa: ASYNC110 - a bounded poll is simplest
        await asyncio.sleep(0.05)
    lost_deltas = sum(1 for s in sessions for (_, m_, _) in s.pending if m_)
    lost_commits = sum(1 for s in sessions for (_, m_, _) in s.pending_commit if m_)
    for s in sessions:
        s.close()
    await asyncio.sleep(0.5)
    for s in sessions:
        if s.t is not None:
            s.t.abort()

    def busy(c0: Any, c1: Any) -> float | None:
        tot = sum(c1) - sum(c0)
        idle = (c1.idle + c1.iowait) - (c0.idle + c0.iowait)
        return round(100 * (tot - idle) / tot, 1) if tot > 0 else None

    offered = n * (1000 // FRAME_MS) * (per_tick if fast else 1)
    sent_aps = g.sent_win / args.seconds
    if g.block_match and g.expected:
        achieved = 100 * len(g.lat) / g.expected * min(1.0, sent_aps / offered)
    elif g.commits_expected:
        achieved = 100 * len(g.commit_lat) / g.commits_expected * min(1.0, sent_aps / offered)
    else:
        achieved = 100 * min(1.0, sent_aps / offered) if not g.block_match else 0.0
    rss_vals = [r for _, r in rss_series if r]
    res: dict[str, Any] = {
        "n": n,
        "connected": len(sessions),
        "conn_failures": len(failures),
        "connect_s": round(connect_s, 2),
        "window_s": round(win, 2),
        "offered_aps": offered,
        "sent_aps": round(sent_aps, 1),
        "achieved_pct": round(achieved, 2),
        "deltas_expected": g.expected,
        "deltas_received": len(g.lat),
        "deltas_missing": g.missing_deltas,
        "deltas_unanswered": lost_deltas,
        "deltas_unexpected": g.unexpected_deltas,
        "deltas_all": g.deltas_all,
        "commits_expected": g.commits_expected,
        "commits_completed": len(g.commit_lat),
        "commits_unanswered": lost_commits,
        "completed_all": g.completed_all,
        "dropped_at_source": g.dropped_win,
        "throttled": g.throttled_win,
        "late_slots": g.late_slots,
        "closed_early": g.closed_early,
        "close_codes": dict(g.close_codes),
        "errors": g.errors,
        "first_errors": g.first_errors,
        "other_msgs": g.other_msgs,
        "delta_ms": _summary_ms(g.lat),
        "commit_ms": _summary_ms(g.commit_lat),
        "server_cpu_pct": round(100 * (server_cpu - snap["server"]) / win, 1) if server else None,
        "server_rss_mb": {
            "start": round(rss_vals[0] / 2**20, 1) if rss_vals else None,
            "end": round(rss_vals[-1] / 2**20, 1) if rss_vals else None,
            "max": round(max(rss_vals) / 2**20, 1) if rss_vals else None,
        },
        "upstream_cpu_pct": round(100 * (up_cpu - snap["up"]) / win, 1) if upstream else None,
        "gen_cpu_pct": round(
            100 * ((me_cpu.user + me_cpu.system) - (snap["me"].user + snap["me"].system)) / win, 1
        ),
        "core_busy_pct": [busy(a, b) for a, b in zip(snap["cores"], cores, strict=False)],
        "foreign_cpu_pct": None,
        "fixture_files": files,
        "fixture_s": round(fixture_s, 2),
    }
    # CPU of everything else on the machine (other jobs on a shared VM spoil a step)
    busy_total = sum(
        ((sum(b) - b.idle - b.iowait) - (sum(a) - a.idle - a.iowait))
        for a, b in zip(snap["cores"], cores, strict=False)
    )
    ours = (
        (server_cpu - snap["server"])
        + (up_cpu - snap["up"])
        + ((me_cpu.user + me_cpu.system) - (snap["me"].user + snap["me"].system))
    )
    res["foreign_cpu_pct"] = round(100 * (busy_total - ours) / win, 1)
    if g.vad:
        res["vad"] = {
            "speech_started": g.speech_started,
            "retro_blocks": g.vad_retro,
            "unmatched_deltas": g.vad_unmatched,
        }
    if failures:
        res["first_failure"] = failures[0]
    return res


def gen_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # the bench still runs, the generator is just slower
        runner = asyncio.run
    res = runner(run_generator(args))
    print(json.dumps(res), flush=True)


# =============================================================================================
# orchestration (ladder, servers, table, plot)
# =============================================================================================


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


NICE: int = 0  # --nice: every process of a step runs at this niceness
RT_PRIO: int = 0  # --rt-prio: ... or under SCHED_FIFO at this priority


def taskset(cpu: int | None) -> list[str]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    if RT_PRIO:
        pin += ["chrt", "-f", str(RT_PRIO)]
    if NICE:
        pin += ["nice", "-n", str(NICE)]
    return pin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_generator_process(
    gen_cmd: list[str], budget: float, rec: dict[str, Any]
) -> dict[str, Any] | None:
    """Run a load generator to its end (bounded by `budget` s): its one JSON result line, or
    None with `rec["error"]` saying why there is none."""
    try:
        out = subprocess.run(gen_cmd, capture_output=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired:
        rec["error"] = f"generator timed out after {budget} s"
        return None
    line = next((ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")), None)
    if line is None:
        rec["error"] = f"generator exit {out.returncode}: {out.stderr.decode()[-1500:]}"
        return None
    result: dict[str, Any] = json.loads(line)
    return result


def wait_for_log(
    path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{path.name}: exited with {proc.returncode}: {text[-800:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{path.name}: no {pattern!r} within {timeout} s")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM our own child by its pid, SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def server_config(backend: str, n: int) -> str:
    lines = []
    if n > 900:  # the default max_sessions is 1000
        lines += ["[server]", f"max_sessions = {n + 100}", ""]
    lines += ["[[backends]]", f'name = "{backend}"', f'kind = "{backend}"', ""]
    return "\n".join(lines)


def http_json(port: int, path: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def scan_log(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace") if path.exists() else ""
    bad = [
        ln
        for ln in text.splitlines()
        if re.search(r"Traceback|ERROR|Error|Exception|crash|WARNING", ln)
    ]
    return {"problem_lines": len(bad), "first_problems": bad[:8]}


class Step:
    """Processes of one step; always stopped in `close`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        f = open(log_path, "wb")
        self.logs.append(f)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> list[int | None]:
        codes = [stop(p) for p in reversed(self.procs)]
        for f in self.logs:
            f.close()
        return codes


def wait_quiet(args: argparse.Namespace) -> float | None:
    """Wait (bounded) until other jobs leave the CPUs alone; returns the busy % last seen."""
    import psutil

    if args.quiet_wait <= 0:
        return None
    deadline = time.monotonic() + args.quiet_wait
    busy = 0.0
    while True:
        busy = sum(psutil.cpu_percent(interval=1.0, percpu=True))
        if busy < args.quiet_busy or time.monotonic() > deadline:
            return round(busy, 1)
        log(f"  machine busy ({busy:.0f} % of a core used by others); waiting")


def run_step(args: argparse.Namespace, mode: str, n: int, logdir: Path, tag: str) -> dict[str, Any]:
    """One N against one target: fresh processes, one generator run, everything stopped."""
    step = Step()
    rec: dict[str, Any] = {
        "target": mode,
        "n": n,
        "backend": args.backend if mode.startswith(("spear", "attached")) else "fake-upstream",
    }
    protocol = "spear"
    server_pid = upstream_pid = 0
    port = 0
    try:
        if mode.startswith("spear-"):
            loop = mode.split("-", 1)[1]
            cfg = Path(args.tmpdir) / f"config-{args.backend}.toml"
            cfg.write_text(server_config(args.backend, n))
            log_path = logdir / f"{tag}-server.log"
            cmd = [
                *taskset(args.server_cpu),
                sys.executable,
                "-m",
                "spear_rt.cli",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--loop",
                loop,
                "--config",
                str(cfg),
            ]
            p = step.spawn(cmd, log_path)
            m = wait_for_log(log_path, r"listening on http://127\.0\.0\.1:(\d+)", p, 60)
            port = int(m.group(1))
            text = log_path.read_text(errors="replace")
            rec["server_cmd"] = shlex.join(cmd)
            rec["config"] = cfg.read_text()
            if re.search(rf"backend {re.escape(args.backend)} \[[^]]*\] unavailable", text):
                rec["skipped"] = "backend unavailable: " + text.strip().splitlines()[0]
                return rec
            server_pid = p.pid
            url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        elif mode == "attached":
            url = args.url
            server_pid = args.server_pid
        else:  # direct / relay: the anchors' fake upstream (+ bare relay)
            protocol = "anchor"
            up_port = free_port()
            up_log = logdir / f"{tag}-upstream.log"
            up_cmd = [
                *taskset(args.gen_cpu),
                args.anchors_python,
                str(ANCHORS / "rt_upstream.py"),
                "--port",
                str(up_port),
            ]
            up = step.spawn(up_cmd, up_log)
            wait_for_log(up_log, r"listening on", up, 20)
            upstream_pid = up.pid
            rec["upstream_cmd"] = shlex.join(up_cmd)
            if mode == "direct":
                url = f"ws://127.0.0.1:{up_port}/v1/realtime?intent=transcription"
            else:
                relay_port = free_port()
                relay_log = logdir / f"{tag}-relay.log"
                cmd = [
                    *taskset(args.server_cpu),
                    args.anchors_python,
                    str(ANCHORS / "rt_relay_asyncio.py"),
                    "--port",
                    str(relay_port),
                    "--upstream",
                    f"ws://127.0.0.1:{up_port}",
                    "--uvloop",
                ]
                rp = step.spawn(cmd, relay_log)
                wait_for_log(relay_log, r"relay\(", rp, 20)
                server_pid = rp.pid
                rec["server_cmd"] = shlex.join(cmd)
                url = f"ws://127.0.0.1:{relay_port}/v1/realtime?intent=transcription"
        gen_cmd = [
            *taskset(args.gen_cpu),
            sys.executable,
            str(Path(__file__).resolve()),
            "--gen",
            "--url",
            url,
            "--sessions",
            str(n),
            "--seconds",
            str(args.seconds),
            "--warmup",
            str(args.warmup),
            "--drain",
            str(args.drain),
            "--turn-seconds",
            str(args.turn_seconds),
            "--pace",
            args.pace,
            "--fast-factor",
            str(args.fast_factor),
            "--fixture",
            args.fixture,
            "--backend",
            args.backend,
            "--protocol",
            protocol,
            "--server-pid",
            str(server_pid),
            "--upstream-pid",
            str(upstream_pid),
            "--connect-timeout",
            str(args.connect_timeout),
        ]
        if args.vad:
            gen_cmd.append("--vad")
        for h in args.header:
            gen_cmd += ["--header", h]
        rec["gen_cmd"] = shlex.join(gen_cmd)
        budget = args.connect_timeout + args.warmup + args.seconds + args.drain + 30
        result = run_generator_process(gen_cmd, budget, rec)
        if result is None:
            return rec
        rec.update(result)
        # after the generator closed every session: does the server let go of them and memory?
        if mode.startswith("spear-") and port:
            left = None
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end:
                try:
                    left = http_json(port, "/healthz")["sessions"]
                except Exception as exc:
                    left = f"healthz failed: {exc!r}"[:200]
                    break
                if left == 0:
                    break
                time.sleep(0.1)
            rec["sessions_after_close"] = left
        if server_pid:
            rss = _rss(_tree(server_pid))
            rec["server_rss_after_close_mb"] = round(rss / 2**20, 1) if rss else None
        return rec
    except Exception as exc:
        rec["error"] = repr(exc)[:1500]
        return rec
    finally:
        codes = step.close()
        rec["exit_codes"] = codes
        if mode.startswith("spear-"):
            rec["server_log"] = scan_log(logdir / f"{tag}-server.log")


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _label(r: dict[str, Any]) -> tuple[str, str]:
    t = r["target"]
    if t.startswith("spear-"):
        return f"spear_rt/{t.split('-', 1)[1]}", r.get("backend", "")
    if t == "relay":
        return "bare relay (anchor, asyncio+uvloop)", "fake upstream"
    if t == "direct":
        return "direct (fake upstream)", "fake upstream"
    return t, r.get("backend", "")


def table(results: list[dict[str, Any]]) -> str:
    direct = {r["n"]: r for r in results if r["target"] == "direct" and "delta_ms" in r}
    head = (
        "| target | backend | N | sessions ok/fail/early | achieved % | delta p50 ms "
        "| delta p99 ms | +p99 vs direct | commit→completed p50 / p99 ms | server CPU % "
        "| RSS MB (end/max) | dropped | errors | gen CPU % | core1 busy % | others CPU % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = list(dict.fromkeys(r["target"] for r in results))
    for r in sorted(results, key=lambda r: (order.index(r["target"]), r["n"])):
        name, backend = _label(r)
        if "delta_ms" not in r:
            why = r.get("skipped") or r.get("error") or "no result"
            lines.append(f"| {name} | {backend} | {r['n']} | {why[:120]} |" + " |" * 13)
            continue
        d = r["delta_ms"]
        add = "-"
        if r["target"] != "direct" and r["n"] in direct and d["p99"] is not None:
            dp = direct[r["n"]]["delta_ms"]["p99"]
            if dp is not None:
                add = f"{d['p99'] - dp:.2f}"
        c = r["commit_ms"]
        commit = f"{_f(c['p50'])} / {_f(c['p99'])}" if c["count"] else "-"
        rss = r.get("server_rss_mb") or {}
        rss_s = f"{_f(rss.get('end'), 1)} / {_f(rss.get('max'), 1)}" if rss.get("max") else "-"
        cores = r.get("core_busy_pct") or []
        core1 = _f(cores[1], 0) if len(cores) > 1 else "-"
        lines.append(
            f"| {name} | {backend} | {r['n']} "
            f"| {r['connected']}/{r['conn_failures']}/{r['closed_early']} "
            f"| {r['achieved_pct']:.1f} | {_f(d['p50'])} | {_f(d['p99'])} | {add} | {commit} "
            f"| {_f(r.get('server_cpu_pct'), 0)} | {rss_s} | {r['dropped_at_source']} "
            f"| {r['errors']} "
            f"| {_f(r.get('gen_cpu_pct'), 0)} | {core1} | {_f(r.get('foreign_cpu_pct'), 0)} |"
        )
    return "\n".join(lines)


def knees(results: list[dict[str, Any]], limit_ms: float = 10.0) -> str:
    """Largest N per target with +p99 < limit and achieved >= 99 % (needs direct rows)."""
    direct = {
        r["n"]: r["delta_ms"]["p99"]
        for r in results
        if r["target"] == "direct" and "delta_ms" in r and r["delta_ms"]["p99"] is not None
    }
    if not direct:
        return ""
    out = [
        f"Largest N with +p99 < {limit_ms:g} ms and achieved ≥ 99 % (no drops, no early closes):",
        "",
    ]
    for target in dict.fromkeys(r["target"] for r in results):
        if target == "direct":
            continue
        ok, bad = [], []
        for r in sorted((r for r in results if r["target"] == target), key=lambda r: r["n"]):
            d = r.get("delta_ms", {}).get("p99")
            passed = (
                d is not None
                and r["n"] in direct
                and d - direct[r["n"]] < limit_ms
                and r["achieved_pct"] >= 99
                and not r["dropped_at_source"]
                and not r["closed_early"]
                and not r["conn_failures"]
            )
            (ok if passed else bad).append(r["n"])
        first_fail = min(bad) if bad else None
        knee = max((n for n in ok if first_fail is None or n < first_fail), default=None)
        shown = knee if knee is not None else "< " + str(min(bad) if bad else "?")
        out.append(
            f"- {_label({'target': target})[0]}: knee {shown}"
            f" (passed {ok or '-'}, failed {bad or '-'})"
        )
    return "\n".join(out)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(
            "--plot: matplotlib is not installed here; run with bench/.venv-bench/bin/python "
            "(see bench/README.md) or: --replot <json>"
        )
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target in dict.fromkeys(r["target"] for r in results):
        rows = sorted(
            (r for r in results if r["target"] == target and r.get("delta_ms", {}).get("p99")),
            key=lambda r: r["n"],
        )
        if not rows:
            continue
        xs = [r["n"] for r in rows]
        (line,) = ax1.plot(
            xs, [r["delta_ms"]["p99"] for r in rows], "o-", label=f"{_label(rows[0])[0]} p99"
        )
        ax1.plot(xs, [r["delta_ms"]["p50"] for r in rows], "--", color=line.get_color(), alpha=0.6)
        cpu = [(r["n"], r["server_cpu_pct"]) for r in rows if r.get("server_cpu_pct") is not None]
        if cpu:
            ax2.plot(
                [c[0] for c in cpu],
                [c[1] for c in cpu],
                "o-",
                color=line.get_color(),
                label=_label(rows[0])[0],
            )
    ax1.axhline(10, color="grey", lw=0.8, ls=":")
    ax1.set_yscale("log")
    ax1.set_xlabel("sessions (50 appends/s each)")
    ax1.set_ylabel("append → delta latency, ms (solid p99, dashed p50)")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.set_xlabel("sessions")
    ax2.set_ylabel("server CPU % of one core")
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)
    fig.suptitle("spear_rt realtime load (server on core 0, generator on core 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["git_head"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except Exception:
        pass
    return info


def main_ladder(args: argparse.Namespace) -> int:
    ns = [int(x) for x in str(args.sessions).replace(" ", "").split(",") if x]
    if args.url:
        modes = ["attached"]
    else:
        modes = [f"spear-{lp}" for lp in args.loop.split(",") if lp]
        bad = [m for m in modes if m.split("-", 1)[1] not in ("trio", "asyncio", "uvloop")]
        if bad:
            raise SystemExit(f"unknown loop in {args.loop!r}")
        if args.compare:
            modes = ["direct", "relay", *modes]
            for f in ("rt_upstream.py", "rt_relay_asyncio.py", "rt_loadgen.py"):
                if not (ANCHORS / f).is_file():
                    raise SystemExit(f"--compare needs {ANCHORS / f} (set SPEAR_ANCHORS)")
    global NICE, RT_PRIO
    NICE = args.nice
    RT_PRIO = args.rt_prio
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 CPUs: running unpinned")
        args.server_cpu = args.gen_cpu = None
    elif args.gen_cpu is not None:
        try:
            os.sched_setaffinity(0, {args.gen_cpu})  # keep the orchestrator off the server's core
        except OSError:
            pass
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = RESULTS / f"realtime_load-{stamp}"
    logdir = RESULTS / f"realtime_load-{stamp}-logs"
    logdir.mkdir()
    args.tmpdir = tempfile.mkdtemp(prefix="spear-bench-")
    meta = {"argv": sys.argv, "host": host_info(), "started": stamp}
    results: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    t0 = time.monotonic()
    order = [(n, m) for n in ns for m in modes]  # interleaved: all targets at one N back to back
    try:
        for i, (n, mode) in enumerate(order, 1):
            tag = f"{i:02d}-{mode}-n{n}"
            log(f"step {i}/{len(order)}: {mode} N={n}")
            for attempt in range(args.retries + 1):
                quiet = wait_quiet(args)
                if args.load == "anchors":
                    import anchor_load

                    rec = anchor_load.run_step(args, mode, n, logdir, f"{tag}-a{attempt}")
                else:
                    rec = run_step(args, mode, n, logdir, f"{tag}-a{attempt}")
                rec.update(
                    {
                        "step": i,
                        "attempt": attempt,
                        "busy_before_pct": quiet,
                        "seconds": args.seconds,
                        "warmup": args.warmup,
                        "pace": args.pace,
                        "vad": args.vad,
                        "turn_seconds": args.turn_seconds,
                        "meta": meta,
                    }
                )
                foreign = rec.get("foreign_cpu_pct")
                spoiled = foreign is not None and foreign > args.retry_busy
                if spoiled and attempt < args.retries:
                    rec["discarded"] = f"other jobs used {foreign} % CPU during the window; retried"
                    log(f"  {rec['discarded']}")
                    discarded.append(rec)
                    base.with_suffix(".json").write_text(json.dumps(results + discarded, indent=1))
                    continue
                break
            results.append(rec)
            base.with_suffix(".json").write_text(json.dumps(results + discarded, indent=1))
            if "delta_ms" in rec:
                log(
                    f"  connected {rec['connected']}/{n} achieved {rec['achieved_pct']}% "
                    f"delta p50/p99 {rec['delta_ms']['p50']}/{rec['delta_ms']['p99']} ms "
                    f"commit p99 {rec['commit_ms']['p99']} cpu {rec['server_cpu_pct']}% "
                    f"dropped {rec['dropped_at_source']} early {rec['closed_early']} "
                    f"errors {rec['errors']} gen {rec['gen_cpu_pct']}%"
                )
            else:
                log(f"  {rec.get('skipped') or rec.get('error')}")
            time.sleep(args.pause)
    finally:
        for p in Path(args.tmpdir).glob("*"):
            p.unlink()
        os.rmdir(args.tmpdir)
    md = table(results)
    kn = knees(results)
    text = f"{md}\n\n{kn}\n" if kn else md + "\n"
    base.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {base.with_suffix('.json')} and .md ({time.monotonic() - t0:.0f} s)")
    if args.plot and plot(results, base.with_suffix(".png")):
        log(f"wrote {base.with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", default="50", help="N, or a comma list for a ladder (50,100,200)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per step")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--drain", type=float, default=3.0, help="wait this long for late answers")
    ap.add_argument("--loop", default="uvloop", help="trio|asyncio|uvloop, or a comma list")
    ap.add_argument(
        "--backend",
        choices=("stub", "pocketsphinx", "remote"),
        help="stub (default) | pocketsphinx; with --fault: remote (default: openai_realtime to "
        "a fake upstream through a resetting proxy) | stub",
    )
    ap.add_argument(
        "--url", help="attach to a running server instead (ws://127.0.0.1:PORT/v1/realtime?...)"
    )
    ap.add_argument(
        "--server-pid", type=int, default=0, help="with --url: pid to sample CPU/RSS of"
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also run the anchors' bare relay and direct-to-fake-upstream at each N",
    )
    ap.add_argument(
        "--load",
        choices=("spear", "anchors"),
        default="spear",
        help="anchors: issue 16's relay table: the anchors' rt_loadgen.py (--commit-every-10, "
        "session.update without VAD) and rt_upstream.py (--session-created --on-commit) for "
        "every target; spear_rt relays through an openai_realtime instance (bench/anchor_load.py)",
    )
    ap.add_argument(
        "--kind",
        choices=("transcription", "conversation"),
        default="transcription",
        help="conversation: speech-to-speech sessions; the ladder is s2s_ladder.py, --fault "
        "is s2s_faults.py (both next to this file)",
    )
    ap.add_argument("--vad", action="store_true", help="server VAD instead of manual commits")
    ap.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    ap.add_argument("--fast-factor", type=int, default=5, help="--pace fast: appends per 20 ms")
    ap.add_argument("--turn-seconds", type=float, default=3.0)
    ap.add_argument(
        "--fixture", default=DEFAULT_FIXTURE, help="glob of WAV files, played end to end"
    )
    ap.add_argument("--header", action="append", default=[], help="extra handshake header")
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--gen-cpu", type=int, default=1)
    ap.add_argument(
        "--anchors-python",
        default=sys.executable,
        help="python with websockets 17.4 + uvloop for the anchors' scripts",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before a step, wait up to this long for other jobs to leave the CPUs idle",
    )
    ap.add_argument(
        "--quiet-busy",
        type=float,
        default=15.0,
        help="'idle' means all cores together below this busy %% over 1 s",
    )
    ap.add_argument(
        "--retry-busy",
        type=float,
        default=10.0,
        help="redo a step when other jobs used more than this CPU %% during its window",
    )
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run server, relay, upstream and generator at this niceness (e.g. -10, needs "
        "root) so that other jobs on a shared machine disturb the steps less",
    )
    ap.add_argument(
        "--rt-prio",
        type=int,
        default=0,
        help="run server, relay, upstream and generator under SCHED_FIFO at this priority "
        "(chrt -f, needs root; the kernel's RT throttling still leaves others 5 %%): on a "
        "machine shared with CPU-bound jobs this keeps their time slices out of the tail",
    )
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between steps")
    ap.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    ap.add_argument(
        "--replot", metavar="JSON", help="only print the table (and --plot) of a results file"
    )
    # internal: be the load generator of one step
    ap.add_argument("--gen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--protocol", choices=("spear", "anchor"), default="spear", help=argparse.SUPPRESS
    )
    ap.add_argument("--upstream-pid", type=int, default=0, help=argparse.SUPPRESS)
    import faults  # the fault mode lives in its own module (bench/faults.py)

    faults.add_arguments(ap)
    return ap


def conversation_main(args: argparse.Namespace) -> int:
    """`--kind conversation`: the same ladder or fault run, for speech-to-speech sessions."""
    if args.fault:
        import s2s_faults

        return s2s_faults.main(["--sessions", args.sessions, "--fault", args.fault])
    import s2s_ladder

    targets = "direct,uvloop,spear" if args.compare else "spear"
    common = ["--sessions", args.sessions, "--seconds", str(args.seconds), "--warmup",
              str(args.warmup), "--targets", targets]  # fmt: skip
    code = 0
    for loop in args.loop.split(","):
        out = RESULTS / f"s2s_ladder-{loop}.json"
        code |= s2s_ladder.main([*common, "--loop", loop, "--out", str(out)])
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import faults

    if args.gen:
        if not args.url:
            raise SystemExit("--gen needs --url")
        args.sessions_n = int(args.sessions)
        faults.gen_main(args) if args.fault else gen_main(args)
        return 0
    if args.replot:
        results = [r for r in json.loads(Path(args.replot).read_text()) if not r.get("discarded")]
        if any("fault_spec" in r for r in results):
            faults.replot(Path(args.replot), args.plot)
            return 0
        print(table(results))
        kn = knees(results)
        if kn:
            print("\n" + kn)
        if args.plot:
            out = Path(args.replot).with_suffix(".png")
            if plot(results, out):
                log(f"wrote {out}")
        return 0
    if args.kind == "conversation":
        return conversation_main(args)
    if args.fault:
        return faults.main(args)
    if args.backend is None:
        args.backend = "stub"
    if args.backend == "remote":
        raise SystemExit("--backend remote is for --fault runs (it needs the fake upstream)")
    return main_ladder(args)


if __name__ == "__main__":
    sys.modules.setdefault("realtime_load", sys.modules["__main__"])  # one module for faults.py
    sys.exit(main())
