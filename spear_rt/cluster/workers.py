"""`spear-rt serve --workers N`: a parent that only supervises, and N serving children.

The parent binds the port once with SO_REUSEPORT (resolving port 0) and keeps that socket,
unlistened, for its lifetime, so the port stays ours; each child serves the same host:port
with SO_REUSEPORT and the kernel spreads new connections across them. SIGINT, SIGTERM and
SIGHUP to the parent reach every child (drain, exit, reload); the parent exits when all
children have, with the worst exit status, and stops the rest if one child dies early.
WASM guests given with ``--wasm`` run in worker 0 only.

``/metrics`` on any worker sums every worker's samples (`metrics_share`), and a resume that
lands on another worker than its session's is forwarded to it (`directory`, `forward`),
both through a private directory the parent makes and removes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from spear_rt.cluster.directory import RUN_DIR_ENV
from spear_rt.cluster.metrics_share import ENV as METRICS_ENV
from spear_rt.config import Config, listen_address

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def worker_count(value: str) -> int:
    """``--workers`` as a number: ``auto`` is one per core."""
    if value == "auto":
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    count = int(value)
    if not 1 <= count <= 256:
        raise ValueError("--workers must be between 1 and 256, or auto")
    return count


def reserve(host: str, port: int) -> socket.socket:
    """A bound, unlistened SO_REUSEPORT socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def child_argv(args: Sequence[str], listen: str, index: int, wasm: Sequence[str]) -> list[str]:
    """One child's command line: the parent's serve options, its port and its index."""
    argv = [sys.executable, "-m", "spear_rt.cli", *args, "serve", "--listen", listen,
            "--worker", str(index)]  # fmt: skip
    if index == 0:
        for module in wasm:
            argv += ["--wasm", module]
    return argv


def supervise(
    config: Config, count: int, common: Sequence[str], serve_args: Sequence[str],
    wasm: Sequence[str],
) -> int:  # fmt: skip
    """Run `count` children until they end (module docstring); the worst exit status."""
    host, port = listen_address(config)
    reserved = reserve(host, port)
    listen = f"{host}:{reserved.getsockname()[1]}"
    children: list[subprocess.Popen[bytes]] = []
    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:  # a reload is not a stop
            signalled.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    shared = tempfile.mkdtemp(prefix="spear-rt-workers-")  # 0700: only this user
    env = {**os.environ, METRICS_ENV: shared, RUN_DIR_ENV: shared}
    try:
        for index in range(count):
            argv = [*child_argv(common, listen, index, wasm), *serve_args]
            # own process group: a terminal's Ctrl-C reaches them once, forwarded by us
            children.append(
                subprocess.Popen(argv, env=env, process_group=0, preexec_fn=_die_with_parent)
            )
        print(f"spear-rt: {count} workers on {listen} (SO_REUSEPORT)", file=sys.stderr, flush=True)
        return _wait(children, signalled)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        reserved.close()
        shutil.rmtree(shared, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux), so none is orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait(children: list[subprocess.Popen[bytes]], signalled: list[int]) -> int:
    """Wait for every child; one that ends by itself while the others run ends them all
    (SIGTERM: they drain). Children told to stop by a forwarded signal just end."""
    worst = 0
    stopping = False
    while any(child.poll() is None for child in children):
        for child in children:
            code = child.poll()
            if code is not None and not stopping and not signalled:
                stopping = True
                if code != 0:
                    print(f"spear-rt: worker exited with status {code}; stopping the others",
                          file=sys.stderr, flush=True)  # fmt: skip
                for other in children:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    for child in children:
        code = child.returncode
        worst = max(worst, code if code >= 0 else 128 - code)
    return worst
