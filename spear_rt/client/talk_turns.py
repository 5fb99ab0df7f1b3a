"""The turns of a spoken conversation, client side, sans I/O: server events in, turns and notes out.

`TalkBook.feed(event, now)` takes every server event of a conversation session (GA or beta
names) and keeps one `Turn` per committed user item: what was heard, the answer's text and
audio, and when each came. What a printer shows live comes back as `Note`s. Times are the
caller's clock (`now`); every latency is measured from the turn's end as the client saw it:
`input_audio_buffer.speech_stopped` (server VAD) or the client's own commit.

Rules (conversation.md):

- A turn starts at `input_audio_buffer.speech_started` (server VAD announces its item there,
  and its transcript deltas stream while it is open), or at `input_audio_buffer.committed`
  when nothing announced it; it belongs to the file being streamed.
- A response answers the last turn committed before its `response.created` (a response the
  server queued while several turns were committed answers them all; it is the last one's).
- A VAD turn expects an answer when its transcript is not empty; a turn the client committed
  itself expects one always (the client then asks with `response.create`).
- A file is settled once the barrier after its audio was answered (no VAD event of it is still
  to come), no turn is open, every turn of it has its transcript, no response is in progress,
  and its last turn that expects an answer has one that is done.
- An `error` event raises `ServerError`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import msgspec

from spear_rt.client.realtime import RealtimeError, ServerError

__all__ = [
    "AnswerDelta",
    "Answered",
    "Heard",
    "HeardDelta",
    "Note",
    "TalkBook",
    "Turn",
    "Unanswered",
]

_HEARD_DELTA = "conversation.item.input_audio_transcription.delta"
_HEARD = "conversation.item.input_audio_transcription.completed"
_HEARD_FAILED = "conversation.item.input_audio_transcription.failed"
_TEXT_DELTAS = (
    "response.output_audio_transcript.delta",
    "response.output_text.delta",
    "response.audio_transcript.delta",  # beta
    "response.text.delta",  # beta
)
_AUDIO_DELTAS = ("response.output_audio.delta", "response.audio.delta")
_UPDATED = ("session.updated", "transcription_session.updated")


class Turn(msgspec.Struct, kw_only=True):
    """One user turn and its answer; times are the caller's clock, None until they happen."""

    number: int  # 1, 2, ... in the session
    file: str  # the file whose audio it is
    item_id: str
    ended_at: float | None = None  # speech_stopped seen, or the manual commit sent
    committed: bool = False
    manual: bool = False
    heard: str | None = None  # the final transcript
    heard_failed: str | None = None
    first_heard_at: float | None = None
    heard_at: float | None = None
    response_id: str | None = None
    answer: str = ""
    first_text_at: float | None = None
    first_audio_at: float | None = None
    done_at: float | None = None
    status: str | None = None  # the response's: completed, cancelled, incomplete, failed
    reason: str | None = None  # why it was not completed
    audio: bytearray = msgspec.field(default_factory=bytearray)  # pcm16 as the server sent it
    served_by: dict[str, str] = msgspec.field(default_factory=dict)  # response.done spear.*

    @property
    def expects_answer(self) -> bool:
        """Whether the server will answer this turn (see the module rules)."""
        if self.manual:
            return True
        return self.heard_failed is None and bool(self.heard and self.heard.strip())

    @property
    def answered(self) -> bool:
        """A response to this turn is done."""
        return self.done_at is not None

    def since_end(self, at: float | None) -> float | None:
        """Seconds from the end of the user's speech to `at`."""
        return None if at is None or self.ended_at is None else at - self.ended_at


class HeardDelta(msgspec.Struct, frozen=True):
    """More of what the user said (a transcript delta)."""

    turn: Turn
    delta: str


class Heard(msgspec.Struct, frozen=True):
    """The user's final transcript (or its failure) is known."""

    turn: Turn


class AnswerDelta(msgspec.Struct, frozen=True):
    """More of the answer's text."""

    turn: Turn
    delta: str


class Answered(msgspec.Struct, frozen=True):
    """A response to the turn is done (its status says how it ended)."""

    turn: Turn


class Unanswered(msgspec.Struct, frozen=True):
    """The turn gets no answer: its transcript is empty or failed."""

    turn: Turn


Note = HeardDelta | Heard | AnswerDelta | Answered | Unanswered


class TalkBook:
    """Every turn of a conversation session, fed every server event (module docstring)."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.updates = 0  # session.updated answers so far
        self.open_item: str | None = None  # speech started, not committed yet
        self.response_id: str | None = None  # the response in progress
        self.file = ""
        self._file_start = 0  # index in `turns` of the current file's first turn
        self._manual_at: float | None = None
        self._items: dict[str, Turn] = {}
        self._responses: dict[str, Turn | None] = {}

    # --- what the client does -----------------------------------------------------------------

    def begin_file(self, name: str) -> None:
        """The client starts streaming file `name`: later turns are its."""
        self.file = name
        self._file_start = len(self.turns)

    def manual_commit(self, now: float) -> None:
        """The client commits the open turn itself at `now` (and asks for a response)."""
        self._manual_at = now

    def file_turns(self) -> list[Turn]:
        """The turns of the current file, in order."""
        return self.turns[self._file_start :]

    def passed(self, barrier: int) -> bool:
        """`updates` reached `barrier`: every event of the audio sent before it has come."""
        return self.updates >= barrier

    def file_settled(self, barrier: int) -> bool:
        """The current file is done once `updates` reached `barrier` (module rules)."""
        if self.updates < barrier or self.open_item is not None or self.response_id is not None:
            return False
        turns = self.file_turns()
        if any(t.heard is None for t in turns):
            return False
        expecting = [i for i, t in enumerate(turns) if t.expects_answer]
        return not expecting or any(t.answered for t in turns[expecting[-1] :])

    # --- what the server says -----------------------------------------------------------------

    def feed(self, event: Mapping[str, Any], now: float) -> list[Note]:
        """Take in one server event at `now`; what to show for it. `error` raises ServerError."""
        kind = event.get("type")
        item_id = event.get("item_id")
        match kind:
            case "error":
                error = event.get("error")
                raise ServerError(dict(error) if isinstance(error, Mapping) else {})
            case _ if kind in _UPDATED:
                self.updates += 1
            case "input_audio_buffer.speech_started" if isinstance(item_id, str):
                self.open_item = item_id
                self._turn(item_id)
            case "input_audio_buffer.speech_stopped" if isinstance(item_id, str):
                self._turn(item_id).ended_at = now
            case "input_audio_buffer.committed" if isinstance(item_id, str):
                self._committed(item_id, now)
            case "response.created":
                return self._response_created(event)
            case "response.done":
                return self._response_done(event, now)
            case _:
                return self._item_event(event, now)
        return []

    def _turn(self, item_id: str) -> Turn:
        """The turn of user item `item_id`, started now if it is new."""
        turn = self._items.get(item_id)
        if turn is None:
            turn = Turn(number=len(self.turns) + 1, file=self.file, item_id=item_id)
            self.turns.append(turn)
            self._items[item_id] = turn
        return turn

    def _committed(self, item_id: str, now: float) -> None:
        if self.open_item == item_id:
            self.open_item = None
        turn = self._turn(item_id)
        turn.committed = True
        if turn.ended_at is None:  # no speech_stopped: the client committed it
            turn.manual = self._manual_at is not None
            turn.ended_at = self._manual_at if self._manual_at is not None else now
        self._manual_at = None

    def _item_event(self, event: Mapping[str, Any], now: float) -> list[Note]:
        kind = event.get("type")
        turn = self._items.get(str(event.get("item_id")))
        if kind in _TEXT_DELTAS or kind in _AUDIO_DELTAS:
            return self._output_delta(event, now)
        if turn is None:
            return []
        if kind == _HEARD_DELTA:
            if turn.first_heard_at is None:
                turn.first_heard_at = now
            return [HeardDelta(turn, str(event.get("delta", "")))]
        if kind == _HEARD or kind == _HEARD_FAILED:
            if kind == _HEARD:
                turn.heard = str(event.get("transcript", ""))
            else:
                turn.heard, turn.heard_failed = "", _message(event.get("error"))
            turn.heard_at = now
            notes: list[Note] = [Heard(turn)]
            if not turn.expects_answer:
                notes.append(Unanswered(turn))
            return notes
        return []

    def _response_created(self, event: Mapping[str, Any]) -> list[Note]:
        response = event.get("response")
        response_id = response.get("id") if isinstance(response, Mapping) else None
        if not isinstance(response_id, str):
            return []
        turn = self.turns[-1] if self.turns else None
        self._responses[response_id] = turn
        self.response_id = response_id
        if turn is not None:
            # a later response replaces an earlier one's record (e.g. after a cancellation)
            turn.response_id, turn.answer, turn.audio = response_id, "", bytearray()
            turn.first_text_at = turn.first_audio_at = turn.done_at = None
            turn.status = turn.reason = None
        return []

    def _output_delta(self, event: Mapping[str, Any], now: float) -> list[Note]:
        turn = self._responses.get(str(event.get("response_id")))
        if turn is None or turn.response_id != event.get("response_id"):
            return []
        delta = event.get("delta")
        if not isinstance(delta, str):
            return []
        if event.get("type") in _AUDIO_DELTAS:
            try:
                turn.audio += base64.b64decode(delta, validate=True)
            except binascii.Error:
                raise RealtimeError("the server sent answer audio that is not base64") from None
            if turn.first_audio_at is None:
                turn.first_audio_at = now
            return []
        if turn.first_text_at is None:
            turn.first_text_at = now
        turn.answer += delta
        return [AnswerDelta(turn, delta)]

    def _response_done(self, event: Mapping[str, Any], now: float) -> list[Note]:
        response = event.get("response")
        if not isinstance(response, Mapping):
            return []
        response_id = response.get("id")
        if response_id == self.response_id:
            self.response_id = None
        turn = self._responses.get(str(response_id))
        if turn is None or turn.response_id != response_id:
            return []
        turn.done_at = now
        turn.status = str(response.get("status", "completed"))
        details = response.get("status_details")
        if turn.status != "completed" and isinstance(details, Mapping):
            reason, error = details.get("reason"), details.get("error")
            parts = [str(reason)] if reason and reason != turn.status else []
            turn.reason = ": ".join([*parts, *([_message(error)] if error else [])]) or None
        spear = response.get("spear")
        if isinstance(spear, Mapping):
            turn.served_by = {k: str(v) for k, v in spear.items() if isinstance(v, str)}
        return [Answered(turn)]


def _message(error: object) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or error.get("code") or "unknown error")
    return "unknown error"
