"""One-shot operations of the stub backend: deterministic OpenAI-shaped answers, no model at all.

This is a stub, for tests, demos and throughput benches. The same request always gives the
same bytes (``created`` is a fixed 1700000000, ids are hashes of the input):

* chat_completions: the reply is ``"stub:"`` followed by the words of the last user message in
  reverse order (cut at ``max_tokens``/``max_completion_tokens``, then ``finish_reason`` is
  ``"length"``). Tokens are whitespace-separated words. ``stream: true`` gives SSE chunks: a
  role chunk, one chunk per word, a finish chunk, a usage chunk when
  ``stream_options.include_usage``, then ``[DONE]``; the deltas concatenate to the reply.
* embeddings: unit vectors from SHAKE-256 of each input, so ``dimensions=d`` is the renormalized
  first ``d`` values of the full vector (like OpenAI's shortened embeddings). Default 1536
  dimensions (option ``dimensions``); ``encoding_format: "base64"`` is float32 little-endian.
* image_generation: a checkered PNG of the asked size, its colours and pattern from a hash of
  the prompt and the image's index; ``b64_json`` only (the stub hosts no URLs).
* speech_to_text: the realtime stub's transcript of the upload: resampled to 24 kHz, each full
  block of ``block_ms`` (200 ms) becomes the lexicon word picked by the block's CRC-32, exactly
  as `spear_rt_backends.stub.StubTranscription` does, so one-shot and realtime agree.
* text_to_speech: one tone per word (pitch from the word's CRC-32, length from its letters and
  ``speed``) in the asked ``response_format`` (see `spear_rt_backends.espeak_tts`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import numpy as np
import soundfile  # type: ignore[import-untyped]  # ships no type hints
from numpy.typing import NDArray

from spear_rt.audio import float32_to_int16, resample
from spear_rt.backend import InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.ir import Operation, Usage
from spear_rt_backends.espeak_tts import (
    DEFAULT_MAX_CHARS,
    encode_speech,
    int_option,
    invalid,
    parse_speech_request,
)
from spear_rt_backends.stub import LEXICON, STUB_RATE_HZ

CREATED = 1700000000  # a fixed timestamp: answers are byte-for-byte reproducible
DEFAULT_DIMENSIONS = 1536
MAX_DIMENSIONS = 8192
MAX_EMBEDDING_INPUTS = 2048
MAX_PROMPT_CHARS = 32000
IMAGE_SIZES = {
    "auto": (1024, 1024),
    "256x256": (256, 256),
    "512x512": (512, 512),
    "1024x1024": (1024, 1024),
    "1536x1024": (1536, 1024),
    "1024x1536": (1024, 1536),
    "1792x1024": (1792, 1024),
    "1024x1792": (1024, 1792),
}
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json")

_json = msgspec.json.Encoder()


def _ok(answer: dict[str, Any], usage: Usage) -> OneShotResponse:
    return OneShotResponse(body=_json.encode(answer), usage=usage)


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model", "stub")
    if not isinstance(model, str):
        raise invalid(f"`model` must be a string, got {type(model).__name__}")
    return model


def _int_field(payload: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"`{key}` must be a whole number from {low} to {high}, got {value!r}")
    return value


async def call(instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
    """Serve one one-shot request with the stub's deterministic answers."""
    match request.operation:
        case Operation.CHAT_COMPLETIONS:
            return chat_completion(request)
        case Operation.EMBEDDINGS:
            return embeddings(instance, request.payload)
        case Operation.IMAGE_GENERATION:
            return image_generation(request.payload)
        case Operation.SPEECH_TO_TEXT:
            return speech_to_text(instance, request)
        case Operation.TEXT_TO_SPEECH:
            return await text_to_speech(instance, request.payload)
        case _:
            raise invalid(f"{request.operation} is not a one-shot operation")


# --- chat ---------------------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """The text of a message's `content`: a string, or the text parts of a list of parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"`{where}.content[{i}]` must be an object with a `type`")
            if part["type"] in ("text", "input_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise invalid(f"`{where}.content[{i}].text` must be a string")
                texts.append(text)
        return " ".join(texts)
    raise invalid(f"`{where}.content` must be a string or a list of content parts")


def _messages(payload: dict[str, Any]) -> tuple[str, int]:
    """(text of the last user message, whitespace tokens in all messages)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("you must provide `messages`: a non-empty list of {role, content} objects")
    last_user, tokens = "", 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"`messages[{i}]` must be an object with `role` and `content`")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid(f"`messages[{i}].role` must be a string such as 'user'")
        text = _text_of(message.get("content"), f"messages[{i}]")
        tokens += len(text.split())
        if role == "user":
            last_user = text
    return last_user, tokens


def chat_completion(request: OneShotRequest) -> OneShotResponse:
    """A `chat.completion` (or its SSE chunks) replying with the user's words reversed."""
    payload = request.payload
    model = _model(payload)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid(f"`stream` must be true or false, got {stream!r}")
    if _int_field(payload, "n", 1, 1, 128) != 1:
        raise invalid("the stub answers with one choice; leave `n` at 1")
    last_user, prompt_tokens = _messages(payload)
    limit_key = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    limit = _int_field(payload, limit_key, 0, 1, 1 << 30)  # 0: no limit given
    words = ["stub:", *reversed(last_user.split())]
    finish = "stop"
    if limit and len(words) > limit:
        words, finish = words[:limit], "length"
    content = " ".join(words)
    usage = Usage(input_tokens=prompt_tokens, output_tokens=len(words))
    wire_usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens + len(words),
    }
    chat_id = f"chatcmpl-stub{zlib.crc32(last_user.encode()):08x}"
    if request.stream or stream:
        options = payload.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("`stream_options` must be an object such as {'include_usage': true}")
        frames = _chat_frames(chat_id, model, words, finish)
        if options.get("include_usage") is True:
            frames.insert(-1, _chunk(chat_id, model, None, None, usage=wire_usage))
        return OneShotResponse(
            content_type="text/event-stream", stream=_replay(frames), usage=usage
        )
    answer = {
        "id": chat_id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "stub",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": wire_usage,
    }
    return _ok(answer, usage)


def _chunk(
    chat_id: str,
    model: str,
    delta: dict[str, str] | None,
    finish: str | None,
    usage: dict[str, int] | None = None,
) -> bytes:
    choices = (
        [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if delta is not None
        else []
    )
    chunk: dict[str, Any] = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "stub",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + _json.encode(chunk) + b"\n\n"


def _chat_frames(chat_id: str, model: str, words: list[str], finish: str) -> list[bytes]:
    frames = [_chunk(chat_id, model, {"role": "assistant", "content": ""}, None)]
    for i, word in enumerate(words):
        frames.append(_chunk(chat_id, model, {"content": word if i == 0 else " " + word}, None))
    frames.append(_chunk(chat_id, model, {}, finish))
    frames.append(b"data: [DONE]\n\n")
    return frames


async def _replay(frames: list[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame


# --- embeddings ---------------------------------------------------------------------------------


def _embedding_keys(value: Any) -> list[bytes]:
    """The bytes each input is hashed from: UTF-8 text, or token ids."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(
            "`input` must be a string, a list of strings, a list of token ids or a list of "
            "token id lists, and not empty"
        )
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"`input` has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} per request")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]
    keys = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise invalid(f"`input[{i}]` is an empty string")
            keys.append(item.encode())
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)
        ):
            keys.append(b"tokens:" + ",".join(map(str, item)).encode())
        else:
            raise invalid(
                f"`input[{i}]` must be a non-empty string or a non-empty list of token ids "
                "(and all items of one kind)"
            )
    return keys


def embedding_vector(key: bytes, dimensions: int) -> NDArray[np.float32]:
    """The stub's unit vector for `key`; a shorter one is the renormalized prefix of a longer."""
    raw = np.frombuffer(hashlib.shake_256(key).digest(2 * dimensions), dtype="<u2")
    vec = raw.astype(np.float64) - 32767.5
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def _embedding_json(key: bytes, dimensions: int, encoding: str) -> msgspec.Raw:
    """`_encode_embedding`, cached for short inputs (benches repeat them): bounded to
    256 entries of at most 1 KB of key and ~17 KB of JSON each."""
    if len(key) <= 1024 and dimensions <= 2048:
        return _cached_embedding_json(key, dimensions, encoding)
    return _encode_embedding(key, dimensions, encoding)


def _encode_embedding(key: bytes, dimensions: int, encoding: str) -> msgspec.Raw:
    """The encoded `embedding` value: floats rounded to 8 decimals (OpenAI sends ~9
    significant digits; half the bytes of a float32's full repr), or base64 float32 LE."""
    vec = embedding_vector(key, dimensions)
    if encoding == "base64":
        return msgspec.Raw(_json.encode(base64.b64encode(vec.astype("<f4").tobytes()).decode()))
    return msgspec.Raw(_json.encode(np.round(vec.astype(np.float64), 8).tolist()))


_cached_embedding_json = functools.lru_cache(maxsize=256)(_encode_embedding)


def embeddings(instance: InstanceInfo, payload: dict[str, Any]) -> OneShotResponse:
    """An embeddings `list`: one deterministic unit vector per input."""
    model = _model(payload)
    keys = _embedding_keys(payload.get("input"))
    default = int_option(instance, "dimensions", DEFAULT_DIMENSIONS)
    dimensions = _int_field(payload, "dimensions", default, 1, MAX_DIMENSIONS)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid(f"`encoding_format` must be 'float' or 'base64', got {encoding!r}")
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _embedding_json(key, dimensions, encoding),
        }
        for index, key in enumerate(keys)
    ]
    tokens = sum(
        len(k.split()) if not k.startswith(b"tokens:") else k.count(b",") + 1 for k in keys
    )
    answer = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return _ok(answer, Usage(input_tokens=tokens))


# --- images -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def stub_png(width: int, height: int, seed: bytes) -> bytes:
    """A checkered 4-colour indexed PNG; colours and pattern come from `seed` (>= 16 bytes)."""
    block = 16 << (seed[12] % 3)  # 16, 32 or 64 px squares
    cols = np.arange(width) // block
    rows = np.arange(height) // block
    index = (cols[None, :] * (1 + seed[13] % 3) + rows[:, None] * (1 + seed[14] % 3)) % 4
    scanlines = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 per row
    scanlines[:, 1:] = index
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
            _png_chunk(b"PLTE", seed[:12]),
            _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def image_generation(payload: dict[str, Any]) -> OneShotResponse:
    """`n` deterministic PNGs of the asked size, as `b64_json`."""
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("you must provide `prompt`: a non-empty string describing the image")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(f"`prompt` is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    n = _int_field(payload, "n", 1, 1, 10)
    size = payload.get("size") or "auto"
    if size not in IMAGE_SIZES:
        raise invalid(f"`size` must be one of {', '.join(IMAGE_SIZES)}, got {size!r}")
    response_format = payload.get("response_format") or "b64_json"
    if response_format == "url":
        raise invalid(
            "the stub backend hosts no images, so it cannot answer with a URL; "
            "ask for response_format 'b64_json'"
        )
    if response_format != "b64_json":
        raise invalid(f"`response_format` must be 'b64_json' or 'url', got {response_format!r}")
    output_format = payload.get("output_format") or "png"
    if output_format != "png":
        raise invalid(f"the stub only draws PNG images; `output_format` {output_format!r} is not")
    width, height = IMAGE_SIZES[size]
    data = []
    for i in range(n):
        seed = hashlib.sha256(f"{i}:{prompt}".encode()).digest()
        png = stub_png(width, height, seed)
        data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": prompt})
    return _ok({"created": CREATED, "data": data}, Usage(images=n))


# --- speech to text -----------------------------------------------------------------------------


def transcribe(pcm: NDArray[np.int16], rate_hz: int, block_ms: int = 200) -> list[str]:
    """The stub's words for `pcm`: one per full `block_ms` block at 24 kHz (as in realtime)."""
    pcm24 = np.ascontiguousarray(resample(np.asarray(pcm, dtype=np.int16), rate_hz, STUB_RATE_HZ))
    block = STUB_RATE_HZ * block_ms // 1000
    return [
        LEXICON[zlib.crc32(pcm24[start : start + block].tobytes()) % len(LEXICON)]
        for start in range(0, pcm24.size - block + 1, block)
    ]


def _decode_upload(data: bytes, filename: str) -> tuple[NDArray[np.int16], int]:
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise invalid(f"could not decode the audio file {filename!r}: {exc}") from None
    return float32_to_int16(samples.mean(axis=1, dtype=np.float32)), int(rate)


def _granularities(payload: dict[str, Any]) -> set[str]:
    value = payload.get("timestamp_granularities[]", payload.get("timestamp_granularities"))
    if value is None:
        return {"segment"}
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(v in ("word", "segment") for v in values):
        raise invalid("`timestamp_granularities` must list 'word' and/or 'segment'")
    return set(values)


def speech_to_text(instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
    """A transcription in `response_format` json, text or verbose_json."""
    payload, audio = request.payload, request.audio
    if audio is None:
        raise invalid("you must provide `file`: the audio to transcribe (a multipart upload)")
    response_format = payload.get("response_format") or "json"
    if response_format not in TRANSCRIPT_FORMATS:
        raise invalid(
            f"`response_format` must be one of {', '.join(TRANSCRIPT_FORMATS)} here, "
            f"got {response_format!r}"
        )
    language = payload.get("language")
    if language is not None and not isinstance(language, str):
        raise invalid("`language` must be a language code such as 'en'")
    granularities = _granularities(payload)
    if audio.pcm is not None and audio.rate_hz > 0:
        pcm, rate_hz = audio.pcm, audio.rate_hz
    else:
        pcm, rate_hz = _decode_upload(audio.data, audio.filename)
    block_ms = int_option(instance, "block_ms", 200)
    words = transcribe(pcm, rate_hz, block_ms)
    text = " ".join(words)
    duration = pcm.size / rate_hz
    usage = Usage(audio_seconds=duration)
    if response_format == "text":
        return OneShotResponse("text/plain; charset=utf-8", (text + "\n").encode(), usage=usage)
    if response_format == "json":
        return _ok({"text": text}, usage)
    answer: dict[str, Any] = {
        "task": "transcribe",
        "language": language or "english",
        "duration": duration,
        "text": text,
    }
    step = block_ms / 1000
    if "segment" in granularities:
        answer["segments"] = [
            {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": duration,
                "text": text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
            }
        ]
    if "word" in granularities:
        answer["words"] = [
            {"word": w, "start": round(i * step, 3), "end": round((i + 1) * step, 3)}
            for i, w in enumerate(words)
        ]
    return _ok(answer, usage)


# --- text to speech -----------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")


def tones(text: str, rate_hz: int, speed: float) -> NDArray[np.int16]:
    """One tone per word: pitch from its CRC-32, length from its letters; 50 ms gaps."""
    parts = []
    gap = np.zeros(int(0.05 / speed * rate_hz), dtype=np.float32)
    for word in _TAG.sub(" ", text).split():
        freq = 200 + zlib.crc32(word.lower().encode()) % 600
        count = int((0.12 + 0.02 * min(len(word), 12)) / speed * rate_hz)
        tone = 0.25 * np.sin(
            np.arange(count, dtype=np.float32) * np.float32(2 * np.pi * freq / rate_hz)
        )
        fade = min(count // 2, rate_hz // 200)  # 5 ms ramps: no clicks
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        tone[:fade] *= ramp
        tone[count - fade :] *= ramp[::-1]
        parts += [tone, gap]
    return float32_to_int16(np.concatenate(parts) if parts else gap)


async def text_to_speech(instance: InstanceInfo, payload: dict[str, Any]) -> OneShotResponse:
    """Tones for the words of `input`, encoded in `response_format`."""
    speech = parse_speech_request(
        payload, max_chars=int_option(instance, "max_chars", DEFAULT_MAX_CHARS)
    )
    fmt = speech.format
    pcm = tones(speech.text, fmt.rate_hz, speech.speed)
    if fmt.container in (None, "WAV"):  # no codec: cheaper than a thread hop
        body = encode_speech(pcm, fmt.rate_hz, fmt)
    else:
        body = await anyio.to_thread.run_sync(encode_speech, pcm, fmt.rate_hz, fmt)
    return OneShotResponse(
        content_type=fmt.content_type, body=body, usage=Usage(characters=len(payload["input"]))
    )
