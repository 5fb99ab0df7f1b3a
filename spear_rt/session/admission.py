"""What the realtime edge and the session manager exchange: connect and resume requests, the
runner an edge driver makes, the state shared with other workers and nodes, and refusals
(an `error` event, then a close code).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import msgspec

from spear_rt.backend import TranscriptionUpstream
from spear_rt.ir import CanonicalError, ErrorCode
from spear_rt.protocol import server_events as se
from spear_rt.protocol.settings import Dialect, SessionKind
from spear_rt.session.machine import SessionMachine
from spear_rt.session.responder import Responder, ResponseHost
from spear_rt.session.runner import CLOSE_GRACE_S, ClientLink


class Runner(Protocol):
    """Drives one session: the task-based SessionRunner or an edge driver's own."""

    machine: SessionMachine

    async def run(self) -> None:
        """Run until the session ends."""
        ...

    def drain(self, deadline_s: float) -> None:
        """Finish turns in flight, then close 1001."""
        ...


ResponderFactory = Callable[[ResponseHost], Responder]
RunnerFactory = Callable[[SessionMachine, TranscriptionUpstream, ResponderFactory | None], Runner]
# Attach a resuming connection to a session's runner (raises ResumeError); the edge knows
# which kind of runner its driver made, and what its connection is.
Attach = Callable[[Runner, int], Awaitable[None]]
RESUME_FAILED = 4004


class SharedSessions(Protocol):
    """Session caps and the session directory shared with other workers and nodes (cluster/).

    `hold` may raise SharedUnavailable: the manager then counts on this server alone.
    """

    async def hold(self, key_id: str, member: str, cap: int) -> bool:
        """Take one of `key_id`'s `cap` places for `member`; False at the cap."""
        ...

    def release(self, key_id: str, member: str) -> None:
        """Give `member`'s place back."""
        ...

    async def register(self, session_id: str) -> None:
        """This server holds `session_id` (resumes elsewhere are forwarded here)."""
        ...

    def unregister(self, session_id: str) -> None:
        """`session_id` ended."""
        ...


class ConnectRequest(msgspec.Struct, frozen=True):
    """What the edge learned from the upgrade request."""

    kind: SessionKind
    dialect: Dialect
    model: str | None = None
    backend: str | None = None
    client_key_id: str | None = None  # a hash of the key, never the key


class ResumeRequest(msgspec.Struct, frozen=True):
    """A reconnect naming a session (`?session_id=&last_seq=` plus the resume token)."""

    session_id: str
    token: str
    last_seq: int
    client_key_id: str | None = None


async def reject_resume(conn: ClientLink, message: str) -> None:
    """Refuse a resume: `error` event with code `resume_failed`, then close 4004."""
    error = CanonicalError(ErrorCode.INVALID_REQUEST, message)
    await reject(conn, error, RESUME_FAILED, code="resume_failed")


async def reject(
    conn: ClientLink, error: CanonicalError, close_code: int, *, code: str | None = None
) -> None:
    """Tell a client why its session cannot run (an `error` event), then close."""
    body = se.ErrorBody(
        type="invalid_request_error" if error.code is ErrorCode.INVALID_REQUEST else "server_error",
        code=code or str(error.code),
        message=error.message,
    )
    event = se.Error(error=body, spear=msgspec.to_builtins(error), event_id="event_reject", seq=1)
    conn.queue_text(se.encode_server_event(event))
    reason = (
        error.message
        if error.retry_after_s is None
        else f"retry after {error.retry_after_s:g}s: {error.message}"
    )
    await conn.close(close_code, reason)
    with anyio.move_on_after(CLOSE_GRACE_S):
        while await conn.receive() is not None:
            pass
