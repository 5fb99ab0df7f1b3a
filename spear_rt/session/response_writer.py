"""The output of a response: its items and their events, in both dialects (sans-I/O).

Rules (conversation.md; rule 6 of `session.conversation`):

1. A message item opens at the response's first text, with one content part: audio with a
   transcript when the response speaks, else text. Each tool call is a ``function_call`` item.
   Opening an item closes the one before it.
2. An item closes with its part's done events (audio done, then transcript done; or text done),
   ``response.content_part.done``, ``response.output_item.done`` and, in GA, for an item in the
   conversation, ``conversation.item.done``.
3. Output items join the conversation when they open, unless the response is out-of-band.
4. Each audio chunk records a `Segment` (audio played so far, transcript characters it covers)
   so a truncate can cut the transcript to what was heard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from spear_rt.backend import AudioOut, ResponseEnded, ResponseOutput, TextOut, ToolCallOut
from spear_rt.protocol import response_events as re
from spear_rt.protocol import server_events as se
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.session.conversation_items import (
    Item,
    Segment,
    content_part,
    render_item,
    render_response,
)

__all__ = [
    "AudioOut",
    "OpenResponse",
    "ResponseEnded",
    "ResponseOutput",
    "ResponseWriter",
    "TextOut",
    "ToolCallOut",
]


class OpenResponse(msgspec.Struct):
    """A response in progress: what it was asked with and the items it wrote so far."""

    id: str
    settings: ConversationSettings
    out_of_band: bool
    metadata: dict[str, str] | None
    input: list[Item] | None = None  # the response's own input (else: the conversation)
    retries: int = 0  # times it was created again after its stage failed mid-answer
    output: list[Item] = msgspec.field(default_factory=list)
    open: Item | None = None  # the output item being written
    open_as: str | None = None  # the id its producer gave it (ours may differ: `_new_id`)


class ResponseWriter:
    """Writes responses' output items into the conversation's items, emitting their events."""

    def __init__(
        self, emit: Callable[[se.ServerEvent], None], ids: Callable[[str], str], items: list[Item]
    ) -> None:
        self._emit = emit
        self._ids = ids
        self._items = items  # the conversation's list, shared
        self.ga = True

    @property
    def names(self) -> re.ResponseNames:
        """The dialect's event classes."""
        return re.GA_NAMES if self.ga else re.BETA_NAMES

    def _open_message(self, response: OpenResponse, item_id: str | None) -> Item:
        item = response.open
        if item is not None and item.type == "message" and item_id in (None, response.open_as):
            return item
        self.close_open(response, "completed")
        kind = "audio" if response.settings.audio_out else "text"
        part: dict[str, Any] = {"kind": kind, ("transcript" if kind == "audio" else "text"): ""}
        item = Item(
            id=self._new_id(item_id), role="assistant", status="in_progress", content=[part]
        )
        self._open_item(response, item)
        response.open_as = item_id
        self._emit(
            re.ContentPartAdded(
                response_id=response.id,
                item_id=item.id,
                output_index=len(response.output) - 1,
                content_index=0,
                part=content_part(part),
            )
        )
        return item

    def _open_item(self, response: OpenResponse, item: Item) -> None:
        response.output.append(item)
        response.open = item
        rendered = render_item(item, self.ga)
        self._emit(
            re.OutputItemAdded(
                response_id=response.id, output_index=len(response.output) - 1, item=rendered
            )
        )
        if not response.out_of_band:
            previous = self._items[-1].id if self._items else None
            self._items.append(item)
            self._emit(self.names.item_added(item=rendered, previous_item_id=previous))

    def text(self, response: OpenResponse, delta: str, item_id: str | None = None) -> None:
        """Append text (or the transcript of audio to come) to the open message."""
        if not delta:
            return
        item = self._open_message(response, item_id)
        part = item.content[0]
        names = self.names
        ids = self._part_ids(response, item)
        if part["kind"] == "audio":
            part["transcript"] += delta
            self._emit(names.transcript_delta(delta=delta, **ids))
        else:
            part["text"] += delta
            self._emit(names.text_delta(delta=delta, **ids))

    def audio(self, response: OpenResponse, out: AudioOut) -> None:
        """Append a chunk of audio to the open message."""
        item = self._open_message(response, out.item_id)
        if item.content[0]["kind"] != "audio":
            return  # a text-only response: the responder does not synthesize
        item.audio_ms += out.ms
        item.segments.append(Segment(item.audio_ms, out.upto_chars))
        self._emit(self.names.audio_delta(delta=out.audio, **self._part_ids(response, item)))

    def tool_call(self, response: OpenResponse, out: ToolCallOut) -> None:
        """Open or continue the function_call item of `out.call_id`."""
        item = response.open
        if item is None or item.type != "function_call" or item.call_id != out.call_id:
            self.close_open(response, "completed")
            item = Item(
                id=self._new_id(out.item_id),
                type="function_call",
                status="in_progress",
                call_id=out.call_id,
                name=out.name,
            )
            self._open_item(response, item)
        if out.arguments_delta:
            item.arguments += out.arguments_delta
            self._emit(
                re.FunctionCallArgumentsDelta(
                    response_id=response.id,
                    item_id=item.id,
                    output_index=len(response.output) - 1,
                    call_id=out.call_id,
                    delta=out.arguments_delta,
                )
            )

    def close_open(self, response: OpenResponse, status: str) -> None:
        """Close the item being written (rule 2)."""
        item = response.open
        if item is None:
            return
        response.open = None
        names = self.names
        index = response.output.index(item)
        if item.type == "message":
            part = item.content[0]
            ids = self._part_ids(response, item)
            if part["kind"] == "audio":
                self._emit(names.audio_done(**ids))
                self._emit(names.transcript_done(transcript=part["transcript"], **ids))
            else:
                self._emit(names.text_done(text=part["text"], **ids))
            self._emit(re.ContentPartDone(part=content_part(part), **ids))
        else:
            self._emit(
                re.FunctionCallArgumentsDone(
                    response_id=response.id,
                    item_id=item.id,
                    output_index=index,
                    call_id=item.call_id or "",
                    name=item.name or "",
                    arguments=item.arguments,
                )
            )
        item.status = status
        rendered = render_item(item, self.ga)
        self._emit(re.OutputItemDone(response_id=response.id, output_index=index, item=rendered))
        if self.ga and not response.out_of_band and item in self._items:
            self._emit(se.ItemDone(item=rendered, previous_item_id=self._previous(item)))

    # --- helpers ------------------------------------------------------------------------------

    def _new_id(self, wanted: str | None) -> str:
        """`wanted` (an upstream's item id) unless it is odd or taken, else a new one."""
        if wanted and len(wanted) <= 64 and all(i.id != wanted for i in self._items):
            return wanted
        return self._ids("item")

    def render(
        self,
        response: OpenResponse,
        status: str,
        details: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        spear: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response as the wire shows it, with `status`."""
        return render_response(
            response.id,
            response.settings,
            self.ga,
            status=status,
            output=[render_item(i, self.ga) for i in response.output],
            out_of_band=response.out_of_band,
            status_details=details,
            usage=_usage(usage) if status != "in_progress" else None,
            metadata=response.metadata,
            spear=spear,
        )

    def _part_ids(self, response: OpenResponse, item: Item) -> dict[str, Any]:
        return {
            "response_id": response.id,
            "item_id": item.id,
            "output_index": response.output.index(item),
            "content_index": 0,
        }

    def _previous(self, item: Item) -> str | None:
        at = self._items.index(item)
        return self._items[at - 1].id if at else None


def _usage(usage: dict[str, int] | None) -> dict[str, Any]:
    u = usage or {}
    inp, out = u.get("input_tokens", 0), u.get("output_tokens", 0)
    return {
        "total_tokens": inp + out,
        "input_tokens": inp,
        "output_tokens": out,
        "input_token_details": {"text_tokens": inp, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": out, "audio_tokens": 0},
    }
