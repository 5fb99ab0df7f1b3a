"""Sans-I/O translation: our commands to upstream frames, upstream frames to our events.

No I/O and no clock: `session_update` builds the session configuration event, `Translator`
maps commands and events (and item ids) both ways, `_Assembler` completes text messages out
of WebSocket frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.frames import Frame, Opcode

from spear_rt.audio import pcm16_to_bytes
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionSpec,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.errors import BackendFailure
from spear_rt.protocol import client_events as ce
from spear_rt.protocol import server_events as se
from spear_rt.protocol.settings import Dialect

RATE_HZ = 24000  # pcm16 24 kHz mono: the protocol's default input format
MAX_MESSAGE_CHARS = 500  # of an upstream error message passed on
_RETRYABLE_ERRORS = frozenset({"server_error", "session_expired"})
_encoder = msgspec.json.Encoder()
UPDATE_EVENT_ID = "spear_session_update"  # errors naming it refuse our session config
BytesLike = bytes | bytearray | memoryview
_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


def session_update(dialect: Dialect, spec: TranscriptionSpec, model: str | None) -> bytes:
    """The session configuration event in `dialect` (transcription, pcm16 24 kHz, no VAD)."""
    transcription = ce.TranscriptionWire(model=model, language=spec.language, prompt=spec.prompt)
    event: ce.ClientEvent
    if dialect is Dialect.BETA:
        session = ce.SessionWire(
            input_audio_format="pcm16", input_audio_transcription=transcription, turn_detection=None
        )
        event = ce.TranscriptionSessionUpdate(event_id=UPDATE_EVENT_ID, session=session)
    else:
        audio_in = ce.GaAudioInput(
            format=ce.GaAudioFormat("audio/pcm", RATE_HZ),
            transcription=transcription,
            turn_detection=None,
        )
        session = ce.SessionWire(type="transcription", audio=ce.GaAudio(input=audio_in))
        event = ce.SessionUpdate(event_id=UPDATE_EVENT_ID, session=session)
    wire: dict[str, Any] = msgspec.to_builtins(event)
    beta = dialect is Dialect.BETA
    parent = wire["session"] if beta else wire["session"]["audio"]["input"]
    key = "input_audio_transcription" if beta else "transcription"
    parent[key] = {k: v for k, v in parent[key].items() if v is not None}  # unset, not null
    return _encoder.encode(wire)


class _Envelope(msgspec.Struct):
    type: Any = None


_envelope = msgspec.json.Decoder(_Envelope)
_KNOWN = frozenset(cls.__struct_config__.tag for cls in se.AnyServerEvent.__args__)
_IGNORABLE = _KNOWN - {  # malformed copies of these are ignored; of the rest, fatal
    "session.created", "transcription_session.created", "input_audio_buffer.committed",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed", "error",
}  # fmt: skip


class Translator:
    """Our commands to upstream frames, upstream frames to our events; no I/O, no clock.

    Item ids: `_open` is the turn in progress; `_pending` the committed turns whose upstream
    item id is not known yet (oldest first); `_ids` maps upstream ids to ours until the
    item completes or fails; `_said` is the text of the deltas delivered per item.
    """

    def __init__(self, redact: Callable[[str], str] = str) -> None:
        self.created = False
        self._redact = redact
        self._count = 0
        self._open: str | None = None
        self._pending: deque[str] = deque()
        self._commits: dict[str, str] = {}  # event_id of our commit -> our item, until answered
        self._ids: dict[str, str] = {}
        self._said: dict[str, str] = {}

    def encode(self, command: UpstreamCommand) -> bytes | None:
        """The frame for `command` (None: nothing to send)."""
        match command:
            case AppendAudio(pcm=pcm):
                self._count += 1  # `_id`, inline: every append
                event_id = f"spear_{self._count}"
                audio = pcm16_to_bytes(pcm)
                return _encoder.encode(ce.InputAudioBufferAppend(event_id=event_id, audio=audio))
            case BeginTurn(item_id=item_id):
                self._open = item_id
                return None
            case Commit(item_id=item_id):
                event_id = self._id()
                self._open = None
                self._pending.append(item_id)
                self._commits[event_id] = item_id
                return _encoder.encode(ce.InputAudioBufferCommit(event_id=event_id))
            case Clear():
                if self._open is not None:
                    self._forget(self._open)
                    self._open = None
                return _encoder.encode(ce.InputAudioBufferClear(event_id=self._id()))
        raise TypeError(f"not an upstream command: {command!r}")

    def decode(self, data: BytesLike) -> list[UpstreamEvent]:
        """Our events for one upstream message; raises `BackendFailure` when it ends us."""
        try:
            event = se.server_event_decoder.decode(data)
        except msgspec.ValidationError as exc:
            return self._unexpected(data, exc)
        except msgspec.DecodeError:
            raise BackendFailure("the upstream sent an event that is not valid JSON") from None
        match event:
            case se.TranscriptionDelta(item_id=uid, delta=delta):
                ours = self._item_of(uid, live=True)
                if ours is None or not delta:
                    return []
                self._said[ours] = self._said.get(ours, "") + delta
                return [TranscriptDelta(ours, delta)]
            case se.TranscriptionCompleted(item_id=uid, transcript=text):
                ours = self._item_of(uid, live=False)
                if ours is None:
                    return []
                said = self._forget(ours)
                done: list[UpstreamEvent] = [TranscriptCompleted(ours, text)]
                if len(text) > len(said) and text.startswith(said):  # deltas must add up
                    done.insert(0, TranscriptDelta(ours, text[len(said) :]))
                return done
            case se.TranscriptionFailed(item_id=uid, error=error):
                ours = self._item_of(uid, live=False)
                if ours is None:
                    return []
                self._forget(ours)
                message = str(error.get("message") or "transcription failed")
                retry = error.get("type") in _RETRYABLE_ERRORS
                return [TranscriptFailed(ours, self._text(message), retryable=retry)]
            case se.Committed(item_id=uid):
                self._committed(uid)
            case se.SessionCreated() | se.TranscriptionSessionCreated():
                self.created = True
            case se.Error(error=body):
                return self._error(body)
        return []

    def _id(self) -> str:
        self._count += 1
        return f"spear_{self._count}"

    def _item_of(self, uid: str, *, live: bool) -> str | None:
        ours = self._ids.get(uid)
        if ours is None:
            if self._pending:
                ours = self._pending[0]
            elif live and self._open is not None:
                ours = self._open
            else:
                return None  # an item we never asked for (or already finished)
            self._ids[uid] = ours
        return ours

    def _committed(self, uid: str) -> None:
        ours = self._ids.get(uid)
        if ours is None:
            if not self._pending:
                return
            ours = self._ids[uid] = self._pending.popleft()
        elif ours in self._pending:
            self._pending.remove(ours)
        self._drop_commit(ours)

    def _forget(self, ours: str) -> str:
        """Drop every trace of item `ours`; the text of its delivered deltas."""
        for uid in [uid for uid, item in self._ids.items() if item == ours]:
            del self._ids[uid]
        if ours in self._pending:
            self._pending.remove(ours)
        self._drop_commit(ours)
        return self._said.pop(ours, "")

    def _drop_commit(self, ours: str) -> None:
        for event_id in [e for e, item in self._commits.items() if item == ours]:
            del self._commits[event_id]

    def _error(self, body: se.ErrorBody) -> list[UpstreamEvent]:
        message = self._text(body.message)
        item = self._commits.get(body.event_id or "")
        if item is not None:
            self._forget(item)
            return [TranscriptFailed(item, message)]
        what = "refused the session configuration" if body.event_id == UPDATE_EVENT_ID else "error"
        code = f", {body.code}" if body.code else ""
        retryable = body.type in _RETRYABLE_ERRORS or body.code in _RETRYABLE_ERRORS
        raise BackendFailure(f"upstream {what} ({body.type}{code}): {message}", retryable=retryable)

    def _unexpected(self, data: BytesLike, exc: msgspec.ValidationError) -> list[UpstreamEvent]:
        try:
            kind = _envelope.decode(data).type
        except (msgspec.ValidationError, msgspec.DecodeError):
            kind = None
        if not isinstance(kind, str):
            raise BackendFailure("the upstream sent an event without a `type`") from None
        if kind not in _KNOWN or kind in _IGNORABLE:
            return []  # an event we do not use (rate_limits.updated, a newer one...)
        raise BackendFailure(self._text(f"the upstream sent a malformed {kind}: {exc}")) from None

    def _text(self, message: str) -> str:
        return self._redact(message)[:MAX_MESSAGE_CHARS]  # redact first, then cut


class _Assembler:
    """Complete text messages out of frames (binary data is a protocol violation here)."""

    def __init__(self) -> None:
        self._parts: list[BytesLike] = []

    def message(self, frame: Frame) -> BytesLike | None:
        if frame.opcode is Opcode.BINARY or (frame.opcode is Opcode.CONT and not self._parts):
            raise BackendFailure("the upstream sent binary data; realtime events are JSON text")
        if frame.opcode is Opcode.TEXT and frame.fin:
            return frame.data
        self._parts.append(frame.data)
        if not frame.fin:
            return None
        data, self._parts = b"".join(self._parts), []
        return data
