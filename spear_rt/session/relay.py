"""A conversation relayed to a speech-to-speech upstream (sans-I/O): what goes upstream.

The session's `Conversation` stays the truth (items, ids, the response in progress, every
event the client sees); a relayed conversation mirrors it upstream with commands:

* settings -> `UpdateConversation` (at start and after each session.update);
* an item the client creates -> `CreateItem` (with our id), a delete -> `DeleteItem`, a
  truncate -> `TruncateItem`;
* a response the conversation starts -> `CreateResponse`; one it ends (barge-in,
  response.cancel) -> `StopResponse`.

`restore_commands` rebuilds the conversation on a new upstream after a reconnect: the settings,
then every item in order, user audio turns as their transcripts and assistant audio as its
transcript (text: the upstream never gets audio back). A user turn still waiting for its
transcript is replayed in its place from the turn journal (its audio and commit: the upstream
transcribes it again); the next item is appended after it, since only the upstream knows the
committed item's id then. A turn the journal could not keep is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spear_rt.audio import input_format_to_wire
from spear_rt.backend import (
    CreateItem,
    CreateResponse,
    DeleteItem,
    StopResponse,
    TruncateItem,
    UpdateConversation,
    UpstreamCommand,
)
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.session.conversation_items import Item

_PART_TYPE = {"input_text": "input_text", "input_audio": "input_text",
              "text": "output_text", "audio": "output_text"}  # fmt: skip


def settings_fields(settings: ConversationSettings) -> dict[str, Any]:
    """The neutral fields `UpdateConversation` / `CreateResponse` carry."""
    fields: dict[str, Any] = {
        "voice": settings.voice,
        "audio_out": settings.audio_out,
        "output_format": input_format_to_wire(settings.output_format, ga=True),
        "tool_choice": settings.tool_choice,
        "temperature": settings.temperature,
        "max_output_tokens": settings.max_output_tokens or "inf",
    }
    if settings.instructions is not None:
        fields["instructions"] = settings.instructions
    if settings.tools:
        fields["tools"] = list(settings.tools)
    return fields


def upstream_item(item: Item) -> dict[str, Any]:
    """`item` as a GA-shaped item to create upstream (its words only, never audio)."""
    if item.type == "function_call":
        return {"id": item.id, "type": "function_call", "call_id": item.call_id,
                "name": item.name, "arguments": item.arguments}  # fmt: skip
    if item.type == "function_call_output":
        return {"id": item.id, "type": "function_call_output", "call_id": item.call_id,
                "output": item.output}  # fmt: skip
    content = [
        {"type": _PART_TYPE.get(p["kind"], "input_text"),
         "text": p.get("text") or p.get("transcript") or ""}
        for p in item.content
    ]  # fmt: skip
    return {"id": item.id, "type": "message", "role": item.role, "content": content}


def _untranscribed(item: Item) -> bool:
    return any(p["kind"] == "input_audio" and p.get("transcript") is None for p in item.content)


class RelayLink:
    """Turns a conversation's changes into upstream commands (module docstring)."""

    def __init__(self, send: Callable[[UpstreamCommand], None]) -> None:
        self._send = send

    def settings(self, settings: ConversationSettings) -> None:
        """The session's settings changed."""
        self._send(UpdateConversation(settings_fields(settings)))

    def item_created(self, item: Item, previous_item_id: str | None) -> None:
        """The client created `item` after `previous_item_id`."""
        self._send(CreateItem(upstream_item(item), previous_item_id or "root"))

    def item_deleted(self, item_id: str) -> None:
        """The client deleted an item."""
        self._send(DeleteItem(item_id))

    def item_truncated(self, item_id: str, content_index: int, audio_end_ms: int) -> None:
        """The client cut an assistant item's audio to what it played."""
        self._send(TruncateItem(item_id, content_index, audio_end_ms))

    def response_started(
        self,
        response_id: str,
        settings: ConversationSettings,
        out_of_band: bool,
        items: list[Item] | None,
        metadata: dict[str, str] | None,
    ) -> None:
        """The conversation started a response: the upstream generates it."""
        fields = settings_fields(settings)
        fields.pop("temperature")  # a session setting upstream, not a response's
        if out_of_band:
            fields["conversation"] = "none"
        if items is not None:
            fields["input"] = [upstream_item(i) for i in items]
        if metadata:
            fields["metadata"] = metadata
        self._send(CreateResponse(response_id, fields))

    def response_stopped(self, response_id: str) -> None:
        """The conversation ended a response before the upstream did."""
        self._send(StopResponse(response_id))


def restore_commands(
    settings: ConversationSettings,
    items: list[Item],
    replays: dict[str, list[UpstreamCommand]],
) -> list[UpstreamCommand]:
    """What brings a new upstream's conversation to ours (module docstring); the journal's
    replays of untranscribed turns it places are popped from `replays`."""
    commands: list[UpstreamCommand] = [UpdateConversation(settings_fields(settings))]
    previous: str | None = "root"
    for item in items:
        if _untranscribed(item):
            replay = replays.pop(item.id, None)
            if replay is not None:
                commands.extend(replay)
                previous = None  # appended after the committed item (only the upstream has its id)
            continue
        commands.append(CreateItem(upstream_item(item), previous))
        previous = item.id
    return commands
