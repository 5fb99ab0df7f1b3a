#!/usr/bin/env python3
"""Hostcall bench: µs per rt_write / rt_read / spear_epoll_wait through a WASM guest, and
events per second through a guest driving a real session.

Micro rows (no event loop): a WAT guest (below) loops over one hostcall N times per round;
the round is timed from Python around the exported loop, so each figure is the whole
crossing — wasm -> wasmtime -> Python binding -> fd table -> back — plus a few wasm
instructions of loop. The fd is connected to a port that runs no session, so nothing else
competes for the GIL. Rows:

* null hostcall: ``rt_close(-1)`` (-EBADF), the floor of a crossing without memory access;
* rt_write: one 20 ms pcm16 frame (960 B) into the send queue (base64 + JSON append event);
* rt_read: one ~200 B delta event out of the recv queue;
* spear_epoll_wait, timeout 0: one watched fd ready; and 64 watched, 1 ready;
* the same rt_write / rt_read called straight from Python on a bytearray memory (no wasm),
  to split the binding's share from the fd table's.

Each row keeps the min and the median over rounds: on a shared machine the min is the cost,
the median shows the noise.

Live rows (``anyio.run`` on trio and on asyncio): the guest streams ``--audio-seconds`` of
noise as 20 ms frames into a real session (stub backend with ``block_ms = 10``: one delta per
10 ms of audio), waiting with epoll on -EAGAIN and draining events meanwhile, commits, and
drains until ``completed``. Reported: frames/s written, events/s read, and audio speed
(x real time).

Chat rows (``--chat-requests N``, 0 to skip): the anchors' fast fake OpenAI upstream
(``../shared/anchors/fake_openai.py``, its own process) behind an ``openai_http`` instance of
a spear_rt server in this process; N sequential chat completions (i) straight to the fake
over HTTP (the floor), (ii) through spear_rt over HTTP (``POST /v1/chat/completions``,
keep-alive), (iii) from a WAT guest in a loop of cchat_create / write_msg / ctl model /
send / recv / close. Requests/s and mean latency; the hostcall path's added latency is
(iii) - (ii), same run.

Writes bench/results/hostcalls-<time>.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spear_rt.config import parse_config  # noqa: E402
from spear_rt.hostcalls.abi import EPOLLIN, EPOLLOUT, BytesMemory, Cmd, EpollOp  # noqa: E402
from spear_rt.hostcalls.epoll import EpollSet  # noqa: E402
from spear_rt.hostcalls.fdtable import FdTable, RtFd  # noqa: E402
from spear_rt.hostcalls.guest import guest_host  # noqa: E402
from spear_rt.hostcalls.wasm import GuestLimits, WasmGuest  # noqa: E402
from spear_rt.registry import BackendRegistry  # noqa: E402
from spear_rt.router import Router  # noqa: E402
from spear_rt.session.manager import SessionManager  # noqa: E402

RESULTS = REPO / "bench" / "results"
ANCHORS = Path(os.environ.get("SPEAR_ANCHORS", str(REPO.parent / "shared" / "anchors")))
AUDIO_AT = 131072
FRAME = 960
CREATED = b'{"type":"transcription_session.created","session":{}}'
DELTA = (
    b'{"type":"conversation.item.input_audio_transcription.delta","item_id":"item_0123456789abc'
    b'def0123","content_index":0,"delta":" foxtrot","event_id":"event_0123abcd_42","seq":42,'
    b'"pad":"' + b"x" * 40 + b'"}'
)
STUB_FAST = '[[backends]]\nname = "stub"\nkind = "stub"\noptions = { block_ms = 10 }\n'

GUEST = """
(module
  (import "spear" "rt_ctl" (func $rt_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "rt_write" (func $rt_write (param i32 i32 i32) (result i32)))
  (import "spear" "rt_read" (func $rt_read (param i32 i32 i32) (result i32)))
  (import "spear" "rt_close" (func $rt_close (param i32) (result i32)))
  (import "spear" "spear_epoll_ctl" (func $epoll_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_wait" (func $epoll_wait (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 48)
  (data (i32.const 1024) "\\"type\\":\\"conversation.item.input_audio_transcription.completed\\"")
  (global $done (mut i32) (i32.const 0))
  (global $events (mut i32) (i32.const 0))

  (func (export "null_calls") (param $n i32) (local $i i32)
    (loop $l
      (drop (call $rt_close (i32.const -1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n)))))

  (func (export "write_loop") (param $fd i32) (param $p i32) (param $len i32) (param $n i32)
    (result i32)
    (local $i i32) (local $ok i32)
    (loop $l
      (if (i32.gt_s (call $rt_write (local.get $fd) (local.get $p) (local.get $len)) (i32.const 0))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $ok))

  (func (export "read_loop") (param $fd i32) (param $n i32) (result i32)
    (local $i i32) (local $ok i32)
    (loop $l
      (i32.store (i32.const 0) (i32.const 65536))
      (if (i32.gt_s (call $rt_read (local.get $fd) (i32.const 4096) (i32.const 0)) (i32.const 0))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $ok))

  (func (export "wait_loop") (param $ep i32) (param $n i32) (result i32)
    (local $i i32) (local $sum i32)
    (loop $l
      (i32.store (i32.const 4) (i32.const 512))
      (local.set $sum (i32.add (local.get $sum)
        (call $epoll_wait (local.get $ep) (i32.const 16) (i32.const 4) (i32.const 0))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $sum))

  (func $contains (param $h i32) (param $hl i32) (param $n i32) (param $nl i32) (result i32)
    (local $i i32) (local $j i32)
    (if (i32.lt_u (local.get $hl) (local.get $nl)) (then (return (i32.const 0))))
    (block $none
      (loop $at
        (br_if $none (i32.gt_u (local.get $i) (i32.sub (local.get $hl) (local.get $nl))))
        (local.set $j (i32.const 0))
        (block $differ
          (loop $cmp
            (if (i32.eq (local.get $j) (local.get $nl)) (then (return (i32.const 1))))
            (br_if $differ (i32.ne
              (i32.load8_u (i32.add (local.get $h) (i32.add (local.get $i) (local.get $j))))
              (i32.load8_u (i32.add (local.get $n) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $cmp)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $at)))
    (i32.const 0))

  (func $drain (param $fd i32) (local $n i32)
    (block $empty
      (loop $next
        (i32.store (i32.const 0) (i32.const 65536))
        (local.set $n (call $rt_read (local.get $fd) (i32.const 4096) (i32.const 0)))
        (if (i32.le_s (local.get $n) (i32.const 0))
          (then
            (if (i32.ne (local.get $n) (i32.const -11)) (then (global.set $done (i32.const 1))))
            (br $empty)))
        (global.set $events (i32.add (global.get $events) (i32.const 1)))
        (if (call $contains (i32.const 4096) (local.get $n) (i32.const 1024) (i32.const 62))
          (then (global.set $done (i32.const 1))))
        (br $next))))

  (func $wait (param $ep i32) (param $fd i32)
    (i32.store (i32.const 4) (i32.const 64))
    (if (i32.lt_s (call $epoll_wait (local.get $ep) (i32.const 16) (i32.const 4) (i32.const -1))
                  (i32.const 0))
      (then (global.set $done (i32.const 1)) (return)))
    (call $drain (local.get $fd)))

  ;; stream total bytes at p as frames, commit, drain until completed; returns events read
  (func (export "stream")
    (param $fd i32) (param $ep i32) (param $p i32) (param $total i32) (param $frame i32)
    (result i32)
    (local $off i32)
    (loop $frames
      (if (i32.eq (call $rt_write (local.get $fd) (i32.add (local.get $p) (local.get $off))
                                  (local.get $frame))
                  (i32.const -11))
        (then
          (drop (call $epoll_ctl (local.get $ep) (i32.const 2) (local.get $fd) (i32.const 5)))
          (call $wait (local.get $ep) (local.get $fd))
          (drop (call $epoll_ctl (local.get $ep) (i32.const 2) (local.get $fd) (i32.const 1)))
          (br $frames)))
      (call $drain (local.get $fd))
      (local.set $off (i32.add (local.get $off) (local.get $frame)))
      (br_if $frames (i32.lt_u (local.get $off) (local.get $total))))
    (drop (call $rt_ctl (local.get $fd) (i32.const 5) (i32.const 0) (i32.const 0)))
    (block $finished
      (loop $events
        (br_if $finished (global.get $done))
        (call $wait (local.get $ep) (local.get $fd))
        (br $events)))
    (global.get $events)))
"""


CHAT_GUEST = """
(module
  (import "spear" "cchat_create" (func $create (result i32)))
  (import "spear" "cchat_write_msg" (func $msg (param i32 i32 i32 i32 i32) (result i32)))
  (import "spear" "cchat_ctl" (func $ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "cchat_send" (func $send (param i32 i32) (result i32)))
  (import "spear" "cchat_recv" (func $recv (param i32 i32 i32) (result i32)))
  (import "spear" "cchat_close" (func $close (param i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 64) "user")
  (data (i32.const 96) "Say hello in one word.")
  (data (i32.const 128) "{\\"key\\":\\"model\\",\\"value\\":\\"fake\\"}")
  (global $bytes (export "bytes") (mut i32) (i32.const 0))
  ;; n chat completions, one after the other; returns how many answered with a body
  (func (export "chats") (param $n i32) (result i32)
    (local $i i32) (local $fd i32) (local $resp i32) (local $ok i32) (local $got i32)
    (loop $l
      (local.set $fd (call $create))
      (drop (call $msg (local.get $fd) (i32.const 64) (i32.const 4) (i32.const 96) (i32.const 22)))
      (i32.store (i32.const 0) (i32.const 38))
      (drop (call $ctl (local.get $fd) (i32.const 1) (i32.const 128) (i32.const 0)))
      (local.set $resp (call $send (local.get $fd) (i32.const 0)))
      (i32.store (i32.const 4) (i32.const 131072))
      (local.set $got (call $recv (local.get $resp) (i32.const 4096) (i32.const 4)))
      (if (i32.gt_s (local.get $got) (i32.const 0))
        (then (local.set $ok (i32.add (local.get $ok) (i32.const 1)))
              (global.set $bytes (local.get $got))))
      (drop (call $close (local.get $resp)))
      (drop (call $close (local.get $fd)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $ok)))
"""
CHAT_CONFIG = """
[server]
listen = "127.0.0.1:0"
[[backends]]
name = "fake"
kind = "openai_http"
base_url = "http://127.0.0.1:{port}/v1"
"""


class NullPort:
    """A session port that runs no session: the micro rows measure the crossing alone."""

    def connect(self, fd: RtFd) -> None:
        """Nothing to start."""

    def cancel(self, fd: RtFd) -> None:
        """Nothing to cancel."""


def per_call_us(
    fn: Callable[[], object], calls: int, rounds: int, reset: Callable[[], object]
) -> tuple[float, float]:
    """(min, median) over rounds of µs per call, `reset` run untimed before each round."""
    samples = []
    for _ in range(rounds):
        reset()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples), statistics.median(samples)


def micro(calls: int, rounds: int) -> list[dict[str, Any]]:
    """µs per hostcall through the guest (and straight from Python)."""
    table = FdTable(NullPort())
    epolls = EpollSet(table)
    guest = WasmGuest(GUEST, table, epolls, limits=GuestLimits(fuel=10**15, memory_bytes=64 << 20))
    guest.instantiate()
    setup = BytesMemory(16)
    fd = table.rt_create()
    table.rt_ctl(setup, fd, Cmd.CONNECT, 0, 0)
    rt = table.fds[fd]
    table.push_event(rt, CREATED)
    rt.recv.clear()
    rt.recv_bytes = 0
    guest.memory_write(AUDIO_AT, bytes(FRAME))
    ep = epolls.spear_epoll_create()
    epolls.spear_epoll_ctl(ep, EpollOp.ADD, fd, EPOLLIN | EPOLLOUT)
    wide = epolls.spear_epoll_create()
    epolls.spear_epoll_ctl(wide, EpollOp.ADD, fd, EPOLLOUT)
    for _ in range(63):
        epolls.spear_epoll_ctl(wide, EpollOp.ADD, table.rt_create(), EPOLLIN)

    def drain_send() -> None:
        table.take_input(rt, lambda: None)

    def fill_recv() -> None:
        for _ in range(calls):
            table.push_event(rt, DELTA)

    py_mem = BytesMemory(1 << 17)
    py_mem.put(AUDIO_AT - 65536, bytes(FRAME))
    py_mem.set_u32(0, 65536)

    def py_writes() -> None:
        for _ in range(calls):
            table.rt_write(py_mem, fd, AUDIO_AT - 65536, FRAME)

    def py_reads() -> None:
        for _ in range(calls):
            py_mem.set_u32(0, 65536)
            table.rt_read(py_mem, fd, 4096, 0)

    rows = [
        ("null hostcall (rt_close(-1))", lambda: guest.call("null_calls", calls), lambda: None),
        (
            "rt_write 960 B frame",
            lambda: guest.call("write_loop", fd, AUDIO_AT, FRAME, calls),
            drain_send,
        ),
        (f"rt_read {len(DELTA)} B event", lambda: guest.call("read_loop", fd, calls), fill_recv),
        (
            "spear_epoll_wait t=0, 1 fd ready",
            lambda: guest.call("wait_loop", ep, calls),
            lambda: None,
        ),
        (
            "spear_epoll_wait t=0, 64 watched",
            lambda: guest.call("wait_loop", wide, calls),
            lambda: None,
        ),
        ("rt_write from Python (no wasm)", py_writes, drain_send),
        ("rt_read from Python (no wasm)", py_reads, fill_recv),
    ]
    out = []
    for name, fn, reset in rows:
        best, median = per_call_us(fn, calls, rounds, reset)
        out.append(
            {
                "row": name,
                "us_min": round(best, 2),
                "us_median": round(median, 2),
                "calls_per_s_at_min": round(1e6 / best),
            }
        )
    return out


async def live(audio_seconds: float) -> dict[str, Any]:
    """A guest streams noise through a real stub session: frames/s and events/s."""
    config = parse_config(STUB_FAST, "bench")
    router = Router(BackendRegistry.build(config))
    manager = SessionManager(config, lambda: router)
    total = int(audio_seconds * 24000) * 2
    audio = np.random.default_rng(1).integers(-8000, 8000, total // 2, dtype=np.int16).tobytes()
    limits = GuestLimits(fuel=10**15, memory_bytes=64 << 20)
    async with guest_host(GUEST, manager, limits=limits) as run:
        table, epolls = run.table, run.epolls
        run.guest.memory_write(AUDIO_AT, audio)
        setup = BytesMemory(256)
        fd = table.rt_create()
        arg = b'{"key":"turn_detection","value":null}'
        setup.put(64, arg)
        setup.set_u32(0, len(arg))
        table.rt_ctl(setup, fd, Cmd.SET_PARAM, 64, 0)
        table.rt_ctl(setup, fd, Cmd.CONNECT, 0, 0)
        ep = epolls.spear_epoll_create()
        epolls.spear_epoll_ctl(ep, EpollOp.ADD, fd, EPOLLIN)
        start = time.perf_counter()
        events = await run.call("stream", fd, ep, AUDIO_AT, total, FRAME)
        elapsed = time.perf_counter() - start
        eagain = table.fds[fd].counters["eagain"]
    frames = total // FRAME
    return {
        "audio_seconds": audio_seconds,
        "frames": frames,
        "events": events,
        "eagain": eagain,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(frames / elapsed),
        "events_per_s": round(events / elapsed),
        "x_realtime": round(audio_seconds / elapsed, 1),
    }


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def chat(requests: int, fake_port: int) -> list[dict[str, Any]]:
    """The chat rows (module docstring), one server, one run."""
    import httpx

    from spear_rt.server.app import Server

    server = Server(parse_config(CHAT_CONFIG.format(port=fake_port), "bench"))
    body = {"model": "fake", "messages": [{"role": "user", "content": "Say hello in one word."}]}
    rows = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with httpx.AsyncClient() as client:
            for name, url in (
                ("HTTP straight to the fake (floor)", f"http://127.0.0.1:{fake_port}"),
                ("HTTP through spear_rt", f"http://127.0.0.1:{port}"),
            ):
                for _ in range(20):  # warm up: connections, JIT-less caches
                    (await client.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()
                samples = []
                for _ in range(requests):
                    start = time.perf_counter()
                    answer = await client.post(f"{url}/v1/chat/completions", json=body)
                    samples.append(time.perf_counter() - start)
                    answer.raise_for_status()
                rows.append(_chat_row(name, samples))
        limits = GuestLimits(fuel=10**15, memory_bytes=64 << 20)
        await run_guest_chats(server, 20, limits)  # warm up
        start = time.perf_counter()
        answered = await run_guest_chats(server, requests, limits)
        elapsed = time.perf_counter() - start
        if answered != requests:
            raise SystemExit(f"the guest got {answered} of {requests} answers")
        rows.append(_chat_row("cchat_* from a guest", [elapsed / requests] * requests))
        tg.cancel_scope.cancel()
    floor, http, guest = (r["mean_ms"] for r in rows)
    rows[1]["added_ms_vs_floor"] = round(http - floor, 3)
    rows[2]["added_ms_vs_floor"] = round(guest - floor, 3)
    rows[2]["added_ms_vs_http"] = round(guest - http, 3)
    return rows


async def run_guest_chats(server: Any, requests: int, limits: GuestLimits) -> int:
    """The chat guest's loop of `requests` completions; how many answered."""
    async with guest_host(CHAT_GUEST, server.sessions, limits=limits,
                          oneshot=server.oneshot.handle) as run:  # fmt: skip
        return int(await run.call("chats", requests))


def _chat_row(name: str, samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    mean = statistics.fmean(samples)
    return {
        "row": name,
        "requests": len(samples),
        "requests_per_s": round(1 / mean),
        "mean_ms": round(mean * 1000, 3),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


def chat_md(rows: list[dict[str, Any]]) -> str:
    """The chat rows as markdown."""
    head = "| chat completion, sequential | requests/s | mean ms | p50 ms | p99 ms "
    lines = [
        head + "| added vs floor ms | added vs HTTP ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['requests_per_s']:,} | {r['mean_ms']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {r.get('added_ms_vs_floor', '')} "
            f"| {r.get('added_ms_vs_http', '')} |"
        )
    lines.append("")
    lines.append("(the guest row times the whole loop: its p50/p99 are its mean)")
    return "\n".join(lines)


def chat_bench(requests: int) -> list[dict[str, Any]]:
    """Start the anchors' fake upstream, run the chat rows, stop it."""
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, str(ANCHORS / "fake_openai.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or fake.poll() is not None:
                    raise SystemExit("the anchors' fake_openai.py did not start") from None
                time.sleep(0.05)
        return anyio.run(chat, requests, port)
    finally:
        fake.terminate()
        fake.wait(10)


def table_md(micro_rows: list[dict[str, Any]], live_rows: dict[str, dict[str, Any]]) -> str:
    """The results as markdown."""
    lines = [
        "| hostcall (through a guest unless noted) | µs/call min | median | calls/s at min |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['row']} | {r['us_min']:.2f} | {r['us_median']:.2f} | {r['calls_per_s_at_min']:,} |"
        for r in micro_rows
    ]
    lines += [
        "",
        "| live session (stub, block_ms=10) | loop | audio s | frames/s | events/s | x real time "
        "| EAGAIN |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for loop, r in live_rows.items():
        lines.append(
            f"| guest streams 20 ms frames, drains until completed | {loop} "
            f"| {r['audio_seconds']:g} "
            f"| {r['frames_per_s']:,} | {r['events_per_s']:,} | {r['x_realtime']} | {r['eagain']} |"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the bench, print the table, write JSON and markdown to bench/results/."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000, help="hostcalls per round (micro rows)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per micro row (median kept)")
    ap.add_argument("--audio-seconds", type=float, default=20.0, help="audio per live run")
    ap.add_argument("--loops", default="trio,asyncio", help="event loops for the live rows")
    ap.add_argument("--chat-requests", type=int, default=500, help="per chat row (0: skip)")
    args = ap.parse_args()
    micro_rows = micro(args.calls, args.rounds)
    live_rows = {
        loop: anyio.run(live, args.audio_seconds, backend=loop) for loop in args.loops.split(",")
    }
    chat_rows = chat_bench(args.chat_requests) if args.chat_requests > 0 else []
    md = table_md(micro_rows, live_rows)
    if chat_rows:
        md += "\n\n" + chat_md(chat_rows)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / time.strftime("hostcalls-%Y%m%d-%H%M%S")
    record = {
        "argv": sys.argv[1:],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "micro": micro_rows,
        "live": live_rows,
        "chat": chat_rows,
    }
    base.with_suffix(".json").write_text(json.dumps(record, indent=1))
    base.with_suffix(".md").write_text(md + "\n")
    print(f"\nwrote {base.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
