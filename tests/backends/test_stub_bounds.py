"""The stub's answers are bounded by its input: no request is amplified into a huge answer.

An 8 KB speech request of one-letter words at speed 0.25 used to come back as 75 MB of
tones; 129 one-letter inputs at 8192 dimensions as 12 MB of floats; a long message as one
SSE chunk per word. Each now has a stated bound.
"""

from __future__ import annotations

import io
from typing import Any

import msgspec
import pytest
import soundfile

from spear_rt.backend import InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode, Operation
from spear_rt_backends import stub_media, stub_oneshot
from spear_rt_backends.stub import KIND

INSTANCE = InstanceInfo(name="stub")


async def call(op: Operation, payload: dict[str, Any]) -> OneShotResponse:
    return await KIND.call(INSTANCE, OneShotRequest(op, payload))


async def test_speech_of_one_letter_words_at_quarter_speed_is_bounded() -> None:
    text = "a " * 2048  # 4096 characters, the most a request may carry
    payload = {"model": "t", "input": text, "voice": "alloy", "response_format": "pcm"}
    answer = await call(Operation.TEXT_TO_SPEECH, {**payload, "speed": 0.25})
    seconds = len(answer.body) / 2 / 24000
    assert seconds <= stub_media.MAX_SPEECH_SECONDS  # was 1556 s: 75 MB
    assert seconds <= len(text) * stub_media.SPEECH_SECONDS_PER_CHAR + 1.0


async def test_short_speech_keeps_one_tone_per_word() -> None:
    """Inside the bound nothing changes: two 180 ms tones, each with a 50 ms gap."""
    payload = {"model": "t", "input": "one two", "voice": "alloy", "response_format": "wav"}
    answer = await call(Operation.TEXT_TO_SPEECH, payload)
    data, rate = soundfile.read(io.BytesIO(answer.body), dtype="int16")
    assert rate == 24000
    assert data.size == 2 * (4320 + 1200)


async def test_embeddings_past_the_value_budget_are_invalid() -> None:
    inputs = ["a"] * 129
    payload = {"model": "e", "input": inputs, "dimensions": 8192}
    with pytest.raises(CanonicalFailure) as caught:
        await call(Operation.EMBEDDINGS, payload)
    error = caught.value.error
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "129 inputs" in error.message and str(stub_media.MAX_EMBEDDING_VALUES) in error.message
    fine = await call(Operation.EMBEDDINGS, {**payload, "input": inputs[:128]})
    assert len(msgspec.json.decode(fine.body)["data"]) == 128


async def test_a_long_message_gets_a_reply_cut_at_the_stub_limit() -> None:
    words = " ".join(["w"] * (stub_oneshot.MAX_REPLY_WORDS + 500))
    payload = {"model": "m", "messages": [{"role": "user", "content": words}], "stream": True}
    answer = await call(Operation.CHAT_COMPLETIONS, payload)
    assert answer.stream is not None
    frames = [frame async for frame in answer.stream]
    assert len(frames) <= stub_oneshot.MAX_REPLY_WORDS + 4  # role, words, finish, [DONE]
    assert b'"finish_reason":"length"' in frames[-2]
