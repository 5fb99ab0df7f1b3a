"""Which worker of `serve --workers N` holds a session: one small file per session.

The parent makes a private directory (mode 0700) and names it in the environment; worker i
listens on ``worker-<i>.sock`` there for resumes forwarded by the other workers, and writes
``sessions/<session id>`` holding ``i`` for every resumable session it holds (deleted when
the session ends). File I/O runs in a worker thread (an ending is queued and written by one
loop), so the event loop never waits on the disk. Session ids from clients are checked
against the shape `new_id` gives them before any path is made of one.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import anyio
import anyio.to_thread

log = logging.getLogger(__name__)
RUN_DIR_ENV = "SPEAR_RT_RUN_DIR"
_SESSION_ID = re.compile(r"^sess_[0-9a-f]{20}$")


def valid_session_id(session_id: str) -> bool:
    """`session_id` has the shape this server gives ids (so it is safe as a file name)."""
    return _SESSION_ID.match(session_id) is not None


class WorkerDirectory:
    """This worker's entries in the shared run directory (module docstring)."""

    def __init__(self, run_dir: str, worker: int) -> None:
        self.root = Path(run_dir)
        self.worker = worker
        self._sessions = self.root / "sessions"
        # made before the server serves (its first session is recorded here at once)
        self._sessions.mkdir(exist_ok=True)
        self._queue: dict[str, bool] = {}  # session id -> ended (False), to be written
        self._wake = anyio.Event()

    def socket_path(self, worker: int | None = None) -> str:
        """Where worker `worker` (default: this one) takes forwarded connections."""
        return str(self.root / f"worker-{self.worker if worker is None else worker}.sock")

    async def register(self, session_id: str) -> None:
        """This worker holds `session_id` (written before this returns)."""
        self._queue.pop(session_id, None)
        await anyio.to_thread.run_sync(self._write, {session_id: True})

    def unregister(self, session_id: str) -> None:
        """`session_id` ended."""
        self._queue[session_id] = False
        self._wake.set()

    async def owner(self, session_id: str) -> int | None:
        """The worker holding `session_id`, when another one does."""
        if not valid_session_id(session_id):
            return None
        text = await anyio.to_thread.run_sync(_read, self._sessions / session_id)
        if text is None or not text.isdigit() or int(text) == self.worker:
            return None
        return int(text)

    async def write_forever(self) -> None:
        """Write queued endings as they come (one thread hop per batch)."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._queue = self._queue, {}
            await anyio.to_thread.run_sync(self._write, batch)

    def _write(self, batch: dict[str, bool]) -> None:
        mine = str(self.worker)
        for session_id, held in batch.items():
            path = self._sessions / session_id
            try:
                if held:
                    path.write_text(mine)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("workers: cannot record session %s: %s", session_id, exc)

    def cleanup(self) -> None:
        """Remove this worker's socket (its session files go with the parent's directory)."""
        try:
            os.unlink(self.socket_path())
        except OSError:
            pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
