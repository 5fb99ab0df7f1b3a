"""The chat request of the `llama_cpp` kind: validation, and the OpenAI answer and SSE frames.

Validation refuses, with one-line InvalidRequest messages (HTTP 400), what a local text model
cannot honour: `n` other than 1, `tools`/`functions` unless `tool_choice`/`function_call` is
"none", `response_format` other than text, `logprobs`, `logit_bias`, audio output, and content
parts that are not text. Fields it does not read (`user`, `metadata`, `store`...) are ignored,
as the stub ignores them. The frames have exactly the stub's shape
(`spear_rt_backends.stub_oneshot`): a role chunk, content chunks, a finish chunk, a usage chunk
when `stream_options.include_usage`, then `[DONE]`; only `created` (the wall clock) and
`system_fingerprint` (the engine) differ, as they must for a real model.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from spear_rt.errors import echo
from spear_rt_backends.espeak_tts import invalid
from spear_rt_backends.stub_media import _int_field

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string: text that may start one is held back while streaming
CHARS_PER_TOKEN_BOUND = 32  # messages longer than n_ctx * this cannot fit: refused untokenized
TOOLS_REFUSED = (
    "this backend (a small local model) does not call tools: SmolLM2-135M cannot do so "
    "reliably; drop `tools` or send tool_choice 'none'"
)

_json = msgspec.json.Encoder()


class ChatJob(msgspec.Struct, frozen=True, kw_only=True):
    """A validated chat request: template-ready messages and sampling settings."""

    messages: list[dict[str, str]]
    model: str  # the name the answer reports
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(payload: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"`{key}` must be a number from {low:g} to {high:g}, got {echo(value)}")
    return float(value)


def _content(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of text parts (nothing else)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"`{where}.content` must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"`{where}.content[{i}]` must be an object with a `type`")
        if part["type"] not in ("text", "input_text"):
            raise invalid(
                f"`{where}.content[{i}]` is of type {echo(part['type'])}: this model reads "
                "text only"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"`{where}.content[{i}].text` must be a string")
        texts.append(text)
    return "".join(texts)


def parse_messages(payload: dict[str, Any], max_chars: int) -> list[dict[str, str]]:
    """`messages` as {role, content} strings the chat template renders ('developer' is system;
    an assistant turn that only called tools has empty content)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("you must provide `messages`: a non-empty list of {role, content} objects")
    out, chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"`{where}` must be an object with `role` and `content`")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"`{where}.role` must be one of {', '.join(ROLES)}, got {echo(role)}")
        content = message.get("content")
        if content is None and role != "assistant":
            raise invalid(f"`{where}.content` is required for a {role} message")
        text = "" if content is None else _content(content, where)
        chars += len(text)
        if chars > max_chars:
            raise invalid(
                f"`messages` hold over {max_chars} characters: more than this model's context "
                "window can take"
            )
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def _stop(payload: dict[str, Any]) -> tuple[str, ...]:
    stop = payload.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise invalid(
            f"`stop` must be a string or a list of at most {MAX_STOPS} non-empty strings of at "
            f"most {MAX_STOP_CHARS} characters, got {echo(stop)}"
        )
    return tuple(stops)


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    """InvalidRequest for fields whose asked behaviour a local text model cannot give."""
    if payload.get("tools") and payload.get("tool_choice", "auto") != "none":
        raise invalid(TOOLS_REFUSED)
    if payload.get("functions") and payload.get("function_call", "auto") != "none":
        raise invalid(TOOLS_REFUSED)
    if _int_field(payload, "n", 1, 1, 128) != 1:
        raise invalid("this backend answers with one choice; leave `n` at 1")
    fmt = payload.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid(
            f"`response_format` {echo(fmt)} is not supported here: this backend answers plain "
            "text only"
        )
    if payload.get("logprobs") or payload.get("top_logprobs") is not None:
        raise invalid("this backend does not return logprobs; leave `logprobs` unset")
    if payload.get("logit_bias"):
        raise invalid("this backend does not apply `logit_bias`; leave it unset")
    modalities = payload.get("modalities")
    if payload.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        raise invalid("this backend answers text only: no `audio` output")


def parse_chat(
    payload: dict[str, Any], *, models: tuple[str, ...], max_tokens: int, max_chars: int
) -> ChatJob:
    """Validate a chat completion request (module docstring); `max_tokens` caps the answer."""
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid(f"`stream` must be true or false, got {echo(stream)}")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise invalid("`stream_options` must be an object such as {'include_usage': true}")
    _refuse_unsupported(payload)
    model = payload.get("model")
    limit_key = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    limit = _int_field(payload, limit_key, 0, 1, 1 << 30)  # 0: not given
    seed = payload.get("seed")
    if seed is not None:
        seed = _int_field(payload, "seed", 0, -(1 << 63), (1 << 63) - 1) % (1 << 32)
    return ChatJob(
        messages=parse_messages(payload, max_chars),
        model=model if isinstance(model, str) and model in models else models[0],
        max_tokens=min(limit or max_tokens, max_tokens),
        temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(payload, "top_p", 1.0, 0.0, 1.0),
        frequency_penalty=_number(payload, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(payload, "presence_penalty", 0.0, -2.0, 2.0),
        stop=_stop(payload),
        seed=seed,
        stream=stream,
        include_usage=options.get("include_usage", False),
    )


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Frames:
    """The answer and SSE chunks of one completion, shaped as the stub's."""

    def __init__(self, model: str, fingerprint: str) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.model = model
        self.fingerprint = fingerprint
        self.created = int(time.time())  # a wire timestamp: OpenAI's seconds since the epoch

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def answer(self, content: str, finish: str, usage: dict[str, int]) -> bytes:
        """The whole `chat.completion` body."""
        message = {"role": "assistant", "content": content, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return _json.encode({**self._head("chat.completion"), "choices": [choice], "usage": usage})

    def chunk(
        self,
        delta: dict[str, str] | None,
        finish: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        """One `data:` frame; `delta` None gives the choice-less usage chunk."""
        chunk = self._head("chat.completion.chunk")
        chunk["choices"] = (
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if delta is not None
            else []
        )
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + _json.encode(chunk) + b"\n\n"

    def role(self) -> bytes:
        """The first chunk: the assistant's role, empty content."""
        return self.chunk({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        """A content delta."""
        return self.chunk({"content": text})

    def end(self, finish: str, usage: dict[str, int] | None) -> list[bytes]:
        """The finish chunk, the usage chunk when asked for, and `[DONE]`."""
        frames = [self.chunk({}, finish)]
        if usage is not None:
            frames.append(self.chunk(None, usage=usage))
        frames.append(b"data: [DONE]\n\n")
        return frames
