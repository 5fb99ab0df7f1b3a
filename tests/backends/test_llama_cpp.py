"""The llama_cpp backend: a real local model (SmolLM2-135M) answering chat through a server on
127.0.0.1, whole and streamed, one generation at a time, freed by a client that hangs up, and
one-line 400s for what it cannot serve.

These tests need the `llama` extra (CI installs it); without it they fail, never skip. Answers
are greedy (temperature 0, a seed), so they are the same on every run. Every wait is bounded
by `trio.fail_after`; ordering comes from events, not from sleeping.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import httpx
import pytest
import trio
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from spear_rt.backend import InstanceInfo, OneShotRequest
from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode, Operation
from spear_rt.server.app import Server
from spear_rt_backends import llama_cpp
from spear_rt_backends.llama_cpp import INSTALL, KIND
from spear_rt_backends.llama_cpp_request import TOOLS_REFUSED
from tests.conftest import ServerFactory, make_config

BOUND_S = 20  # generous for a busy machine; a healthy run takes a few seconds per test
BACKENDS = '[[backends]]\nname = "smollm2"\nkind = "llama_cpp"\n'
FRANCE = {
    "model": "smollm2",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "temperature": 0,
    "seed": 7,
}
STORY = {  # a long answer: SmolLM2 writes until the 512-token cap
    **FRANCE,
    "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
}


@pytest.fixture(autouse=True)
def llama_extra_installed() -> None:
    """Fail (not skip) when the extra is missing: CI installs it, so its absence is a bug."""
    assert KIND.unavailable_reason(InstanceInfo(name="smollm2")) is None


@pytest.fixture
async def server(serve: ServerFactory) -> Server:
    return await serve(make_config(backends=BACKENDS))


def client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=BOUND_S)


async def chat(server: Server, body: dict[str, Any]) -> httpx.Response:
    async with client(server) as c:
        return await c.post("/v1/chat/completions", json=body)


def sse_frames(body: bytes) -> list[bytes]:
    """The `data:` frames of an SSE body, checked to be framed as `data: ...\\n\\n`."""
    assert body.endswith(b"\n\n")
    frames = [f + b"\n\n" for f in body[:-2].split(b"\n\n")]
    assert all(f.startswith(b"data: ") for f in frames), frames[:3]
    return frames


def chunks_of(frames: list[bytes]) -> list[ChatCompletionChunk]:
    assert frames[-1] == b"data: [DONE]\n\n"
    return [ChatCompletionChunk.model_validate_json(f[6:]) for f in frames[:-1]]


# --- answers ------------------------------------------------------------------------------------


async def test_one_shot_chat_answers_the_france_question(server: Server) -> None:
    """A real model's answer: Paris, finish "stop", token usage, the model's name, no stub."""
    with trio.fail_after(BOUND_S):
        answer = await chat(server, FRANCE)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-spear-instance"] == "smollm2"
    assert "x-spear-stub" not in answer.headers
    completion = ChatCompletion.model_validate_json(answer.content)
    choice = completion.choices[0]
    assert "Paris" in (choice.message.content or ""), choice.message.content
    assert choice.finish_reason == "stop"
    assert completion.model == "smollm2"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 10 and 0 < completion.usage.completion_tokens < 30
    other = await chat(server, {**FRANCE, "model": "gpt-4o-mini"})  # served: routed here
    assert ChatCompletion.model_validate_json(other.content).model == "SmolLM2-135M-Instruct"


async def test_streamed_deltas_concatenate_to_the_one_shot_answer(server: Server) -> None:
    with trio.fail_after(BOUND_S):
        whole = ChatCompletion.model_validate_json((await chat(server, FRANCE)).content)
        answer = await chat(server, {**FRANCE, "stream": True})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/event-stream"
    chunks = chunks_of(sse_frames(answer.content))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "smollm2"


async def test_include_usage_adds_a_usage_chunk_before_done(server: Server) -> None:
    body = {**FRANCE, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 3}
    with trio.fail_after(BOUND_S):
        answer = await chat(server, body)
    chunks = chunks_of(sse_frames(answer.content))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 3  # cut by max_tokens
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 3
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_stop_strings_end_the_answer_before_them(server: Server) -> None:
    with trio.fail_after(BOUND_S):
        whole = await chat(server, {**FRANCE, "stop": ["Paris"]})
        streamed = await chat(server, {**FRANCE, "stop": "Paris", "stream": True})
    choice = ChatCompletion.model_validate_json(whole.content).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "The capital of France is "
    chunks = chunks_of(sse_frames(streamed.content))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


# --- one generation at a time ---------------------------------------------------------------------


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, for every token step, which generation took it (by id) and check that no two
    steps ever run at once."""
    order: list[int] = []
    running = threading.Semaphore(1)
    step = llama_cpp.Generation.step

    def counted(self: llama_cpp.Generation) -> str:
        assert running.acquire(blocking=False), "two generations stepped at once"
        try:
            order.append(id(self))
            return step(self)
        finally:
            running.release()

    monkeypatch.setattr(llama_cpp.Generation, "step", counted)
    return order


async def test_two_concurrent_requests_both_complete_one_after_the_other(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = count_steps(monkeypatch)
    answers: dict[str, httpx.Response] = {}

    async def ask(name: str, body: dict[str, Any]) -> None:
        answers[name] = await chat(server, body)

    with trio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "whole", FRANCE)
            tg.start_soon(ask, "streamed", {**FRANCE, "stream": True})
    assert "Paris" in answers["whole"].json()["choices"][0]["message"]["content"]
    streamed = chunks_of(sse_frames(answers["streamed"].content))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in streamed)
    first = order[0]
    switch = order.index(next(g for g in order if g != first))
    assert set(order[switch:]) == {order[switch]}, "the generations were interleaved"


async def test_a_client_hanging_up_mid_stream_frees_the_instance(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read the first content chunk of a long answer with a raw client, close the socket: the
    generation stops between two tokens and the next request is served at once."""
    closed = trio.Event()
    streams: list[llama_cpp.ChatStream] = []
    aclose = llama_cpp.ChatStream.aclose

    async def noticed(self: llama_cpp.ChatStream) -> None:
        await aclose(self)
        streams.append(self)
        closed.set()

    monkeypatch.setattr(llama_cpp.ChatStream, "aclose", noticed)
    body = json.dumps({**STORY, "stream": True}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(BOUND_S):
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send(head + body)
        received = b""
        while b'"delta":{"content":"' not in received.replace(b'"content":""', b""):
            received += await stream.receive()
        assert received.startswith(b"HTTP/1.1 200 ")
        await stream.aclose()
        await closed.wait()
        generation = streams[0]._generation
        assert generation.finish == "cancelled"
        assert 0 < generation.completion_tokens < 100  # of up to 512
        (engine,) = KIND._engines.get().values()
        assert engine.limiter.borrowed_tokens == 0
        answer = await chat(server, FRANCE)
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"messages": None}, "you must provide a `messages` parameter"),
        ({"messages": "hi"}, "Expected `array`, got `str`"),
        ({"messages": []}, "messages must contain at least one message"),
        ({"messages": ["hi"]}, "Expected `object`, got `str`"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "`messages[0].role` must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "must be a string or a list of text"),
        ({"messages": [{"role": "user"}]}, "`messages[0].content` is required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "this model reads text only",
        ),
        ({"temperature": "hot"}, "`temperature` must be a number from 0 to 2"),
        ({"top_p": 2}, "`top_p` must be a number from 0 to 1"),
        ({"max_tokens": 0}, "`max_tokens` must be a whole number"),
        ({"max_completion_tokens": "many"}, "`max_completion_tokens` must be a whole number"),
        ({"seed": 1.5}, "`seed` must be a whole number"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` must be a string or a list of at most 4"),
        ({"n": 2}, "leave `n` at 1"),
        ({"response_format": {"type": "json_object"}}, "answers plain text only"),
        ({"logprobs": True}, "does not return logprobs"),
        ({"stream": "yes"}, "Expected `bool`, got `str`"),
        ({"stream_options": {"include_usage": 1}}, "`stream_options` must be an object"),
    ],
)
async def test_bad_requests_are_a_400_with_a_one_line_error(
    server: Server, change: dict[str, Any], needle: str
) -> None:
    body = {k: v for k, v in {**FRANCE, **change}.items() if v is not None}
    with trio.fail_after(BOUND_S):
        answer = await chat(server, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"] and "\n" not in error["message"], error["message"]
    assert "Traceback" not in answer.text


async def test_a_prompt_over_the_context_window_is_a_400(serve: ServerFactory) -> None:
    small = await serve(make_config(backends=BACKENDS + "options = { n_ctx = 64 }\n"))
    long = {**FRANCE, "messages": [{"role": "user", "content": "word " * 200}]}
    with trio.fail_after(BOUND_S):
        answer = await chat(small, long)
    assert answer.status_code == 400
    assert "this model's context window is 64 tokens" in answer.json()["error"]["message"]


async def test_tools_are_refused_naming_the_limitation() -> None:
    """The router sends tool requests elsewhere (no supports_tools); asked directly, the kind
    refuses them, unless tool_choice is "none" (then there is nothing to call)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with pytest.raises(CanonicalFailure) as refused:
        await KIND.call(
            InstanceInfo(name="direct"),
            OneShotRequest(Operation.CHAT_COMPLETIONS, {**FRANCE, "tools": tools}),
        )
    assert refused.value.error.code is ErrorCode.INVALID_REQUEST
    assert refused.value.error.message == TOOLS_REFUSED
    assert "cannot do so reliably" in TOOLS_REFUSED
    with trio.fail_after(BOUND_S):
        answer = await KIND.call(
            InstanceInfo(name="direct"),
            OneShotRequest(
                Operation.CHAT_COMPLETIONS, {**FRANCE, "tools": tools, "tool_choice": "none"}
            ),
        )
    assert "Paris" in ChatCompletion.model_validate_json(answer.body).choices[0].message.content


async def test_through_the_server_tools_never_reach_the_instance(server: Server) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    answer = await chat(server, {**FRANCE, "tools": tools})
    assert answer.status_code >= 400
    reason = answer.json()["error"]["spear"]["rejected_reasons"]["smollm2"]
    assert "supports_tools" in reason


async def test_a_missing_model_file_makes_the_instance_unavailable_naming_the_extra(
    serve: ServerFactory,
) -> None:
    missing = InstanceInfo(name="m", options={"model_path": "/nonexistent/model.gguf"})
    reason = KIND.unavailable_reason(missing)
    assert reason is not None and INSTALL in reason and "\n" not in reason
    assert "/nonexistent/model.gguf" in reason
    assert INSTALL == "pip install 'spear-rt[llama]'"
    backends = BACKENDS + 'options = { model_path = "/nonexistent/model.gguf" }\n'
    server = await serve(make_config(backends=backends))
    async with client(server) as c:
        listed = (await c.get("/v1/backends")).json()
        answer = await c.post("/v1/chat/completions", json=FRANCE)
    (instance,) = [i for i in listed["data"] if i["name"] == "smollm2"]
    assert instance["available"] is False and INSTALL in instance["unavailable_reason"]
    assert answer.status_code == 503 and INSTALL in answer.text


def test_bad_options_are_a_reason_not_a_crash() -> None:
    bad = InstanceInfo(name="m", options={"n_ctx": -1})
    assert KIND.unavailable_reason(bad) == "instance m: option n_ctx must be a positive integer"
