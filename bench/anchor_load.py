"""`realtime_load.py --compare --load anchors`: issue 16's relay table, side by side in one run.

Every target of a step gets the anchors' own load generator and fake upstream, so the rows
are comparable with the anchors' README and with each other:

* upstream: ``rt_upstream.py --session-created --on-commit`` (core 1): ``session.created`` on
  connect, each ``input_audio_buffer.commit`` answered with committed + one delta + completed;
* generator: ``rt_loadgen.py --commit-every-10 --first-event <session.update, no VAD>``
  (core 1): 20 ms appends, a commit after every 10th; latency = 10th append -> its delta;
* ``direct``: generator -> upstream; ``relay``: the anchors' bare relay
  (``rt_relay_asyncio.py --uvloop``, core 0); ``spear-L``: ``spear-rt serve --loop L`` (core 0)
  with one ``openai_realtime`` instance at the upstream (the path a deployment relays).

The generator's JSON line is mapped onto the bench's record (``delta_ms``, ``server_cpu_pct``,
``server_rss_mb``, ...), so the table, knees and plot are realtime_load.py's own.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import realtime_load as rl

FIRST_EVENT = '{"type":"session.update","session":{"turn_detection":null}}'
MODEL = "fake"


def spear_config(up_port: int, n: int) -> str:
    """One openai_realtime instance at the fake upstream; room for N sessions."""
    return "\n".join([
        "[server]", f"max_sessions = {max(1000, n + 100)}", "",
        "[[backends]]", f'name = "{MODEL}"', 'kind = "openai_realtime"',
        f'base_url = "http://127.0.0.1:{up_port}/v1"', "",
    ])  # fmt: skip


def run_step(args: argparse.Namespace, mode: str, n: int, logdir: Path, tag: str) -> dict[str, Any]:
    """One N against one target with the anchors' generator; everything stopped after."""
    step = rl.Step()
    backend = "openai_realtime -> fake upstream" if mode.startswith("spear-") else "fake upstream"
    rec: dict[str, Any] = {"target": mode, "n": n, "backend": backend, "load": "anchors"}
    server_pid, port = 0, 0
    try:
        up_port = rl.free_port()
        up_log = logdir / f"{tag}-upstream.log"
        up_cmd = [*rl.taskset(args.gen_cpu), args.anchors_python,
                  str(rl.ANCHORS / "rt_upstream.py"), "--port", str(up_port),
                  "--session-created", "--on-commit"]  # fmt: skip
        up = step.spawn(up_cmd, up_log)
        rl.wait_for_log(up_log, r"listening on", up, 20)
        rec["upstream_cmd"] = shlex.join(up_cmd)
        port = up_port
        if mode == "relay":
            port = rl.free_port()
            relay_log = logdir / f"{tag}-relay.log"
            cmd = [*rl.taskset(args.server_cpu), args.anchors_python,
                   str(rl.ANCHORS / "rt_relay_asyncio.py"), "--port", str(port),
                   "--upstream", f"ws://127.0.0.1:{up_port}", "--uvloop"]  # fmt: skip
            p = step.spawn(cmd, relay_log)
            rl.wait_for_log(relay_log, r"relay\(", p, 20)
            server_pid, rec["server_cmd"] = p.pid, shlex.join(cmd)
        elif mode.startswith("spear-"):
            cfg = logdir / f"{tag}.toml"
            cfg.write_text(spear_config(up_port, n))
            log_path = logdir / f"{tag}-server.log"
            cmd = [*rl.taskset(args.server_cpu), sys.executable, "-m", "spear_rt.cli", "serve",
                   "--listen", "127.0.0.1:0", "--loop", mode.split("-", 1)[1],
                   "--config", str(cfg)]  # fmt: skip
            p = step.spawn(cmd, log_path)
            m = rl.wait_for_log(log_path, r"listening on http://127\.0\.0\.1:(\d+)", p, 60)
            port = int(m.group(1))
            server_pid, rec["server_cmd"], rec["config"] = p.pid, shlex.join(cmd), cfg.read_text()
        url = f"ws://127.0.0.1:{port}/v1/realtime?model={MODEL}"
        gen_cmd = [*rl.taskset(args.gen_cpu), args.anchors_python,
                   str(rl.ANCHORS / "rt_loadgen.py"), "--url", url, "-n", str(n),
                   "--duration", str(args.seconds), "--warmup", str(args.warmup),
                   "--drain", str(args.drain), "--connect-timeout", str(args.connect_timeout),
                   "--relay-pid", str(server_pid), "--upstream-pid", str(up.pid),
                   "--label", mode, "--commit-every-10", "--first-event", FIRST_EVENT]  # fmt: skip
        rec["gen_cmd"] = shlex.join(gen_cmd)
        budget = args.connect_timeout + args.warmup + args.seconds + args.drain + 30
        result = rl.run_generator_process(gen_cmd, budget, rec)
        if result is None:
            return rec
        rec.update(_record(result))
        if mode.startswith("spear-"):
            rec["sessions_after_close"] = _sessions_left(port)
        return rec
    except Exception as exc:
        rec["error"] = repr(exc)[:1500]
        return rec
    finally:
        rec["exit_codes"] = step.close()
        if mode.startswith("spear-"):
            rec["server_log"] = rl.scan_log(logdir / f"{tag}-server.log")


def _record(g: dict[str, Any]) -> dict[str, Any]:
    """rt_loadgen.py's line in the bench's record format (its own keys kept under `anchor`)."""
    lat = g["lat_ms"]
    cores = g.get("core_busy_pct") or []
    ours = sum(v or 0.0 for v in (g.get("relay_cpu_pct"), g.get("upstream_cpu_pct"),
                                  g.get("loadgen_cpu_pct")))  # fmt: skip
    busy = sum(c for c in cores if c is not None)
    return {
        "connected": g["connected"],
        "conn_failures": g["conn_failures"],
        "connect_s": g["connect_s"],
        "window_s": g["window_s"],
        "achieved_pct": g["achieved_pct"],
        "deltas_expected": g["deltas_expected"],
        "deltas_received": g["deltas_received"],
        "dropped_at_source": g["dropped_at_source"],
        "late_slots": g["late_slots"],
        "closed_early": g["closed_early"],
        "errors": 0,  # the anchors' generator counts every non-delta message as other_msgs
        "other_msgs": g["other_msgs"],
        "delta_ms": {**lat, "count": g["deltas_received"]},
        "commit_ms": {"count": 0, "p50": None, "p99": None},
        "server_cpu_pct": g.get("relay_cpu_pct"),
        "server_rss_mb": {"max": g.get("relay_rss_mb"), "end": None},
        "upstream_cpu_pct": g.get("upstream_cpu_pct"),
        "gen_cpu_pct": g.get("loadgen_cpu_pct"),
        "core_busy_pct": cores,
        "foreign_cpu_pct": round(max(0.0, busy - ours), 1) if cores else None,
        "anchor": g,
    }


def _sessions_left(port: int) -> Any:
    """After the generator closed every session: how many the server still holds (5 s)."""
    import time

    left: Any = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            left = rl.http_json(port, "/healthz")["sessions"]
        except Exception as exc:
            return f"healthz failed: {exc!r}"[:200]
        if left == 0:
            break
        time.sleep(0.1)
    return left
