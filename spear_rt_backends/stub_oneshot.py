"""One-shot operations of the stub backend: deterministic OpenAI-shaped answers, no model at all.

This is a stub, for tests, demos and throughput benches. The same request always gives the
same bytes (``created`` is a fixed 1700000000, ids are hashes of the input):

* chat_completions: the reply is ``"stub:"`` followed by the words of the last user message in
  reverse order (cut at ``max_tokens``/``max_completion_tokens``, then ``finish_reason`` is
  ``"length"``). Tokens are whitespace-separated words. ``stream: true`` gives SSE chunks: a
  role chunk, one chunk per word, a finish chunk, a usage chunk when
  ``stream_options.include_usage``, then ``[DONE]``; the deltas concatenate to the reply.
  With ``tools`` (non-streaming): when the last user message holds two integers and no tool
  result came after it, the answer is a ``tool_calls`` for the first tool with arguments
  ``{"a": x, "b": y}``; after a tool result the reply is ``"stub: after tool <its output>"``.
  (The kind does not declare ``supports_tools``, so the router sends it tool requests only
  when an instance's config declares it, or the request names the stub.)
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
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.backend import InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.errors import echo
from spear_rt.ir import Operation, Usage
from spear_rt_backends.espeak_tts import int_option, invalid
from spear_rt_backends.stub_media import (  # shared helpers and the media operations
    CREATED,
    DEFAULT_DIMENSIONS,
    MAX_DIMENSIONS,
    MAX_EMBEDDING_INPUTS,
    MAX_EMBEDDING_VALUES,
    _int_field,
    _json,
    _model,
    _ok,
    image_generation,
    speech_to_text,
    text_to_speech,
)

# A reply is at most this many words (then finish_reason "length"): one SSE chunk per word,
# so a long message must not become a stream of millions of chunks.
MAX_REPLY_WORDS = 4096


def _many_values(payload: dict[str, Any]) -> bool:
    """An embeddings request big enough to be worth a thread hop (JSON of many floats)."""
    inputs, dims = payload.get("input"), payload.get("dimensions")
    return (isinstance(inputs, list) and len(inputs) > 16) or (
        isinstance(dims, int) and dims > 2048
    )


async def call(instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
    """Serve one one-shot request with the stub's deterministic answers.

    Work that grows with the request (images, many embeddings, audio) runs in a worker thread.
    """
    match request.operation:
        case Operation.CHAT_COMPLETIONS:
            return chat_completion(request)
        case Operation.EMBEDDINGS if _many_values(request.payload):
            return await anyio.to_thread.run_sync(embeddings, instance, request.payload)
        case Operation.EMBEDDINGS:
            return embeddings(instance, request.payload)
        case Operation.IMAGE_GENERATION:
            return await anyio.to_thread.run_sync(image_generation, request.payload)
        case Operation.SPEECH_TO_TEXT:
            return await speech_to_text(instance, request)
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
        raise invalid(f"`stream` must be true or false, got {echo(stream)}")
    if _int_field(payload, "n", 1, 1, 128) != 1:
        raise invalid("the stub answers with one choice; leave `n` at 1")
    last_user, prompt_tokens = _messages(payload)
    tool_answer = None if stream else _tool_answer(payload, model, prompt_tokens)
    if tool_answer is not None:
        return tool_answer
    limit_key = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    limit = _int_field(payload, limit_key, 0, 1, 1 << 30)  # 0: no limit given
    words = ["stub:", *reversed(last_user.split())]
    finish = "stop"
    limit = min(limit or MAX_REPLY_WORDS, MAX_REPLY_WORDS)
    if len(words) > limit:
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


_INTEGER = re.compile(r"-?\d+")


def _tool_answer(payload: dict[str, Any], model: str, prompt_tokens: int) -> OneShotResponse | None:
    """The tool-calling rule of the module docstring, or None when it does not apply."""
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    messages: list[dict[str, Any]] = payload["messages"]
    last = messages[-1]
    if last.get("role") == "tool":
        content = f"stub: after tool {_text_of(last.get('content'), 'messages[-1]')}"
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        finish = "stop"
    else:
        numbers = _INTEGER.findall(_text_of(last.get("content"), "messages[-1]"))
        function = tools[0].get("function")
        name = function.get("name") if isinstance(function, dict) else tools[0].get("name")
        if last.get("role") != "user" or len(numbers) < 2 or not isinstance(name, str):
            return None
        arguments = msgspec.json.encode({"a": int(numbers[0]), "b": int(numbers[1])}).decode()
        call_id = f"call_stub{zlib.crc32(arguments.encode()):08x}"
        call = {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}  # fmt: skip
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        finish = "tool_calls"
    wire_usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                  "total_tokens": prompt_tokens + 1}  # fmt: skip
    answer = {
        "id": f"chatcmpl-stub{zlib.crc32(msgspec.json.encode(message)):08x}",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "stub",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": wire_usage,
    }
    return _ok(answer, Usage(input_tokens=prompt_tokens, output_tokens=1))


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
    if len(keys) * dimensions > MAX_EMBEDDING_VALUES:
        raise invalid(
            f"{len(keys)} inputs of {dimensions} dimensions is {len(keys) * dimensions} values; "
            f"the stub answers at most {MAX_EMBEDDING_VALUES} per request (send fewer inputs)"
        )
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise invalid(f"`encoding_format` must be 'float' or 'base64', got {echo(encoding)}")
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
