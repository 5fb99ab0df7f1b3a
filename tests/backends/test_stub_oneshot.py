"""The stub's one-shot operations: OpenAI shapes, determinism, and clear InvalidRequest errors."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import msgspec
import numpy as np
import pytest
import soundfile
from openai.types import CreateEmbeddingResponse, ImagesResponse
from openai.types.audio import Transcription, TranscriptionVerbose
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from spear_rt.audio import resample
from spear_rt.backend import (
    AppendAudio,
    AudioInput,
    BeginTurn,
    Commit,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    TranscriptCompleted,
)
from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode, Operation
from spear_rt_backends import stub_media
from spear_rt_backends.stub import KIND, StubTranscription

INSTANCE = InstanceInfo(name="stub")


async def call(op: Operation, payload: dict[str, Any], **kw: Any) -> OneShotResponse:
    return await KIND.call(INSTANCE, OneShotRequest(op, payload, **kw))


async def invalid(op: Operation, payload: dict[str, Any], **kw: Any) -> str:
    """The message of the InvalidRequest the stub raises for this request."""
    with pytest.raises(CanonicalFailure) as info:
        await call(op, payload, **kw)
    assert info.value.error.code is ErrorCode.INVALID_REQUEST
    return info.value.error.message


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


async def sse_frames(response: OneShotResponse) -> list[bytes]:
    assert response.stream is not None
    return [frame async for frame in response.stream]


# --- chat -----------------------------------------------------------------------------------------


async def test_chat_reverses_the_last_user_message_and_counts_tokens() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello big world"},
        ],
    }
    response = await call(Operation.CHAT_COMPLETIONS, payload)
    completion = ChatCompletion.model_validate_json(response.body)
    assert completion.choices[0].message.content == "stub: world big hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "m"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 4)
    assert response.usage is not None and response.usage.input_tokens == 5


async def test_chat_is_deterministic_byte_for_byte() -> None:
    first = await call(Operation.CHAT_COMPLETIONS, chat("same input"))
    second = await call(Operation.CHAT_COMPLETIONS, chat("same input"))
    other = await call(Operation.CHAT_COMPLETIONS, chat("other input"))
    assert first.body == second.body
    assert first.body != other.body


async def test_chat_reads_text_parts_of_list_content() -> None:
    content = [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {}}]
    response = await call(Operation.CHAT_COMPLETIONS, chat(content))  # type: ignore[arg-type]
    assert ChatCompletion.model_validate_json(response.body).choices[0].message.content == (
        "stub: two one"
    )


async def test_chat_max_tokens_cuts_the_reply_with_finish_reason_length() -> None:
    response = await call(Operation.CHAT_COMPLETIONS, chat("a b c d e", max_tokens=3))
    choice = ChatCompletion.model_validate_json(response.body).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("stub: e d", "length")


async def test_streamed_deltas_concatenate_to_the_non_streamed_content() -> None:
    text = "the quick brown fox jumps"
    plain = ChatCompletion.model_validate_json(
        (await call(Operation.CHAT_COMPLETIONS, chat(text))).body
    )
    response = await call(Operation.CHAT_COMPLETIONS, chat(text, stream=True), stream=True)
    assert response.content_type == "text/event-stream"
    frames = await sse_frames(response)
    assert frames[-1] == b"data: [DONE]\n\n"
    assert all(f.startswith(b"data: ") and f.endswith(b"\n\n") for f in frames)
    chunks = [ChatCompletionChunk.model_validate_json(f[6:]) for f in frames[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        plain.choices[0].message.content
    )
    assert len(chunks) == 2 + len(text.split()) + 1  # role, "stub:", words, finish
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stream_include_usage_adds_a_usage_chunk_before_done() -> None:
    payload = chat("a b", stream=True, stream_options={"include_usage": True})
    frames = await sse_frames(await call(Operation.CHAT_COMPLETIONS, payload))
    last = ChatCompletionChunk.model_validate_json(frames[-2][6:])
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 3)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"model": "m"}, "you must provide `messages`"),
        ({"model": "m", "messages": []}, "non-empty list"),
        ({"model": "m", "messages": "hi"}, "`messages`"),
        ({"model": "m", "messages": ["hi"]}, "`messages[0]` must be an object"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "`messages[0].role`"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "`messages[0].content`"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "`messages[0].content[0].text`",
        ),
        (chat("x", stream="yes"), "`stream` must be true or false"),
        (chat("x", n=2), "one choice"),
        (chat("x", max_tokens=0), "`max_tokens`"),
        ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "`model` must be a string"),
    ],
)
async def test_bad_chat_requests_are_invalid_with_a_helpful_message(
    payload: dict[str, Any], needle: str
) -> None:
    assert needle in await invalid(Operation.CHAT_COMPLETIONS, payload)


# --- embeddings -----------------------------------------------------------------------------------


async def embed(payload: dict[str, Any]) -> CreateEmbeddingResponse:
    response = await call(Operation.EMBEDDINGS, {"model": "e", **payload})
    return CreateEmbeddingResponse.model_validate_json(response.body)


async def test_embeddings_are_unit_vectors_of_the_default_dimension() -> None:
    result = await embed({"input": ["alpha", "beta"]})
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        vec = np.array(item.embedding)
        assert vec.shape == (1536,)
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-5
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == 2


async def test_embeddings_are_deterministic_and_honour_dimensions_as_a_prefix() -> None:
    full = np.array((await embed({"input": "same text"})).data[0].embedding)
    again = np.array((await embed({"input": "same text"})).data[0].embedding)
    short = np.array((await embed({"input": "same text", "dimensions": 8})).data[0].embedding)
    assert np.array_equal(full, again)
    assert short.shape == (8,) and abs(np.linalg.norm(short) - 1.0) < 1e-5
    np.testing.assert_allclose(short, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)


async def test_embeddings_base64_is_float32_little_endian_of_the_float_answer() -> None:
    floats = (await embed({"input": "x", "dimensions": 16})).data[0].embedding
    response = await call(
        Operation.EMBEDDINGS,
        {"model": "e", "input": "x", "dimensions": 16, "encoding_format": "base64"},
    )
    encoded = msgspec.json.decode(response.body)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, floats, rtol=0, atol=1e-8)


async def test_embeddings_accept_token_ids() -> None:
    one = await embed({"input": [1, 2, 3]})
    two = await embed({"input": [[1, 2, 3], [4]]})
    assert one.data[0].embedding == two.data[0].embedding
    assert len(two.data) == 2 and two.usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "`input` must be"),
        ({"input": 5}, "`input` must be"),
        ({"input": []}, "not empty"),
        ({"input": [""]}, "`input[0]` is an empty string"),
        ({"input": ["a", 1]}, "`input[1]`"),
        ({"input": "a", "dimensions": 0}, "`dimensions`"),
        ({"input": "a", "dimensions": "8"}, "`dimensions`"),
        ({"input": "a", "encoding_format": "hex"}, "`encoding_format`"),
    ],
)
async def test_bad_embedding_requests_are_invalid(payload: dict[str, Any], needle: str) -> None:
    assert needle in await invalid(Operation.EMBEDDINGS, {"model": "e", **payload})


# --- images ---------------------------------------------------------------------------------------


def png_size_and_pixels(png: bytes) -> tuple[int, int, bytes]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", png, pos + 8 + length)
        assert crc == zlib.crc32(kind + data)
        if kind == b"IHDR":
            width, height = struct.unpack_from(">II", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    return width, height, zlib.decompress(idat)


async def test_images_are_deterministic_pngs_of_the_asked_size() -> None:
    payload = {"prompt": "a red fox", "n": 2, "size": "256x256"}
    response = await call(Operation.IMAGE_GENERATION, payload)
    again = await call(Operation.IMAGE_GENERATION, payload)
    result = ImagesResponse.model_validate_json(response.body)
    assert response.body == again.body
    assert result.data is not None and len(result.data) == 2
    pngs = [base64.b64decode(d.b64_json or "") for d in result.data]
    for png in pngs:
        width, height, pixels = png_size_and_pixels(png)
        assert (width, height) == (256, 256)
        assert len(pixels) == 256 * 257  # a filter byte per row
    assert pngs[0] != pngs[1]
    assert response.usage is not None and response.usage.images == 2


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "you must provide `prompt`"),
        ({"prompt": 3}, "`prompt`"),
        ({"prompt": "x", "response_format": "url"}, "b64_json"),
        ({"prompt": "x", "size": "10x10"}, "`size` must be one of"),
        ({"prompt": "x", "n": 11}, "`n`"),
        ({"prompt": "x", "output_format": "jpeg"}, "PNG"),
    ],
)
async def test_bad_image_requests_are_invalid(payload: dict[str, Any], needle: str) -> None:
    assert needle in await invalid(Operation.IMAGE_GENERATION, payload)


# --- speech to text -------------------------------------------------------------------------------


def noise(samples: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8000, 8000, samples, dtype=np.int16)


def upload(pcm: np.ndarray, rate_hz: int) -> AudioInput:
    return AudioInput(b"", "a.wav", "audio/wav", pcm, rate_hz)


async def realtime_transcript(pcm: np.ndarray) -> str:
    """What the realtime stub says for 24 kHz audio sent in 20 ms frames."""
    upstream = StubTranscription()
    await upstream.send(BeginTurn("item"))
    for start in range(0, pcm.size, 480):
        await upstream.send(AppendAudio(pcm[start : start + 480]))
    await upstream.send(Commit("item"))
    while True:
        event = await upstream.receive()
        if isinstance(event, TranscriptCompleted):
            await upstream.aclose()
            return event.transcript


async def test_transcription_agrees_with_the_realtime_stub() -> None:
    pcm = noise(24000 * 2 + 1000)  # 10 full blocks and a partial one
    response = await call(Operation.SPEECH_TO_TEXT, {"model": "s"}, audio=upload(pcm, 24000))
    text = Transcription.model_validate_json(response.body).text
    assert text == await realtime_transcript(pcm)
    assert len(text.split()) == 10
    assert (
        response.usage is not None and abs(response.usage.audio_seconds - pcm.size / 24000) < 1e-9
    )


async def test_transcription_resamples_other_rates_to_24k_first() -> None:
    pcm16k = noise(16000)
    response = await call(Operation.SPEECH_TO_TEXT, {"model": "s"}, audio=upload(pcm16k, 16000))
    expected = await realtime_transcript(resample(pcm16k, 16000, 24000))
    assert Transcription.model_validate_json(response.body).text == expected


async def test_transcription_decodes_the_upload_when_no_samples_were_given() -> None:
    pcm = noise(24000)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, 24000, format="FLAC")
    audio = AudioInput(buffer.getvalue(), "a.flac", "audio/flac")
    response = await call(Operation.SPEECH_TO_TEXT, {"model": "s"}, audio=audio)
    assert Transcription.model_validate_json(response.body).text == await realtime_transcript(pcm)


async def test_transcription_text_and_verbose_json_formats() -> None:
    pcm = noise(24000)
    text = await call(
        Operation.SPEECH_TO_TEXT, {"response_format": "text"}, audio=upload(pcm, 24000)
    )
    assert text.content_type.startswith("text/plain")
    words = text.body.decode().split()
    assert len(words) == 5
    verbose = await call(
        Operation.SPEECH_TO_TEXT,
        {"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]},
        audio=upload(pcm, 24000),
    )
    result = TranscriptionVerbose.model_validate_json(verbose.body)
    assert result.text.split() == words and result.duration == 1.0
    assert result.words is not None and [w.word for w in result.words] == words
    assert (result.words[1].start, result.words[1].end) == (0.2, 0.4)


@pytest.mark.parametrize(
    ("payload", "audio", "needle"),
    [
        ({}, None, "you must provide `file`"),
        ({"response_format": "xml"}, upload(noise(10), 24000), "`response_format` must be one of"),
        ({"timestamp_granularities[]": ["line"]}, upload(noise(10), 24000), "granularities"),
        ({}, AudioInput(b"not audio", "x.wav", "audio/wav"), "could not decode the audio file"),
    ],
)
async def test_bad_transcription_requests_are_invalid(
    payload: dict[str, Any], audio: AudioInput | None, needle: str
) -> None:
    assert needle in await invalid(Operation.SPEECH_TO_TEXT, payload, audio=audio)


# --- text to speech -------------------------------------------------------------------------------


async def speak(text: str, fmt: str = "wav", **extra: Any) -> OneShotResponse:
    payload = {"model": "t", "input": text, "voice": "alloy", "response_format": fmt, **extra}
    return await call(Operation.TEXT_TO_SPEECH, payload)


async def test_speech_is_a_tone_per_word_in_the_asked_format() -> None:
    short = await speak("one two")
    longer = await speak("one two three four five six")
    assert short.content_type == "audio/wav"
    data, rate = soundfile.read(io.BytesIO(short.body), dtype="int16")
    long_data, _ = soundfile.read(io.BytesIO(longer.body), dtype="int16")
    assert rate == 24000 and np.abs(data).max() > 4000
    assert long_data.size > 2 * data.size
    assert (await speak("one two")).body == short.body
    assert short.usage is not None and short.usage.characters == 7


async def test_speech_formats_decode_at_their_rates() -> None:
    opus = await speak("hello there", "opus")
    _, rate = soundfile.read(io.BytesIO(opus.body))
    assert (opus.content_type, rate) == ("audio/ogg", 48000)
    pcm = await speak("hello there", "pcm")
    wav = await speak("hello there", "wav")
    wav_data, _ = soundfile.read(io.BytesIO(wav.body), dtype="int16")
    assert np.array_equal(np.frombuffer(pcm.body, dtype="<i2"), wav_data)


async def test_faster_speech_is_shorter() -> None:
    normal = await speak("one two three", "pcm")
    fast = await speak("one two three", "pcm", speed=2.0)
    assert len(fast.body) < 0.6 * len(normal.body)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "you must provide `input`"),
        ({"input": ["hi"]}, "`input` must be a string"),
        ({"input": "   "}, "`input` is empty"),
        ({"input": "x" * 4097}, "at most 4096"),
        ({"input": "hi", "response_format": "aac"}, "'aac' is not supported"),
        ({"input": "hi", "response_format": "ogg"}, "response_format must be one of"),
        ({"input": "hi", "speed": 9}, "`speed`"),
        ({"input": "hi", "voice": 3}, "`voice`"),
        ({"input": "hi", "stream_format": "sse"}, "stream_format"),
    ],
)
async def test_bad_speech_requests_are_invalid(payload: dict[str, Any], needle: str) -> None:
    assert needle in await invalid(Operation.TEXT_TO_SPEECH, {"model": "t", **payload})


async def test_realtime_voice_is_not_a_one_shot_operation() -> None:
    assert "not a one-shot" in await invalid(Operation.REALTIME_VOICE, {})


def test_transcribe_is_the_documented_block_rule() -> None:
    pcm = noise(4800 * 3)
    words = stub_media.transcribe(pcm, 24000)
    assert len(words) == 3
    crc = zlib.crc32(pcm[4800:9600].tobytes())
    assert words[1] == stub_media.LEXICON[crc % len(stub_media.LEXICON)]
