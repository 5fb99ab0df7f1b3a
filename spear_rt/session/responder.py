"""The responder of a conversation session: composes each response from routed stages.

One task per session (in the session's task group, both runners) takes the machine's
response actions. A `StartResponse` runs as a child task in its own cancel scope:

    routed chat stream --text--> machine (TextOut, at once)
            \\--> SentenceCutter --> sentences (capacity `sentences_ahead`)
                  --> speech task: routed text_to_speech per sentence, resampled and encoded
                      in a worker thread, sent as chunks of <= 100 ms (AudioOut)

so each sentence is synthesized while the next is generated, and the chat stream is pulled
only while fewer than `sentences_ahead` sentences wait for speech. Flow control: before each
output the responder waits until the session's outbound queue is back under its bound
(`host.wait_room`): a client that reads slowly slows generation; audio is never dropped.

A `CancelResponse` (barge-in, response.cancel; the machine has sent response.done already)
cancels the response's scope: the chat stream is closed, which aborts the upstream request,
and a speech request in flight is cancelled. Nothing of the response keeps running.
"""

from __future__ import annotations

import base64
import logging
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np

from spear_rt.audio import AudioFormat, InputFormat, encode_audio, resample
from spear_rt.backend import Pcm16
from spear_rt.config import ConversationConfig
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.metrics import MetricsRegistry
from spear_rt.session.conversation import (
    AudioOut,
    CancelResponse,
    ResponseEnded,
    ResponseOutput,
    StartResponse,
    TextOut,
    ToolCallOut,
)
from spear_rt.session.conversation_items import chat_tool_choice, chat_tools
from spear_rt.session.machine import SessionMachine
from spear_rt.session.sentences import SentenceCutter
from spear_rt.session.stages import ChatChunk, Stages

log = logging.getLogger(__name__)

CHUNK_MS = 100  # output audio delta size (at most)
INLINE = 96_000  # samples of pcm16 at the output rate chunked on the loop (~0.1 ms); else a thread


class ResponseHost(Protocol):
    """What the responder needs of its session's runner."""

    def after(self) -> None:
        """The machine changed: wake the writer."""
        ...

    async def wait_room(self) -> None:
        """Return once the outbound queue is at or under its bound (or the session closes)."""
        ...


def audio_chunks(pcm: Pcm16, rate_hz: int, fmt: InputFormat) -> list[tuple[str, float]]:
    """`pcm` at `rate_hz` in the output format, as base64 chunks of <= CHUNK_MS (CPU-bound)."""
    out_pcm = resample(pcm, rate_hz, fmt.rate_hz) if rate_hz != fmt.rate_hz else pcm
    step = fmt.rate_hz * CHUNK_MS // 1000
    chunks = []
    for start in range(0, out_pcm.size, step):
        piece = np.ascontiguousarray(out_pcm[start : start + step])
        encoded = base64.b64encode(encode_audio(fmt, piece)).decode("ascii")
        chunks.append((encoded, piece.size * 1000 / fmt.rate_hz))
    return chunks


class Responder:
    """Runs the responses a conversation machine starts (module docstring)."""

    def __init__(
        self,
        machine: SessionMachine,
        stages: Stages,
        host: ResponseHost,
        config: ConversationConfig,
        metrics: ConversationMetrics | None = None,
    ) -> None:
        self.machine = machine
        self._metrics = metrics
        self._stages = stages
        self._host = host
        self._config = config
        self._wakeup = anyio.Event()
        self._scopes: dict[str, anyio.CancelScope] = {}
        assert machine.conversation is not None  # a responder serves conversations only
        self._conversation = machine.conversation
        self._conversation.wake = self._wake

    def _wake(self) -> None:
        # Cancel at once, not when this task next runs: the machine has sent response.done,
        # and a speech task made runnable this tick must not start a request after it.
        actions = self._conversation.actions
        cancelled = {a.response_id for a in actions if isinstance(a, CancelResponse)}
        for response_id in cancelled:
            scope = self._scopes.pop(response_id, None)
            if scope is not None:
                scope.cancel()
        # a response cancelled before it started never starts
        self._conversation.actions = [
            a for a in actions if isinstance(a, StartResponse) and a.response_id not in cancelled
        ]
        self._wakeup.set()

    async def run(self) -> None:
        """Take actions until cancelled with the session."""
        async with anyio.create_task_group() as tg:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                actions, self._conversation.actions = self._conversation.actions, []
                for action in actions:
                    if isinstance(action, StartResponse):
                        scope = anyio.CancelScope()
                        self._scopes[action.response_id] = scope
                        tg.start_soon(self._respond, action, scope)

    def _out(self, out: ResponseOutput) -> None:
        self.machine.response_output(out)
        self._host.after()

    async def _respond(self, action: StartResponse, scope: anyio.CancelScope) -> None:
        timing = _Timing(action.turn_ended_at or anyio.current_time())
        status = "cancelled"  # unless the scope runs to its end
        with scope:
            try:
                ended = await self._cascade(action, timing)
                status = "incomplete" if ended.incomplete_reason else "completed"
            except Exception as exc:  # the speech task's failure comes in a group
                ended = self._failed(action.response_id, _leaf(exc), timing)
                status = "incomplete" if ended.interrupted else "failed"
            self._out(ended)
        self._scopes.pop(action.response_id, None)
        if self._metrics is not None:
            self._metrics.observe(status, timing, self._stages.names())

    def _failed(self, response_id: str, exc: BaseException, timing: _Timing) -> ResponseEnded:
        if isinstance(exc, BackendFailure) and exc.retryable and "first_text" in timing.marks:
            return ResponseEnded(response_id, interrupted=_one_line(exc))  # mid-answer
        if isinstance(exc, (BackendFailure, CanonicalFailure, TimeoutError)):
            return ResponseEnded(response_id, error=_one_line(exc))
        log.error(
            "session %s: a response failed", self.machine.session_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )  # fmt: skip
        message = "the server failed to compose the response"
        return ResponseEnded(response_id, error=message, code="internal_error")

    async def _cascade(self, action: StartResponse, timing: _Timing) -> ResponseEnded:
        send, receive = anyio.create_memory_object_stream[tuple[str, int]](
            self._config.sentences_ahead
        )
        async with anyio.create_task_group() as tg:
            if action.settings.audio_out:
                tg.start_soon(self._speak, action, receive, timing)
            else:
                receive.close()
            async with send:
                usage, finish = await self._generate(action, send, timing)
        spear: dict[str, Any] = {**self._stages.names(), **timing.report()}
        incomplete = "max_output_tokens" if finish == "length" else None
        return ResponseEnded(action.response_id, usage, incomplete_reason=incomplete, spear=spear)

    def _chat_payload(self, action: StartResponse) -> dict[str, Any]:
        settings = action.settings
        payload: dict[str, Any] = {
            "messages": action.messages,
            "temperature": settings.temperature,
            "max_tokens": settings.max_output_tokens or self._config.max_output_tokens,
        }
        if settings.tools and settings.tool_choice != "none":
            payload["tools"] = chat_tools(settings)
            payload["tool_choice"] = chat_tool_choice(settings)
        return payload

    async def _generate(
        self,
        action: StartResponse,
        sentences: anyio.abc.ObjectSendStream[tuple[str, int]],
        timing: _Timing,
    ) -> tuple[dict[str, int] | None, str | None]:
        rid = action.response_id
        cutter = SentenceCutter()
        spoken = action.settings.audio_out
        covered = 0  # transcript characters handed to speech so far
        calls: dict[int, tuple[str, str]] = {}  # tool call index -> (call_id, name)
        usage: dict[str, int] | None = None
        finish: str | None = None
        async with self._stages.chat(self._chat_payload(action)) as chunks:
            chunk: ChatChunk
            async for chunk in chunks:
                await self._host.wait_room()
                usage = chunk.usage or usage
                finish = chunk.finish_reason or finish
                if chunk.text:
                    timing.mark("first_text")
                    self._out(TextOut(rid, chunk.text))
                    if spoken:
                        for sentence in cutter.feed(chunk.text):
                            covered += len(sentence)
                            await sentences.send((sentence, covered))
                for call in chunk.tool_calls:
                    call_id, name = calls.get(call.index, (call.id or "", call.name or ""))
                    calls[call.index] = (call.id or call_id, call.name or name)
                    call_id, name = calls[call.index]
                    self._out(ToolCallOut(rid, call_id, name, call.arguments))
        rest = cutter.flush()
        if spoken and rest.strip():
            await sentences.send((rest, covered + len(rest)))
        return usage, finish

    async def _speak(
        self,
        action: StartResponse,
        sentences: anyio.abc.ObjectReceiveStream[tuple[str, int]],
        timing: _Timing,
    ) -> None:
        settings = action.settings
        covered = 0
        async with sentences:
            async for sentence, upto in sentences:
                await anyio.lowlevel.checkpoint_if_cancelled()  # handed over, then cancelled
                if not any(c.isalnum() for c in sentence):
                    covered = upto
                    continue
                pcm, rate = await self._stages.speech(sentence.strip(), settings.voice)
                fmt = settings.output_format
                if rate == fmt.rate_hz and fmt.format is AudioFormat.PCM16 and pcm.size <= INLINE:
                    chunks = audio_chunks(pcm, rate, fmt)  # base64 only: less than a thread hop
                else:
                    chunks = await anyio.to_thread.run_sync(audio_chunks, pcm, rate, fmt)
                for i, (audio, ms) in enumerate(chunks, 1):
                    await self._host.wait_room()
                    timing.mark("first_audio")
                    timing.audio_ms += ms
                    heard = covered + (upto - covered) * i // len(chunks)
                    self._out(AudioOut(action.response_id, audio, ms, heard))
                covered = upto


class ConversationMetrics:
    """The Prometheus series of conversation responses (one set per server)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        self.responses = registry.counter(
            "spear_conversation_responses_total", "Responses by how they ended", ("status",)
        )
        self.first_text = registry.histogram(
            "spear_conversation_first_text_seconds",
            "End of the user's turn (or response.create) to the answer's first text",
            ("chat_instance",),
        )
        self.voice_to_voice = registry.histogram(
            "spear_conversation_voice_to_voice_seconds",
            "End of the user's turn (or response.create) to the answer's first audio",
            ("chat_instance", "speech_instance"),
        )

    def observe(self, status: str, timing: _Timing, served: dict[str, str]) -> None:
        """Count one response; its latencies when it got that far."""
        self.responses.inc(status)
        chat = served.get("chat", "none")
        if (text := timing.seconds("first_text")) is not None:
            self.first_text.observe(text, chat)
        if (audio := timing.seconds("first_audio")) is not None:
            self.voice_to_voice.observe(audio, chat, served.get("speech", "none"))


class _Timing:
    """When a response's first text and audio went out, from the end of the user's turn."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.marks: dict[str, float] = {}
        self.audio_ms = 0.0

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = anyio.current_time()

    def seconds(self, name: str) -> float | None:
        at = self.marks.get(name)
        return at - self.since if at is not None else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_audio_seconds": round(self.audio_ms / 1000, 3)}
        for name, at in self.marks.items():
            out[f"{name}_ms"] = round((at - self.since) * 1000, 1)
        return out


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CanonicalFailure):
        return exc.error.message.splitlines()[0]
    if isinstance(exc, TimeoutError):
        return "a stage of the response did not answer in time"
    return (str(exc).splitlines() or ["the backend failed"])[0]
