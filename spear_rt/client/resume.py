"""Resuming a dropped realtime session, client side, sans I/O: what to reconnect with, what to
resend, what to drop. `ResumingClient` (resuming.py) wraps it around our `RealtimeClient`,
`SpearResume` (openai_resume.py) around the official `openai` package's connection.

Rules:

- Server events: the session's `session.created` gives `session.id` and `spear.resume_token`.
  An event whose `seq` is at or below the last one seen is a replay of something already
  delivered and is dropped; `spear.session.resumed` (seq 0, not part of the session's log) and
  events without a `seq` always pass. Gaps in `seq` are allowed (the server may drop deltas).
- Client events: each gets an `event_id` (kept if the caller gave one) and is logged, encoded,
  in send order with the running total of decoded input audio sent up to and including it
  (less appends the server refused in an `error` event naming them).
  The log is bounded in bytes: past `max_log_bytes` the oldest entries are forgotten. A resume
  also forgets the entries the server reports applied.
- Reconnect: `?session_id=ID&last_seq=N` plus the `Spear-Resume-Token` header.
- The first event on the new socket must be `spear.session.resumed`. Its `last_event_id` says
  which client event the server applied last; every logged event after it is resent, in order,
  before anything new. Its `input_audio_bytes` must equal the audio total at that event. A point
  the log no longer reaches, a mismatch, an `error` event or any other answer is a `ResumeError`.

| answer on the new socket              | result                                          |
|---------------------------------------|-------------------------------------------------|
| `spear.session.resumed`, point in log | the events after the point, to resend           |
| `spear.session.resumed`, otherwise    | `ResumeError` (gap not covered, audio mismatch) |
| `error` (`resume_failed`)             | `ResumeError` with the server's message, 4004   |
| anything else                         | `ResumeError`                                   |
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from spear_rt.client.realtime import ResumeError

__all__ = [
    "CREATED_TYPES",
    "DEFAULT_LOG_BYTES",
    "RESUMED_TYPE",
    "RESUME_TOKEN_HEADER",
    "ResumeState",
    "with_query",
]

DEFAULT_LOG_BYTES = 4 << 20  # about 30 s of base64 pcm16 at 24 kHz not yet applied by the server
RESUME_TOKEN_HEADER = "Spear-Resume-Token"
RESUMED_TYPE = "spear.session.resumed"
CREATED_TYPES = ("session.created", "transcription_session.created")
RESUME_FAILED_CLOSE = 4004


class _Sent(NamedTuple):
    event_id: str
    data: bytes  # the encoded event, as sent
    audio: int  # decoded input audio bytes in this event (an append), counted by the server
    audio_total: int  # the same, summed over every event up to and including this one


def audio_bytes(audio: object) -> int:
    """Decoded length of an append's base64 `audio` (0 if it is not valid base64)."""
    if not isinstance(audio, str):
        return 0
    try:
        return len(base64.b64decode(audio, validate=True))
    except (binascii.Error, ValueError):
        return 0


class ResumeState:
    """One session's resume bookkeeping: seq and token in, reconnect parameters and gap out."""

    def __init__(self, max_log_bytes: int = DEFAULT_LOG_BYTES) -> None:
        if max_log_bytes <= 0:
            raise ValueError("max_log_bytes must be positive")
        self.max_log_bytes = max_log_bytes
        self.session_id: str | None = None
        self.token: str | None = None
        self.last_seq = 0
        self.audio_sent = 0  # decoded input audio bytes in the appends sent, less refused ones
        self.duplicates = 0  # replayed events dropped
        self.resumes = 0
        self._log: deque[_Sent] = deque()
        self._log_bytes = 0
        self._floor_id: str | None = None  # the newest event no longer in the log (None: none)
        self._floor_audio = 0
        self._overflowed = 0  # events forgotten for space, not because the server had them
        self._prefix = f"spear_c{secrets.token_hex(4)}_"
        self._count = 0

    # --- server -> client ---------------------------------------------------------------------

    def accept(self, event_type: str, seq: object) -> bool:
        """Record an event's `seq`; False if it is a replay of one already delivered."""
        if event_type == RESUMED_TYPE or not isinstance(seq, int) or isinstance(seq, bool):
            return True
        if seq <= self.last_seq:
            self.duplicates += 1
            return False
        self.last_seq = seq
        return True

    def observe(self, event: Mapping[str, Any]) -> bool:
        """Take in one server event as a dict; False if it is a replayed duplicate."""
        event_type = event.get("type")
        if not isinstance(event_type, str):
            return True
        if not self.accept(event_type, event.get("seq")):
            return False
        if event_type == "error":
            body = event.get("error")
            if isinstance(body, Mapping) and isinstance(body.get("event_id"), str):
                self._rejected(body["event_id"])
        elif event_type in CREATED_TYPES:
            session, spear = event.get("session"), event.get("spear")
            if isinstance(session, Mapping) and isinstance(session.get("id"), str):
                self.session_id = session["id"]
            if isinstance(spear, Mapping) and isinstance(spear.get("resume_token"), str):
                self.token = spear["resume_token"]
        return True

    @property
    def resumable(self) -> bool:
        """True once the session's id and resume token are known."""
        return self.session_id is not None and self.token is not None

    def query(self) -> dict[str, str]:
        """Query parameters for the reconnect (added to the original URL's)."""
        if self.session_id is None:
            raise ResumeError("the connection dropped before session.created named the session")
        return {"session_id": self.session_id, "last_seq": str(self.last_seq)}

    def headers(self) -> dict[str, str]:
        """Headers for the reconnect."""
        if self.token is None:
            raise ResumeError("the server gave no spear.resume_token in session.created")
        return {RESUME_TOKEN_HEADER: self.token}

    # --- client -> server ---------------------------------------------------------------------

    def record(self, event: Mapping[str, Any]) -> bytes:
        """Give `event` an `event_id` unless it has one, log it, return it encoded (JSON)."""
        event_id = event.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            self._count += 1
            event_id = f"{self._prefix}{self._count}"
            event = {**event, "event_id": event_id}
        audio = 0
        if event.get("type") == "input_audio_buffer.append":
            audio = audio_bytes(event.get("audio"))
            self.audio_sent += audio
        data = msgspec.json.encode(event)
        self._log.append(_Sent(event_id, data, audio, self.audio_sent))
        self._log_bytes += len(data)
        while self._log_bytes > self.max_log_bytes and len(self._log) > 1:
            self._forget()
            self._overflowed += 1
        return data

    def _rejected(self, event_id: str) -> None:
        """The server refused a logged event: audio it carried was not taken in."""
        index = self._find(event_id)
        if index is None or not self._log[index].audio:
            return
        lost = self._log[index].audio
        self.audio_sent -= lost
        for i in range(index, len(self._log)):
            sent = self._log[i]
            self._log[i] = sent._replace(
                audio=0 if i == index else sent.audio, audio_total=sent.audio_total - lost
            )

    @property
    def log_bytes(self) -> int:
        """Bytes of sent events held for a resume."""
        return self._log_bytes

    def _forget(self) -> None:
        oldest = self._log.popleft()
        self._log_bytes -= len(oldest.data)
        self._floor_id, self._floor_audio = oldest.event_id, oldest.audio_total

    # --- the answer to a reconnect ------------------------------------------------------------

    def answer(self, event: Mapping[str, Any]) -> list[bytes]:
        """Check the first event of a reconnect; the logged events the server lacks, in order."""
        match event:
            case {"type": "spear.session.resumed"}:
                pass
            case {"type": "error", "error": Mapping() as error}:
                message = error.get("message") or error.get("code") or "resume refused"
                raise ResumeError(f"the server refused: {message}", code=RESUME_FAILED_CLOSE)
            case _:
                raise ResumeError(
                    f"the server answered {event.get('type')!r} instead of {RESUMED_TYPE}"
                )
        if "last_event_id" not in event:
            raise ResumeError(f"{RESUMED_TYPE} does not say which client event was applied last")
        last_event_id, held = event["last_event_id"], event.get("input_audio_bytes")
        if last_event_id is not None and not isinstance(last_event_id, str):
            raise ResumeError(f"{RESUMED_TYPE} has a malformed last_event_id: {last_event_id!r}")
        if not isinstance(held, int):
            raise ResumeError(f"{RESUMED_TYPE} has a malformed input_audio_bytes: {held!r}")
        gap = self._gap(last_event_id, held)
        self.resumes += 1
        return gap

    def _gap(self, last_event_id: str | None, held: int) -> list[bytes]:
        if last_event_id == self._floor_id:  # also: nothing applied and nothing forgotten
            applied, audio = 0, self._floor_audio
        else:
            index = self._find(last_event_id)
            if index is None:
                raise ResumeError(self._not_covered(last_event_id))
            applied, audio = index + 1, self._log[index].audio_total
        if audio != held:
            raise ResumeError(
                f"the server holds {held} bytes of input audio, but {audio} were sent up to "
                f"event {last_event_id}"
            )
        for _ in range(applied):
            self._forget()
        return [sent.data for sent in self._log]

    def _find(self, event_id: str | None) -> int | None:
        for index in range(len(self._log) - 1, -1, -1):
            if self._log[index].event_id == event_id:
                return index
        return None

    def _not_covered(self, last_event_id: str | None) -> str:
        where = "no client event" if last_event_id is None else f"up to event {last_event_id}"
        if self._overflowed:
            return (
                f"the server applied {where}, and the send log (max_log_bytes="
                f"{self.max_log_bytes}) has since dropped {self._overflowed} older events: "
                "the gap cannot be covered (raise max_log_bytes)"
            )
        return f"the server applied {where}, which this client never sent"


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` set in its query (replacing any of the same name)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*kept, *params.items()])))
