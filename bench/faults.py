"""Fault mode of realtime_load.py: drop client and/or upstream connections while N sessions stream.

`realtime_load.py --fault SPEC[,SPEC...]` runs one step per (N, SPEC, loop) instead of the
latency ladder. SPEC is ``none``, ``client:T``, ``upstream:T`` or ``client:T+upstream:T``.

* ``client:T``: during the window every session kills its own socket every T seconds (session
  i first at i/N·T, so kills are spread evenly; each waits for the next append that completes
  a 200 ms block or a turn, at most 200 ms, so that the server has an answer on its way). The
  kill is SO_LINGER 0 then abort: an RST. Odd kills deliver that last append first (the
  server's answer dies with the socket and must come back in the replay); even kills lose it
  in flight instead (half a frame, then the RST: the server must not apply it and the client
  must resend it). The session reconnects at once to ``?session_id=&last_seq=`` with
  ``Spear-Resume-Token``, waits for ``spear.session.resumed``, resends every client event the
  server had not applied (located from ``input_audio_bytes`` and ``last_event_id``; commits
  carry ``event_id`` ``c<k>``, appends none), then the audio that piled up meanwhile (audio
  keeps coming during the outage, as from a microphone), and goes on at real-time pace.
* ``upstream:T``: spear_rt's backend is ``openai_realtime`` pointed at fault_net.py's proxy in
  front of the fake upstream; during the window the proxy resets every upstream connection
  every T s (``--upstream-drop all``, an upstream restart) or each one T s after it opened
  (``staggered``). spear_rt must reopen and replay; the client only sees
  ``spear.upstream.reconnected``.

Checked per session over the whole run (warm-up included), counted as **lost**: seq numbers
skipped; commits without a ``completed`` by the end of the drain; ``transcription.failed``;
a ``completed`` transcript other than the stub rule's words for the audio of that turn (the
un-faulted transcript: the no-fault row must show 0 of these); deltas of an item whose
concatenation differs from its ``completed`` transcript. Counted as **dup**: seq numbers seen
twice, a second ``completed`` for a commit, a ``completed`` for an item never committed.
Resume time: from the kill to reading ``spear.session.resumed``. RSS per session: (server RSS
at window end - RSS of the same server idle before the sessions) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import realtime_load as rl

NET = Path(__file__).resolve().parent / "fault_net.py"


def parse_fault(spec: str) -> dict[str, Any]:
    """``none`` | ``client:T`` | ``upstream:T`` | ``client:T+upstream:T`` -> {client, upstream}."""
    out: dict[str, Any] = {"name": spec, "client": None, "upstream": None}
    if spec == "none":
        return out
    for part in spec.split("+"):
        kind, _, every = part.partition(":")
        if kind not in ("client", "upstream") or not every:
            raise SystemExit(f"--fault: bad item {part!r} (client:T, upstream:T, none)")
        out[kind] = float(every)
        if out[kind] <= 0:
            raise SystemExit(f"--fault: T must be > 0 in {part!r}")
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The fault mode's options (realtime_load.py's parser)."""
    ap.add_argument(
        "--fault",
        help="fault mode: comma list of none | client:T | upstream:T | client:T+upstream:T "
        "(T seconds between drops per session / per upstream round); see bench/faults.py",
    )
    ap.add_argument(
        "--upstream-drop",
        choices=("all", "staggered"),
        default="all",
        help="upstream faults: reset all upstream connections at once, or each on its own",
    )
    ap.add_argument(
        "--live-deltas",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the fake upstream sends each word's delta as its audio arrives (else at commit)",
    )
    ap.add_argument(
        "--resume-grace", type=float, help="[realtime] resume_grace_seconds (server default 30)"
    )
    ap.add_argument("--proxy-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--aux-pids", default="", help=argparse.SUPPRESS)


def gen_main(args: argparse.Namespace) -> None:
    """Be the generator of one fault step; prints one JSON line."""
    import fault_client

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(fault_client.run_generator(args))), flush=True)


# =============================================================================================
# orchestration
# =============================================================================================


def server_config(backend: str, n: int, base_url: str, grace: float | None) -> str:
    lines = []
    if n > 900:
        lines += ["[server]", f"max_sessions = {n + 100}", ""]
    if grace is not None:
        lines += ["[realtime]", f"resume_grace_seconds = {grace}", ""]
    if backend == "remote":
        lines += [
            "[[backends]]",
            'name = "remote"',
            'kind = "openai_realtime"',
            f'base_url = "{base_url}"',
            "options = { ping_interval_s = 0 }",
            "",
        ]
    else:
        lines += ["[[backends]]", f'name = "{backend}"', f'kind = "{backend}"', ""]
    return "\n".join(lines)


def _json_lines(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.update(json.loads(line))
            except ValueError:
                pass
    return out


def run_step(
    args: argparse.Namespace, loop_name: str, n: int, spec: str, logdir: Path, tag: str
) -> dict[str, Any]:
    """One (loop, N, fault): fresh fake upstream + proxy + server, one generator run."""
    fault = parse_fault(spec)
    step = rl.Step()
    rec: dict[str, Any] = {
        "target": f"spear-{loop_name}",
        "n": n,
        "fault_spec": spec,
        "backend": args.backend,
    }
    aux: list[int] = []
    proxy_pid = 0
    logs: dict[str, Path] = {}
    py = sys.executable
    try:
        base_url = ""
        if args.backend == "remote":
            up_port, px_port = rl.free_port(), rl.free_port()
            logs["upstream"] = logdir / f"{tag}-upstream.log"
            cmd = [*rl.taskset(args.gen_cpu), py, str(NET), "upstream", "--port", str(up_port)]
            if args.live_deltas:
                cmd.append("--live-deltas")
            p = step.spawn(cmd, logs["upstream"])
            rl.wait_for_log(logs["upstream"], r"listening on", p, 30)
            aux.append(p.pid)
            logs["proxy"] = logdir / f"{tag}-proxy.log"
            every = fault["upstream"] or 0
            cmd = [*rl.taskset(args.gen_cpu), py, str(NET), "proxy", "--listen", str(px_port),
                   "--target", str(up_port), "--every", str(every),
                   "--mode", args.upstream_drop]  # fmt: skip
            p = step.spawn(cmd, logs["proxy"])
            rl.wait_for_log(logs["proxy"], r"proxy listening", p, 30)
            aux.append(p.pid)
            proxy_pid = p.pid
            base_url = f"http://127.0.0.1:{px_port}/v1"
        cfg = Path(args.tmpdir) / f"config-{tag}.toml"
        cfg.write_text(server_config(args.backend, n, base_url, args.resume_grace))
        rec["config"] = cfg.read_text()
        logs["server"] = logdir / f"{tag}-server.log"
        cmd = [*rl.taskset(args.server_cpu), py, "-m", "spear_rt.cli", "serve",
               "--listen", "127.0.0.1:0", "--loop", loop_name, "--config", str(cfg)]  # fmt: skip
        p = step.spawn(cmd, logs["server"])
        m = rl.wait_for_log(logs["server"], r"listening on http://127\.0\.0\.1:(\d+)", p, 60)
        port = int(m.group(1))
        rec["server_cmd"] = shlex.join(cmd)
        time.sleep(1.0)
        idle = rl._rss(rl._tree(p.pid))
        rec["server_rss_idle_mb"] = round(idle / 2**20, 1)
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        gen_cmd = [
            *rl.taskset(args.gen_cpu), py, str(Path(rl.__file__).resolve()), "--gen",
            "--fault", spec, "--url", url, "--sessions", str(n), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--drain", str(args.drain),
            "--turn-seconds", str(args.turn_seconds), "--fixture", args.fixture,
            "--server-pid", str(p.pid), "--proxy-pid", str(proxy_pid),
            "--aux-pids", ",".join(map(str, aux)), "--connect-timeout", str(args.connect_timeout),
        ]  # fmt: skip
        for h in args.header:
            gen_cmd += ["--header", h]
        rec["gen_cmd"] = shlex.join(gen_cmd)
        budget = args.connect_timeout + args.warmup + args.seconds + max(args.drain, 10) + 30
        result = rl.run_generator_process(gen_cmd, budget, rec)
        if result is None:
            return rec
        rec.update(result)
        end = rec.get("server_rss_end_mb")
        start, n_ok = rec.get("server_rss_start_mb"), rec.get("connected")
        if end is not None and n_ok:
            rec["rss_per_session_kb"] = round((end * 2**20 - idle) / n_ok / 1024, 1)
        if end is not None and start is not None and n_ok:  # growth while streaming
            growth = (end - start) * 1024 / n_ok / rec["window_s"]
            rec["rss_growth_kb_per_session_s"] = round(growth, 2)
        left: Any = None
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:
            try:
                left = rl.http_json(port, "/healthz")["sessions"]
            except Exception as exc:
                left = f"healthz failed: {exc!r}"[:200]
                break
            if left == 0:
                break
            time.sleep(0.1)
        rec["sessions_after_close"] = left
        rss = rl._rss(rl._tree(p.pid))
        rec["server_rss_after_close_mb"] = round(rss / 2**20, 1) if rss else None
        return rec
    except Exception as exc:
        rec["error"] = repr(exc)[:1500]
        return rec
    finally:
        rec["exit_codes"] = step.close()
        if "server" in logs:
            rec["server_log"] = rl.scan_log(logs["server"])
        for name in ("upstream", "proxy"):
            if name in logs:
                rec.update(_json_lines(logs[name]))


def _f(v: Any, nd: int = 1) -> str:
    return rl._f(v, nd)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| loop | backend | N | fault | sessions ok/fail/early | events lost | dup "
        "| commits completed/made | client kills → resumed (failed) | resume p50 / p99 ms "
        "| upstream resets → reconnected | downtime p50 / p99 ms | commit→completed p50 / p99 ms "
        "| server CPU % | RSS MB idle → start → end | RSS / session KB | growth KB/session/s "
        "| errors | core1 busy % "
        "| others CPU % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        loop = r["target"].split("-", 1)[1]
        pre = f"| {loop} | {r['backend']} | {r['n']} | {r['fault_spec']} "
        if "events_lost" not in r:
            why = (r.get("error") or "no result")[:120]
            lines.append(pre + f"| {why} |" + " |" * 15)
            continue
        res, cm, dt = r["resume_ms"], r["commit_ms"], r["upstream_downtime_ms"]
        px = r.get("proxy") or {}
        kills = f"{r['kills']} → {r['resumes']} ({r['resume_failed']})" if r["kills"] else "-"
        ups = "-"
        if px.get("resets") or r["upstream_reconnected"]:
            ups = f"{px.get('resets', '?')} → {r['upstream_reconnected']}"
        cores = r.get("core_busy_pct") or []
        lines.append(
            pre + f"| {r['connected']}/{r['conn_failures']}/{r['closed_early']} "
            f"| **{r['events_lost']}** | {r['events_dup']} "
            f"| {r['completed_ok']}/{r['commits']} | {kills} "
            f"| {_f(res['p50'], 2)} / {_f(res['p99'], 2)} | {ups} "
            f"| {_f(dt['p50'], 0)} / {_f(dt['p99'], 0)} "
            f"| {_f(cm['p50'], 1)} / {_f(cm['p99'], 1)} | {_f(r.get('server_cpu_pct'), 0)} "
            f"| {_f(r.get('server_rss_idle_mb'))} → {_f(r.get('server_rss_start_mb'))} "
            f"→ {_f(r.get('server_rss_end_mb'))} | {_f(r.get('rss_per_session_kb'))} "
            f"| {_f(r.get('rss_growth_kb_per_session_s'), 2)} | {r['errors']} "
            f"| {_f(cores[1] if len(cores) > 1 else None, 0)} "
            f"| {_f(r.get('foreign_cpu_pct'), 0)} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        rl.log("--plot: matplotlib is not installed here (see bench/README.md)")
        return False
    rows = [r for r in results if "events_lost" in r]
    if not rows:
        return False
    labels = [
        "\n".join([r["target"].split("-", 1)[1], f"N={r['n']}", *r["fault_spec"].split("+")])
        for r in rows
    ]
    xs = range(len(rows))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.8))
    for key, ax, title in (
        ("resume_ms", ax1, "client resume: kill → resumed, ms"),
        ("upstream_downtime_ms", ax2, "upstream downtime (server-reported), ms"),
    ):
        p50 = [r[key]["p50"] or 0 for r in rows]
        p99 = [r[key]["p99"] or 0 for r in rows]
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax3.bar(list(xs), [r.get("rss_per_session_kb") or 0 for r in rows])
    ax3.set_title("server RSS per session (end - idle) / N, KB", fontsize=9)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    lost = sum(r["events_lost"] for r in rows)
    fig.suptitle(f"spear_rt fault mode (events lost over all rows: {lost})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(args: argparse.Namespace) -> int:
    specs = [s for s in args.fault.replace(" ", "").split(",") if s]
    faults = [parse_fault(s) for s in specs]
    if args.backend is None:
        args.backend = "remote"
    if args.backend not in ("remote", "stub"):
        raise SystemExit("--fault runs with --backend remote (fake upstream) or stub")
    if args.backend == "stub" and any(f["upstream"] for f in faults):
        raise SystemExit("upstream faults need --backend remote (the stub has no connection)")
    if args.url:
        raise SystemExit("--fault starts its own servers; --url is not supported")
    ns = [int(x) for x in str(args.sessions).replace(" ", "").split(",") if x]
    loops = [lp for lp in args.loop.split(",") if lp]
    rl.NICE, rl.RT_PRIO = args.nice, args.rt_prio
    if args.gen_cpu is not None and (os.cpu_count() or 1) >= 2:
        try:
            os.sched_setaffinity(0, {args.gen_cpu})
        except OSError:
            pass
    rl.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = rl.RESULTS / f"realtime_faults-{stamp}"
    logdir = rl.RESULTS / f"realtime_faults-{stamp}-logs"
    logdir.mkdir()
    args.tmpdir = __import__("tempfile").mkdtemp(prefix="spear-bench-")
    meta = {"argv": sys.argv, "host": rl.host_info(), "started": stamp}
    order = [(n, spec, lp) for n in ns for spec in specs for lp in loops]
    results: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for i, (n, spec, lp) in enumerate(order, 1):
            tag = f"{i:02d}-{lp}-n{n}-{spec.replace(':', '').replace('+', '_')}"
            rl.log(f"step {i}/{len(order)}: {lp} N={n} fault={spec}")
            for attempt in range(args.retries + 1):
                quiet = rl.wait_quiet(args)
                rec = run_step(args, lp, n, spec, logdir, f"{tag}-a{attempt}")
                rec.update({"step": i, "attempt": attempt, "busy_before_pct": quiet,
                            "seconds": args.seconds, "warmup": args.warmup,
                            "turn_seconds": args.turn_seconds, "upstream_drop": args.upstream_drop,
                            "live_deltas": args.live_deltas, "meta": meta})  # fmt: skip
                foreign = rec.get("foreign_cpu_pct")
                if foreign is not None and foreign > args.retry_busy and attempt < args.retries:
                    rec["discarded"] = f"other jobs used {foreign} % CPU during the window; retried"
                    rl.log(f"  {rec['discarded']}")
                    discarded.append(rec)
                    continue
                break
            results.append(rec)
            base.with_suffix(".json").write_text(json.dumps(results + discarded, indent=1))
            if "events_lost" in rec:
                rl.log(
                    f"  connected {rec['connected']}/{n} lost {rec['events_lost']} "
                    f"dup {rec['events_dup']} completed {rec['completed_ok']}/{rec['commits']} "
                    f"resumes {rec['resumes']}/{rec['kills']} p99 {rec['resume_ms']['p99']} ms "
                    f"upstream reconnected {rec['upstream_reconnected']} "
                    f"rss/session {rec.get('rss_per_session_kb')} KB cpu {rec['server_cpu_pct']}%"
                )
            else:
                rl.log(f"  {rec.get('error')}")
            time.sleep(args.pause)
    finally:
        for p in Path(args.tmpdir).glob("*"):
            p.unlink()
        os.rmdir(args.tmpdir)
    text = table(results) + "\n"
    base.with_suffix(".md").write_text(text)
    print(text)
    rl.log(f"wrote {base.with_suffix('.json')} and .md ({time.monotonic() - t0:.0f} s)")
    if args.plot and plot(results, base.with_suffix(".png")):
        rl.log(f"wrote {base.with_suffix('.png')}")
    return 0


def replot(path: Path, with_png: bool) -> None:
    results = [r for r in json.loads(path.read_text()) if not r.get("discarded")]
    print(table(results))
    if with_png and plot(results, path.with_suffix(".png")):
        rl.log(f"wrote {path.with_suffix('.png')}")
