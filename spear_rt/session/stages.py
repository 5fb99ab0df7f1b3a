"""The routed stages of a cascaded response: streaming chat and speech, as one-shot requests.

Each stage is a one-shot operation of the shared registry, sent exactly as the HTTP edge sends
it: normalized (`normalize_json`, so features such as tools narrow the routing), admitted
against the client key's limits and budget, run by the executor (policy, fallback, retry
budget, breaker feedback, metrics), and charged. A chat stream is the backend's SSE bytes,
parsed here into `ChatChunk`s; closing it (a cancelled response) aborts the upstream request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import msgspec

from spear_rt.audio.files import AudioLimits, decode_audio_bytes, pcm16_wav
from spear_rt.backend import OneShotResponse, Pcm16
from spear_rt.config import ConversationConfig
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import ErrorCode, Operation, Usage
from spear_rt.normalize import InvalidInput, Normalized, normalize_json
from spear_rt.registry import RegisteredInstance
from spear_rt.router import Router
from spear_rt.router.execute import Executor
from spear_rt.session.machine import new_id

MAX_SSE_LINE_BYTES = 1 << 20  # one `data:` line of a chat stream
MAX_SPEECH_BYTES = 32 << 20  # one sentence's synthesized audio file
_SPEECH_LIMITS = AudioLimits(max_seconds=120.0, max_samples=120 * 48_000)
_NO_INSTANCE = (ErrorCode.NO_CANDIDATE_BACKEND, ErrorCode.MISSING_CAPABILITIES)


class ToolCallDelta(msgspec.Struct, frozen=True):
    """A piece of a streamed tool call (OpenAI's `delta.tool_calls[]`)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ChatChunk(msgspec.Struct, frozen=True):
    """One streamed chat completion chunk, reduced to what a response needs."""

    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class Stages(Protocol):
    """What a responder needs: a chat stream and speech for a sentence."""

    def chat(self, payload: dict[str, Any]) -> Any:
        """An async context manager yielding an async iterator of `ChatChunk`."""
        ...

    async def speech(self, text: str, voice: str) -> tuple[Pcm16, int]:
        """Synthesize `text`: mono int16 samples and their rate."""
        ...

    def names(self) -> dict[str, str]:
        """The instances that served the last chat and speech requests."""
        ...


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: dict[str, Any] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


def parse_chunk(data: bytes) -> ChatChunk | None:
    """One SSE `data:` payload as a ChatChunk (None for `[DONE]`); BackendFailure if garbled."""
    if data.strip() == b"[DONE]":
        return None
    try:
        chunk = _chunk_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise BackendFailure("the chat backend streamed a chunk that is not JSON") from None
    text, calls, finish = "", [], None
    for choice in chunk.choices[:1]:
        text = choice.delta.content or ""
        finish = choice.finish_reason
        for call in choice.delta.tool_calls or ():
            fn = call.get("function") or {}
            calls.append(
                ToolCallDelta(
                    index=int(call.get("index", 0)),
                    id=call.get("id"),
                    name=fn.get("name"),
                    arguments=fn.get("arguments") or "",
                )
            )
    usage = None
    if chunk.usage:
        usage = {
            "input_tokens": int(chunk.usage.get("prompt_tokens", 0)),
            "output_tokens": int(chunk.usage.get("completion_tokens", 0)),
        }
    return ChatChunk(text, tuple(calls), finish, usage)


async def sse_chunks(stream: AsyncIterator[bytes]) -> AsyncIterator[ChatChunk]:
    """Parse SSE bytes (any framing) into ChatChunks, up to `[DONE]`; a stream that ends
    before it (and before a finish_reason) is a retryable BackendFailure, never an answer."""
    buffer = b""
    finished = False
    async for data in stream:
        buffer += data
        if len(buffer) > MAX_SSE_LINE_BYTES and b"\n" not in buffer:
            raise BackendFailure("the chat backend streamed an over-long line")
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            chunk = parse_chunk(line[5:])
            if chunk is None:
                return
            finished = finished or chunk.finish_reason is not None
            yield chunk
    if not finished:
        raise BackendFailure("the chat stream ended before its end ([DONE])", retryable=True)


class RoutedStages:
    """Chat and speech through the router and executor, as one client key's requests."""

    def __init__(
        self,
        router: Callable[[], Router],
        executor: Executor,
        config: ConversationConfig,
        client_key_id: str | None,
    ) -> None:
        self._router = router
        self._executor = executor
        self._config = config
        self._key = client_key_id
        self._served: dict[str, str] = {}

    def names(self) -> dict[str, str]:
        """The instances that served the last chat and speech requests."""
        return dict(self._served)

    def _normalized(
        self, op: Operation, payload: dict[str, Any], backend: str | None
    ) -> Normalized:
        hints: dict[str, str | None] = {"backend": backend}
        try:
            return normalize_json(
                op, msgspec.json.encode(payload), request_id=new_id("req"), hints=hints,
                client_key_id=self._key,
            )  # fmt: skip
        except InvalidInput as exc:
            raise BackendFailure(f"the {op} request was refused: {exc}") from None

    async def _run(self, normalized: Normalized, stage: str) -> OneShotResponse:
        envelope = normalized.envelope
        router = self._router()
        await router.admit_shared(envelope)

        async def call(instance: RegisteredInstance) -> OneShotResponse:
            assert instance.kind is not None
            with anyio.fail_after(self._config.stage_timeout_s):
                return await instance.kind.call(instance.info, normalized.for_model(instance.model))

        done = await self._executor.run(envelope, call, idempotent=True)
        self._served[stage] = done.instance.name
        if getattr(done.instance.kind, "stub", False):
            self._served[f"{stage}_stub"] = "true"
        await router.charge_shared(envelope, done.instance, done.result.usage or Usage())
        return done.result

    async def _run_with_fallback(
        self, op: Operation, payload: dict[str, Any], backend: str | None, stage: str
    ) -> OneShotResponse:
        try:
            return await self._run(self._normalized(op, payload, backend), stage)
        except CanonicalFailure as exc:
            fallback = self._config.fallback_backend
            if not fallback or exc.error.code not in _NO_INSTANCE:
                raise
            # the config names a fallback explicitly (the default names the stub)
            return await self._run(self._normalized(op, payload, fallback), stage)

    @asynccontextmanager
    async def chat(self, payload: dict[str, Any]) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        """A routed streaming chat completion; leaving the block closes (aborts) it."""
        payload = {"model": self._config.chat_model or "default", **payload, "stream": True,
                   "stream_options": {"include_usage": True}}  # fmt: skip
        response = await self._run_with_fallback(
            Operation.CHAT_COMPLETIONS, payload, self._config.chat_backend, "chat"
        )
        if response.stream is None:
            raise BackendFailure("the chat backend answered without streaming")
        stream = response.stream
        try:
            yield sse_chunks(stream)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def speech(self, text: str, voice: str) -> tuple[Pcm16, int]:
        """A routed text_to_speech request for one sentence, decoded (in a worker thread)."""
        payload = {"model": self._config.speech_model or "default", "input": text,
                   "voice": voice, "response_format": "wav"}  # fmt: skip
        response = await self._run_with_fallback(
            Operation.TEXT_TO_SPEECH, payload, self._config.speech_backend, "speech"
        )
        body = response.body
        if len(body) > MAX_SPEECH_BYTES:
            raise BackendFailure("the speech backend answered more audio than a sentence needs")
        plain = pcm16_wav(body)  # the usual answer: no decoder, no thread hop
        if plain is not None:
            return plain
        try:
            return await anyio.to_thread.run_sync(
                decode_audio_bytes, body, "speech.wav", _SPEECH_LIMITS
            )
        except ValueError as exc:
            raise BackendFailure(f"the speech backend's audio is unreadable: {exc}") from None
