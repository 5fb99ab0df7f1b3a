"""The speech-to-speech translator, sans-I/O: commands to frames, upstream events to ours."""

from __future__ import annotations

import base64
import json
from typing import Any

from spear_rt.backend import (
    AudioOut,
    CreateItem,
    CreateResponse,
    DeleteItem,
    ResponseEnded,
    StopResponse,
    TextOut,
    ToolCallOut,
    UpdateConversation,
)
from spear_rt.protocol.settings import Dialect
from spear_rt_backends.openai_realtime.conversation import ConversationTranslator


def frame(t: ConversationTranslator, command: Any) -> dict[str, Any]:
    data = t.encode(command)
    assert data is not None
    out: dict[str, Any] = json.loads(data)
    return out


def feed(t: ConversationTranslator, **event: Any) -> list[Any]:
    return t.decode(json.dumps(event).encode())


def started(t: ConversationTranslator, ours: str = "resp_ours", theirs: str = "resp_up") -> None:
    frame(t, CreateResponse(ours, {"audio_out": True}))
    assert feed(t, type="response.created", response={"id": theirs}) == []


def test_a_beta_upstream_gets_beta_names_and_the_turns_stay_ours() -> None:
    t = ConversationTranslator(Dialect.BETA, "whisper-1")
    fmt = {"type": "audio/pcmu"}
    session = frame(t, UpdateConversation({"voice": "nova", "output_format": fmt,
                                           "max_output_tokens": 100}))["session"]  # fmt: skip
    assert session["output_audio_format"] == "g711_ulaw"
    assert session["max_response_output_tokens"] == 100 and session["turn_detection"] is None
    assert session["input_audio_transcription"] == {"model": "whisper-1"}
    item = {"id": "item_a", "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "hi"}]}  # fmt: skip
    created = frame(t, CreateItem(item, "root"))
    assert created["item"]["content"] == [{"type": "text", "text": "hi"}]
    assert created["previous_item_id"] == "root"
    # g711 at 8 kHz: 800 bytes are 100 ms
    started(t)
    audio = base64.b64encode(bytes(800)).decode()
    out = feed(t, type="response.audio.delta", response_id="resp_up", item_id="item_u",
               delta=audio)  # fmt: skip
    assert out == [AudioOut("resp_ours", audio, 100.0, 0, "item_u")]


def test_response_events_come_back_under_our_ids_and_a_stopped_response_goes_quiet() -> None:
    t = ConversationTranslator(Dialect.GA, "whisper-1")
    started(t)
    text = feed(t, type="response.output_audio_transcript.delta", response_id="resp_up",
                item_id="item_u", delta="Hello")  # fmt: skip
    assert text == [TextOut("resp_ours", "Hello", "item_u")]
    audio = feed(t, type="response.output_audio.delta", response_id="resp_up",
                 item_id="item_u", delta="AAAA")  # fmt: skip
    assert audio == [AudioOut("resp_ours", "AAAA", 3 / 48, 5, "item_u")]  # covers "Hello"
    cancel = frame(t, StopResponse("resp_ours"))
    assert cancel["type"] == "response.cancel" and cancel["response_id"] == "resp_up"
    assert feed(t, type="response.output_audio.delta", response_id="resp_up", delta="AAAA") == []
    assert feed(t, type="response.done", response={"id": "resp_up", "status": "cancelled"}) == []


def test_tool_calls_arrive_whole_even_when_the_upstream_sends_no_deltas() -> None:
    t = ConversationTranslator(Dialect.GA, "whisper-1")
    started(t)
    item = {"id": "item_f", "type": "function_call", "call_id": "call_1", "name": "weather"}
    feed(t, type="response.output_item.added", response_id="resp_up", item=item)
    first = feed(t, type="response.function_call_arguments.delta", response_id="resp_up",
                 item_id="item_f", delta='{"city":')  # fmt: skip
    rest = feed(t, type="response.function_call_arguments.done", response_id="resp_up",
                item_id="item_f", arguments='{"city": "Paris"}')  # fmt: skip
    assert first == [ToolCallOut("resp_ours", "call_1", "weather", '{"city":', "item_f")]
    assert rest == [ToolCallOut("resp_ours", "call_1", "weather", ' "Paris"}', "item_f")]
    done = feed(t, type="response.done", response={"id": "resp_up", "status": "completed",
                "usage": {"input_tokens": 3, "output_tokens": 4}})  # fmt: skip
    assert done == [ResponseEnded("resp_ours", {"input_tokens": 3, "output_tokens": 4})]


def test_an_error_answering_a_response_fails_it_and_one_answering_an_item_is_dropped() -> None:
    t = ConversationTranslator(Dialect.GA, "whisper-1")
    create = frame(t, CreateResponse("resp_ours", {}))
    error = {"type": "invalid_request_error", "message": "no", "event_id": create["event_id"]}
    [ended] = feed(t, type="error", error=error)
    assert isinstance(ended, ResponseEnded) and ended.response_id == "resp_ours"
    assert ended.error is not None and "no" in ended.error
    delete = frame(t, DeleteItem("item_gone"))
    error = {"type": "invalid_request_error", "message": "gone", "event_id": delete["event_id"]}
    assert feed(t, type="error", error=error) == []  # the client was answered already
