"""The resuming client of realtime_load.py's fault mode (the generator process).

N sessions in one uvloop process, each a hand-written WebSocket client (asyncio Protocol) that
survives its own socket being killed: it keeps every client event the server has not
confirmed, resumes with `?session_id=&last_seq=` + `Spear-Resume-Token`, resends exactly what
`spear.session.resumed` says is missing, and checks the event stream (seq, one `completed` per
commit, transcripts by the stub rule). See faults.py for what is counted and why.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import signal
import socket
import struct
import zlib
from typing import Any
from urllib.parse import urlsplit

import realtime_load as rl
from faults import parse_fault

FRAME_BYTES = rl.FRAME_SAMPLES * 2
LINGER_RST = struct.pack("ii", 1, 0)

# =============================================================================================
# the resuming client (generator process)
# =============================================================================================


class Counters:
    """Counters of one generator run (correctness over the run, timings over the window)."""

    def __init__(self) -> None:
        self.seq_gaps = 0
        self.seq_dups = 0
        self.completed_ok = 0
        self.completed_dup = 0
        self.completed_unknown = 0
        self.failed = 0
        self.transcript_mismatch = 0
        self.delta_mismatch = 0
        self.first_mismatches: list[str] = []
        self.commits = 0
        self.kills = 0
        self.kills_skipped = 0
        self.kills_after_block = 0
        self.lost_in_flight = 0  # client events a kill lost on purpose (must be resent)
        self.replayed_events = 0  # events that came in the same read as `resumed`
        self.resumes = 0
        self.resume_failed = 0
        self.resume_mismatch = 0
        self.resent_events = 0
        self.backlog_events = 0
        self.resume_s: list[float] = []
        self.reconnect_s: list[float] = []
        self.commit_s: list[float] = []
        self.reconnected = 0
        self.downtime_ms: list[float] = []
        self.reconnect_attempts: list[int] = []
        self.replayed_items = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.closed_early = 0
        self.close_codes: collections.Counter[str] = collections.Counter()
        self.late_slots = 0
        self.event_bytes = 0  # server event payload bytes read during the window

    def mismatch(self, text: str) -> None:
        if len(self.first_mismatches) < 5:
            self.first_mismatches.append(text[:300])


class World:
    """What every client shares: frames, expected words, counters, the fault plan."""

    def __init__(self, args: argparse.Namespace, fault: dict[str, Any]) -> None:
        self.key = os.urandom(4)
        raw, self.files = rl.fixture_pcm(args.fixture)
        self.frames = [rl.append_frame(pcm, self.key) for pcm in raw]
        self.nframes = len(raw)
        # the stub rule: one word per full 200 ms block (10 appends) of a turn's audio
        lexicon = __import__("spear_rt_backends.stub", fromlist=["LEXICON"]).LEXICON
        self.words = [
            lexicon[zlib.crc32(b"".join(raw[(i + j) % self.nframes] for j in range(10)))
                    % len(lexicon)]
            for i in range(self.nframes)
        ]  # fmt: skip
        self.turn_appends = max(1, round(args.turn_seconds * 1000 / rl.FRAME_MS))
        u = urlsplit(args.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.headers = ["OpenAI-Beta: realtime=v1", *args.header]
        session = {"input_audio_format": "pcm16", "turn_detection": None}
        update = {"type": "transcription_session.update", "session": session}
        self.update_frame = rl.client_frame(json.dumps(update).encode(), 1, self.key)
        self.client_every: float | None = fault["client"]
        self.c = Counters()
        self.meas = False

    def request(self, target: str, extra: list[str]) -> bytes:
        ws_key = base64.b64encode(os.urandom(16)).decode()
        headers = "".join(f"{h}\r\n" for h in [*self.headers, *extra])
        return (
            f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()

    def expected(self, start: int, count: int) -> str:
        """The stub rule's transcript of `count` appends from frame `start`."""
        return " ".join(self.words[(start + b) % self.nframes] for b in range(0, count - 9, 10))


class Link(asyncio.Protocol):
    """One TCP connection of a client; a killed link's callbacks are ignored."""

    def __init__(self, client: Client, request: bytes) -> None:
        self.client = client
        self.request = request
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.hs = False
        self.dead = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed in the handshake: {exc}"))
        if not self.dead:
            self.dead = True
            self.client.link_lost(self)

    def kill(self) -> None:
        """RST: SO_LINGER 0, then abort (unsent bytes are dropped)."""
        self.dead = True
        if self.t is not None:
            sock = self.t.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                except OSError:
                    pass
            self.t.abort()

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        now = rl.perf()
        buf = self.buf
        buf += data
        if not self.hs:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if not status.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(status.decode("latin-1")))
                self.dead = True
                self.t.close()
                return
            del buf[: i + 4]
            self.hs = True
            self.opened.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2 and not self.dead:
            b1 = buf[pos + 1]
            n, h = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, h = (buf[pos + 2] << 8) | buf[pos + 3], 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, h = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + h + n
            if end > size:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                if self.client.w.meas:
                    self.client.w.c.event_bytes += n
                self.client.event(json.loads(bytes(buf[pos + h : end])), now)
            elif op == 9:
                self.t.write(rl.client_frame(bytes(buf[pos + h : end]), 0xA))
            elif op == 8:
                code = str(int.from_bytes(buf[pos + h : pos + h + 2], "big")) if n >= 2 else "1005"
                self.client.closed_by_server(self, code)
            pos = end
        self.client.replaying = False
        if pos:
            del buf[:pos]


class Client:
    """One session across its links: produces audio, keeps the unconfirmed part, resumes.

    `log` holds every client event since the last one the server confirmed (by
    `input_audio_buffer.committed`): a frame index (>= 0) for an append, -k for commit k.
    `written` of them went out on the current link; the rest wait for it.
    """

    def __init__(self, w: World, index: int, offset: int) -> None:
        self.w = w
        self.index = index
        self.state = "connecting"  # live | resuming | dead | closed
        self.link: Link | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.session_id = ""
        self.token = ""
        self.last_seq = 0
        self.pos = offset
        self.log: collections.deque[int] = collections.deque()
        self.written = 0
        self.base_appends = 0  # appends before log[0], all applied by the server
        self.turn_n = 0
        self.turn_len = w.turn_appends
        self.turn_start = offset
        self.commits = 0
        self.expected: dict[int, str] = {}
        self.commit_t: dict[int, tuple[float, bool]] = {}
        self.committed = 0
        self.item_commit: dict[str, int] = {}
        self.deltas: dict[str, list[str]] = {}
        self.kill_at = float("inf")
        self.t_kill = 0.0
        self.reconnect_task: asyncio.Task[None] | None = None
        self.replaying = False  # events after `resumed` in the same read: the replay

    # --- events from the server ------------------------------------------------------------

    def event(self, ev: dict[str, Any], now: float) -> None:
        c = self.w.c
        kind = ev.get("type")
        seq = ev.get("seq", 0)
        if kind == "spear.session.resumed":
            self._resumed(ev, now)
            return
        if seq:
            if seq <= self.last_seq:
                c.seq_dups += 1
                return
            if seq > self.last_seq + 1:
                c.seq_gaps += seq - self.last_seq - 1
                c.mismatch(f"session {self.index}: seq {self.last_seq} -> {seq} ({kind})")
            self.last_seq = seq
            if self.replaying:
                c.replayed_events += 1
        if kind == "conversation.item.input_audio_transcription.delta":
            self.deltas.setdefault(ev["item_id"], []).append(ev["delta"])
        elif kind == "input_audio_buffer.committed":
            self.committed += 1
            self.item_commit[ev["item_id"]] = self.committed
            self._confirm(self.committed)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._completed(ev, now)
        elif kind == "conversation.item.input_audio_transcription.failed":
            c.failed += 1
            c.mismatch(f"session {self.index}: failed {json.dumps(ev)[:200]}")
        elif kind == "spear.upstream.reconnected":
            c.reconnected += 1
            c.downtime_ms.append(ev.get("downtime_ms", 0))
            c.reconnect_attempts.append(ev.get("attempts", 0))
            c.replayed_items += len(ev.get("replayed_item_ids", ()))
        elif kind in ("transcription_session.created", "session.created"):
            self.session_id = ev["session"]["id"]
            self.token = (ev.get("spear") or {}).get("resume_token") or ""
        elif kind in ("transcription_session.updated", "session.updated"):
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            c.errors += 1
            if len(c.first_errors) < 3:
                c.first_errors.append(json.dumps(ev)[:400])

    def _completed(self, ev: dict[str, Any], now: float) -> None:
        c = self.w.c
        item = ev["item_id"]
        k = self.item_commit.pop(item, None)
        deltas = "".join(self.deltas.pop(item, ()))
        if k is None:
            c.completed_unknown += 1
            return
        expected = self.expected.pop(k, None)
        if expected is None:
            c.completed_dup += 1
            return
        c.completed_ok += 1
        t0, meas = self.commit_t.pop(k)
        if meas:
            c.commit_s.append(now - t0)
        text = ev.get("transcript", "")
        if text != expected:
            c.transcript_mismatch += 1
            c.mismatch(f"session {self.index} commit {k}: got {text!r}, want {expected!r}")
        if deltas != text:
            c.delta_mismatch += 1
            c.mismatch(f"session {self.index} commit {k}: deltas {deltas!r} vs {text!r}")

    def _confirm(self, k: int) -> None:
        """Commit k was applied: everything up to it leaves the log."""
        log = self.log
        if -k not in log:
            return  # already confirmed by a resume that started after it
        while log:
            e = log.popleft()
            self.written = max(0, self.written - 1)
            if e >= 0:
                self.base_appends += 1
            elif e == -k:
                return

    # --- links ---------------------------------------------------------------------------

    async def open(self, resume: bool) -> None:
        w = self.w
        if resume:
            sep = "&" if "?" in w.target else "?"
            target = f"{w.target}{sep}session_id={self.session_id}&last_seq={self.last_seq}"
            request = w.request(target, [f"Spear-Resume-Token: {self.token}"])
        else:
            request = w.request(w.target, [])
        link = Link(self, request)
        self.link = link
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.create_connection(lambda: link, w.host, w.port), 10)
        await asyncio.wait_for(link.opened, 10)
        if not resume:
            link.t.write(w.update_frame)
            await asyncio.wait_for(self.ready, 15)
            self.state = "live"

    def kill(self, now: float) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.kill()
        self.state = "resuming"
        self.t_kill = now
        self.w.c.kills += 1
        self.reconnect_task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        c = self.w.c
        for _attempt in range(3):
            try:
                await self.open(resume=True)
                c.reconnect_s.append(rl.perf() - self.t_kill)
                return  # the rest happens when `spear.session.resumed` arrives
            except (OSError, ConnectionError, TimeoutError) as exc:
                if self.link is not None:
                    self.link.kill()
                    self.link = None
                err = repr(exc)
                if "HTTP/1.1" in err:
                    break
                await asyncio.sleep(0.05)
        c.resume_failed += 1
        c.mismatch(f"session {self.index}: resume handshake failed")
        self.state = "dead"

    def _resumed(self, ev: dict[str, Any], now: float) -> None:
        c = self.w.c
        c.resumes += 1
        c.resume_s.append(now - self.t_kill)
        applied, rest = divmod(int(ev["input_audio_bytes"]), FRAME_BYTES)
        need = applied - self.base_appends
        log = self.log
        p = seen = 0
        while seen < need and p < len(log):
            if log[p] >= 0:
                seen += 1
            p += 1
        last = ev.get("last_event_id") or ""
        if last.startswith("c") and p < len(log) and log[p] == -int(last[1:]):
            p += 1
        if rest or need < 0 or seen < need:
            c.resume_mismatch += 1
            c.mismatch(f"session {self.index}: resumed {ev} but {self.base_appends} confirmed")
        c.resent_events += self.written - p if self.written > p else 0
        c.backlog_events += len(log) - max(p, self.written)
        self.written = p
        self.state = "live"
        self.replaying = True
        self.flush()

    def link_lost(self, link: Link) -> None:
        """The server ended a link without a close frame (a failed handshake is `open`'s)."""
        if link is self.link and link.hs and self.state in ("live", "resuming"):
            self.link = None
            self.state = "dead"
            self.w.c.closed_early += 1
            self.w.c.close_codes["eof"] += 1

    def closed_by_server(self, link: Link, code: str) -> None:
        if link is not self.link:
            return
        c = self.w.c
        if self.state == "closed":
            c.close_codes[code + " (answer)"] += 1
        else:
            c.closed_early += 1
            c.close_codes[code] += 1
            if code == "4004":
                c.resume_failed += 1
            self.state = "dead"
        link.dead = True
        link.t.write(rl.client_frame(struct.pack("!H", int(code)), 0x8))
        link.t.close()
        self.link = None

    # --- sending -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the current link has not had yet (stops at 64 KiB buffered)."""
        link = self.link
        if self.state != "live" or link is None or link.t is None:
            return
        t, log = link.t, self.log
        while self.written < len(log) and t.get_write_buffer_size() <= rl.WBUF_LIMIT:
            self._write(t, log[self.written])
            self.written += 1

    def _write(self, t: asyncio.Transport, e: int) -> None:
        if e >= 0:
            t.write(self.w.frames[e])
        else:
            body = b'{"type":"input_audio_buffer.commit","event_id":"c%d"}' % -e
            t.write(rl.client_frame(body, 1, self.w.key))

    def tick(self, now: float, meas: bool) -> None:
        """One 20 ms step: one append (and a commit at the turn's end), maybe then a kill."""
        if self.state in ("dead", "closed", "connecting"):
            return
        w = self.w
        due = w.meas and now >= self.kill_at
        if due and self.state != "live":
            w.c.kills_skipped += 1  # still resuming from the last one
            self._next_kill(now)
            due = False
        first = len(self.log)
        self.log.append(self.pos)
        self.pos = (self.pos + 1) % w.nframes
        self.turn_n += 1
        block_done = self.turn_n % rl.BLOCK_APPENDS == 0
        if self.turn_n >= self.turn_len:
            self.commits += 1
            k = self.commits
            self.log.append(-k)
            self.expected[k] = w.expected(self.turn_start, self.turn_n)
            self.commit_t[k] = (now, meas)
            w.c.commits += 1
            self.turn_start = self.pos
            self.turn_n = 0
            self.turn_len = w.turn_appends
            block_done = True
        if not (due and block_done):
            self.flush()
            return
        # The kill comes right after an append that completes a 200 ms block (or a commit), so
        # that the server has an answer on its way. Every other kill loses this step's events
        # in flight instead (a torn frame, then nothing): the server must not have applied
        # them, and the client must resend them after the resume.
        w.c.kills_after_block += 1
        if w.c.kills_after_block % 2:
            self.flush()  # delivered: the server's answer is lost with the socket -> replay
        elif self.state == "live" and self.written == first and self.link is not None:
            frame = w.frames[self.log[first]]
            self.link.t.write(frame[: len(frame) // 2])  # a torn frame
            w.c.lost_in_flight += len(self.log) - first
            self.written = len(self.log)  # "sent", never arrived
        self.kill(now)
        self._next_kill(now)

    def _next_kill(self, now: float) -> None:
        while self.kill_at <= now:
            self.kill_at += self.w.client_every or float("inf")

    def outstanding(self) -> bool:
        return self.state == "resuming" or (self.state == "live" and bool(self.expected))

    def close(self) -> None:
        link = self.link
        if self.state == "live" and link is not None and link.t is not None:
            self.state = "closed"
            link.t.write(rl.client_frame(struct.pack("!H", 1000), 0x8))


async def run_generator(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    fault = parse_fault(args.fault)
    loop = asyncio.get_running_loop()
    w = World(args, fault)
    c = w.c
    n = args.sessions_n
    clients = [Client(w, i, (i * 997) % w.nframes) for i in range(n)]
    sessions: list[Client] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(64)

    async def open_one(cl: Client) -> None:
        async with sem:
            try:
                await cl.open(resume=False)
                sessions.append(cl)
            except Exception as exc:
                failures.append(repr(exc)[:300])
                if cl.link is not None:
                    cl.link.kill()
                cl.state = "dead"

    t0 = rl.perf()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(open_one(x) for x in clients)), args.connect_timeout
        )
    except TimeoutError:
        failures.append("connect phase timed out")
    connect_s = rl.perf() - t0
    await asyncio.sleep(0.3)
    m = max(1, len(sessions))
    for k, s in enumerate(sessions):  # spread commits over the turn, as realtime_load does
        first = w.turn_appends - (k * w.turn_appends // m) // rl.BLOCK_APPENDS * rl.BLOCK_APPENDS
        s.turn_len = first if first > 0 else w.turn_appends
    buckets = [sessions[k :: rl.SLOTS] for k in range(rl.SLOTS)]

    server = rl._tree(args.server_pid)
    aux = [p for pid in args.aux_pids.split(",") if pid for p in rl._tree(int(pid))]
    me = psutil.Process()
    t_start = loop.time() + 0.05
    t_meas0 = t_start + args.warmup
    t_meas1 = t_meas0 + args.seconds
    snap: dict[str, Any] = {}
    rss_start = 0
    k = 0
    while sessions:
        due = t_start + k * (rl.PERIOD / rl.SLOTS)
        if due >= t_meas1:
            break
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 0.005:
            c.late_slots += 1
        meas = due >= t_meas0
        if meas and not snap:
            snap = _snapshot(server, aux, me)
            rss_start = rl._rss(server)
            w.meas = True
            p0 = rl.perf()
            if fault["client"]:
                for i, s in enumerate(sessions):
                    s.kill_at = p0 + fault["client"] * i / len(sessions)
            if fault["upstream"] and args.proxy_pid:
                os.kill(args.proxy_pid, signal.SIGUSR1)
        p = rl.perf()
        for s in buckets[k % rl.SLOTS]:
            s.tick(p, meas)
        k += 1
    w.meas = False
    if args.proxy_pid:
        os.kill(args.proxy_pid, signal.SIGUSR2)
    if not snap:
        snap = _snapshot(server, aux, me)
    end = _snapshot(server, aux, me)
    rss_end = rl._rss(server)
    win = max(1e-9, end["t"] - snap["t"])
    deadline = rl.perf() + max(args.drain, 10.0)
    while rl.perf() < deadline and any(s.outstanding() for s in sessions):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    drain_s = rl.perf() - (deadline - max(args.drain, 10.0))
    missing = sum(len(s.expected) for s in sessions)
    stuck = sum(1 for s in sessions if s.state == "resuming")
    for s in sessions:
        s.close()
    await asyncio.sleep(0.5)
    for s in sessions:
        if s.link is not None and s.link.t is not None:
            s.link.t.abort()
        if s.reconnect_task is not None:
            s.reconnect_task.cancel()

    lost = c.seq_gaps + missing + c.failed + c.transcript_mismatch + c.delta_mismatch
    dup = c.seq_dups + c.completed_dup + c.completed_unknown
    foreign, cores = _foreign(snap, end)
    res: dict[str, Any] = {
        "n": n,
        "fault": fault,
        "connected": len(sessions),
        "conn_failures": len(failures),
        "connect_s": round(connect_s, 2),
        "window_s": round(win, 2),
        "drain_s": round(drain_s, 2),
        "events_lost": lost,
        "events_dup": dup,
        "seq_gaps": c.seq_gaps,
        "seq_dups": c.seq_dups,
        "commits": c.commits,
        "completed_ok": c.completed_ok,
        "completed_missing": missing,
        "completed_dup": c.completed_dup,
        "completed_unknown": c.completed_unknown,
        "transcription_failed": c.failed,
        "transcript_mismatch": c.transcript_mismatch,
        "delta_mismatch": c.delta_mismatch,
        "first_mismatches": c.first_mismatches,
        "kills": c.kills,
        "kills_skipped": c.kills_skipped,
        "lost_in_flight": c.lost_in_flight,
        "replayed_events": c.replayed_events,
        "resumes": c.resumes,
        "resume_failed": c.resume_failed,
        "resume_mismatch": c.resume_mismatch,
        "stuck_resuming": stuck,
        "resent_events": c.resent_events,
        "backlog_events": c.backlog_events,
        "resume_ms": rl._summary_ms(c.resume_s),
        "reconnect_101_ms": rl._summary_ms(c.reconnect_s),
        "upstream_reconnected": c.reconnected,
        "upstream_downtime_ms": _summary_plain(c.downtime_ms),
        "upstream_attempts_max": max(c.reconnect_attempts, default=0),
        "upstream_replayed_items": c.replayed_items,
        "commit_ms": rl._summary_ms(c.commit_s),
        "errors": c.errors,
        "first_errors": c.first_errors,
        "closed_early": c.closed_early,
        "close_codes": dict(c.close_codes),
        "late_slots": c.late_slots,
        "event_kb_per_session_s": round(c.event_bytes / 1024 / max(1, len(sessions)) / win, 2),
        "server_cpu_pct": _pct_of(end["server"] - snap["server"], win) if server else None,
        "server_rss_start_mb": round(rss_start / 2**20, 1) if rss_start else None,
        "server_rss_end_mb": round(rss_end / 2**20, 1) if rss_end else None,
        "aux_cpu_pct": _pct_of(end["aux"] - snap["aux"], win) if aux else None,
        "gen_cpu_pct": _pct_of(end["me"] - snap["me"], win),
        "core_busy_pct": cores,
        "foreign_cpu_pct": round(100 * foreign / win, 1),
        "fixture_files": w.files,
    }
    if failures:
        res["first_failure"] = failures[0]
    return res


def _pct_of(cpu_s: float, window_s: float) -> float:
    return round(100 * cpu_s / window_s, 1)


def _snapshot(server: list[Any], aux: list[Any], me: Any) -> dict[str, Any]:
    import psutil

    t = me.cpu_times()
    return {
        "t": rl.perf(),
        "server": rl._cpu(server),
        "aux": rl._cpu(aux),
        "me": t.user + t.system,
        "cores": psutil.cpu_times(percpu=True),
    }


def _foreign(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, list[float | None]]:
    """CPU seconds used by processes outside the step, and each core's busy %."""
    busy_total = 0.0
    cores: list[float | None] = []
    for x, y in zip(a["cores"], b["cores"], strict=False):
        tot = sum(y) - sum(x)
        busy = tot - ((y.idle + y.iowait) - (x.idle + x.iowait))
        busy_total += busy
        cores.append(round(100 * busy / tot, 1) if tot > 0 else None)
    ours = (b["server"] - a["server"]) + (b["aux"] - a["aux"]) + (b["me"] - a["me"])
    return busy_total - ours, cores


def _summary_plain(values: list[float]) -> dict[str, float | None]:
    """p50/p99/max of values already in ms."""
    v = sorted(values)
    out: dict[str, float | None] = {"count": len(v)}  # type: ignore[dict-item]
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        x = rl._pct(v, q)
        out[name] = None if x is None else round(float(x), 1)
    return out
