#!/usr/bin/env python3
"""Attack bench: replay the attack classes of issue 10 against a spear-rt server, one at a time.

Each class gets a fresh server (``--python`` + ``--src`` tree, ``--loop``) on 127.0.0.1, or the
server at ``--url`` (with ``--pid`` for RSS). While a class runs, a thread samples the server's
RSS (psutil, every 20 ms) and another polls ``GET /healthz`` every ~20 ms on a fresh connection:
its max / p99 latency is the loop stall. A class is bounded in count and time; if the server's
RSS passes ``--rss-cap-mb`` (default 1536) the server is killed and the class is "broke: RSS >
cap". Loopback only. Prints one table row per class and writes
``bench/results/attack-<timestamp>.json`` (+ ``.md``, the table).

    python bench/attack.py                                  # /work/main tree, uvloop
    python bench/attack.py --src /tmp/before --loop trio    # another checkout
    python bench/attack.py --classes redos,deepjson --quick
    python bench/attack.py --classes longspeech             # slow: 70 s of speech, not in "all"

The classes are in bench/attack_classes.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack_classes as ac

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A spear-rt server subprocess from a given source tree, logging to a file."""

    def __init__(
        self,
        python: str,
        src: Path,
        loop: str,
        log: Path,
        config: str | None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.python, self.src, self.loop, self.log_path = python, src, loop, log
        self.config, self.extra_env = config, extra_env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The environment that makes `spear_rt` resolve to the source tree."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.src)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        """Start the server and wait (≤ 30 s) for /healthz."""
        cmd = [self.python, "-m", "spear_rt.cli", "serve", "--loop", self.loop]
        cmd += ["--listen", f"127.0.0.1:{self.port}"]
        if self.config:
            cmd += ["--config", self.config]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=self.src, env=self.env(), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}: see {self.log_path}")
            if healthz(self.port, 1.0) is not None:
                return
            time.sleep(0.1)
        raise SystemExit(f"server did not answer /healthz in 30 s: see {self.log_path}")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (the RSS cap)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def healthz(port: int, timeout: float) -> float | None:
    """Seconds one ``GET /healthz`` took on a fresh connection; None if it failed."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    return time.monotonic() - t0 if data.startswith(b"HTTP/1.1 200") else None


@dataclass
class Watch:
    """RSS sampler + /healthz prober threads around one class."""

    pid: int | None
    port: int
    cap_mb: float
    on_cap: Any
    rss: list[float] = field(default_factory=list)
    probes: list[float] = field(default_factory=list)
    probe_failures: int = 0
    capped: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start both threads."""
        self.threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        """Stop both threads (the prober may be stuck in one probe ≤ its timeout)."""
        self.stop.set()
        for t in self.threads:
            t.join(35)

    def _sample(self) -> None:
        if self.pid is None:
            return
        while not self.stop.is_set():
            mb = rss_mb(self.pid)
            if mb is None:
                return
            self.rss.append(mb)
            if mb > self.cap_mb and not self.capped:
                self.capped = True
                self.on_cap()
                return
            time.sleep(0.02)

    def _probe(self) -> None:
        while not self.stop.is_set():
            took = healthz(self.port, 30.0)
            if took is None:
                self.probe_failures += 1
                if self.capped:
                    return
            else:
                self.probes.append(took)
            self.stop.wait(0.02)


def rss_mb(pid: int) -> float | None:
    """RSS of `pid` in MB (None once it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.Error:
        return None


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def log_counts(text: str) -> dict[str, int]:
    """Tracebacks and ERROR lines in a slice of the server log."""
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "error_lines": sum(
            1 for line in text.splitlines() if " ERROR " in line or "ERROR:" in line
        ),
    }


def run_class(args: argparse.Namespace, name: str, cls: ac.AttackClass) -> dict[str, Any]:
    """One class on a fresh server (or the --url one): measurements + verdict."""
    log = Path(args.logdir) / f"server-{name}.log"
    server: Server | None = None
    cleanup: Any = None
    if cls.needs_server and not args.url:
        config, env = args.config, {}
        if cls.setup is not None:
            text, env, cleanup = cls.setup()
            config = str(Path(args.logdir) / f"config-{name}.toml")
            Path(config).write_text(text)
        server = Server(args.python, Path(args.src), args.loop, log, config, env)
        server.start()
        pid, port = server.proc.pid if server.proc else None, server.port
    elif cls.needs_server:
        pid, port = args.pid, int(args.url.rsplit(":", 1)[1].split("/")[0])
    else:
        pid, port = None, 0
    ctx = ac.Context(
        port=port,
        python=args.python,
        src=Path(args.src),
        quick=args.quick,
        cap_mb=args.rss_cap_mb,
        workdir=Path(args.logdir),
    )
    offset = log.stat().st_size if log.exists() else 0

    def log_text() -> str:
        if not log.exists():
            return ""
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    ctx.log_text = log_text
    time.sleep(0.5)
    before = rss_mb(pid) if pid else None
    watch = Watch(pid, port, args.rss_cap_mb, server.kill if server else (lambda: None))
    if cls.needs_server:
        ctx.capped = lambda: watch.capped
        watch.start()
    t0 = time.monotonic()
    try:
        result = asyncio.run(_bounded(cls, ctx, watch))
    except Exception as exc:  # the bench reports, it does not stop
        result = ac.Result(False, f"bench error: {type(exc).__name__}: {exc}")
    elapsed = time.monotonic() - t0
    if cls.needs_server:
        time.sleep(1.0)  # settle: what the server keeps after the class
    after = rss_mb(pid) if pid else None
    if cls.needs_server:
        watch.finish()
    counts = log_counts(log_text())
    rss = watch.rss or ([before] if before else [])
    if not cls.needs_server:
        before, after, rss = result.rss_before, result.rss_after, result.rss_samples
    row: dict[str, Any] = {
        "class": name,
        "rss_before_mb": before,
        "rss_peak_mb": max(rss) if rss else None,
        "rss_after_mb": after if (server is None or server.alive()) else None,
        "healthz_max_ms": 1000 * max(watch.probes) if watch.probes else None,
        "healthz_p99_ms": 1000 * p99(watch.probes) if watch.probes else None,
        "healthz_probes": len(watch.probes),
        "healthz_failures": watch.probe_failures,
        "seconds": round(elapsed, 2),
        **counts,
        "details": result.details,
    }
    row["verdict"], row["why"] = verdict(row, result, watch, args, cls)
    if server is not None:
        server.stop()
    if cleanup is not None:
        cleanup()
    return row


async def _bounded(cls: ac.AttackClass, ctx: ac.Context, watch: Watch) -> ac.Result:
    """The class under its time limit; stops early at the RSS cap."""
    task = asyncio.ensure_future(cls.run(ctx))
    deadline = time.monotonic() + cls.limit_s
    while not task.done():
        if watch.capped or time.monotonic() > deadline:
            task.cancel()
            try:
                await task
            except BaseException:
                pass
            why = f"RSS > {ctx.cap_mb:.0f} MB" if watch.capped else f"timed out ({cls.limit_s} s)"
            return ac.Result(False, why)
        await asyncio.sleep(0.05)
    return task.result()


def verdict(
    row: dict[str, Any], result: ac.Result, watch: Watch, args: Any, cls: ac.AttackClass
) -> tuple[str, str]:
    """held / broke and why: the class's own check, then RSS cap and budgets, stalls, tracebacks."""
    reasons = []
    if watch.capped:
        reasons.append(f"RSS > {args.rss_cap_mb:.0f} MB (server killed)")
    if not result.held:
        reasons.append(result.why)
    before, peak, after = row["rss_before_mb"], row["rss_peak_mb"], row["rss_after_mb"]
    if before is not None and peak is not None and peak - before > cls.rss_budget_mb:
        reasons.append(f"RSS +{peak - before:.0f} MB")
    if before is not None and after is not None and after - before > cls.rss_keep_mb:
        reasons.append(f"RSS stayed +{after - before:.0f} MB")
    stall = row["healthz_max_ms"]
    if stall is not None and stall > args.stall_ms:
        reasons.append(f"loop stalled {stall / 1000:.1f} s")
    if row["tracebacks"]:
        reasons.append(f"{row['tracebacks']} tracebacks in log")
    if reasons:
        return "broke", "; ".join(dict.fromkeys(reasons))
    return "held", result.why


def fmt(value: float | None, digits: int = 0) -> str:
    """A number for the table (– when unknown)."""
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table."""
    out = [
        "| class | RSS before/peak/after MB | healthz max/p99 ms | outcome |",
        "|---|---|---|---|",
    ]
    for r in rows:
        rss = "/".join(fmt(r[k]) for k in ("rss_before_mb", "rss_peak_mb", "rss_after_mb"))
        hz = f"{fmt(r['healthz_max_ms'])}/{fmt(r['healthz_p99_ms'])}"
        out.append(f"| {r['class']} | {rss} | {hz} | **{r['verdict']}**: {r['why']} |")
    return "\n".join(out)


def spear_file(python: str, src: str) -> str:
    """Where `spear_rt` resolves for this python + tree (checked before any run)."""
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [python, "-c", "import spear_rt; print(spear_rt.__file__)"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def git_head(src: str) -> str:
    """The tree's commit (or '?')."""
    out = subprocess.run(
        ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def main() -> None:
    """Parse arguments, run the selected classes, print and save the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--src", default=str(HERE.parent), help="source tree (PYTHONPATH, cwd)")
    ap.add_argument("--loop", choices=("trio", "asyncio", "uvloop"), default="uvloop")
    ap.add_argument("--config", help="server config (default: the embedded default)")
    ap.add_argument("--url", help="attack this running server (http://127.0.0.1:PORT)")
    ap.add_argument("--pid", type=int, help="its pid, for RSS (with --url)")
    ap.add_argument("--classes", default="all", help=f"comma list of {','.join(ac.CLASSES)}")
    ap.add_argument("--quick", action="store_true", help="smaller counts")
    ap.add_argument("--rss-cap-mb", type=float, default=1536.0)
    ap.add_argument("--stall-ms", type=float, default=1000.0, help="healthz max above = broke")
    ap.add_argument("--out", help="JSON path (default bench/results/attack-<time>.json)")
    args = ap.parse_args()
    names = (
        [n for n, c in ac.CLASSES.items() if c.default]
        if args.classes == "all"
        else [n.strip() for n in args.classes.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in ac.CLASSES]
    if unknown:
        raise SystemExit(f"unknown classes: {unknown} (known: {list(ac.CLASSES)})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"attack-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.logdir = tempfile.mkdtemp(prefix=f"attack-{stamp}-", dir=out.parent)
    where = spear_file(args.python, args.src) if not args.url else args.url
    head = git_head(args.src)
    print(f"spear_rt = {where} ({head}), loop {args.loop}, logs in {args.logdir}", flush=True)
    rows = []
    for name in names:
        print(f"-- {name} ...", flush=True)
        row = run_class(args, name, ac.CLASSES[name])
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    meta = {
        "spear_rt": where,
        "commit": head,
        "loop": args.loop,
        "quick": args.quick,
        "rss_cap_mb": args.rss_cap_mb,
        "stall_ms": args.stall_ms,
        "time": stamp,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    out.with_suffix(".md").write_text(f"{json.dumps(meta)}\n\n{text}\n")
    print(f"\nspear_rt {head} ({where}), loop {args.loop}\n\n{text}\n\nJSON: {out}")


if __name__ == "__main__":
    main()
