"""`ResumingClient`: our `RealtimeClient` with resume (the rules are in resume.py).

One task calls `receive()` and does the resuming; any task may send. The sender never writes
to a socket the receiver is replacing: while a resume runs, sends wait, and the resent gap goes
out before anything new.
"""

from __future__ import annotations

import base64
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from spear_rt.client.realtime import (
    HANDSHAKE_TIMEOUT_S,
    ConnectError,
    ConnectionClosed,
    RealtimeClient,
    ResumeError,
)
from spear_rt.client.resume import DEFAULT_LOG_BYTES, ResumeState, with_query

__all__ = ["ResumePolicy", "ResumingClient"]


class ResumePolicy(msgspec.Struct, frozen=True):
    """How `ResumingClient` resumes: bounded attempts, doubling jittered delays, a bounded log."""

    max_attempts: int = 5
    initial_delay_s: float = 0.05  # before the first attempt, so the server sees the drop
    max_delay_s: float = 2.0
    max_log_bytes: int = DEFAULT_LOG_BYTES


class ResumingClient:
    """A realtime session that outlives its socket; the calls of `RealtimeClient`.

    The task in `receive()` resumes: when the socket ends without a close frame it reconnects,
    resends what the server lacks, and returns the `spear.session.resumed` event; replayed
    events already delivered are dropped. Meanwhile `send()` waits, so nothing new overtakes
    the resent events; a send that meets the dead socket waits too (its event is logged and goes
    out with the gap if the server lacks it). A close frame, or `policy=None`, ends the session
    as `RealtimeClient` would; a resume that fails raises `ResumeError` in every caller.
    """

    def __init__(
        self,
        client: RealtimeClient,
        url: str,
        key: str | None,
        beta: bool,
        policy: ResumePolicy | None,
    ) -> None:
        self._client = client
        self._url, self._key, self._beta = url, key, beta
        self._policy = policy
        self.state = ResumeState(policy.max_log_bytes if policy else DEFAULT_LOG_BYTES)
        self._resuming = False
        self._generation = 0  # sockets opened, less one
        self._switched = anyio.Event()  # set (and replaced) on a new socket or a failure
        self._failure: ConnectionClosed | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        key: str | None = None,
        beta: bool = True,
        policy: ResumePolicy | None = ResumePolicy(),  # noqa: B008 (frozen)
    ) -> AsyncIterator[ResumingClient]:
        """Open `url`, yield the client, close whichever socket is current on exit."""
        client = cls(await RealtimeClient.open(url, key=key, beta=beta), url, key, beta, policy)
        try:
            yield client
        finally:
            with anyio.CancelScope(shield=True):
                await client._client.aclose()

    # --- sending ------------------------------------------------------------------------------

    async def send(self, event: Mapping[str, Any]) -> None:
        """Send one client event; waits while the session is being resumed."""
        if self._policy is None:
            await self._client.send(dict(event))
            return
        while self._resuming:
            await self._switched.wait()
        self._raise_failure()
        data = self.state.record(event)
        client, generation = self._client, self._generation
        try:
            await client.send_raw(data)
        except ConnectionClosed as exc:
            if exc.code != 1006 or not self.state.resumable:
                raise
            # The receiver meets the same dead socket and resumes; the gap covers this event.
            while self._generation == generation and self._failure is None:
                await self._switched.wait()
            self._raise_failure()

    async def send_audio(self, pcm16: bytes) -> None:
        """Append raw pcm16 audio to the input buffer (`input_audio_buffer.append`)."""
        audio = base64.b64encode(pcm16).decode("ascii")
        await self.send({"type": "input_audio_buffer.append", "audio": audio})

    async def commit(self) -> None:
        """Commit the input buffer (`input_audio_buffer.commit`)."""
        await self.send({"type": "input_audio_buffer.commit"})

    def _raise_failure(self) -> None:
        """Raise (a copy of) what ended the session in the receiver, if anything did."""
        failure = self._failure
        if isinstance(failure, ResumeError):
            raise ResumeError(failure.detail, failure.code, failure.reason)
        if failure is not None:
            raise ConnectionClosed(failure.code, failure.reason)

    # --- receiving ----------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The next new server event; resumes the session if its socket drops."""
        self._raise_failure()
        while True:
            try:
                event = await self._client.receive()
            except ConnectionClosed as exc:
                if self._policy is None or exc.code != 1006:
                    self._fail(exc)
                    raise
                try:
                    return await self._resume(self._policy)
                except ResumeError as failure:
                    self._fail(failure)
                    raise
            if self.state.observe(event):
                return event

    async def _resume(self, policy: ResumePolicy) -> dict[str, Any]:
        self._resuming = True
        await self._client.abort()
        query, headers = self.state.query(), self.state.headers()  # ResumeError if unknown
        url = with_query(self._url, query)
        delay, problem = policy.initial_delay_s, "no attempt"
        for _ in range(policy.max_attempts):
            await anyio.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(2 * delay, policy.max_delay_s)
            try:
                client = await RealtimeClient.open(
                    url, key=self._key, beta=self._beta, headers=headers
                )
            except ConnectError as exc:
                problem = str(exc)
                continue
            try:
                with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                    resumed = await client.receive()
                    for data in self.state.answer(resumed):
                        await client.send_raw(data)
            except (ConnectionClosed, TimeoutError) as exc:
                await client.abort()
                if isinstance(exc, ResumeError):
                    raise
                if isinstance(exc, ConnectionClosed) and exc.code != 1006:
                    raise ResumeError(str(exc), exc.code, exc.reason) from None
                problem = "no answer" if isinstance(exc, TimeoutError) else str(exc)
                continue
            except BaseException:
                await client.abort()
                raise
            self._client = client
            self._generation += 1
            self._resuming = False
            self._wake()
            return resumed
        raise ResumeError(f"gave up after {policy.max_attempts} attempts: {problem}")

    def _fail(self, failure: ConnectionClosed) -> None:
        self._failure = failure
        self._resuming = False
        self._wake()

    def _wake(self) -> None:
        self._switched.set()
        self._switched = anyio.Event()
