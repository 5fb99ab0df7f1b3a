"""Client -> server realtime events (OpenAI Realtime protocol, beta and GA dialects).

One module-level decoder for the whole tagged union (tag field ``type``); audio arrives as
base64 and msgspec decodes it straight into ``bytes``. Unknown fields of an event are ignored,
but unknown fields of a `session` object (anything the server does not implement, e.g.
`instructions`, `voice`, `tools`) are refused as ``unknown_parameter`` naming the field's path,
so a client never believes a setting took effect. Unknown *types*, malformed or too deeply
nested JSON and mistyped fields become a `ProtocolError` that the session answers with an
``error`` event and carries on. An `event_id` is kept (and echoed in errors) to its first
`MAX_EVENT_ID_CHARS` characters.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

MAX_EVENT_ID_CHARS = 128  # longer client event ids are cut to this (they are echoed in errors)
_MAX_ECHO_CHARS = 64  # of an unknown event type named in an error message


class TurnDetectionSpearWire(msgspec.Struct, forbid_unknown_fields=True):
    """`turn_detection.spear`: spear's own turn detection options."""

    detector: str | None = None  # "energy" (the default) | "silero"


class TurnDetectionWire(msgspec.Struct, forbid_unknown_fields=True):
    """`turn_detection` object: `server_vad`, or `semantic_vad` (run by the silero detector).

    `create_response` and `interrupt_response` matter in conversations only; `idle_timeout_ms`
    is accepted for compatibility and has no effect, and so is `eagerness` with `server_vad`.
    """

    type: str = "server_vad"
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None
    eagerness: str | None = None
    spear: TurnDetectionSpearWire | None = None


class TranscriptionWire(msgspec.Struct, forbid_unknown_fields=True):
    """`input_audio_transcription` (beta) / `audio.input.transcription` (GA)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class GaAudioFormat(msgspec.Struct, forbid_unknown_fields=True):
    """GA audio format object: {type: audio/pcm, rate: 24000} | {type: audio/pcmu|pcma}."""

    type: str
    rate: int | None = None


class GaAudioInput(msgspec.Struct, forbid_unknown_fields=True):
    """GA `session.audio.input`."""

    format: GaAudioFormat | UnsetType = UNSET
    transcription: TranscriptionWire | UnsetType | None = UNSET
    turn_detection: TurnDetectionWire | UnsetType | None = UNSET
    noise_reduction: dict[str, Any] | UnsetType | None = UNSET


class GaAudioOutput(msgspec.Struct, forbid_unknown_fields=True):
    """GA `session.audio.output` / `response.audio.output` (conversations only)."""

    format: GaAudioFormat | UnsetType = UNSET
    voice: str | UnsetType = UNSET
    speed: float | UnsetType = UNSET


class GaAudio(msgspec.Struct, forbid_unknown_fields=True):
    """GA `session.audio`."""

    input: GaAudioInput | UnsetType = UNSET
    output: GaAudioOutput | UnsetType = UNSET


class ToolWire(msgspec.Struct, forbid_unknown_fields=True):
    """A function the model may call (`session.tools[]`, `response.tools[]`)."""

    name: str
    type: str = "function"
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ContentWire(msgspec.Struct, forbid_unknown_fields=True):
    """One content part of an item a client creates."""

    type: str
    text: str | None = None
    transcript: str | None = None
    audio: str | None = None
    id: str | None = None  # item_reference


class ItemWire(msgspec.Struct, forbid_unknown_fields=True):
    """An item in `conversation.item.create` or `response.input` (both dialects)."""

    type: str = "message"
    id: str | None = None
    object: str | None = None
    status: str | None = None
    role: str | None = None
    content: list[ContentWire] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class SpearSessionWire(msgspec.Struct, forbid_unknown_fields=True):
    """`session.spear`: spear's own session options (both dialects)."""

    # True: live transcript deltas of a manual-commit turn are sent before the commit that
    # announces their item (lower latency; such deltas reference an item not announced yet).
    early_deltas: bool | UnsetType = UNSET


class SessionWire(msgspec.Struct, forbid_unknown_fields=True):
    """The `session` object of any update event, both dialects' fields side by side.

    UNSET means "not mentioned, keep the current value"; None means "set to null". A field
    not listed here is refused (`unknown_parameter`).
    """

    type: str | UnsetType = UNSET  # GA: "realtime" | "transcription"
    model: str | UnsetType | None = UNSET  # null: what session.created shows when unset
    # beta
    input_audio_format: str | UnsetType = UNSET
    input_audio_transcription: TranscriptionWire | UnsetType | None = UNSET
    turn_detection: TurnDetectionWire | UnsetType | None = UNSET
    modalities: list[str] | UnsetType = UNSET
    input_audio_noise_reduction: dict[str, Any] | UnsetType | None = UNSET
    # beta transcription_session.update may ask about an ephemeral key (REST sessions);
    # accepted and ignored, as session.created shows an empty one
    client_secret: dict[str, Any] | UnsetType | None = UNSET
    # GA
    audio: GaAudio | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    include: list[str] | UnsetType | None = UNSET
    spear: SpearSessionWire | UnsetType = UNSET
    # conversations (refused in transcription sessions)
    instructions: str | UnsetType | None = UNSET
    voice: str | UnsetType = UNSET
    output_audio_format: str | UnsetType = UNSET  # beta
    tools: list[ToolWire] | UnsetType | None = UNSET
    tool_choice: str | dict[str, Any] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    max_output_tokens: int | str | UnsetType | None = UNSET  # GA: n | "inf"
    max_response_output_tokens: int | str | UnsetType | None = UNSET  # beta


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
    """Add an item (a text turn, a function call output...) after `previous_item_id`."""

    item: ItemWire = msgspec.field(default_factory=ItemWire)
    previous_item_id: str | None = None


class ConversationItemRetrieve(ClientEvent, tag="conversation.item.retrieve", kw_only=True):
    """Ask for an item as the server holds it."""

    item_id: str


class ConversationItemDelete(ClientEvent, tag="conversation.item.delete", kw_only=True):
    """Remove an item from the conversation."""

    item_id: str


class ConversationItemTruncate(ClientEvent, tag="conversation.item.truncate", kw_only=True):
    """Cut an assistant audio item to what the user heard."""

    item_id: str
    content_index: int
    audio_end_ms: int


class ResponseWire(msgspec.Struct, forbid_unknown_fields=True):
    """`response.create`'s `response`: per-response overrides (both dialects)."""

    conversation: str | UnsetType | None = UNSET  # "auto" | "none"
    input: list[ItemWire] | UnsetType = UNSET
    instructions: str | UnsetType | None = UNSET
    modalities: list[str] | UnsetType = UNSET  # beta
    output_modalities: list[str] | UnsetType = UNSET  # GA
    voice: str | UnsetType = UNSET  # beta
    output_audio_format: str | UnsetType = UNSET  # beta
    audio: GaAudio | UnsetType = UNSET  # GA: audio.output.{format,voice}
    tools: list[ToolWire] | UnsetType | None = UNSET
    tool_choice: str | dict[str, Any] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    max_output_tokens: int | str | UnsetType | None = UNSET
    max_response_output_tokens: int | str | UnsetType | None = UNSET
    metadata: dict[str, str] | UnsetType | None = UNSET


class ResponseCreate(ClientEvent, tag="response.create"):
    """Ask for a response, optionally with per-response overrides."""

    response: ResponseWire | None = None


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
    | ConversationItemRetrieve
    | ConversationItemDelete
    | ConversationItemTruncate
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
    """Decode one text frame into a client event, or a ProtocolError saying what is wrong.

    Never raises: JSON nested deeper than msgspec decodes is an ``invalid_json`` error too.
    """
    try:
        event: AnyClientEvent = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        return _explain(data, str(exc))
    except msgspec.DecodeError as exc:
        return ProtocolError("invalid_json", f"the frame is not valid JSON: {exc}")
    except RecursionError:
        return _TOO_DEEP
    if event.event_id is not None and len(event.event_id) > MAX_EVENT_ID_CHARS:
        event.event_id = event.event_id[:MAX_EVENT_ID_CHARS]
    return event


_TOO_DEEP = ProtocolError("invalid_json", "the frame nests JSON too deeply to be an event")


def _explain(data: bytes | bytearray | memoryview | str, reason: str) -> ProtocolError:
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ProtocolError("invalid_event", f"the event must be a JSON object: {reason}")
    except RecursionError:
        return _TOO_DEEP
    event_id = (
        envelope.event_id[:MAX_EVENT_ID_CHARS] if isinstance(envelope.event_id, str) else None
    )
    if envelope.type is None:
        return ProtocolError("missing_type", "the event has no `type` field", event_id, "type")
    if not isinstance(envelope.type, str) or envelope.type not in KNOWN_TYPES:
        named = (
            f"unknown event type {_short(envelope.type)}"
            if isinstance(envelope.type, str)
            else "the event type must be a string"
        )
        return ProtocolError(
            "unknown_event_type", f"{named}; supported: {', '.join(KNOWN_TYPES)}", event_id, "type"
        )
    param = None
    if " - at `$." in reason:
        reason, _, where = reason.rpartition(" - at `$.")
        param = where.rstrip("`")
    if reason.startswith("Object contains unknown field `") and param is not None:
        field = reason.removeprefix("Object contains unknown field `").rstrip("`")
        param = f"{param}.{field}"
        return ProtocolError(
            "unknown_parameter",
            f"{envelope.type}: {param} is not supported by this server (see its README for the "
            "fields it implements)",
            event_id,
            param,
        )
    if param == "audio":
        reason = "audio must be a base64 string" if "base64" not in reason else reason
    return ProtocolError("invalid_value", f"{envelope.type}: {reason}", event_id, param)


def _short(text: str) -> str:
    """`text` quoted, cut to _MAX_ECHO_CHARS characters."""
    cut = text[:_MAX_ECHO_CHARS] + ("..." if len(text) > _MAX_ECHO_CHARS else "")
    return "'" + cut.replace("'", "\\'") + "'"
