"""Server -> client realtime events as msgspec Structs (tag field ``type``).

`event_id` and `seq` are stamped by the session when an event is emitted (seq = 1, 2, 3, ...
per session). Event names common to both dialects are one class; where the dialects differ
(session.* vs transcription_session.*, item.created vs item.added/done) both classes exist
and the session picks by dialect.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every server event."""

    event_id: str = ""
    seq: int = 0


class SessionCreated(ServerEvent, tag="session.created"):
    """Sent once at connect; `spear.resume_token` lets the client resume."""

    session: dict[str, Any]
    spear: dict[str, Any] | None = None


class SessionUpdated(ServerEvent, tag="session.updated"):
    """Answer to `session.update`."""

    session: dict[str, Any]


class TranscriptionSessionCreated(ServerEvent, tag="transcription_session.created"):
    """Beta transcription dialect of `session.created`."""

    session: dict[str, Any]
    spear: dict[str, Any] | None = None


class TranscriptionSessionUpdated(ServerEvent, tag="transcription_session.updated"):
    """Beta transcription dialect of `session.updated`."""

    session: dict[str, Any]


class SpeechStarted(ServerEvent, tag="input_audio_buffer.speech_started"):
    """Server VAD found speech; `item_id` is the item the turn will become."""

    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, tag="input_audio_buffer.speech_stopped"):
    """Server VAD found the end of speech."""

    audio_end_ms: int
    item_id: str


class Committed(ServerEvent, tag="input_audio_buffer.committed"):
    """The input buffer became item `item_id`."""

    item_id: str
    previous_item_id: str | None = None


class Cleared(ServerEvent, tag="input_audio_buffer.cleared"):
    """Uncommitted audio was dropped."""


class ItemCreated(ServerEvent, tag="conversation.item.created"):
    """Beta: an input item was added to the conversation."""

    item: dict[str, Any]
    previous_item_id: str | None = None


class ItemAdded(ServerEvent, tag="conversation.item.added"):
    """GA: an input item was added to the conversation."""

    item: dict[str, Any]
    previous_item_id: str | None = None


class ItemDone(ServerEvent, tag="conversation.item.done"):
    """GA: an item is complete (its transcript is final)."""

    item: dict[str, Any]
    previous_item_id: str | None = None


class TranscriptionDelta(ServerEvent, tag="conversation.item.input_audio_transcription.delta"):
    """Append-only transcript text of `item_id`."""

    item_id: str
    delta: str
    content_index: int = 0


class TranscriptionCompleted(
    ServerEvent, tag="conversation.item.input_audio_transcription.completed"
):
    """The final transcript: the concatenation of the item's deltas.

    `usage` is what the SDKs' models require: ``{"type": "duration", "seconds": s}`` with the
    item's input audio in seconds (`duration_usage`).
    """

    item_id: str
    transcript: str
    content_index: int = 0
    usage: dict[str, Any] = msgspec.field(default_factory=lambda: duration_usage(0.0))


class TranscriptionFailed(ServerEvent, tag="conversation.item.input_audio_transcription.failed"):
    """The item could not be transcribed."""

    item_id: str
    error: dict[str, Any]
    content_index: int = 0


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The `error` object of an error event."""

    type: str
    message: str
    code: str | None = None
    param: str | None = None
    event_id: str | None = None  # the offending client event


class Error(ServerEvent, tag="error"):
    """Something the client sent (or the server hit) went wrong; the session may live on."""

    error: ErrorBody
    spear: dict[str, Any] | None = None  # routing explanation, when there is one


class SpearServerDraining(ServerEvent, tag="spear.server.draining"):
    """The server is shutting down: turns in flight finish, then the session closes 1001."""

    deadline_ms: int


class SpearSessionExpiring(ServerEvent, tag="spear.session.expiring"):
    """The session reaches max_session_seconds in `seconds_left` and will then close."""

    seconds_left: float


class SpearSessionResumed(ServerEvent, tag="spear.session.resumed"):
    """First event on a resumed connection (seq 0: not part of the session's event log).

    Events with seq > `last_seq` follow. The server holds `input_audio_bytes` of input audio
    and last applied the client event `last_event_id`: the client resends what came after.
    """

    session_id: str
    last_seq: int
    input_audio_bytes: int
    last_event_id: str | None = None


class SpearUpstreamReconnected(ServerEvent, tag="spear.upstream.reconnected"):
    """The backend connection dropped and was reopened; unfinished turns were sent again."""

    backend: str  # the instance now serving the session
    attempts: int
    downtime_ms: int
    replayed_item_ids: list[str]


class SpearMetrics(ServerEvent, tag="spear.metrics"):
    """Per-session counters (spear extension; clients that don't know it ignore it)."""

    metrics: dict[str, int | float]


AnyServerEvent = (
    SessionCreated
    | SessionUpdated
    | TranscriptionSessionCreated
    | TranscriptionSessionUpdated
    | SpeechStarted
    | SpeechStopped
    | Committed
    | Cleared
    | ItemCreated
    | ItemAdded
    | ItemDone
    | TranscriptionDelta
    | TranscriptionCompleted
    | TranscriptionFailed
    | Error
    | SpearServerDraining
    | SpearSessionExpiring
    | SpearSessionResumed
    | SpearUpstreamReconnected
    | SpearMetrics
)

_encoder = msgspec.json.Encoder()
encode_server_event = _encoder.encode
server_event_decoder = msgspec.json.Decoder(AnyServerEvent)


def duration_usage(seconds: float) -> dict[str, Any]:
    """The `usage` of a transcription billed by audio duration."""
    return {"type": "duration", "seconds": round(seconds, 3)}


def input_item(item_id: str, transcript: str | None, status: str = "completed") -> dict[str, Any]:
    """The conversation item a committed audio turn becomes."""
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "user",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }
