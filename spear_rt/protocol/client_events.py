"""Client -> server realtime events (OpenAI Realtime protocol, beta and GA dialects).

One module-level decoder for the whole tagged union (tag field ``type``); audio arrives as
base64 and msgspec decodes it straight into ``bytes``. Unknown *fields* are ignored (clients
send options we do not use); unknown *types*, malformed JSON and mistyped fields become a
`ProtocolError` that the session answers with an ``error`` event and carries on.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType


class TurnDetectionWire(msgspec.Struct):
    """`turn_detection` object; only `server_vad` is implemented (others are refused)."""

    type: str = "server_vad"
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


class TranscriptionWire(msgspec.Struct):
    """`input_audio_transcription` (beta) / `audio.input.transcription` (GA)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class GaAudioFormat(msgspec.Struct):
    """GA audio format object: {type: audio/pcm, rate: 24000} | {type: audio/pcmu|pcma}."""

    type: str
    rate: int | None = None


class GaAudioInput(msgspec.Struct):
    """GA `session.audio.input`."""

    format: GaAudioFormat | UnsetType = UNSET
    transcription: TranscriptionWire | UnsetType | None = UNSET
    turn_detection: TurnDetectionWire | UnsetType | None = UNSET
    noise_reduction: dict[str, Any] | UnsetType | None = UNSET


class GaAudio(msgspec.Struct):
    """GA `session.audio`."""

    input: GaAudioInput | UnsetType = UNSET
    output: dict[str, Any] | UnsetType = UNSET


class SessionWire(msgspec.Struct):
    """The `session` object of any update event, both dialects' fields side by side.

    UNSET means "not mentioned, keep the current value"; None means "set to null".
    """

    type: str | UnsetType = UNSET  # GA: "realtime" | "transcription"
    model: str | UnsetType | None = UNSET  # null: what session.created shows when unset
    # beta
    input_audio_format: str | UnsetType = UNSET
    input_audio_transcription: TranscriptionWire | UnsetType | None = UNSET
    turn_detection: TurnDetectionWire | UnsetType | None = UNSET
    modalities: list[str] | UnsetType = UNSET
    # GA
    audio: GaAudio | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    include: list[str] | UnsetType | None = UNSET


class ClientEvent(msgspec.Struct, tag_field="type"):
    """Base of every client event."""

    event_id: str | None = None


class SessionUpdate(ClientEvent, tag="session.update"):
    """`session.update` (beta conversation, or GA with `session.type`)."""

    session: SessionWire = msgspec.field(default_factory=SessionWire)


class TranscriptionSessionUpdate(ClientEvent, tag="transcription_session.update"):
    """Beta `transcription_session.update`."""

    session: SessionWire = msgspec.field(default_factory=SessionWire)


class InputAudioBufferAppend(ClientEvent, tag="input_audio_buffer.append"):
    """Audio in the session's input format, base64 on the wire, bytes here."""

    audio: bytes = b""


class InputAudioBufferCommit(ClientEvent, tag="input_audio_buffer.commit"):
    """End the current input turn."""


class InputAudioBufferClear(ClientEvent, tag="input_audio_buffer.clear"):
    """Drop uncommitted audio."""


class ConversationItemCreate(ClientEvent, tag="conversation.item.create"):
    """A text turn (needs a conversational backend)."""

    item: dict[str, Any] = msgspec.field(default_factory=dict)


class ResponseCreate(ClientEvent, tag="response.create"):
    """Ask for a response (needs a conversational backend)."""

    response: dict[str, Any] | None = None


class ResponseCancel(ClientEvent, tag="response.cancel"):
    """Cancel the response in progress."""

    response_id: str | None = None


class SpearMetricsRequest(ClientEvent, tag="spear.metrics.request"):
    """Ask for a `spear.metrics` event (queue bytes, dropped events)."""


AnyClientEvent = (
    SessionUpdate
    | TranscriptionSessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ResponseCreate
    | ResponseCancel
    | SpearMetricsRequest
)

KNOWN_TYPES = tuple(sorted(str(cls.__struct_config__.tag) for cls in AnyClientEvent.__args__))


class ProtocolError(msgspec.Struct, frozen=True):
    """A client event we could not accept: answered with an `error` event, session lives on."""

    code: str
    message: str
    event_id: str | None = None
    param: str | None = None


class _Envelope(msgspec.Struct):
    """Lenient view used only on the error path, to name the offending event."""

    type: Any = None
    event_id: Any = None


_decoder = msgspec.json.Decoder(AnyClientEvent)
_envelope_decoder = msgspec.json.Decoder(_Envelope)


def decode_client_event(
    data: bytes | bytearray | memoryview | str,
) -> AnyClientEvent | ProtocolError:
    """Decode one text frame into a client event, or a ProtocolError saying what is wrong."""
    try:
        event: AnyClientEvent = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        return _explain(data, str(exc))
    except msgspec.DecodeError as exc:
        return ProtocolError("invalid_json", f"the frame is not valid JSON: {exc}")
    return event


def _explain(data: bytes | bytearray | memoryview | str, reason: str) -> ProtocolError:
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ProtocolError("invalid_event", f"the event must be a JSON object: {reason}")
    event_id = envelope.event_id if isinstance(envelope.event_id, str) else None
    if envelope.type is None:
        return ProtocolError("missing_type", "the event has no `type` field", event_id, "type")
    if not isinstance(envelope.type, str) or envelope.type not in KNOWN_TYPES:
        return ProtocolError(
            "unknown_event_type",
            f"unknown event type {envelope.type!r}; supported: {', '.join(KNOWN_TYPES)}",
            event_id,
            "type",
        )
    param = None
    if " - at `$." in reason:
        reason, _, where = reason.rpartition(" - at `$.")
        param = where.rstrip("`")
    if param == "audio":
        reason = "audio must be a base64 string" if "base64" not in reason else reason
    return ProtocolError("invalid_value", f"{envelope.type}: {reason}", event_id, param)
