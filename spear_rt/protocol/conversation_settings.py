"""Conversation settings: what shapes a response, from `session.update` or `response.create`.

One normalized form for both dialects (`ConversationSettings`); `conversation_update` folds a
session object or a response's overrides into it (fields not mentioned keep their value),
refusing what the server cannot honour with the field's path; `render_conversation` shows the
settings back in a dialect.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from spear_rt.audio import AudioFormat, AudioFormatError, InputFormat, input_format_from_wire
from spear_rt.audio import input_format_to_wire as format_to_wire
from spear_rt.protocol.client_events import GaAudio, ResponseWire, SessionWire, ToolWire

MAX_TOOLS = 128
MAX_INSTRUCTIONS_CHARS = 64 * 1024
_MODALITIES = ({"audio"}, {"text"}, {"audio", "text"})
_TOOL_CHOICES = ("auto", "none", "required")


class SettingsError(ValueError):
    """A session update we refuse; `param` names the offending field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ConversationSettings(msgspec.Struct, frozen=True):
    """What shapes a conversation's responses (session defaults, or one response's).

    `tools` keep the realtime shape (`{"type": "function", "name", ...}`);
    `max_output_tokens` None means "inf".
    """

    instructions: str | None = None
    voice: str = "alloy"
    output_modalities: tuple[str, ...] = ("audio",)
    output_format: InputFormat = msgspec.field(default_factory=InputFormat.default)
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] = "auto"
    temperature: float = 0.8
    max_output_tokens: int | None = None
    create_response: bool = True  # server VAD answers each committed turn
    interrupt_response: bool = True  # speech during a response cancels it (barge-in)

    @property
    def audio_out(self) -> bool:
        """Whether responses speak (else text only)."""
        return "audio" in self.output_modalities


def _modalities(value: list[str], param: str) -> tuple[str, ...]:
    if set(value) not in _MODALITIES:
        raise SettingsError(param, f"{param} must be ['audio'], ['text'] or ['audio', 'text']")
    return ("audio",) if "audio" in value else ("text",)


def _output_format(value: Any, param: str) -> InputFormat:
    try:
        fmt = input_format_from_wire(value)
    except AudioFormatError as exc:
        raise SettingsError(param, str(exc)) from None
    if fmt.format is AudioFormat.PCM16 and fmt.rate_hz != 24000:
        raise SettingsError(param, f"{param}: output pcm16 is 24000 Hz, got {fmt.rate_hz}")
    return fmt


def _tools(tools: list[ToolWire] | None, param: str) -> tuple[dict[str, Any], ...]:
    if not tools:
        return ()
    if len(tools) > MAX_TOOLS:
        raise SettingsError(param, f"{param}: at most {MAX_TOOLS} tools")
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise SettingsError(
                f"{param}[{i}].type", f"{param}[{i}]: only 'function' tools are supported"
            )
        out.append(
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description or "",
                "parameters": tool.parameters or {"type": "object", "properties": {}},
            }
        )
    return tuple(out)


def _tool_choice(value: str | dict[str, Any], param: str) -> str | dict[str, Any]:
    if isinstance(value, str) and value in _TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function" and "name" in value:
        return {"type": "function", "name": str(value["name"])}
    raise SettingsError(param, f"{param} must be 'auto', 'none', 'required' or a function")


def _max_tokens(value: int | str | None, param: str) -> int | None:
    if value is None or value == "inf":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096:
        return value
    raise SettingsError(param, f"{param} must be 1..4096 or 'inf'")


def _audio_output(audio: GaAudio | UnsetType, prefix: str, changes: dict[str, Any]) -> None:
    if audio is UNSET or audio.output is UNSET:
        return
    out = audio.output
    if out.format is not UNSET:
        fmt: dict[str, Any] = {"type": out.format.type}
        if out.format.rate is not None:
            fmt["rate"] = out.format.rate
        changes["output_format"] = _output_format(fmt, f"{prefix}.audio.output.format")
    if out.voice is not UNSET:
        changes["voice"] = out.voice
    if out.speed is not UNSET and out.speed != 1.0:
        raise SettingsError(f"{prefix}.audio.output.speed", "only speed 1.0 is supported")


def conversation_update(
    current: ConversationSettings, wire: SessionWire | ResponseWire, prefix: str = "session"
) -> ConversationSettings:
    """`current` with the conversation fields of `wire` applied; raises SettingsError."""
    changes: dict[str, Any] = {}
    if wire.instructions is not UNSET:
        if wire.instructions is not None and len(wire.instructions) > MAX_INSTRUCTIONS_CHARS:
            raise SettingsError(
                f"{prefix}.instructions", f"at most {MAX_INSTRUCTIONS_CHARS} characters"
            )
        changes["instructions"] = wire.instructions
    if wire.voice is not UNSET:
        changes["voice"] = wire.voice
    for name in ("modalities", "output_modalities"):
        value = getattr(wire, name)
        if value is not UNSET:
            changes["output_modalities"] = _modalities(value, f"{prefix}.{name}")
    if wire.output_audio_format is not UNSET:
        changes["output_format"] = _output_format(
            wire.output_audio_format, f"{prefix}.output_audio_format"
        )
    _audio_output(wire.audio, prefix, changes)
    if wire.tools is not UNSET:
        changes["tools"] = _tools(wire.tools, f"{prefix}.tools")
    if wire.tool_choice is not UNSET:
        changes["tool_choice"] = _tool_choice(wire.tool_choice, f"{prefix}.tool_choice")
    if wire.temperature is not UNSET:
        if not 0.0 <= wire.temperature <= 2.0:
            raise SettingsError(f"{prefix}.temperature", "temperature must be within 0..2")
        changes["temperature"] = wire.temperature
    for name in ("max_output_tokens", "max_response_output_tokens"):
        value = getattr(wire, name)
        if value is not UNSET:
            changes["max_output_tokens"] = _max_tokens(value, f"{prefix}.{name}")
    return msgspec.structs.replace(current, **changes) if changes else current


def render_conversation(settings: ConversationSettings, ga: bool) -> dict[str, Any]:
    """The conversation fields of a session object (or a response) in a dialect."""
    tokens: int | str = "inf" if settings.max_output_tokens is None else settings.max_output_tokens
    common = {
        "instructions": settings.instructions or "",
        "tools": list(settings.tools),
        "tool_choice": settings.tool_choice,
    }
    if ga:
        return {
            **common,
            "output_modalities": list(settings.output_modalities),
            "max_output_tokens": tokens,
        }
    return {
        **common,
        "modalities": ["audio", "text"] if settings.audio_out else ["text"],
        "voice": settings.voice,
        "output_audio_format": format_to_wire(settings.output_format, ga=False),
        "temperature": settings.temperature,
        "max_response_output_tokens": tokens,
    }


def render_audio_output(settings: ConversationSettings) -> dict[str, Any]:
    """GA `audio.output` of a session or response."""
    return {"format": format_to_wire(settings.output_format, ga=True), "voice": settings.voice}
