"""Conversation control end to end over a real socket: barge-in, response.cancel, truncate,
tools, text-only output, out-of-band responses and item create/retrieve/delete.

The chat stage is the fake upstream; scripted streams are let out event by event
(`SlowStream`), so "the response is in progress" is a fact the test arranges, not a race.
Every event validates against the SDK's models (`Talk`).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from spear_rt.config import ConversationConfig
from spear_rt.server.app import Server
from tests.conftest import DRIVERS, IDS, load_fixture_24k
from tests.fakes.openai_upstream import FakeOpenAI, text_events, tool_call_events
from tests.server.conversation_rig import Talk, answer_pcm, response_events, run_rig

ANSWER = ["The weather ", "is nice today. ", "Let us ", "go outside."]
MANUAL = {"audio": {"input": {"turn_detection": None}}}
VAD = {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def chat_requests(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path == "/v1/chat/completions"]


def after(events: list[dict[str, Any]], done: dict[str, Any]) -> list[dict[str, Any]]:
    return events[events.index(done) + 1 :]


# --- barge-in and cancel -------------------------------------------------------------------


async def barge_in(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    """The user speaks while the answer plays: the response ends cancelled, its chat request
    is aborted upstream, and the user's new turn is answered."""
    assert server.port is not None
    talk = await Talk.open(server.port, **VAD)
    slow = fake.slow_stream(text_events(ANSWER))
    slow.release(3)  # role, "The weather ", "is nice today. ": one sentence to speak
    await talk.user_text("What is the weather like?")
    await talk.send({"type": "response.create"})
    await talk.until("response.output_audio.delta")
    await talk.say(load_fixture_24k("speech_go_forward.wav"))
    seen = await talk.until("response.done")
    cancelled = seen[-1]
    with anyio.fail_after(10):
        await slow.disconnected.wait()  # the chat request was aborted, not left running
    await talk.until("response.done")  # the answer to the new turn
    await talk.close()
    return {"events": talk.events, "cancelled": cancelled, "chat": chat_requests(fake)}


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_barge_in_cancels_the_response_and_answers_the_new_turn(backend: str, driver: str) -> None:
    result = run_rig(backend, driver, barge_in)
    events, cancelled = result["events"], result["cancelled"]
    response = cancelled["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    assert events.index(started) < events.index(cancelled)
    # nothing of the cancelled response follows its response.done
    assert response_events(after(events, cancelled), response["id"]) == []
    item = response["output"][0]
    assert item["status"] == "incomplete"
    assert item["content"][0]["transcript"] == "The weather is nice today. "
    # the second chat request carries what was said of the cut answer, then the new turn
    second = result["chat"][1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "The weather is nice today. "}
    assert second[-1]["role"] == "user" and second[-1]["content"].strip()
    assert events[-1]["response"]["status"] == "completed"


async def cancel(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    """response.cancel mid-stream; a second cancel is an error; the next response works."""
    assert server.port is not None
    talk = await Talk.open(server.port, **MANUAL)
    slow = fake.slow_stream(text_events(ANSWER))
    slow.release(2)
    await talk.user_text("Tell me about the weather.")
    await talk.send({"type": "response.create"})
    await talk.until("response.output_audio_transcript.delta")
    await talk.send({"type": "response.cancel"})
    cancelled = (await talk.until("response.done"))[-1]
    with anyio.fail_after(10):
        await slow.disconnected.wait()
    await talk.send({"type": "response.cancel", "event_id": "again"})
    error = (await talk.until("error"))[-1]
    await talk.send({"type": "response.create"})
    done = (await talk.until("response.done"))[-1]
    await talk.send({"type": "spear.metrics.request"})
    session_metrics = (await talk.until("spear.metrics"))[-1]["metrics"]
    await talk.close()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        metrics = (await http.get("/metrics")).text
    return {
        "cancelled": cancelled,
        "error": error,
        "done": done,
        "events": talk.events,
        "metrics": metrics,
        "session_metrics": session_metrics,
    }


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_response_cancel_aborts_the_upstream_and_the_session_goes_on(
    backend: str, driver: str
) -> None:
    result = run_rig(backend, driver, cancel)
    cancelled = result["cancelled"]["response"]
    assert cancelled["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert result["error"]["error"]["code"] == "response_cancel_not_active"
    assert result["error"]["error"]["event_id"] == "again"
    assert response_events(after(result["events"], result["cancelled"]), cancelled["id"]) == []
    assert result["done"]["response"]["status"] == "completed"
    # /metrics: one response of each ending, and the completed one's latencies per instance
    metrics = result["metrics"]
    assert 'spear_conversation_responses_total{status="cancelled"} 1' in metrics
    assert 'spear_conversation_responses_total{status="completed"} 1' in metrics
    assert (
        'spear_conversation_voice_to_voice_seconds_count{chat_instance="fake",'
        'speech_instance="espeak"} 1'
    ) in metrics
    assert 'spear_conversation_first_text_seconds_count{chat_instance="fake"} 2' in metrics
    session = result["session_metrics"]
    assert session["responses"] == 2
    assert 0 < session["first_text_ms"] <= session["first_audio_ms"]  # of the last response


# --- truncate ------------------------------------------------------------------------------


async def truncate(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    talk = await Talk.open(server.port, **MANUAL)
    fake.slow_stream(text_events(ANSWER)).release(len(ANSWER) + 3)
    await talk.user_text("How is the weather?")
    await talk.send({"type": "response.create"})
    events = await talk.until("response.done")
    done = events[-1]["response"]
    item_id = done["output"][0]["id"]
    audio_ms = len(answer_pcm(events, "response.output_audio.delta")) * 1000 // 24000
    await talk.send(
        {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
         "audio_end_ms": audio_ms + 1000, "event_id": "too-far"}
    )  # fmt: skip
    too_far = (await talk.until("error"))[-1]
    half = audio_ms // 2
    await talk.send(
        {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
         "audio_end_ms": half}
    )  # fmt: skip
    truncated = (await talk.until("conversation.item.truncated"))[-1]
    await talk.send({"type": "conversation.item.retrieve", "item_id": item_id})
    retrieved = (await talk.until("conversation.item.retrieved"))[-1]
    await talk.user_text("And tomorrow?")
    await talk.send({"type": "response.create"})
    await talk.until("response.done")
    await talk.close()
    return {
        "full": done["output"][0]["content"][0]["transcript"],
        "half": half,
        "too_far": too_far,
        "truncated": truncated,
        "retrieved": retrieved,
        "chat": chat_requests(fake),
    }


def test_truncate_cuts_audio_and_transcript_to_what_was_heard() -> None:
    result = run_rig("trio", "auto", truncate)
    assert result["too_far"]["error"]["param"] == "audio_end_ms"
    assert result["truncated"]["audio_end_ms"] == result["half"]
    full = result["full"]
    cut = result["retrieved"]["item"]["content"][0]["transcript"]
    assert cut and len(cut) < len(full.rstrip()) and full.startswith(cut)
    assert full[len(cut) : len(cut) + 1] in (" ", "")  # whole words only
    # the next chat request remembers only what was heard
    messages = result["chat"][1]["messages"]
    assert {"role": "assistant", "content": cut} in messages


# --- tools ---------------------------------------------------------------------------------


async def tools(server: Server, fake: FakeOpenAI, dialect: str) -> dict[str, Any]:
    assert server.port is not None
    session: dict[str, Any] = {"tools": [WEATHER_TOOL], "tool_choice": "auto"}
    session.update(MANUAL if dialect == "ga" else {"turn_detection": None})
    talk = await Talk.open(server.port, dialect, **session)
    pieces = ['{"city":', ' "Paris"}']
    fake.slow_stream(tool_call_events("call_7", "get_weather", pieces)).release(10)
    await talk.user_text("What is the weather in Paris?")
    await talk.send({"type": "response.create"})
    called = await talk.until("response.done")
    output = {"type": "function_call_output", "call_id": "call_7", "output": '{"sky": "sunny"}'}
    await talk.send({"type": "conversation.item.create", "item": output})
    await talk.until(talk.names("item_added"))
    fake.slow_stream(text_events(["It is sunny in Paris."])).release(5)
    await talk.send({"type": "response.create"})
    answered = await talk.until("response.done")
    await talk.close()
    return {"called": called, "answered": answered, "chat": chat_requests(fake)}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_tool_calls_become_function_call_items_and_outputs_continue(dialect: str) -> None:
    result = run_rig("trio", "auto", lambda s, f: tools(s, f, dialect))
    called = result["called"]
    deltas = [e["delta"] for e in called if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"city":', ' "Paris"}']
    done = next(e for e in called if e["type"] == "response.function_call_arguments.done")
    assert (done["call_id"], done["name"]) == ("call_7", "get_weather")
    assert json.loads(done["arguments"]) == {"city": "Paris"}
    response = called[-1]["response"]
    assert response["status"] == "completed"
    assert [(i["type"], i["call_id"]) for i in response["output"]] == [("function_call", "call_7")]
    first, second = result["chat"]
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER_TOOL["parameters"],
            },
        }
    ]
    assert first["tool_choice"] == "auto"
    call = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert second["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": '{"sky": "sunny"}'},
    ]
    answer = result["answered"][-1]["response"]
    assert answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["transcript"] == "It is sunny in Paris."


# --- text-only and out-of-band -------------------------------------------------------------


async def text_only(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    talk = await Talk.open(server.port, output_modalities=["text"], **MANUAL)
    await talk.user_text("hello in text")
    await talk.send({"type": "response.create"})
    events = await talk.until("response.done")
    await talk.close()
    return {"events": events}


def test_text_only_output_streams_text_and_synthesizes_nothing() -> None:
    events = run_rig("trio", "auto", text_only)["events"]
    types = [e["type"] for e in events]
    assert not [t for t in types if "audio" in t]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "echo: hello in text"
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == text
    response = events[-1]["response"]
    assert response["output"][0]["content"] == [{"type": "output_text", "text": text}]
    assert response["output_modalities"] == ["text"]
    assert "speech" not in response["spear"]  # no text_to_speech request was made


async def out_of_band(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    talk = await Talk.open(server.port, instructions="Be a robot.", **MANUAL)
    await talk.user_text("this is in the conversation")
    content = [{"type": "input_text", "text": "classify this out of band"}]
    request = {
        "conversation": "none",
        "output_modalities": ["text"],
        "instructions": "Classify the text.",
        "metadata": {"purpose": "classify"},
        "input": [{"type": "message", "role": "user", "content": content}],
    }
    await talk.send({"type": "response.create", "response": request})
    events = await talk.until("response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    await talk.send({"type": "conversation.item.retrieve", "item_id": item_id, "event_id": "r"})
    missing = (await talk.until("error"))[-1]
    await talk.send({"type": "response.create"})  # in-band: the conversation is unchanged
    await talk.until("response.done")
    await talk.close()
    return {"events": events, "missing": missing, "chat": chat_requests(fake)}


def test_out_of_band_responses_stay_out_of_the_conversation() -> None:
    result = run_rig("trio", "auto", out_of_band)
    events = result["events"]
    created = next(e for e in events if e["type"] == "response.created")["response"]
    assert created["conversation_id"] is None
    done = events[-1]["response"]
    assert done["metadata"] == {"purpose": "classify"}
    assert done["output_modalities"] == ["text"]
    assert "conversation.item.added" not in [e["type"] for e in events]
    assert result["missing"]["error"]["code"] == "item_not_found"
    oob, in_band = result["chat"]
    assert oob["messages"] == [
        {"role": "system", "content": "Classify the text."},
        {"role": "user", "content": "classify this out of band"},
    ]
    assert in_band["messages"] == [
        {"role": "system", "content": "Be a robot."},
        {"role": "user", "content": "this is in the conversation"},
    ]


# --- items ---------------------------------------------------------------------------------


async def items(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    talk = await Talk.open(server.port, **MANUAL)
    await talk.user_text("second")
    first = {
        "id": "item_first",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "first"}],
    }
    await talk.send({"type": "conversation.item.create", "previous_item_id": "root", "item": first})
    added = (await talk.until("conversation.item.added"))[-1]
    await talk.send({"type": "conversation.item.create", "item": first, "event_id": "dup"})
    duplicate = (await talk.until("error"))[-1]
    await talk.send({"type": "response.create"})
    await talk.until("response.done")
    await talk.send({"type": "conversation.item.delete", "item_id": "item_first"})
    deleted = (await talk.until("conversation.item.deleted"))[-1]
    await talk.send({"type": "conversation.item.retrieve", "item_id": "item_first"})
    gone = (await talk.until("error"))[-1]
    await talk.send({"type": "response.create"})
    await talk.until("response.done")
    await talk.close()
    return {
        "added": added,
        "duplicate": duplicate,
        "deleted": deleted,
        "gone": gone,
        "chat": chat_requests(fake),
    }


def test_items_are_inserted_retrieved_and_deleted_in_order() -> None:
    result = run_rig("trio", "auto", items)
    assert result["added"]["previous_item_id"] is None  # "root": first in the conversation
    assert result["duplicate"]["error"]["event_id"] == "dup"
    assert result["deleted"]["item_id"] == "item_first"
    assert result["gone"]["error"]["code"] == "item_not_found"
    before, after_delete = result["chat"]
    users = [m["content"] for m in before["messages"] if m["role"] == "user"]
    assert users == ["first", "second"]
    users = [m["content"] for m in after_delete["messages"] if m["role"] == "user"]
    assert users == ["second"]


# --- failures ------------------------------------------------------------------------------


async def unknown_voice(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    audio = {"input": {"turn_detection": None}, "output": {"voice": "nosuchvoice"}}
    talk = await Talk.open(server.port, audio=audio)
    await talk.user_text("hello")
    await talk.send({"type": "response.create"})
    done = (await talk.until("response.done"))[-1]
    await talk.close()
    return done


def test_a_stage_refusing_the_request_fails_the_response_with_its_reason() -> None:
    """espeak refuses the voice: response.done says so (it said "the server failed")."""
    response = run_rig("trio", "auto", unknown_voice)["response"]
    assert response["status"] == "failed"
    error = response["status_details"]["error"]
    assert "nosuchvoice" in error["message"] and "\n" not in error["message"]
    assert error["code"] == "response_failed"


async def default_instructions(server: Server, fake: FakeOpenAI) -> dict[str, Any]:
    assert server.port is not None
    talk = await Talk.open(server.port, **MANUAL)
    await talk.user_text("hi")
    await talk.send({"type": "response.create"})
    await talk.until("response.done")
    await talk.close()
    return {"created": talk.events[0], "chat": chat_requests(fake)}


def test_a_session_without_instructions_gets_the_configured_default() -> None:
    """Small local models ramble without a system prompt: `[conversation] instructions`."""
    result = run_rig("trio", "auto", default_instructions)
    default = ConversationConfig().instructions
    assert result["created"]["session"]["instructions"] == default
    assert result["chat"][0]["messages"][0] == {"role": "system", "content": default}


async def stage_drops(server: Server, fake: FakeOpenAI, cut: bool) -> dict[str, Any]:
    assert server.port is not None
    partial = text_events(ANSWER)[:3]  # role, "The weather ", "is nice today. "; no end
    fake.slow_stream(partial, cut=cut).release(len(partial))
    talk = await Talk.open(server.port, **MANUAL)
    await talk.user_text("How is the weather?")
    await talk.send({"type": "response.create"})
    first = (await talk.until("response.done"))[-1]["response"]
    again = (await talk.until("response.done"))[-1]["response"]  # created again by itself
    await talk.close()
    return {"first": first, "again": again, "events": talk.events, "chat": chat_requests(fake)}


@pytest.mark.parametrize("cut", [True, False], ids=["connection-dropped", "ended-early"])
def test_a_chat_stream_cut_mid_answer_ends_incomplete_and_is_created_again(cut: bool) -> None:
    """Never a partial answer presented as complete: the response says why it is incomplete,
    what was said stays, and the same response is created again (the fake answers whole)."""
    result = run_rig("trio", "auto", lambda s, f: stage_drops(s, f, cut), speech="fake")
    first, again = result["first"], result["again"]
    assert first["status"] == "incomplete"
    assert first["status_details"]["error"]["code"] == "upstream_disconnected"
    assert first["output"][0]["content"][0]["transcript"] == "The weather is nice today. "
    assert again["status"] == "completed" and again["id"] != first["id"]
    assert again["output"][0]["content"][0]["transcript"] == "echo: How is the weather?"
    assert "error" not in [e["type"] for e in result["events"]]
    retry = result["chat"][1]["messages"]
    assert retry[-1] == {"role": "assistant", "content": "The weather is nice today. "}
