"""The conversation model driven directly (sans-I/O): the rules of `session/conversation.py`."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgspec

from spear_rt.protocol import client_events as ce
from spear_rt.protocol.client_events import decode_client_event
from spear_rt.protocol.settings import SessionSettings
from spear_rt.session.conversation import (
    AudioOut,
    CancelResponse,
    Conversation,
    ResponseEnded,
    StartResponse,
    TextOut,
)


class Harness:
    """A Conversation whose events, errors and actions are collected as plain data."""

    def __init__(self, *, vad: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.errors: list[tuple[str, str | None]] = []
        counter = itertools.count(1)
        self.conversation = Conversation(
            lambda e: self.events.append(msgspec.to_builtins(e)),
            lambda code, message, event_id=None, param=None: self.errors.append((code, param)),
            lambda prefix: f"{prefix}_{next(counter)}",
        )
        settings = SessionSettings()
        if not vad:
            settings = msgspec.structs.replace(settings, turn_detection=None)
        self.conversation.configure(settings, ga=True)

    def send(self, event: dict[str, Any]) -> None:
        decoded = decode_client_event(json.dumps(event))
        assert not isinstance(decoded, ce.ProtocolError), decoded
        self.conversation.client_event(decoded, now=1.0)  # type: ignore[arg-type]

    def user_text(self, text: str) -> None:
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        self.send({"type": "conversation.item.create", "item": item})

    def take_actions(self) -> list[Any]:
        actions, self.conversation.actions = self.conversation.actions, []
        return actions

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def test_a_response_waits_for_every_committed_turns_transcript() -> None:
    h = Harness(vad=True)
    h.conversation.user_audio_committed("item_u1", by_vad=True, now=2.0)
    assert h.take_actions() == []  # rule 2: the chat request must carry what was said
    h.conversation.user_transcript("item_u1", "hello there")
    (start,) = h.take_actions()
    assert isinstance(start, StartResponse)
    assert start.messages == [{"role": "user", "content": "hello there"}]
    assert start.turn_ended_at == 2.0
    assert h.types()[-1] == "response.created"


def test_an_empty_or_failed_transcript_is_not_answered() -> None:
    h = Harness(vad=True)
    h.conversation.user_audio_committed("item_u1", by_vad=True, now=2.0)
    h.conversation.user_transcript("item_u1", "   ")
    h.conversation.user_audio_committed("item_u2", by_vad=True, now=3.0)
    h.conversation.user_transcript("item_u2", None)
    assert h.take_actions() == []
    assert "response.created" not in h.types()


def test_a_manual_response_waits_for_a_pending_transcript_too() -> None:
    h = Harness()
    h.conversation.user_audio_committed("item_u1", by_vad=False, now=2.0)
    h.send({"type": "response.create"})
    assert h.take_actions() == []
    h.conversation.user_transcript("item_u1", "what time is it")
    (start,) = h.take_actions()
    assert start.messages[-1] == {"role": "user", "content": "what time is it"}


def test_one_response_at_a_time_and_late_outputs_are_ignored() -> None:
    h = Harness()
    h.user_text("hi")
    h.send({"type": "response.create"})
    (start,) = h.take_actions()
    h.send({"type": "response.create"})
    assert h.errors == [("conversation_already_has_active_response", None)]
    h.conversation.output(TextOut(start.response_id, "Hel"))
    h.send({"type": "response.cancel"})
    assert h.take_actions() == [CancelResponse(start.response_id)]
    done = h.events[-1]
    assert done["type"] == "response.done" and done["response"]["status"] == "cancelled"
    count = len(h.events)
    # rule 4: the responder may be a frame late; nothing of the response follows its done
    h.conversation.output(TextOut(start.response_id, "lo"))
    h.conversation.output(AudioOut(start.response_id, "AAAA", 10.0, 3))
    h.conversation.output(ResponseEnded(start.response_id))
    assert len(h.events) == count


def test_barge_in_cancels_only_with_interrupt_response() -> None:
    h = Harness(vad=True)
    h.user_text("hi")
    h.send({"type": "response.create"})
    (start,) = h.take_actions()
    h.conversation.speech_started()
    assert h.take_actions() == [CancelResponse(start.response_id)]
    assert h.events[-1]["response"]["status_details"]["reason"] == "turn_detected"

    h = Harness(vad=True)
    settings = SessionSettings()
    settings = msgspec.structs.replace(
        settings,
        conversation=msgspec.structs.replace(settings.conversation, interrupt_response=False),
    )
    h.conversation.configure(settings, ga=True)
    h.user_text("hi")
    h.send({"type": "response.create"})
    h.take_actions()
    h.conversation.speech_started()
    assert h.take_actions() == []


def test_output_items_close_in_order_before_response_done() -> None:
    h = Harness()
    h.user_text("hi")
    h.send({"type": "response.create"})
    (start,) = h.take_actions()
    rid = start.response_id
    h.conversation.output(TextOut(rid, "Hello."))
    h.conversation.output(AudioOut(rid, "AAAA", 100.0, 6))
    h.conversation.output(ResponseEnded(rid, usage={"input_tokens": 3, "output_tokens": 2}))
    assert h.types()[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    usage = h.events[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (3, 2, 5)


def test_items_of_the_response_in_progress_cannot_be_truncated_or_deleted() -> None:
    h = Harness()
    h.user_text("hi")
    h.send({"type": "response.create"})
    (start,) = h.take_actions()
    h.conversation.output(TextOut(start.response_id, "Hello there."))
    item_id = h.conversation.items[-1].id
    h.send({"type": "conversation.item.delete", "item_id": item_id})
    h.send(
        {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
         "audio_end_ms": 0}
    )  # fmt: skip
    assert [code for code, _ in h.errors] == ["item_in_progress", "item_in_progress"]


def test_truncate_keeps_the_words_whose_audio_was_sent() -> None:
    h = Harness()
    h.user_text("hi")
    h.send({"type": "response.create"})
    (start,) = h.take_actions()
    rid = start.response_id
    h.conversation.output(TextOut(rid, "Good morning to you. "))
    for upto in (4, 10, 14, 21):  # four 100 ms chunks through the sentence
        h.conversation.output(AudioOut(rid, "AAAA", 100.0, upto))
    h.conversation.output(ResponseEnded(rid))
    item_id = h.conversation.items[-1].id
    h.send(
        {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
         "audio_end_ms": 250}
    )  # fmt: skip
    item = h.conversation.items[-1]
    # 200 ms were sent whole: the first 10 characters, "Good morni", back to a whole word
    assert item.content[0]["transcript"] == "Good"
    assert item.audio_ms == 250.0
    assert h.events[-1]["type"] == "conversation.item.truncated"


def test_cancelling_a_response_that_has_not_started_drops_it_silently() -> None:
    h = Harness()
    h.conversation.user_audio_committed("item_u1", by_vad=False, now=2.0)
    h.send({"type": "response.create"})  # waits for the transcript
    h.send({"type": "response.cancel"})
    h.conversation.user_transcript("item_u1", "hello")
    assert h.take_actions() == []
    assert "response.created" not in h.types() and h.errors == []


def test_a_long_conversation_keeps_a_bounded_history_and_says_what_it_let_go() -> None:
    from spear_rt.session.conversation_items import MAX_CONVERSATION_ITEMS

    h = Harness()
    turns = MAX_CONVERSATION_ITEMS + 5
    for n in range(turns):
        h.conversation.user_audio_committed(f"item_u{n}", by_vad=False, now=float(n))
        h.conversation.user_transcript(f"item_u{n}", f"turn {n}")
    items = h.conversation.items
    assert len(items) == MAX_CONVERSATION_ITEMS
    assert [i.id for i in items[:2]] == ["item_u5", "item_u6"]  # the oldest went first
    assert items[-1].id == f"item_u{turns - 1}"
    deleted = [e["item_id"] for e in h.events if e["type"] == "conversation.item.deleted"]
    assert deleted == [f"item_u{n}" for n in range(5)]
    h.send({"type": "conversation.item.retrieve", "item_id": "item_u0"})
    assert h.errors == [("item_not_found", "item_id")]
    h.send({"type": "conversation.item.retrieve", "item_id": "item_u5"})
    assert h.events[-1]["type"] == "conversation.item.retrieved"
    assert h.events[-1]["item"]["content"][0]["transcript"] == "turn 5"


def test_conversation_items_stay_out_of_the_collectors_walks() -> None:
    """A long history must not lengthen every full collection (issue 16's p99 pauses): items
    are untracked, only their content lists are walked."""
    import gc

    h = Harness()
    h.conversation.user_audio_committed("item_first", by_vad=False, now=0.0)
    h.conversation.user_transcript("item_first", "first")
    gc.collect()
    before = len(gc.get_objects())
    for n in range(300):
        h.conversation.user_audio_committed(f"item_u{n}", by_vad=False, now=float(n))
        h.conversation.user_transcript(f"item_u{n}", f"turn {n}")
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert not gc.is_tracked(h.conversation.items[-1])
    assert grown <= 2 * 300 + 50  # two lists an item (content, segments), no more
