"""Sans-I/O translation for a speech-to-speech upstream: a whole conversation, relayed.

`ConversationTranslator` extends the transcription `Translator` (the user's audio turns, their
commits and transcripts work exactly as there) with the conversation commands and the
response events:

* commands -> upstream (in its dialect): `UpdateConversation` -> `session.update` (type
  realtime; our VAD, so `turn_detection: null`; the input transcribed by
  `transcription_model`), `CreateItem` (items keep OUR ids: after a reconnect the upstream's
  ids are ours), `DeleteItem` / `TruncateItem` (our id -> the upstream's), `CreateResponse`
  -> `response.create`, `StopResponse` -> `response.cancel`.
* upstream -> events: the response in progress is mapped to ours (responses start one at a
  time, in order, so the oldest `response.create` not yet answered is the one a
  `response.created` answers); audio and transcript/text deltas become `AudioOut` /
  `TextOut`, function call arguments `ToolCallOut`, `response.done` `ResponseEnded`; events
  of a response we stopped are dropped. Output item ids are the upstream's (our writer keeps
  them unless taken), so truncating one later needs no table.
* an `error` answering a `response.create` fails that response; one answering an item
  command or a cancel is logged and dropped (the client was answered already: the
  conversation state is ours); any other `error` ends the upstream, as for transcription.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from spear_rt.backend import (
    AudioOut,
    CreateItem,
    CreateResponse,
    DeleteItem,
    ResponseEnded,
    StopResponse,
    TextOut,
    ToolCallOut,
    TruncateItem,
    UpdateConversation,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.protocol.settings import Dialect

from .translate import RATE_HZ, UPDATE_EVENT_ID, BytesLike, Translator

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()

# beta names of GA output formats, and bytes per millisecond of each
_BETA_FORMAT = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_BYTES_PER_MS = {"audio/pcm": RATE_HZ * 2 / 1000, "audio/pcmu": 8.0, "audio/pcma": 8.0}
_AUDIO_DELTA = frozenset({"response.output_audio.delta", "response.audio.delta"})
_TRANSCRIPT_DELTA = frozenset(
    {"response.output_audio_transcript.delta", "response.audio_transcript.delta"}
)
_TEXT_DELTA = frozenset({"response.output_text.delta", "response.text.delta"})
_RESPONSE_EVENTS = (
    _AUDIO_DELTA
    | _TRANSCRIPT_DELTA
    | _TEXT_DELTA
    | {
        "response.created",
        "response.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    }
)


class _Event(msgspec.Struct):
    """The fields of the response events we use (others are ignored)."""

    type: str
    response_id: str | None = None
    item_id: str | None = None
    delta: str | None = None
    arguments: str | None = None
    response: dict[str, Any] | None = None
    item: dict[str, Any] | None = None


_event = msgspec.json.Decoder(_Event)


class _Response:
    __slots__ = ("calls", "chars", "ours")

    def __init__(self, ours: str) -> None:
        self.ours = ours
        self.chars = 0  # transcript characters so far (what an audio chunk covers)
        self.calls: dict[str, tuple[str, str, int]] = {}  # item -> (call_id, name, chars)


class ConversationTranslator(Translator):
    """Commands and events of a relayed conversation (module docstring)."""

    def __init__(
        self, dialect: Dialect, transcription_model: str, redact: Callable[[str], str] = str
    ) -> None:
        super().__init__(redact)
        self.dialect = dialect
        self.transcription_model = transcription_model
        self.output_format = "audio/pcm"
        self._upstream_ids: dict[str, str] = {}  # our user item -> the upstream's
        self._awaiting: deque[tuple[str, str]] = deque()  # (event_id, our response) unanswered
        self._responses: dict[str, _Response] = {}  # upstream response id -> ours
        self._stopped: set[str] = set()  # our responses no longer wanted
        self._item_commands: set[str] = set()  # event ids of item commands and cancels

    @property
    def beta(self) -> bool:
        """The upstream speaks the beta dialect."""
        return self.dialect is Dialect.BETA

    # --- commands -----------------------------------------------------------------------------

    def encode(self, command: UpstreamCommand) -> bytes | None:
        """The frame for `command` (None: nothing to send)."""
        match command:
            case UpdateConversation(session=session):
                update = {"type": "session.update", "event_id": UPDATE_EVENT_ID}
                return _encoder.encode({**update, "session": self._session(session)})
            case CreateItem(item=item, previous_item_id=previous):
                event: dict[str, Any] = {"item": self._item(item)}
                if previous is not None:
                    event["previous_item_id"] = self._upstream_ids.get(previous, previous)
                return self._item_command("conversation.item.create", event)
            case DeleteItem(item_id=item_id):
                uid = self._upstream_ids.pop(item_id, item_id)
                return self._item_command("conversation.item.delete", {"item_id": uid})
            case TruncateItem():
                fields = msgspec.structs.asdict(command)
                return self._item_command("conversation.item.truncate", fields)
            case CreateResponse(response_id=ours, response=response):
                event_id = self._id()
                self._awaiting.append((event_id, ours))
                body = {"type": "response.create", "event_id": event_id}
                return _encoder.encode({**body, "response": self._response_fields(response)})
            case StopResponse(response_id=ours):
                self._stopped.add(ours)
                theirs = next((u for u, r in self._responses.items() if r.ours == ours), None)
                if theirs is None and all(ours != o for _, o in self._awaiting):
                    return None  # it is over upstream already
                fields = {} if theirs is None else {"response_id": theirs}
                return self._item_command("response.cancel", fields)
        return super().encode(command)

    def _item_command(self, kind: str, fields: dict[str, Any]) -> bytes:
        event_id = self._id()
        self._item_commands.add(event_id)
        return _encoder.encode({"type": kind, "event_id": event_id, **fields})

    def _session(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`session.update`'s session in the upstream's dialect."""
        fmt = fields.get("output_format") or {"type": "audio/pcm", "rate": RATE_HZ}
        self.output_format = str(fmt["type"])
        transcription = {"model": self.transcription_model}
        common = _pick(fields, "instructions", "tools", "tool_choice")
        audio_out = fields.get("audio_out", True)
        if self.beta:
            session = {
                **common,
                "modalities": ["text", "audio"] if audio_out else ["text"],
                "input_audio_format": "pcm16",
                "output_audio_format": _BETA_FORMAT.get(self.output_format, "pcm16"),
                "input_audio_transcription": transcription,
                "turn_detection": None,
            }
            if "voice" in fields:
                session["voice"] = fields["voice"]
            for ours, theirs in (("temperature", "temperature"),
                                 ("max_output_tokens", "max_response_output_tokens")):  # fmt: skip
                if ours in fields:
                    session[theirs] = fields[ours]
            return session
        output: dict[str, Any] = {"format": fmt}
        if "voice" in fields:
            output["voice"] = fields["voice"]
        session = {
            "type": "realtime",
            **common,
            "output_modalities": ["audio"] if audio_out else ["text"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE_HZ},
                    "transcription": transcription,
                    "turn_detection": None,
                },
                "output": output,
            },
        }
        if "max_output_tokens" in fields:
            session["max_output_tokens"] = fields["max_output_tokens"]
        return session

    def _response_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """`response.create`'s response in the upstream's dialect."""
        out = _pick(fields, "instructions", "tools", "tool_choice", "metadata")
        if fields.get("conversation") == "none":
            out["conversation"] = "none"
        if "input" in fields:
            out["input"] = [self._item(i) for i in fields["input"]]
        audio_out = fields.get("audio_out", True)
        if self.beta:
            out["modalities"] = ["text", "audio"] if audio_out else ["text"]
            if "voice" in fields:
                out["voice"] = fields["voice"]
            if "max_output_tokens" in fields:
                out["max_response_output_tokens"] = fields["max_output_tokens"]
        else:
            out["output_modalities"] = ["audio"] if audio_out else ["text"]
            if "max_output_tokens" in fields:
                out["max_output_tokens"] = fields["max_output_tokens"]
        return out

    def _item(self, item: dict[str, Any]) -> dict[str, Any]:
        """A GA-shaped item in the upstream's dialect (assistant text is `text` in beta)."""
        if not self.beta or item.get("role") != "assistant":
            return item
        content = [
            {**p, "type": "text"} if p.get("type") == "output_text" else p
            for p in item.get("content", [])
        ]
        return {**item, "content": content}

    # --- events -------------------------------------------------------------------------------

    def decode(self, data: BytesLike) -> list[UpstreamEvent]:
        """Our events for one upstream message; raises `BackendFailure` when it ends us."""
        try:
            event = _event.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return super().decode(data)  # says what is wrong with it
        if event.type in _RESPONSE_EVENTS:
            return self._response_event(event)
        if event.type == "error":
            handled = self._conversation_error(data)
            if handled is not None:
                return handled
        return super().decode(data)

    def _response_event(self, event: _Event) -> list[UpstreamEvent]:
        if event.type == "response.created":
            theirs = (event.response or {}).get("id")
            if isinstance(theirs, str) and self._awaiting:
                _, ours = self._awaiting.popleft()
                self._responses[theirs] = _Response(ours)
            return []
        uid = event.response_id or (event.response or {}).get("id")
        response = self._responses.get(uid) if isinstance(uid, str) else None
        if response is None:
            return []  # a response we did not ask for
        ours = response.ours
        if event.type == "response.done":
            del self._responses[uid]  # type: ignore[arg-type]
            if ours in self._stopped:
                self._stopped.discard(ours)
                return []
            return [_ended(ours, event.response or {}, self._text)]
        if ours in self._stopped:
            return []
        delta, item_id = event.delta or "", event.item_id
        if event.type in _TRANSCRIPT_DELTA or event.type in _TEXT_DELTA:
            response.chars += len(delta)
            return [TextOut(ours, delta, item_id)] if delta else []
        if event.type in _AUDIO_DELTA:
            ms = _decoded_bytes(delta) / _BYTES_PER_MS.get(self.output_format, 48.0)
            return [AudioOut(ours, delta, ms, response.chars, item_id)] if delta else []
        if event.type == "response.output_item.added":
            item = event.item or {}
            if item.get("type") == "function_call" and isinstance(item.get("id"), str):
                call = (str(item.get("call_id") or ""), str(item.get("name") or ""), 0)
                response.calls[item["id"]] = call
            return []
        known = response.calls.get(item_id or "")
        if known is None:
            return []
        call_id, name, chars = known
        rest = delta if event.type.endswith(".delta") else (event.arguments or "")[chars:]
        response.calls[item_id or ""] = (call_id, name, chars + len(rest))
        if not rest and chars:
            return []
        return [ToolCallOut(ours, call_id, name, rest, item_id)]

    def _conversation_error(self, data: BytesLike) -> list[UpstreamEvent] | None:
        """The events for an `error` answering a conversation command (None: not one)."""
        body = msgspec.json.decode(data).get("error") or {}
        event_id = body.get("event_id") if isinstance(body, dict) else None
        message = self._text(str(body.get("message") or "the upstream refused it"))
        if event_id in self._item_commands:
            self._item_commands.discard(event_id)
            log.info("the upstream refused a conversation command: %s", message)
            return []
        for entry in self._awaiting:
            if entry[0] == event_id:
                self._awaiting.remove(entry)
                return [ResponseEnded(entry[1], error=f"the upstream refused it: {message}")]
        return None

    def committed_id(self, ours: str, theirs: str) -> None:
        """Remember the upstream's id of our user item (for a later delete)."""
        self._upstream_ids[ours] = theirs

    def _committed(self, uid: str) -> None:
        super()._committed(uid)
        ours = self._ids.get(uid)
        if ours is not None:
            self.committed_id(ours, uid)


def _pick(fields: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: fields[name] for name in names if name in fields}


def _decoded_bytes(b64: str) -> int:
    """Bytes a base64 string decodes to."""
    return len(b64) * 3 // 4 - b64.endswith("=") - b64.endswith("==")


def _ended(ours: str, response: dict[str, Any], text: Callable[[str], str]) -> ResponseEnded:
    """Our `ResponseEnded` for the upstream's `response.done`."""
    status = response.get("status")
    details = response.get("status_details") or {}
    usage = response.get("usage") or {}
    tokens = {k: usage[k] for k in ("input_tokens", "output_tokens")
              if isinstance(usage.get(k), int)}  # fmt: skip
    if status == "failed":
        error = details.get("error") or {}
        message = text(str(error.get("message") or "the upstream's response failed"))
        return ResponseEnded(ours, tokens or None, error=message)
    if status in ("incomplete", "cancelled"):
        reason = str(details.get("reason") or status)
        return ResponseEnded(ours, tokens or None, incomplete_reason=reason)
    return ResponseEnded(ours, tokens or None)
