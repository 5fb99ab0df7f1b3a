"""Processes of bench/conversation_load.py: start, nice, measure and stop them (psutil)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A started process group, its log in the run's temp dir."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            # cwd: the run's temp dir, so `python -m` finds spear_rt on PYTHONPATH (--src) or
            # installed, never in whatever directory the bench was started from
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                start_new_session=True,
            )  # fmt: skip
        self.ps = psutil.Process(self.popen.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def wait_ready(self, url: str, deadline_s: float = 60) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline_s:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (OSError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {deadline_s:.0f} s; see {self.log}")

    def stop(self) -> int | None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
        return self.popen.returncode


def renice(pid: int, nice: int | None) -> None:
    """Nice a process of its own session: its autogroup (with autogroups on, the kernel weighs
    sessions against each other, so a plain nice value only counts inside the session) and
    the process itself."""
    if nice is None:
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass
    os.setpriority(os.PRIO_PROCESS, pid, nice)


def http_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def steal_s() -> float:
    """CPU seconds the hypervisor gave other guests (a VM's noisy neighbours), all cores."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def busy_per_core() -> list[float]:
    return [t.user + t.nice + t.system + t.irq + t.softirq for t in psutil.cpu_times(percpu=True)]


def ours_cpu_s(*procs: Proc) -> float:
    """CPU seconds of this process and `procs` (the bench's own share of the machine)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system + sum(p.cpu_s() for p in procs)


def spear_file(env: dict[str, str], cwd: Path) -> str:
    """Where the server's `spear_rt` resolves with this environment."""
    return subprocess.run(
        [sys.executable, "-c", "import spear_rt; print(spear_rt.__file__)"],
        capture_output=True, text=True, env=env, cwd=cwd, check=False,
    ).stdout.strip()  # fmt: skip


def git_head(path: str) -> str | None:
    """The short commit of a git tree (None for a tree that is not one, e.g. an export)."""
    done = subprocess.run(
        ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None if done.returncode == 0 else None
