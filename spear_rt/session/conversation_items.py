"""Conversation items and responses as data, and their wire shapes in both dialects.

Items are kept dialect-neutral (`Item`); `render_item` shows one the way a dialect names its
content parts (GA `output_audio` / `output_text`, beta `audio` / `text`). `chat_messages`
turns the conversation into the messages of a chat request: `instructions` first as the
system message, user turns by their transcripts, consecutive function calls as one assistant
message with `tool_calls`, their outputs as `tool` messages.
"""

from __future__ import annotations

from typing import Any

import msgspec

from spear_rt.audio import input_format_to_wire
from spear_rt.protocol.client_events import ItemWire
from spear_rt.protocol.conversation_settings import (
    ConversationSettings,
    SettingsError,
    render_audio_output,
)

MAX_ITEM_TEXT_CHARS = 256 * 1024  # of one created item's text (a client's, or a tool output)
# Items one conversation keeps. Past it the oldest go, each announced with
# `conversation.item.deleted` (and deleted upstream on a relay): a session that runs for
# hours holds a bounded history, and lookups stay cheap.
MAX_CONVERSATION_ITEMS = 1000


class Segment(msgspec.Struct, frozen=True, gc=False):
    """Once an assistant item's audio has played to `audio_end_ms`, its transcript's first
    `text_chars` characters were heard (one per audio chunk sent: for truncation)."""

    audio_end_ms: float
    text_chars: int


class Item(msgspec.Struct, kw_only=True, gc=False):
    """One conversation item (dialect-neutral).

    Not tracked by the garbage collector (`gc=False`): a long conversation holds many, and an
    item only ever refers to strings, lists and dicts of plain data (no cycle can pass it).

    Message content parts are `{"kind": k, ...}` with k one of input_text, input_audio,
    text, audio (assistant output); `text` / `transcript` hold their words.
    """

    id: str
    type: str = "message"  # message | function_call | function_call_output
    role: str | None = None
    status: str = "completed"
    content: list[dict[str, Any]] = msgspec.field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""
    output: str = ""
    audio_ms: float = 0.0  # assistant output audio sent so far
    segments: list[Segment] = msgspec.field(default_factory=list)

    def text(self) -> str:
        """The words of a message item (text parts, transcripts of audio parts)."""
        return "".join(p.get("text") or p.get("transcript") or "" for p in self.content)


class ItemList(list[Item]):
    """A conversation's items in order, indexed by id.

    Only `append`, `insert` and `remove` change it (they keep the index); membership is
    identity, found through the index instead of a scan.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_id: dict[str, Item] = {}

    def append(self, item: Item) -> None:
        """Add `item` at the end."""
        super().append(item)
        self._by_id[item.id] = item

    def insert(self, at: Any, item: Item) -> None:
        """Add `item` at position `at`."""
        super().insert(at, item)
        self._by_id[item.id] = item

    def remove(self, item: Item) -> None:
        """Take `item` out."""
        super().remove(item)
        if self._by_id.get(item.id) is item:
            del self._by_id[item.id]

    def find(self, item_id: str) -> Item | None:
        """The item with id `item_id`, if the conversation has it."""
        return self._by_id.get(item_id)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, Item) and self._by_id.get(item.id) is item


_GA_KIND = {
    "input_text": "input_text",
    "input_audio": "input_audio",
    "text": "output_text",
    "audio": "output_audio",
}


def render_item(item: Item, ga: bool) -> dict[str, Any]:
    """`item` as the `item` object of an event in a dialect."""
    out: dict[str, Any] = {"id": item.id, "object": "realtime.item", "type": item.type}
    out["status"] = item.status
    if item.type == "message":
        out["role"] = item.role
        out["content"] = [_render_part(p, ga) for p in item.content]
    elif item.type == "function_call":
        out.update(call_id=item.call_id, name=item.name, arguments=item.arguments)
    else:
        out.update(call_id=item.call_id, output=item.output)
    return out


def _render_part(part: dict[str, Any], ga: bool) -> dict[str, Any]:
    kind = part["kind"]
    out = {"type": _GA_KIND[kind] if ga else kind}
    for key in ("text", "transcript"):
        if key in part:
            out[key] = part[key]
    return out


def content_part(part: dict[str, Any]) -> dict[str, Any]:
    """The `part` of response.content_part.* (both dialects say `text` / `audio`)."""
    if part["kind"] == "audio":
        return {"type": "audio", "transcript": part.get("transcript", "")}
    return {"type": "text", "text": part.get("text", "")}


def item_from_wire(wire: ItemWire, item_id: str, param: str = "item") -> Item:
    """A client-created item, validated; raises SettingsError naming the bad field."""
    if wire.type == "message":
        role = wire.role
        if role not in ("user", "assistant", "system"):
            raise SettingsError(f"{param}.role", f"{param}.role must be user, assistant or system")
        parts = []
        for i, part in enumerate(wire.content or []):
            parts.append(
                _part_from_wire(
                    part.type, part.text, part.transcript, part.audio, role, f"{param}.content[{i}]"
                )
            )
        if not parts:
            raise SettingsError(f"{param}.content", f"{param}.content must hold at least one part")
        return Item(id=item_id, role=role, content=parts)
    if wire.type == "function_call":
        if not wire.name or not wire.call_id:
            raise SettingsError(param, f"{param}: a function_call needs name and call_id")
        return Item(
            id=item_id,
            type="function_call",
            call_id=wire.call_id,
            name=wire.name,
            arguments=_bounded(wire.arguments or "", f"{param}.arguments"),
        )
    if wire.type == "function_call_output":
        if not wire.call_id:
            raise SettingsError(f"{param}.call_id", f"{param}: function_call_output needs call_id")
        output = _bounded(wire.output or "", f"{param}.output")
        return Item(id=item_id, type="function_call_output", call_id=wire.call_id, output=output)
    raise SettingsError(
        f"{param}.type", f"{param}.type must be message, function_call or function_call_output"
    )


def _part_from_wire(
    kind: str, text: str | None, transcript: str | None, audio: str | None, role: str, param: str
) -> dict[str, Any]:
    allowed = {
        "user": ("input_text", "input_audio"),
        "system": ("input_text",),
        "assistant": ("output_text", "text", "output_audio", "audio"),
    }
    if kind not in allowed[role]:
        raise SettingsError(f"{param}.type", f"{param}.type {kind!r} is not valid for {role}")
    if kind == "input_audio":
        if audio is not None and transcript is None:
            raise SettingsError(
                f"{param}.audio",
                f"{param}: audio in conversation.item.create is not supported; stream it with "
                "input_audio_buffer.append, or send its transcript",
            )
        return {"kind": "input_audio", "transcript": _bounded(transcript or "", param)}
    if kind in ("output_audio", "audio"):
        return {"kind": "audio", "transcript": _bounded(transcript or "", param)}
    return {
        "kind": "text" if role == "assistant" else "input_text",
        "text": _bounded(text or "", param),
    }


def _bounded(text: str, param: str) -> str:
    if len(text) > MAX_ITEM_TEXT_CHARS:
        raise SettingsError(param, f"{param}: at most {MAX_ITEM_TEXT_CHARS} characters")
    return text


def chat_messages(items: list[Item], instructions: str | None) -> list[dict[str, Any]]:
    """The chat request messages for a conversation (module docstring)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if item.type == "function_call":
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        elif item.text().strip():
            messages.append({"role": item.role, "content": item.text()})
    return messages


def chat_tools(settings: ConversationSettings) -> list[dict[str, Any]]:
    """Realtime tools in the chat completions shape."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["parameters"],
            },
        }
        for t in settings.tools
    ]


def chat_tool_choice(settings: ConversationSettings) -> str | dict[str, Any]:
    """`tool_choice` in the chat completions shape."""
    choice = settings.tool_choice
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def render_response(
    response_id: str,
    settings: ConversationSettings,
    ga: bool,
    *,
    status: str,
    output: list[dict[str, Any]],
    out_of_band: bool,
    status_details: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    spear: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `response` object of response.created / response.done in a dialect."""
    tokens: int | str = "inf" if settings.max_output_tokens is None else settings.max_output_tokens
    out: dict[str, Any] = {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": status_details,
        "output": output,
        "usage": usage,
        "conversation_id": None if out_of_band else "conv_default",
        "metadata": metadata,
        "max_output_tokens": tokens,
    }
    if ga:
        out["output_modalities"] = list(settings.output_modalities)
        out["audio"] = {"output": render_audio_output(settings)}
    else:
        out["modalities"] = ["audio", "text"] if settings.audio_out else ["text"]
        out["voice"] = settings.voice
        out["output_audio_format"] = input_format_to_wire(settings.output_format, ga=False)
        out["temperature"] = settings.temperature
    if spear:
        out["spear"] = spear
    return out


def insert_position(items: list[Item], previous_item_id: str | None) -> int:
    """Where an item created after `previous_item_id` goes (None: the end, "root": first)."""
    if previous_item_id is None:
        return len(items)
    if previous_item_id == "root":
        return 0
    for i, item in enumerate(items):
        if item.id == previous_item_id:
            return i + 1
    raise SettingsError("previous_item_id", f"no item {previous_item_id!r} in the conversation")


def truncation_error(
    item: Item, content_index: int, audio_end_ms: int, in_progress: bool
) -> tuple[str, str, str] | None:
    """Why `item` cannot be truncated so, as (code, message, param); None when it can."""
    parts = item.content
    if (
        item.role != "assistant"
        or not (0 <= content_index < len(parts))
        or (parts[content_index]["kind"] != "audio")
    ):
        return (
            "invalid_value",
            "only the audio content part of an assistant message can be truncated",
            "content_index",
        )
    if in_progress:
        return (
            "item_in_progress",
            "the item's response is still in progress; cancel it before truncating",
            "item_id",
        )
    if not 0 <= audio_end_ms <= round(item.audio_ms):
        return (
            "invalid_value",
            f"audio_end_ms must be within 0..{round(item.audio_ms)} (the item's audio)",
            "audio_end_ms",
        )
    return None


def truncate(item: Item, content_index: int, audio_end_ms: int) -> None:
    """Keep what was heard of the item's audio part: its audio up to `audio_end_ms` and the
    whole words of its transcript spoken by then."""
    heard = [s for s in item.segments if s.audio_end_ms <= audio_end_ms]
    part = item.content[content_index]
    part["transcript"] = _words_upto(
        part.get("transcript", ""), heard[-1].text_chars if heard else 0
    )
    item.audio_ms = float(audio_end_ms)
    item.segments = heard


def _words_upto(text: str, chars: int) -> str:
    """`text` cut to its first `chars` characters, then back to a whole word."""
    if chars >= len(text):
        return text
    cut = text[:chars]
    if not text[chars].isspace():
        cut = cut[: cut.rfind(" ") + 1]  # a word the cut went through was not heard whole
    return cut.rstrip()
