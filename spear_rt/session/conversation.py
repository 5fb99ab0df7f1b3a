"""The conversation of a realtime session (sans-I/O: events in; server events and actions out).

Rules:

1. Items form one ordered list; an item's ``previous_item_id`` is the item before it. A user
   audio turn joins at its commit (its transcript is filled in when transcription completes);
   ``conversation.item.create`` inserts after ``previous_item_id`` (``root``: first; absent:
   last); an assistant item joins when a response opens it, unless the response is
   out-of-band (``conversation: "none"``), whose items live only in the response.
2. At most one response is in progress, and at most one waits to start. A response starts
   (``response.created``, action `StartResponse`) once every user turn committed before it has
   its transcript: the chat request must carry what the user said. Relayed (rule 9), it
   starts at once: the upstream hears the audio itself, and its transcript comes when it comes.
3. Server VAD with ``create_response`` answers each turn it commits, when its transcript is
   known; a turn whose transcript is empty (or failed) is not answered. Relayed, it answers
   at the commit. With manual commit the client sends ``response.create``.
4. Every ``response.created`` is followed by exactly one ``response.done``. Once it is out,
   nothing of that response follows: outputs for a response that is no longer the current one
   are ignored (the responder may be a frame late, never its events).
5. Barge-in: ``speech_started`` during a response with ``interrupt_response`` ends it
   ``cancelled`` (reason ``turn_detected``) at once and emits `CancelResponse`, which the
   responder obeys by cancelling its chat and speech requests. ``response.cancel`` does the
   same with reason ``client_cancelled``.
6. A response's output: a message item opens at its first text (one content part: audio with
   transcript, or text); each tool call is a ``function_call`` item. Items close in order:
   the part's done events, ``response.output_item.done``, GA ``conversation.item.done``; the
   response's own ``response.done`` comes last. A cancelled response's open items end
   ``incomplete``.
7. ``conversation.item.truncate`` cuts an assistant audio item to ``audio_end_ms`` (no longer
   than what was sent) and its transcript to the words whose audio was sent before that point.
   An item of the response in progress cannot be truncated or deleted.
8. A stage failing after the answer began (an upstream dropped mid-stream) ends the response
   ``incomplete``, ``status_details.error.code`` ``upstream_disconnected``; what was said stays
   in the conversation and the response is created again, once, with the same settings and
   input (unless a user turn already waits to be answered). A failure before any output is
   the router's to retry on another instance; if none can, the response ends ``failed``.
9. Relayed to a speech-to-speech upstream (`relay` set, `session/relay.py`), the same rules
   hold and the upstream mirrors the conversation: settings, created/deleted/truncated items,
   started and stopped responses go to it as commands instead of responder actions. Its
   reconnect cuts the response in progress (rule 8, up to `max_recreations` times).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from spear_rt.protocol import client_events as ce
from spear_rt.protocol import response_events as re
from spear_rt.protocol import server_events as se
from spear_rt.protocol.conversation_settings import (
    ConversationSettings,
    SettingsError,
    conversation_update,
)
from spear_rt.protocol.settings import SessionSettings
from spear_rt.session.conversation_items import (
    MAX_CONVERSATION_ITEMS,
    Item,
    ItemList,
    chat_messages,
    insert_position,
    item_from_wire,
    render_item,
    truncate,
    truncation_error,
)
from spear_rt.session.relay import RelayLink
from spear_rt.session.response_writer import (
    AudioOut,
    OpenResponse,
    ResponseEnded,
    ResponseOutput,
    ResponseWriter,
    TextOut,
    ToolCallOut,
)

__all__ = [
    "AudioOut",
    "CancelResponse",
    "Conversation",
    "ResponseAction",
    "ResponseEnded",
    "ResponseOutput",
    "StartResponse",
    "TextOut",
    "ToolCallOut",
]


class StartResponse(msgspec.Struct, frozen=True):
    """Generate response `response_id` for `messages` (the responder's work)."""

    response_id: str
    messages: list[dict[str, Any]]
    settings: ConversationSettings
    model: str | None = None
    turn_ended_at: float | None = None  # event-loop time the answered turn ended


class CancelResponse(msgspec.Struct, frozen=True):
    """Stop generating `response_id` (its response.done is out already)."""

    response_id: str


ResponseAction = StartResponse | CancelResponse


class _Queued(msgspec.Struct):
    settings: ConversationSettings
    out_of_band: bool = False
    input: list[Item] | None = None
    metadata: dict[str, str] | None = None
    turn_ended_at: float | None = None
    retries: int = 0


ErrorSink = Callable[[str, str, "str | None", "str | None"], None]


class Conversation:
    """Items and responses of one conversation session (module docstring)."""

    def __init__(
        self,
        emit: Callable[[se.ServerEvent], None],
        error: ErrorSink,
        ids: Callable[[str], str],
    ) -> None:
        self._emit = emit
        self._error = error
        self._ids = ids
        self.items = ItemList()
        self._writer = ResponseWriter(emit, ids, self.items)
        self.settings = ConversationSettings()
        self.model: str | None = None
        self.auto_respond = False  # server VAD with create_response
        self.response: OpenResponse | None = None
        self._queued: _Queued | None = None
        self._untranscribed: set[str] = set()
        self._answer: set[str] = set()  # VAD turns to answer once transcribed
        self._committed_at: dict[str, float] = {}  # untranscribed turn -> when it ended
        self.responses = 0
        self.latest_ms: dict[str, float] = {}  # the last finished response's latencies
        # Actions for the responder, which sets `wake` to hear of them.
        self.actions: list[ResponseAction] = []
        self.wake: Callable[[], None] = lambda: None
        self.relay: RelayLink | None = None  # rule 9
        self.max_recreations = 1  # rule 8: times a cut response is created again

    def configure(self, session: SessionSettings, ga: bool) -> None:
        """Take the session's (updated) settings and dialect."""
        self.ga = ga
        self.settings = session.conversation
        self.model = session.model
        self.auto_respond = (
            session.turn_detection is not None and session.conversation.create_response
        )
        if self.relay is not None:
            self.relay.settings(self.settings)

    def _act(self, action: ResponseAction) -> None:
        self.actions.append(action)
        self.wake()

    @property
    def busy(self) -> bool:
        """A response is in progress or waiting to start."""
        return self.response is not None or self._queued is not None

    @property
    def ga(self) -> bool:
        """The session speaks the GA dialect (else beta)."""
        return self._writer.ga

    @ga.setter
    def ga(self, value: bool) -> None:
        self._writer.ga = value

    @property
    def names(self) -> re.ResponseNames:
        """The dialect's event classes."""
        return self._writer.names

    # --- user turns ---------------------------------------------------------------------------

    def user_audio_committed(self, item_id: str, by_vad: bool, now: float) -> str | None:
        """A user audio turn became item `item_id` at `now`; returns its previous item's id."""
        previous = self.items[-1].id if self.items else None
        self._committed_at[item_id] = now
        item = Item(id=item_id, role="user", content=[{"kind": "input_audio", "transcript": None}])
        self.items.append(item)
        self._untranscribed.add(item_id)
        if by_vad and self.auto_respond:
            if self.relay is None:
                self._answer.add(item_id)
            elif self._queued is None:  # rule 3: relayed, the upstream answers the audio
                self._queued = _Queued(self.settings, turn_ended_at=now)
        return previous

    def start_waiting(self) -> None:
        """Start the response waiting to start, if nothing holds it (after a turn's events)."""
        self._maybe_start()

    def user_transcript(self, item_id: str, transcript: str | None) -> None:
        """The transcript of a user turn (None: it failed); may start a response."""
        now = self._committed_at.pop(item_id, None)
        item = self._find(item_id)
        if item is not None:
            item.content[0]["transcript"] = transcript or ""
        self._untranscribed.discard(item_id)
        if item_id in self._answer:
            self._answer.discard(item_id)
            if transcript and transcript.strip() and self._queued is None:
                self._queued = _Queued(self.settings, turn_ended_at=now)
        self._bound()
        self._maybe_start()

    def speech_started(self) -> None:
        """The user started speaking: barge-in on the response in progress."""
        if self.response is not None and self.settings.interrupt_response:
            self._cancel(self.response, "turn_detected")

    # --- client events ------------------------------------------------------------------------

    def client_event(self, event: ce.AnyClientEvent, now: float) -> None:
        """Apply one conversation client event."""
        match event:
            case ce.ConversationItemCreate():
                self._create_item(event)
            case ce.ConversationItemRetrieve():
                item = self._item_or_error(event.item_id, event.event_id)
                if item is not None:
                    self._emit(re.ItemRetrieved(item=render_item(item, self.ga)))
            case ce.ConversationItemDelete():
                self._delete_item(event)
            case ce.ConversationItemTruncate():
                self._truncate(event)
            case ce.ResponseCreate():
                self._response_create(event, now)
            case ce.ResponseCancel():
                self._response_cancel(event)

    def _create_item(self, event: ce.ConversationItemCreate) -> None:
        wire = event.item
        item_id = wire.id or self._ids("item")
        try:
            if self._find(item_id) is not None:
                raise SettingsError("item.id", f"an item with id {item_id!r} exists already")
            item = item_from_wire(wire, item_id)
            at = insert_position(self.items, event.previous_item_id)
        except SettingsError as exc:
            self._error(exc.code, str(exc), event.event_id, exc.param)
            return
        self.items.insert(at, item)
        previous = self.items[at - 1].id if at else None
        rendered = render_item(item, self.ga)
        self._emit(self.names.item_added(item=rendered, previous_item_id=previous))
        if self.ga:
            self._emit(se.ItemDone(item=rendered, previous_item_id=previous))
        if self.relay is not None:
            self.relay.item_created(item, previous)
        self._bound()

    def _delete_item(self, event: ce.ConversationItemDelete) -> None:
        item = self._item_or_error(event.item_id, event.event_id)
        if item is None:
            return
        if self.response is not None and item in self.response.output:
            self._error(
                "item_in_progress",
                f"item {event.item_id!r} belongs to the response in progress; cancel it first",
                event.event_id,
                "item_id",
            )
            return
        self._forget_item(item)
        self._maybe_start()

    def _forget_item(self, item: Item) -> None:
        """Take `item` out of the conversation, and tell the client (and the upstream)."""
        self.items.remove(item)
        self._untranscribed.discard(item.id)
        self._answer.discard(item.id)
        self._committed_at.pop(item.id, None)
        self._emit(re.ItemDeleted(item_id=item.id))
        if self.relay is not None:
            self.relay.item_deleted(item.id)

    def _truncate(self, event: ce.ConversationItemTruncate) -> None:
        item = self._item_or_error(event.item_id, event.event_id)
        if item is None:
            return
        in_progress = self.response is not None and item in self.response.output
        refusal = truncation_error(item, event.content_index, event.audio_end_ms, in_progress)
        if refusal is not None:
            code, message, param = refusal
            self._error(code, message, event.event_id, param)
            return
        truncate(item, event.content_index, event.audio_end_ms)
        self._emit(
            re.ItemTruncated(
                item_id=item.id,
                content_index=event.content_index,
                audio_end_ms=event.audio_end_ms,
            )
        )
        if self.relay is not None:
            self.relay.item_truncated(item.id, event.content_index, event.audio_end_ms)

    def _response_create(self, event: ce.ResponseCreate, now: float) -> None:
        if self.busy:
            self._error(
                "conversation_already_has_active_response",
                "a response is already in progress; cancel it or wait for its response.done",
                event.event_id,
                None,
            )
            return
        wire = event.response
        queued = _Queued(self.settings, turn_ended_at=now)
        if wire is not None:
            try:
                queued = self._overrides(wire, now)
            except SettingsError as exc:
                self._error(exc.code, str(exc), event.event_id, exc.param)
                return
        self._queued = queued
        self._maybe_start()

    def _overrides(self, wire: ce.ResponseWire, now: float) -> _Queued:
        settings = conversation_update(self.settings, wire, prefix="response")
        if wire.conversation not in (msgspec.UNSET, None, "auto", "none"):
            raise SettingsError("response.conversation", "must be 'auto' or 'none'")
        items: list[Item] | None = None
        if wire.input is not msgspec.UNSET:
            items = []
            for i, item_wire in enumerate(wire.input):
                param = f"response.input[{i}]"
                if item_wire.type == "item_reference":
                    found = self._find(item_wire.id or "")
                    if found is None:
                        raise SettingsError(f"{param}.id", f"no item {item_wire.id!r}")
                    items.append(found)
                else:
                    items.append(item_from_wire(item_wire, self._ids("item"), param))
        metadata = wire.metadata if isinstance(wire.metadata, dict) else None
        return _Queued(settings, wire.conversation == "none", items, metadata, now)

    def _response_cancel(self, event: ce.ResponseCancel) -> None:
        response = self.response
        if response is None or event.response_id not in (None, response.id):
            if self._queued is not None and event.response_id is None:
                self._queued = None  # not started yet: nothing was announced
                return
            self._error(
                "response_cancel_not_active",
                "there is no response in progress to cancel"
                if response is None
                else f"response {event.response_id!r} is not the one in progress",
                event.event_id,
                "response_id" if event.response_id else None,
            )
            return
        self._cancel(response, "client_cancelled")

    # --- responses ----------------------------------------------------------------------------

    def _maybe_start(self) -> None:
        queued = self._queued
        if queued is None or self.response is not None:
            return
        if queued.input is None and self._untranscribed and self.relay is None:
            return  # rule 2: wait for the user's words
        self._queued = None
        response = OpenResponse(
            self._ids("resp"), queued.settings, queued.out_of_band, queued.metadata,
            queued.input, queued.retries,
        )  # fmt: skip
        self.response = response
        self.responses += 1
        self._emit(re.ResponseCreated(response=self._writer.render(response, "in_progress")))
        if self.relay is not None:
            self.relay.response_started(
                response.id, queued.settings, queued.out_of_band, queued.input, queued.metadata
            )
            return
        history = queued.input if queued.input is not None else self.items
        messages = chat_messages(history, queued.settings.instructions)
        self._act(
            StartResponse(response.id, messages, queued.settings, self.model, queued.turn_ended_at)
        )

    def output(self, out: ResponseOutput) -> None:
        """Apply what the responder produced for the current response (else: ignored)."""
        response = self.response
        if response is None or response.id != out.response_id:
            return  # rule 4: its response.done is out already
        match out:
            case TextOut(delta=delta, item_id=item_id):
                self._writer.text(response, delta, item_id)
            case AudioOut():
                self._writer.audio(response, out)
            case ToolCallOut():
                self._writer.tool_call(response, out)
            case ResponseEnded():
                self._ended(response, out)

    def _ended(self, response: OpenResponse, out: ResponseEnded) -> None:
        for name in ("first_text_ms", "first_audio_ms"):  # for spear.metrics
            if out.spear is not None and isinstance(out.spear.get(name), int | float):
                self.latest_ms[name] = out.spear[name]
        if out.interrupted is not None:
            self._interrupted(response, out)
        elif out.error is not None:
            details = {
                "type": "failed",
                "error": {"type": "server_error", "code": out.code, "message": out.error},
            }
            self._finish(response, "failed", details, out.usage, out.spear)
        elif out.incomplete_reason is not None:
            details = {"type": "incomplete", "reason": out.incomplete_reason}
            self._finish(response, "incomplete", details, out.usage, out.spear)
        else:
            self._finish(response, "completed", None, out.usage, out.spear)

    def _interrupted(self, response: OpenResponse, out: ResponseEnded) -> None:
        """Rule 8: incomplete, saying why, and created again (once) unless a turn waits."""
        code, message = "upstream_disconnected", out.interrupted
        error = {"type": "server_error", "code": code, "message": message}
        if response.retries < self.max_recreations and self._queued is None:
            self._queued = _Queued(
                response.settings, response.out_of_band, response.input, response.metadata,
                retries=response.retries + 1,
            )  # fmt: skip
        details = {"type": "incomplete", "error": error}
        self._finish(response, "incomplete", details, out.usage, out.spear)

    def _cancel(self, response: OpenResponse, reason: str) -> None:
        if self.relay is not None:  # before a queued response is created upstream
            self.relay.response_stopped(response.id)
        self._finish(response, "cancelled", {"type": "cancelled", "reason": reason}, None, None)
        if self.relay is None:
            self._act(CancelResponse(response.id))

    def _finish(
        self,
        response: OpenResponse,
        status: str,
        details: dict[str, Any] | None,
        usage: dict[str, int] | None,
        spear: dict[str, Any] | None,
    ) -> None:
        self._writer.close_open(response, "completed" if status == "completed" else "incomplete")
        self.response = None
        self._emit(
            re.ResponseDone(response=self._writer.render(response, status, details, usage, spear))
        )
        self._bound()
        self._maybe_start()

    def _find(self, item_id: str) -> Item | None:
        return self.items.find(item_id)

    def _bound(self) -> None:
        """Past MAX_CONVERSATION_ITEMS, let the oldest items go (not the answer's own)."""
        over = len(self.items) - MAX_CONVERSATION_ITEMS
        if over <= 0:
            return
        busy = self.response.output if self.response is not None else ()
        for item in [i for i in self.items[: over + len(busy)] if i not in busy][:over]:
            self._forget_item(item)

    def _previous(self, item: Item) -> str | None:
        at = self.items.index(item)
        return self.items[at - 1].id if at else None

    def _item_or_error(self, item_id: str, event_id: str | None) -> Item | None:
        item = self._find(item_id)
        if item is None:
            self._error(
                "item_not_found",
                f"no item {item_id[:64]!r} in the conversation",
                event_id,
                "item_id",
            )
        return item
