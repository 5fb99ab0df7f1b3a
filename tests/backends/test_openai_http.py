"""The `openai_http` backend against a real loopback fake upstream (tests/fakes/openai_upstream).

Every test is bounded by `trio.fail_after`; nothing sleeps. Ordering is proven with the
fake's events (a stalled answer, SSE events released one by one), not with timing.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
import trio

from spear_rt.backend import AudioInput, InstanceInfo, OneShotRequest, OneShotResponse, Secret
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport, Usage
from spear_rt_backends.openai_http import KIND, aclose_clients
from tests.fakes.openai_upstream import PNG, FakeOpenAI, embedding_of, speech_wav, sse_events

KEY = "sk-test-0123456789abcdef"
BOUND_S = 10  # no test comes near this; it only turns a hang into a failure

CHAT = Operation.CHAT_COMPLETIONS


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def instance(fake: FakeOpenAI) -> AsyncIterator[InstanceInfo]:
    yield InstanceInfo("up-1", base_url=fake.base_url, api_key=Secret(KEY))
    await aclose_clients()


def chat_payload(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


def chat(
    text: str = "hello there", *, stream: bool = False, timeout_s: float | None = None, **extra: Any
) -> OneShotRequest:
    """A chat request whose raw body is the client's bytes (odd spacing on purpose)."""
    payload = chat_payload(text, **({"stream": True} if stream else {}), **extra)
    raw = msgspec.json.format(msgspec.json.encode(payload), indent=3)
    return OneShotRequest(CHAT, payload, raw_body=raw, stream=stream, timeout_s=timeout_s)


async def call(instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
    with trio.fail_after(BOUND_S):
        return await KIND.call(instance, request)


async def failure(instance: InstanceInfo, request: OneShotRequest) -> BackendFailure:
    with pytest.raises(BackendFailure) as info:
        await call(instance, request)
    assert KEY not in str(info.value)
    return info.value


# --- declaration --------------------------------------------------------------------------


def test_kind_declares_its_operations_features_and_transport() -> None:
    assert KIND.name == "openai_http" and KIND.extra is None
    assert KIND.defaults.ops == {
        CHAT,
        Operation.EMBEDDINGS,
        Operation.SPEECH_TO_TEXT,
        Operation.TEXT_TO_SPEECH,
        Operation.IMAGE_GENERATION,
    }
    assert {
        Feature.SUPPORTS_STREAM,
        Feature.SUPPORTS_TOOLS,
        Feature.SUPPORTS_IMAGE_INPUT,
    } <= KIND.defaults.features
    assert KIND.defaults.transports == {Transport.HTTP}
    assert KIND.defaults.hosting is Hosting.REMOTE


def test_instance_without_base_url_is_unavailable_with_a_reason() -> None:
    assert KIND.unavailable_reason(InstanceInfo("x", base_url="http://h/v1")) is None
    reason = KIND.unavailable_reason(InstanceInfo("x"))
    assert reason is not None and "base_url" in reason


# --- operations ---------------------------------------------------------------------------


async def test_chat_forwards_the_raw_body_byte_for_byte_with_the_key(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    request = chat("what is up")
    response = await call(instance, request)
    sent = fake.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.body == request.raw_body
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["content-type"] == "application/json"
    answer = msgspec.json.decode(response.body)
    assert answer["choices"][0]["message"]["content"] == "echo: what is up"
    assert response.status == 200 and response.content_type == "application/json"
    assert response.usage == Usage(input_tokens=3, output_tokens=4)


async def test_chat_encodes_the_payload_when_the_edge_changed_it(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    request = OneShotRequest(CHAT, chat_payload() | {"model": "rewritten-model"}, raw_body=None)
    response = await call(instance, request)
    assert fake.requests[-1].json["model"] == "rewritten-model"
    assert msgspec.json.decode(response.body)["model"] == "rewritten-model"


async def test_instance_without_key_sends_no_authorization(fake: FakeOpenAI) -> None:
    try:
        await call(InstanceInfo("local", base_url=fake.base_url), chat())
    finally:
        await aclose_clients()
    assert "authorization" not in fake.requests[-1].headers


async def test_embeddings_as_floats_and_as_base64(fake: FakeOpenAI, instance: InstanceInfo) -> None:
    payload = {"model": "emb", "input": ["one two", "three"], "dimensions": 4}
    response = await call(instance, OneShotRequest(Operation.EMBEDDINGS, payload))
    answer = msgspec.json.decode(response.body)
    assert [d["embedding"] for d in answer["data"]] == [
        embedding_of("one two", 4),
        embedding_of("three", 4),
    ]
    assert response.usage == Usage(input_tokens=3)

    payload = {"model": "emb", "input": "three", "dimensions": 4, "encoding_format": "base64"}
    response = await call(instance, OneShotRequest(Operation.EMBEDDINGS, payload))
    packed = base64.b64decode(msgspec.json.decode(response.body)["data"][0]["embedding"])
    assert list(struct.unpack("<4f", packed)) == embedding_of("three", 4)
    assert fake.requests[-1].path == "/v1/embeddings"


async def test_transcription_is_resent_as_multipart(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    data = b"RIFF" + bytes(range(256)) * 4
    pcm = np.zeros(8000, dtype=np.int16)
    audio = AudioInput(data, "hello.wav", "audio/wav", pcm=pcm, rate_hz=16000)
    payload = {
        "model": "whisper-1",
        "language": "en",
        "temperature": 0.5,
        "timestamp_granularities[]": ["word", "segment"],
    }
    response = await call(instance, OneShotRequest(Operation.SPEECH_TO_TEXT, payload, audio=audio))
    sent = fake.requests[-1]
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    upload = sent.files["file"]
    assert (upload.filename, upload.content_type, upload.data) == ("hello.wav", "audio/wav", data)
    assert sent.form["model"] == "whisper-1" and sent.form["language"] == "en"
    assert sent.form["temperature"] == "0.5"
    assert msgspec.json.decode(response.body) == {"text": f"heard {len(data)} bytes of hello.wav"}
    assert response.usage == Usage(audio_seconds=0.5)


async def test_transcription_as_plain_text(fake: FakeOpenAI, instance: InstanceInfo) -> None:
    audio = AudioInput(b"abc", "a.mp3", "audio/mpeg")
    payload = {"model": "whisper-1", "response_format": "text"}
    response = await call(instance, OneShotRequest(Operation.SPEECH_TO_TEXT, payload, audio=audio))
    assert response.body == b"heard 3 bytes of a.mp3"
    assert response.content_type.startswith("text/plain")


async def test_speech_returns_the_upstream_audio_and_its_type(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    payload = {"model": "tts-1", "input": "say this", "voice": "alloy", "response_format": "wav"}
    response = await call(instance, OneShotRequest(Operation.TEXT_TO_SPEECH, payload))
    assert fake.requests[-1].path == "/v1/audio/speech"
    assert response.body == speech_wav("say this")
    assert response.content_type == "audio/wav"
    assert response.usage == Usage(characters=8)


async def test_images_come_back_as_b64_json(fake: FakeOpenAI, instance: InstanceInfo) -> None:
    payload = {"model": "img", "prompt": "a dot", "n": 2, "response_format": "b64_json"}
    response = await call(instance, OneShotRequest(Operation.IMAGE_GENERATION, payload))
    assert fake.requests[-1].path == "/v1/images/generations"
    data = msgspec.json.decode(response.body)["data"]
    assert [base64.b64decode(d["b64_json"]) for d in data] == [PNG, PNG]
    assert response.usage == Usage(images=2)


async def test_sequential_requests_reuse_one_connection(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    for n in range(5):
        await call(instance, chat(f"message {n}"))
    await call(instance, OneShotRequest(Operation.EMBEDDINGS, {"model": "e", "input": "x"}))
    assert fake.connections == 1
    assert [r.connection for r in fake.requests] == [1] * 6


# --- streaming ----------------------------------------------------------------------------


async def collect(stream: AsyncIterator[bytes] | None) -> bytes:
    assert stream is not None
    with trio.fail_after(BOUND_S):
        return b"".join([chunk async for chunk in stream])


async def test_stream_relays_the_upstream_sse_bytes(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    request = chat("a b c", stream=True, stream_options={"include_usage": True})
    response = await call(instance, request)
    assert response.content_type == "text/event-stream"
    assert fake.requests[-1].body == request.raw_body
    assert await collect(response.stream) == b"".join(sse_events(request.payload))
    # the connection went back to the pool once the body was complete
    await call(instance, chat())
    assert fake.connections == 1


async def test_stream_is_relayed_chunk_by_chunk(fake: FakeOpenAI, instance: InstanceInfo) -> None:
    slow = fake.slow_stream()
    request = chat("one two", stream=True)
    events = sse_events(request.payload)
    response = await call(instance, request)  # the head arrived; no event was sent yet
    assert response.stream is not None and slow.sent == 0
    with trio.fail_after(BOUND_S):
        for n, event in enumerate(events, 1):
            slow.release()
            assert await response.stream.__anext__() == event
            assert slow.sent == n  # the consumer has event n before event n+1 was released
        slow.release()
        with pytest.raises(StopAsyncIteration):
            await response.stream.__anext__()


async def test_closing_the_stream_midway_cancels_the_upstream_request(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    slow = fake.slow_stream()
    response = await call(instance, chat("one two three", stream=True))
    assert response.stream is not None
    slow.release()
    with trio.fail_after(BOUND_S):
        await response.stream.__anext__()
        await response.stream.aclose()  # type: ignore[attr-defined]
        await slow.disconnected.wait()
    assert slow.sent == 1 and fake.disconnects == 1


async def test_closing_the_stream_before_reading_it_also_cancels(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    slow = fake.slow_stream()
    response = await call(instance, chat(stream=True))
    with trio.fail_after(BOUND_S):
        await response.stream.aclose()  # type: ignore[union-attr]
        await slow.disconnected.wait()
    assert slow.sent == 0


async def test_a_stream_that_stops_flowing_times_out_and_hangs_up(fake: FakeOpenAI) -> None:
    instance = InstanceInfo("up-1", base_url=fake.base_url, options={"read_timeout_s": 0.2})
    slow = fake.slow_stream()
    try:
        response = await call(instance, chat(stream=True))
        assert response.stream is not None
        slow.release()
        with trio.fail_after(BOUND_S):
            await response.stream.__anext__()
            with pytest.raises(TimeoutError):
                await response.stream.__anext__()  # the next event is never released
            await slow.disconnected.wait()
    finally:
        await aclose_clients()


async def test_stream_request_answered_with_an_error_fails_before_streaming(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.fail(503)
    exc = await failure(instance, chat(stream=True))
    assert exc.retryable and exc.status == 503


# --- errors -------------------------------------------------------------------------------


async def test_429_is_retryable_with_its_retry_after(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.fail(429, retry_after="7", message="Rate limit reached for requests")
    exc = await failure(instance, chat())
    assert exc.retryable and exc.status == 429 and exc.retry_after_s == 7.0
    assert str(exc) == "Rate limit reached for requests"


async def test_retry_after_as_an_http_date_is_read(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.fail(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")  # in the past: retry now
    exc = await failure(instance, chat())
    assert exc.retry_after_s == 0.0


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_retryable(fake: FakeOpenAI, instance: InstanceInfo, status: int) -> None:
    fake.fail(status)
    exc = await failure(instance, chat())
    assert exc.retryable and exc.status == status and exc.retry_after_s is None
    await call(instance, chat())  # the next request goes through


async def test_400_is_not_retryable_and_carries_the_upstream_message(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.fail(400, message="'messages' is a required property")
    exc = await failure(instance, chat())
    assert not exc.retryable and exc.status == 400
    assert str(exc) == "'messages' is a required property"


async def test_an_upstream_message_quoting_the_key_is_redacted(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.fail(401, message=f"Incorrect API key provided: {KEY}.")
    exc = await failure(instance, chat())
    assert str(exc) == "Incorrect API key provided: ***." and exc.status == 401


async def test_garbage_is_a_non_retryable_invalid_json_failure(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    fake.garbage()
    exc = await failure(instance, chat())
    assert not exc.retryable and "invalid JSON" in str(exc)


async def test_stall_past_the_timeout_is_a_timeout_and_hangs_up(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    stall = fake.stall()
    with pytest.raises(TimeoutError) as info:
        await call(instance, chat(timeout_s=0.2))
    assert KEY not in str(info.value)
    with trio.fail_after(BOUND_S):
        await stall.disconnected.wait()  # the abandoned request was cancelled upstream
    assert stall.reached.is_set()


async def test_a_released_stall_answers_normally(fake: FakeOpenAI, instance: InstanceInfo) -> None:
    stall = fake.stall()
    async with anyio.create_task_group() as tg:
        answers: list[OneShotResponse] = []

        async def ask() -> None:
            answers.append(await call(instance, chat("late")))

        tg.start_soon(ask)
        with trio.fail_after(BOUND_S):
            await stall.reached.wait()
        assert not answers  # held by the fake
        stall.release()
    assert b"echo: late" in answers[0].body and not stall.disconnected.is_set()


async def test_cancelling_a_call_hangs_up_on_the_upstream(
    fake: FakeOpenAI, instance: InstanceInfo
) -> None:
    stall = fake.stall()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, instance, chat())
        with trio.fail_after(BOUND_S):
            await stall.reached.wait()
        tg.cancel_scope.cancel()  # e.g. the edge's deadline, or a hedge that lost
    with trio.fail_after(BOUND_S):
        await stall.disconnected.wait()


async def test_connections_are_bounded_by_max_connections(fake: FakeOpenAI) -> None:
    options: dict[str, Any] = {"max_connections": 1, "pool_timeout_s": 0.2}
    instance = InstanceInfo("one", base_url=fake.base_url, options=options)
    stall = fake.stall()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, instance, chat("first"))
            with trio.fail_after(BOUND_S):
                await stall.reached.wait()
            exc = await failure(instance, chat("second"))  # waits for the only connection
            assert exc.retryable and "max_connections" in str(exc)
            stall.release()
    finally:
        await aclose_clients()
    assert fake.connections == 1 and len(fake.requests) == 1


async def test_unreachable_upstream_is_a_retryable_failure_without_the_key() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there any more
    instance = InstanceInfo("gone", base_url=f"http://127.0.0.1:{port}/v1", api_key=Secret(KEY))
    try:
        exc = await failure(instance, chat())
    finally:
        await aclose_clients()
    assert exc.retryable and exc.status is None and "connect" in str(exc).lower()


async def test_transcription_without_audio_is_refused(instance: InstanceInfo) -> None:
    exc = await failure(instance, OneShotRequest(Operation.SPEECH_TO_TEXT, {"model": "w"}))
    assert not exc.retryable and exc.status == 400


async def test_realtime_voice_is_not_served(instance: InstanceInfo) -> None:
    exc = await failure(instance, OneShotRequest(Operation.REALTIME_VOICE, {}))
    assert not exc.retryable
