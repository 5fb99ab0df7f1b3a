"""Resuming a spear_rt session with the official `openai` package (asyncio only, as the SDK is).

The SDK reconnects by itself inside `async for event in connection` when the socket drops with
a recoverable close code, calling `on_reconnecting` before each attempt. On its own that opens a
new session. `SpearResume` turns it into a resume of the same one:

- `on_reconnecting` adds `session_id` and `last_seq` to the query and the resume token header;
- `send` gives every client event an `event_id`, logs it (bounded in bytes) and counts the
  audio; from the moment the socket drops until the gap is resent, new sends wait here, so
  the SDK's own send queue (flushed as soon as the new socket opens) stays empty and nothing
  overtakes the resent events;
- iterating `SpearResume` yields the connection's events without replayed duplicates; on
  `spear.session.resumed` it resends what the server lacks (after its `last_event_id`, checked
  against its `input_audio_bytes`) before letting new sends go.

    resume = SpearResume()
    async with client.realtime.connect(
        extra_query={"intent": "transcription"}, on_reconnecting=resume.on_reconnecting
    ) as connection:
        resume.attach(connection)
        ...  # one task: await resume.send({...}), resume.append_audio(pcm16), resume.commit()
        async for event in resume:  # another task; the SDK reconnects only while iterating
            ...

Send every client event through `send` (an event sent on the connection directly cannot be
resent). A resume that cannot be done raises `ResumeError` from the iterator and from `send`.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from openai import OpenAIError
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from openai.types.realtime import RealtimeServerEvent
from openai.types.websocket_reconnection import (
    ReconnectingEvent,
    ReconnectingOverrides,
    is_recoverable_close,
)
from websockets.exceptions import ConnectionClosed as WsConnectionClosed

from spear_rt.client.realtime import ResumeError
from spear_rt.client.resume import CREATED_TYPES, DEFAULT_LOG_BYTES, ResumeState

__all__ = ["SpearResume"]


class SpearResume:
    """Resume support for one `client.realtime.connect(...)` connection to spear_rt."""

    def __init__(self, *, max_log_bytes: int = DEFAULT_LOG_BYTES) -> None:
        self.state = ResumeState(max_log_bytes)
        self._connection: AsyncRealtimeConnection | None = None
        self._holding = False  # new sends wait: the socket dropped, the gap is not resent yet
        self._answer_next = False  # the next event comes from a new socket
        self._generation = 0  # sockets opened, less one
        self._switched: anyio.Event | None = None  # set (and dropped) on a new socket or failure
        self._failure: ResumeError | None = None
        self._ended = False  # the iterator is over: no resume can happen any more

    def attach(self, connection: AsyncRealtimeConnection) -> None:
        """Use `connection` (from `connect(..., on_reconnecting=self.on_reconnecting)`)."""
        self._connection = connection

    @property
    def resumes(self) -> int:
        """Resumes completed so far."""
        return self.state.resumes

    # --- the SDK's reconnect hook -------------------------------------------------------------

    def on_reconnecting(self, event: ReconnectingEvent) -> ReconnectingOverrides:
        """Before each reconnect attempt: hold new sends; resume parameters for the attempt."""
        self._holding = self._answer_next = True
        if self._failure is not None:
            return {"abort": True}
        try:
            query, headers = self.state.query(), self.state.headers()
        except ResumeError as exc:
            self._failure = exc
            return {"abort": True}
        return {
            "extra_query": {**event.extra_query, **query},
            "extra_headers": {**event.extra_headers, **headers},
        }

    # --- sending ------------------------------------------------------------------------------

    async def send(self, event: Mapping[str, Any]) -> None:
        """Send one client event (a JSON object); waits while the session is being resumed."""
        connection = self._require()
        while self._holding and self._failure is None and not self._ended:
            await self._wait_switch()
        self._raise_failure()
        data = self.state.record(event).decode()
        generation = self._generation
        try:
            await connection.send_raw(data)
        except WsConnectionClosed as exc:
            if self._ended or (exc.rcvd is not None and not is_recoverable_close(exc.rcvd.code)):
                raise
            # The iterator meets the same drop and resumes; the gap covers this event.
            self._holding = True
            while self._generation == generation and self._failure is None and not self._ended:
                await self._wait_switch()
            self._raise_failure()

    async def append_audio(self, pcm16: bytes) -> None:
        """Append raw audio in the session's input format (`input_audio_buffer.append`)."""
        audio = base64.b64encode(pcm16).decode("ascii")
        await self.send({"type": "input_audio_buffer.append", "audio": audio})

    async def commit(self) -> None:
        """Commit the input buffer (`input_audio_buffer.commit`)."""
        await self.send({"type": "input_audio_buffer.commit"})

    # --- receiving ----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[RealtimeServerEvent]:
        """The connection's events, without replayed duplicates; resumes on the way."""
        return self._events(self._require())

    async def _events(
        self, connection: AsyncRealtimeConnection
    ) -> AsyncIterator[RealtimeServerEvent]:
        try:
            async for event in connection:
                if self._answer_next:
                    await self._resend_gap(connection, event)
                elif event.type in CREATED_TYPES or event.type == "error":
                    if not self.state.observe(event.to_dict()):  # token, or a refused append
                        continue
                elif not self.state.accept(event.type, getattr(event, "seq", None)):
                    continue
                yield event
        except (WsConnectionClosed, OpenAIError) as exc:
            if self._holding and self._failure is None:  # the SDK gave up (or had no hook)
                rcvd = exc.rcvd if isinstance(exc, WsConnectionClosed) else None
                code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
                self._failure = ResumeError(f"the connection was not reopened: {exc}", code, reason)
            if self._failure is not None:
                raise self._failure from exc
            raise
        except ResumeError as exc:
            self._failure = self._failure or exc
            raise
        finally:
            if self._holding and self._failure is None:
                self._failure = ResumeError("the events stopped before the session was resumed")
            self._ended = True
            self._wake()

    async def _resend_gap(self, connection: AsyncRealtimeConnection, answer: Any) -> None:
        """Resend what the server lacks after `answer` (`spear.session.resumed`, or a refusal)."""
        gap = self.state.answer(answer.to_dict())  # ResumeError unless resumed and covered
        self._answer_next = False
        try:
            for data in gap:
                await connection.send_raw(data.decode())
        except WsConnectionClosed:
            return  # dropped again: the SDK reconnects and the next answer says what is missing
        self._holding = False
        self._generation += 1
        self._wake()

    # --- plumbing -----------------------------------------------------------------------------

    def _require(self) -> AsyncRealtimeConnection:
        if self._connection is None:
            raise RuntimeError("SpearResume.attach(connection) first")
        return self._connection

    async def _wait_switch(self) -> None:
        if self._switched is None:
            self._switched = anyio.Event()
        await self._switched.wait()

    def _wake(self) -> None:
        if self._switched is not None:
            self._switched.set()
            self._switched = None

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            raise ResumeError(failure.detail, failure.code, failure.reason)
