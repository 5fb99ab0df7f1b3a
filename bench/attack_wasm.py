"""The WASM class of bench/attack.py: hostile guests through ``spear-rt run-wasm``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Result:
    """A class's own check, and what it saw (RSS fields only for classes without a server)."""

    held: bool
    why: str
    details: dict[str, Any] = field(default_factory=dict)
    rss_before: float | None = None
    rss_after: float | None = None
    rss_samples: list[float] = field(default_factory=list)


LOOP = """(module
  (import "spear" "rt_close" (func $rt_close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (drop (call $rt_close (i32.const -1))) (br $l))))
"""

FDS = """(module
  (import "spear" "rt_create" (func $create (result i32)))
  (import "spear" "spear_epoll_create" (func $epoll (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (loop $a (drop (call $create)) (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $a (i32.lt_u (local.get $i) (i32.const 200000))))
    (local.set $i (i32.const 0))
    (loop $b (drop (call $epoll)) (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $b (i32.lt_u (local.get $i) (i32.const 100000))))))
"""


async def run_guest(
    python: str, src: Path, wat: Path, extra: list[str], limit_s: float
) -> dict[str, Any]:
    """Run one guest; its exit, seconds, RSS samples (MB), last stderr line."""
    cmd = [python, "-m", "spear_rt.cli", "run-wasm", str(wat), *extra]
    env = dict(os.environ, PYTHONPATH=str(src))
    err = wat.with_suffix(".log")
    with err.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=log)  # noqa: ASYNC220
        t0, rss = time.monotonic(), []
        while proc.poll() is None and time.monotonic() - t0 < limit_s:
            try:
                rss.append(psutil.Process(proc.pid).memory_info().rss / 1e6)
            except psutil.Error:
                break
            await asyncio.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            proc.kill()
        proc.wait()
    lines = err.read_text(errors="replace").strip().splitlines()
    return {
        "exit": None if killed else proc.returncode,
        "killed_after_s": limit_s if killed else None,
        "seconds": round(time.monotonic() - t0, 1),
        "rss": rss,
        "last_line": lines[-1][:160] if lines else "",
    }


def has_option(python: str, src: Path, option: str) -> bool:
    """Whether this tree's run-wasm knows `option`."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        [python, "-m", "spear_rt.cli", "run-wasm", "--help"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
    )
    return option in out.stdout


async def run(python: str, src: Path, workdir: Path, quick: bool) -> Result:
    """The loop guest (must stop by itself) and the fd guest (RSS bounded)."""
    loop_wat, fds_wat = workdir / "loop.wat", workdir / "fds.wat"
    loop_wat.write_text(LOOP)
    fds_wat.write_text(FDS)
    wall = 5 if quick else 10
    extra = ["--max-run-seconds", str(wall)] if has_option(python, src, "--max-run-seconds") else []
    loop = await run_guest(python, src, loop_wat, extra, wall + 10)
    fds = await run_guest(python, src, fds_wat, [], 60)
    rss = loop["rss"] + fds["rss"]
    stopped = loop["exit"] is not None
    fds_peak = max(fds["rss"], default=0.0)
    held = stopped and fds_peak < 300
    if stopped:
        loop_said = f"loop guest stopped after {loop['seconds']} s"
    else:
        loop_said = f"loop guest still running after {wall + 10} s (killed)"
    option = f" (--max-run-seconds {wall})" if extra else " (no wall-clock option)"
    why = (
        f"{loop_said}{option}; 200k rt_create + 100k epoll: peak {fds_peak:.0f} MB,"
        f" {fds['seconds']} s"
    )
    details = {
        "loop": {k: v for k, v in loop.items() if k != "rss"},
        "fds": {k: v for k, v in fds.items() if k != "rss"},
        "fds_peak_mb": fds_peak,
    }
    return Result(
        held,
        why,
        details,
        rss_before=rss[0] if rss else None,
        rss_after=fds["rss"][-1] if fds["rss"] else None,
        rss_samples=rss,
    )
