"""Session settings: one normalized form for both dialects, and the wire views of it.

`apply_update` folds a `session` object from either dialect into the current settings
(fields not mentioned keep their value; an explicit null clears turn detection), and
`render_session` shows settings back in the dialect the client speaks.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec
from msgspec import UNSET

from spear_rt.audio import (
    AudioFormatError,
    InputFormat,
    VadConfig,
    input_format_from_wire,
    input_format_to_wire,
    silero,
)
from spear_rt.audio.vad import DETECTORS
from spear_rt.errors import echo
from spear_rt.protocol.client_events import SessionWire, TranscriptionWire, TurnDetectionWire
from spear_rt.protocol.conversation_settings import (
    ConversationSettings,
    conversation_update,
    render_audio_output,
    render_conversation,
)
from spear_rt.protocol.conversation_settings import (
    SettingsError as SettingsError,
)


class Dialect(enum.StrEnum):
    """Which version of the OpenAI Realtime protocol a peer speaks."""

    BETA = "beta"  # OpenAI-Beta: realtime=v1
    GA = "ga"


class SessionKind(enum.StrEnum):
    """What the session does."""

    TRANSCRIPTION = "transcription"
    REALTIME = "realtime"


class TranscriptionSettings(msgspec.Struct, frozen=True):
    """Transcription model, language and prompt."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class SessionSettings(msgspec.Struct, frozen=True):
    """A session's current configuration, independent of dialect."""

    kind: SessionKind = SessionKind.TRANSCRIPTION
    model: str | None = None
    input_format: InputFormat = msgspec.field(default_factory=InputFormat.default)
    transcription: TranscriptionSettings = TranscriptionSettings()
    turn_detection: VadConfig | None = msgspec.field(default_factory=VadConfig)
    # spear option (session.spear.early_deltas): manual-commit deltas before the commit
    early_deltas: bool = False
    conversation: ConversationSettings = ConversationSettings()


_MAX_SILENCE_MS = 10_000
_MAX_PADDING_MS = 5_000
# OpenAI's semantic_vad waits for the end of a thought; spear has no model of that, so it runs
# the silero detector with a silence that follows the eagerness ("auto" is "medium").
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 500, "high": 250, "auto": 500}
_SERVER_VAD_ONLY = ("threshold", "prefix_padding_ms", "silence_duration_ms")


def turn_detection_config(wire: TurnDetectionWire, param: str = "turn_detection") -> VadConfig:
    """The detector settings a fresh session would take from `wire` (SettingsError or
    ConfigError naming the bad field)."""
    return _vad(wire, None, param)


def _vad(wire: TurnDetectionWire, current: VadConfig | None, param: str) -> VadConfig:
    """The detector settings `wire` asks for; fields it leaves out keep `current`'s value when
    the type stays the same (a change of type starts from that type's defaults)."""
    semantic = current is not None and current.eagerness is not None
    match wire.type:
        case "server_vad":
            config = _server_vad(wire, None if semantic else current, param)
            where = f"{param}.spear.detector"
        case "semantic_vad":
            config = _semantic_vad(wire, current if semantic else None, param)
            where = f"{param}.type"
        case _:
            raise SettingsError(
                f"{param}.type",
                f"turn detection {echo(wire.type)} is not supported; use 'server_vad', "
                "'semantic_vad' or null for manual commit",
            )
    if config.detector == "silero":
        try:
            silero.require()
        except silero.DetectorUnavailable as exc:
            raise SettingsError(where, str(exc)) from None
    return config


def _server_vad(wire: TurnDetectionWire, current: VadConfig | None, param: str) -> VadConfig:
    base = current or VadConfig()
    threshold = base.threshold if wire.threshold is None else wire.threshold
    padding = base.prefix_padding_ms if wire.prefix_padding_ms is None else wire.prefix_padding_ms
    silence = (
        base.silence_duration_ms if wire.silence_duration_ms is None else wire.silence_duration_ms
    )
    detector = base.detector
    if wire.spear is not None and wire.spear.detector is not None:
        detector = wire.spear.detector
    if detector not in DETECTORS:
        raise SettingsError(
            f"{param}.spear.detector",
            f"unknown detector {echo(detector)}; use one of {', '.join(DETECTORS)}",
        )
    if not 0.0 <= threshold <= 1.0:
        raise SettingsError(f"{param}.threshold", f"threshold must be within 0..1, got {threshold}")
    if not 0 <= padding <= _MAX_PADDING_MS:
        raise SettingsError(f"{param}.prefix_padding_ms", f"must be 0..{_MAX_PADDING_MS}")
    if not 0 <= silence <= _MAX_SILENCE_MS:
        raise SettingsError(f"{param}.silence_duration_ms", f"must be 0..{_MAX_SILENCE_MS}")
    return VadConfig(
        threshold=threshold,
        prefix_padding_ms=padding,
        silence_duration_ms=silence,
        detector=detector,
    )


def _semantic_vad(wire: TurnDetectionWire, current: VadConfig | None, param: str) -> VadConfig:
    for name in _SERVER_VAD_ONLY:
        if getattr(wire, name) is not None:
            raise SettingsError(
                f"{param}.{name}",
                f"semantic_vad has no {name} (it follows eagerness); use server_vad with "
                'spear.detector "silero" to set it',
                "unknown_parameter",
            )
    if wire.spear is not None and wire.spear.detector not in (None, "silero"):
        raise SettingsError(
            f"{param}.spear.detector", "semantic_vad always runs the silero detector"
        )
    eagerness = wire.eagerness or (current.eagerness if current else None) or "auto"
    if eagerness not in SEMANTIC_SILENCE_MS:
        raise SettingsError(
            f"{param}.eagerness",
            f"eagerness must be one of {', '.join(SEMANTIC_SILENCE_MS)}, got {echo(eagerness)}",
        )
    return VadConfig(
        silence_duration_ms=SEMANTIC_SILENCE_MS[eagerness], detector="silero", eagerness=eagerness
    )


def _transcription(
    wire: TranscriptionWire | None, current: TranscriptionSettings
) -> TranscriptionSettings:
    if wire is None:
        return TranscriptionSettings()
    return TranscriptionSettings(
        model=wire.model if wire.model is not None else current.model,
        language=wire.language if wire.language is not None else current.language,
        prompt=wire.prompt if wire.prompt is not None else current.prompt,
    )


def _format(value: Any, param: str) -> InputFormat:
    try:
        return input_format_from_wire(value)
    except AudioFormatError as exc:
        raise SettingsError(param, str(exc)) from None


_CONVERSATION_FIELDS = (
    "instructions",
    "voice",
    "output_audio_format",
    "tools",
    "tool_choice",
    "temperature",
    "max_output_tokens",
    "max_response_output_tokens",
)


def _refuse_in_transcription(wire: SessionWire) -> None:
    """A transcription session produces no responses: conversation fields are refused."""
    for name in _CONVERSATION_FIELDS:
        if getattr(wire, name) is not UNSET:
            raise SettingsError(
                f"session.{name}",
                f"session.update: session.{name} is not supported in a transcription session "
                "(it answers nothing; open a conversation for responses)",
                "unknown_parameter",
            )
    for name, modalities in (
        ("modalities", wire.modalities),
        ("output_modalities", wire.output_modalities),
    ):
        if modalities is not UNSET and not set(modalities) <= {"text"}:
            raise SettingsError(
                f"session.{name}",
                f"session.{name}: a transcription session produces no audio",
                "unknown_parameter",
            )
    if wire.audio is not UNSET and wire.audio.output is not UNSET:
        raise SettingsError(
            "session.audio.output",
            "session.audio.output is not supported in a transcription session (no audio output)",
            "unknown_parameter",
        )


def _refuse_unsupported(wire: SessionWire) -> None:
    """Documented fields whose only supported value is 'off': anything else is refused."""
    noise = [("session.input_audio_noise_reduction", wire.input_audio_noise_reduction)]
    if wire.audio is not UNSET:
        if wire.audio.input is not UNSET:
            noise.append(("session.audio.input.noise_reduction", wire.audio.input.noise_reduction))
    for param, value in noise:
        if value is not UNSET and value is not None:
            raise SettingsError(param, f"{param} is not supported; send null or leave it out")


def apply_update(current: SessionSettings, wire: SessionWire) -> SessionSettings:
    """The settings after a session update from either dialect; raises SettingsError."""
    if current.kind is SessionKind.TRANSCRIPTION:
        _refuse_in_transcription(wire)
    _refuse_unsupported(wire)
    changes: dict[str, Any] = {}
    if wire.spear is not UNSET and wire.spear.early_deltas is not UNSET:
        changes["early_deltas"] = wire.spear.early_deltas
    if wire.type is not UNSET:
        try:
            kind = SessionKind(wire.type)
        except ValueError:
            raise SettingsError(
                "session.type", "session.type must be 'realtime' or 'transcription'"
            ) from None
        if kind is not current.kind:
            raise SettingsError(
                "session.type", f"this is a {current.kind} session; its type cannot change"
            )
    if wire.model is not UNSET:
        changes["model"] = wire.model
    turn = current.turn_detection
    transcription = current.transcription
    if wire.input_audio_format is not UNSET:
        changes["input_format"] = _format(wire.input_audio_format, "session.input_audio_format")
    if wire.input_audio_transcription is not UNSET:
        transcription = _transcription(wire.input_audio_transcription, transcription)
    if wire.turn_detection is not UNSET:
        td = wire.turn_detection
        turn = None if td is None else _vad(td, turn, "session.turn_detection")
    if wire.audio is not UNSET and wire.audio.input is not UNSET:
        audio_in = wire.audio.input
        if audio_in.format is not UNSET:
            fmt: dict[str, str | int] = {"type": audio_in.format.type}
            if audio_in.format.rate is not None:
                fmt["rate"] = audio_in.format.rate
            changes["input_format"] = _format(fmt, "session.audio.input.format")
        if audio_in.transcription is not UNSET:
            transcription = _transcription(audio_in.transcription, transcription)
        if audio_in.turn_detection is not UNSET:
            td = audio_in.turn_detection
            turn = None if td is None else _vad(td, turn, "session.audio.input.turn_detection")
    changes["turn_detection"] = turn
    changes["transcription"] = transcription
    if current.kind is SessionKind.REALTIME:
        conversation = conversation_update(current.conversation, wire)
        for td in _turn_wires(wire):
            if td.create_response is not None:
                conversation = msgspec.structs.replace(
                    conversation, create_response=td.create_response
                )
            if td.interrupt_response is not None:
                conversation = msgspec.structs.replace(
                    conversation, interrupt_response=td.interrupt_response
                )
        changes["conversation"] = conversation
    return msgspec.structs.replace(current, **changes)


def _turn_wires(wire: SessionWire) -> list[TurnDetectionWire]:
    found = [wire.turn_detection]
    if wire.audio is not UNSET and wire.audio.input is not UNSET:
        found.append(wire.audio.input.turn_detection)
    return [td for td in found if isinstance(td, TurnDetectionWire)]


def _turn_wire(settings: SessionSettings) -> dict[str, Any] | None:
    turn = settings.turn_detection
    if turn is None:
        return None
    wire: dict[str, Any]
    if turn.eagerness is not None:
        wire = {"type": "semantic_vad", "eagerness": turn.eagerness}
    else:
        wire = {
            "type": "server_vad",
            "threshold": turn.threshold,
            "prefix_padding_ms": turn.prefix_padding_ms,
            "silence_duration_ms": turn.silence_duration_ms,
        }
        if turn.detector != "energy":  # the default is not shown (as before the choice)
            wire["spear"] = {"detector": turn.detector}
    if settings.kind is SessionKind.REALTIME:
        wire["create_response"] = settings.conversation.create_response
        wire["interrupt_response"] = settings.conversation.interrupt_response
    return wire


def _transcription_wire(t: TranscriptionSettings) -> dict[str, Any]:
    return {"model": t.model, "language": t.language, "prompt": t.prompt}


def render_session(settings: SessionSettings, dialect: Dialect, session_id: str) -> dict[str, Any]:
    """The `session` object of session.created/updated in `dialect`."""
    obj = (
        "realtime.transcription_session"
        if settings.kind is SessionKind.TRANSCRIPTION
        else "realtime.session"
    )
    realtime = settings.kind is SessionKind.REALTIME
    if dialect is Dialect.GA:
        session: dict[str, Any] = {
            "type": str(settings.kind),
            "object": obj,
            "id": session_id,
            "model": settings.model,
            "audio": {
                "input": {
                    "format": input_format_to_wire(settings.input_format, ga=True),
                    "transcription": _transcription_wire(settings.transcription),
                    "turn_detection": _turn_wire(settings),
                }
            },
        }
        if realtime:
            session.update(render_conversation(settings.conversation, ga=True))
            session["audio"]["output"] = render_audio_output(settings.conversation)
        return session
    try:
        fmt: Any = input_format_to_wire(settings.input_format, ga=False)
    except AudioFormatError:
        fmt = input_format_to_wire(settings.input_format, ga=True)  # beta has no name for it
    session = {
        **(render_conversation(settings.conversation, ga=False) if realtime else {}),
        "object": obj,
        "id": session_id,
        "input_audio_format": fmt,
        "input_audio_transcription": _transcription_wire(settings.transcription),
        "turn_detection": _turn_wire(settings),
    }
    if realtime:
        session["model"] = settings.model
    else:
        # The beta SDK's TranscriptionSession model requires client_secret; a WebSocket
        # session has none (that is for REST-created sessions): empty value, expires_at 0.
        session["client_secret"] = {"value": "", "expires_at": 0}
    return session
