#!/usr/bin/env python3
"""Conversation load bench: N concurrent voice conversations against fixed-latency fakes.

Setup (2-core machine):

* the fake voice upstream (``bench/fake_voice_upstream.py``) on **core 1**: streaming chat whose
  first token comes 200 ms after the request and each next one 20 ms later, and speech that
  answers each sentence's WAV 50 ms after the request; it records when it really read and wrote
  everything (``GET /stats``, CLOCK_MONOTONIC) and whether a stream was aborted;
* spear_rt on **core 0** (``taskset -c 0 spear-rt serve --config <tmp toml> --loop L``), a fresh
  process per N, ``[conversation]`` chat and speech stages pointed at two ``openai_http``
  instances on the fake; a ``stub`` instance transcribes the barge-in turns' audio;
* this process, the load generator, on **core 1** too (uvloop, hand-written WebSocket
  clients: ``bench/conversation_client.py``).

Per N: one warm-up conversation, a wait for a quiet second (other processes and other guests
of the VM under --quiet-pct of a core), then N conversations connect (≤ 20 at a time), each
starts at a random offset within one turn's cycle (--ramp-ms) and runs `--turns` spoken
answers (--pace playback: the next turn after the answer's audio would have played, + think),
one ``response.cancel`` turn and one server-VAD barge-in turn (conversation_client.py).

Measured per spoken answer, all on one clock (CLOCK_MONOTONIC in every process):

* **added** = (first ``response.output_audio.delta`` read - ``response.create`` written) -
  (the fake's chat time: request read → the token completing the first sentence written) -
  (the fake's speech time: request read → WAV written). That is spear_rt's share of the
  critical path, both loopback hops and the client's own read included. **nominal added**
  subtracts the configured delays instead (200 + 5 × 20 + 50 = 350 ms: the first sentence is
  6 tokens). The three pieces of *added*: client → fake (``response.create`` written → chat
  request read), sentence → speech (first sentence's last token written → speech request
  read), speech → client (WAV written → first audio delta read);
* cancel: ``response.cancel`` written → ``response.done`` (cancelled) read; barge-in:
  ``input_audio_buffer.speech_started`` read → ``response.done`` (cancelled) read, and from the
  append that makes server VAD fire (written) to ``response.done`` read; for both, the
  time the fake saw the chat stream closed, events of the response after its ``response.done``
  (must be 0) and speech requests the fake read after the cancel;
* server CPU seconds per conversation (psutil, from before the N connect to their end) and RSS
  per conversation (RSS with the N conversations still open, minus RSS after the warm-up, / N).

Writes bench/results/conversation_load.json and .png (``--out`` to change), prints the table.
Not part of spear_rt; 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from conversation_client import (  # noqa: E402
    Conversation,
    client_frame,
    json_frame,
    speech_frames,
)
from conversation_procs import (  # noqa: E402
    Proc,
    busy_per_core,
    free_port,
    git_head,
    http_json,
    ours_cpu_s,
    renice,
    spear_file,
    steal_s,
)
from conversation_report import plot, summarize, table, verdicts  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
FIXTURE = str(REPO / "fixtures" / "audio" / "speech_go_forward.wav")

CONFIG = """
[server]
listen = "127.0.0.1:{port}"

[conversation]
chat_backend = "fake_chat"
chat_model = "fake-chat"
speech_backend = "fake_tts"
speech_model = "fake-tts"

[[backends]]
name = "fake_chat"
kind = "openai_http"
base_url = "http://127.0.0.1:{fake}/v1"
ops = ["chat_completions"]
options = {{ max_connections = 512 }}

[[backends]]
name = "fake_tts"
kind = "openai_http"
base_url = "http://127.0.0.1:{fake}/v1"
ops = ["text_to_speech"]
options = {{ max_connections = 512 }}

[[backends]]
name = "stub"
kind = "stub"
"""


# --- processes -----------------------------------------------------------------------------


# --- one step ------------------------------------------------------------------------------


class Gen:
    """What every conversation of a run shares: pre-built frames and settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.response_create = json_frame({"type": "response.create"})
        self.response_cancel = client_frame(b'{"type":"response.cancel"}')
        self.speech, self.speech_trigger = speech_frames(args.fixture)


async def sample_rss(server: Proc, out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append(server.rss_mb())
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def wait_quiet(args: argparse.Namespace, *procs: Proc) -> tuple[float, float]:
    """Wait (≤ --quiet-wait s) until processes outside the bench and other guests of the host
    (steal) use < --quiet-pct of a core over a second; (seconds waited, that last share %)."""
    t0 = time.monotonic()
    while True:
        busy0, ours0, w0 = sum(busy_per_core()), ours_cpu_s(*procs), time.monotonic()
        steal0 = steal_s()
        await asyncio.sleep(1.0)
        others = sum(busy_per_core()) - busy0 - (ours_cpu_s(*procs) - ours0)
        others += steal_s() - steal0
        pct = 100 * others / (time.monotonic() - w0)
        if pct < args.quiet_pct or time.monotonic() - t0 > args.quiet_wait:
            return round(time.monotonic() - t0, 1), round(pct, 1)


def ramp_s(args: argparse.Namespace, fake_stats: dict[str, Any]) -> float:
    """Over how long the N conversations start: one turn's cycle, so their turns are spread
    over it instead of arriving together (--ramp-ms, else think + the answer's time: its audio
    played with --pace playback, its generation with eager)."""
    if args.ramp_ms is not None:
        return args.ramp_ms / 1000
    c = fake_stats["config"]
    tokens = c["sentences"] * c["tokens_per_sentence"]
    if args.pace == "playback":  # a token is a word; each word is audio_ms_per_word of audio
        answer_ms = c["first_token_ms"] + tokens * c["audio_ms_per_word"]
    else:
        answer_ms = c["first_token_ms"] + tokens * c["token_ms"]
    return (args.think_ms + answer_ms) / 1000


async def run_step(
    n: int, args: argparse.Namespace, gen: Gen, server: Proc, port: int, fake: str, fake_p: Proc
) -> dict[str, Any]:
    # warm-up: one whole conversation (every path once), not counted
    warm = Conversation(gen, 0, port)
    await warm.connect()
    await warm.run(1, 0.1, args.cancel_after_ms / 1000, barge=True, playback=False)
    warm.close()
    await asyncio.sleep(1.0)
    http_json(f"{fake}/reset", "POST")
    stats0 = http_json(f"{fake}/stats")
    waited, quiet_pct = await wait_quiet(args, server, fake_p)
    rss_idle, cpu0, busy0, t0 = server.rss_mb(), server.cpu_s(), busy_per_core(), time.monotonic()
    fake0, own0, steal0 = fake_p.cpu_s(), ours_cpu_s(), steal_s()
    rss: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, rss, stop))
    convs = [Conversation(gen, i, port) for i in range(1, n + 1)]
    gate = asyncio.Semaphore(20)

    async def connect(c: Conversation) -> None:
        async with gate:
            try:
                await c.connect()
            except (OSError, TimeoutError, ConnectionError) as exc:
                c.failed = f"connect: {exc}"

    await asyncio.gather(*(connect(c) for c in convs))
    rss_connected = server.rss_mb()
    think = args.think_ms / 1000
    ramp = ramp_s(args, stats0)

    async def converse(c: Conversation) -> None:
        if c.failed:
            return
        await asyncio.sleep(random.uniform(0, ramp))
        try:
            await c.run(
                args.turns, think, args.cancel_after_ms / 1000, barge=True,
                playback=args.pace == "playback",
            )  # fmt: skip
        except (OSError, TimeoutError, ConnectionError) as exc:
            c.failed = f"run: {exc}"

    t_run = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(converse(c) for c in convs)), args.step_timeout)
    t_end = time.monotonic()
    cpu1, rss_open, busy1 = server.cpu_s(), server.rss_mb(), busy_per_core()
    fake1, own1, steal1 = fake_p.cpu_s(), ours_cpu_s(), steal_s()
    others = sum(busy1) - sum(busy0) - (cpu1 - cpu0) - (fake1 - fake0) - (own1 - own0)
    stop.set()
    await sampler
    for c in convs:
        c.close()
    await asyncio.sleep(0.5)
    stats = http_json(f"{fake}/stats")
    wall = t_end - t0
    return {
        "n": n,
        "wall_s": round(wall, 2),
        "run_s": round(t_end - t_run, 2),
        "ramp_s": round(ramp, 2),
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
        "core_busy_pct": [
            round(100 * (b - a) / wall, 1) for a, b in zip(busy0, busy1, strict=True)
        ],
        "fake_cpu_pct": round(100 * (fake1 - fake0) / wall, 1),
        "loadgen_cpu_pct": round(100 * (own1 - own0) / wall, 1),
        "others_cpu_pct": round(100 * others / wall, 1),
        "steal_pct": round(100 * (steal1 - steal0) / wall, 1),
        "quiet_wait_s": waited,
        "others_cpu_pct_before": quiet_pct,
        "rss_idle_mb": round(rss_idle, 1),
        "rss_connected_mb": round(rss_connected, 1),
        "rss_open_mb": round(rss_open, 1),
        "rss_peak_mb": round(max([*rss, rss_open]), 1),
        "convs": convs,
        "fake": stats,
    }


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="conversation_load-"))
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = args.src
    fake_port = args.fake_port or free_port()
    fake = Proc(
        "fake",
        ["taskset", "-c", LOAD_CORE, sys.executable, str(HERE / "fake_voice_upstream.py"),
         "--port", str(fake_port)],
        tmp / "fake.log", env,
    )  # fmt: skip
    renice(fake.popen.pid, args.nice)
    fake_url = f"http://127.0.0.1:{fake_port}"
    where = spear_file(env, tmp)
    print(f"server: spear_rt from {where}; logs in {tmp}", flush=True)
    args.spear_rt_file, args.logs = where, str(tmp)
    rows = []
    gen = Gen(args)
    try:
        fake.wait_ready(f"{fake_url}/healthz", 30)
        for n in args.n:
            port = free_port()
            cfg = tmp / f"server-{n}.toml"
            cfg.write_text(CONFIG.format(port=port, fake=fake_port))
            spear = str(Path(sys.executable).parent / "spear-rt")
            argv = ["taskset", "-c", SERVER_CORE]
            if args.cprofile:
                prof = Path(args.out).with_suffix(f".n{n}.prof")
                argv += [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "spear_rt.cli"]
            else:
                argv += [spear]
            argv += ["serve", "--config", str(cfg), "--loop", args.loop]
            server = Proc(f"spear-{n}", argv, tmp / f"server-{n}.log", env)
            renice(server.popen.pid, args.nice)
            try:
                ready = server.wait_ready(f"http://127.0.0.1:{port}/healthz")
                print(f"N={n}: server pid {server.popen.pid} ready in {ready:.1f} s", flush=True)
                row = await run_step(n, args, gen, server, port, fake_url, fake)
            finally:
                code = server.stop()
            row["server_exit"] = code
            row["server_log_tail"] = server.log.read_text(errors="replace")[-1500:]
            row["tracebacks"] = server.log.read_text(errors="replace").count("Traceback")
            raw = {
                "fake": row["fake"],
                "tracks": [t.__dict__ | {"ids": None} for c in row["convs"] for t in c.tracks],
            }
            (tmp / f"raw-{n}.json").write_text(json.dumps(raw))  # every time, for diagnosis
            summary = summarize(row)
            rows.append(summary)
            print(table([summary]).splitlines()[-1], flush=True)
    finally:
        fake.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="10,50,100", help="concurrent conversations per step")
    ap.add_argument("--turns", type=int, default=3, help="spoken answers per conversation")
    ap.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio", "trio"))
    ap.add_argument("--quick", action="store_true", help="N=10, 1 turn: checks the script")
    ap.add_argument(
        "--pace", choices=("playback", "eager"), default="playback",
        help="next turn after the answer's audio played (+ think), or right after response.done",
    )  # fmt: skip
    ap.add_argument(
        "--ramp-ms", type=float, default=None,
        help="start the conversations over this long (default: one turn's cycle)",
    )  # fmt: skip
    ap.add_argument("--think-ms", type=float, default=1000, help="pause after each answer (±50%%)")
    ap.add_argument(
        "--cancel-after-ms", type=float, default=300,
        help="cancel / start speaking this long after the first audio delta",
    )  # fmt: skip
    ap.add_argument("--fixture", default=FIXTURE, help="speech for the barge-in turn")
    ap.add_argument("--src", default=None, help="spear_rt source tree for the server (PYTHONPATH)")
    ap.add_argument("--fake-port", type=int, default=0)
    ap.add_argument("--step-timeout", type=float, default=120)
    ap.add_argument("--quiet-pct", type=float, default=15,
                    help="before a step, wait until others use < this %% of a core")  # fmt: skip
    ap.add_argument("--quiet-wait", type=float, default=30, help="...for at most this long (s)")
    ap.add_argument(
        "--nice", type=int, default=None,
        help="give the bench's processes this nice value, per session (e.g. -10 on a shared "
        "machine; negative needs root): the load generator moves to its own session",
    )  # fmt: skip
    ap.add_argument("--cprofile", action="store_true", help="run the server under cProfile")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "conversation_load.json"))
    args = ap.parse_args()
    args.src = os.path.abspath(args.src) if args.src else None
    args.n = [10] if args.quick else [int(x) for x in args.n.split(",")]
    if args.quick:
        args.turns = 1
        args.ramp_ms = args.think_ms if args.ramp_ms is None else args.ramp_ms
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    if args.nice is not None:
        if os.getsid(0) != os.getpid():
            try:
                os.setsid()
            except OSError:  # a process group leader: stays in its session
                pass
        renice(os.getpid(), args.nice)
    import uvloop

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load0 = os.getloadavg()
    rows = uvloop.run(run_all(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": {
            "command": shlex.join(["python", "bench/conversation_load.py", *sys.argv[1:]]),
            "started": started,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loop": args.loop,
            "turns": args.turns,
            "think_ms": args.think_ms,
            "pace": args.pace,
            "nice": args.nice,
            "cancel_after_ms": args.cancel_after_ms,
            "src": args.src or str(REPO),
            "spear_rt_file": args.spear_rt_file,
            "logs": args.logs,
            "repo_head": git_head(str(REPO)),
            "src_head": git_head(args.src) if args.src else None,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "server_core": SERVER_CORE,
            "load_core": LOAD_CORE,
        },
        "steps": rows,
    }
    out.write_text(json.dumps(data, indent=1))
    print()
    print(table(rows))
    print()
    for line in verdicts(rows):
        print(line)
    png = out.with_suffix(".png")
    if plot(rows, png):
        print(f"\nwrote {out} and {png}")
    else:
        print(f"\nwrote {out} (no plot: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
