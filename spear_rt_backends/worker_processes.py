"""Worker processes for engines that hold the GIL (pocketsphinx), made by a fork server.

Why not `anyio.to_process`: it starts a worker by spawning from the event loop's thread, in a
server whose other threads are busy decoding (Whisper, numpy); a fork taken while they hold
locks can hang before the new process gets to exec, and on uvloop that spawn blocks the loop
until it does. It did: a fresh-clone CI run froze the README server with its loop thread in
uvloop's `subprocess_exec` and a Whisper thread in numpy. Here every worker is forked by
multiprocessing's single-threaded fork server, the pool is made (and the fork server
started) from a worker thread, and a call waits for its result in a thread: the loop never
spawns. Workers live as long as the process and keep what they loaded (a decoder).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")
_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ProcessPoolExecutor:
    """The process-wide pool (runs in a worker thread: it may start the fork server)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            _pool = ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 2), mp_context=context)
        return _pool


def _call(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    return _executor().submit(fn, *args).result()


async def run_in_worker(fn: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter) -> T:
    """`fn(*args)` in a worker process, at most `limiter` at once (`fn` must be picklable);
    cancelling stops waiting, the worker finishes its call and takes the next."""
    async with limiter:
        return await anyio.to_thread.run_sync(_call, fn, args, abandon_on_cancel=True)
