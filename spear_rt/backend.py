"""The small interface every backend kind implements (the only part of spear_rt they import).

A *kind* is an implementation registered under the entry-point group ``spear_rt.backends``;
an *instance* is a configured endpoint of a kind. For realtime transcription a kind opens a
`TranscriptionUpstream` per session: the session sends it commands (audio at the upstream's
rate, commit, clear) and reads append-only transcript events back.

Contract of a transcription upstream:

* audio arrives as ``AppendAudio`` (int16 mono at ``input_rate_hz``) for the *current turn*;
* ``Commit(item_id)`` ends the turn: the upstream emits zero or more ``TranscriptDelta`` and
  exactly one ``TranscriptCompleted`` (or ``TranscriptFailed``) for that ``item_id``;
* ``Clear`` drops the current turn's audio; nothing is emitted for it;
* deltas of one item are append-only: their concatenation equals the completed transcript.
  Deltas may arrive *before* the commit (live partials), tagged with the ``item_id`` the
  session announced in ``BeginTurn``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import numpy as np
from anyio.streams.memory import MemoryObjectSendStream
from numpy.typing import NDArray

from spear_rt.ir import Feature, Hosting, Limits, Operation, Transport, Usage

Pcm16 = NDArray[np.int16]


class InstanceDefaults(msgspec.Struct, frozen=True):
    """Capabilities a kind declares; an instance's config may narrow or override them."""

    ops: frozenset[Operation]
    features: frozenset[Feature] = frozenset()
    transports: frozenset[Transport] = frozenset({Transport.IN_PROCESS})
    hosting: Hosting = Hosting.LOCAL
    limits: Limits = Limits()


class Secret:
    """A credential value that never shows itself in repr, str, logs or errors."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself, for the one place that sends it upstream."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class InstanceInfo(msgspec.Struct, frozen=True):
    """What a kind may know of the instance it serves; the key is a `Secret`."""

    name: str
    model: str | None = None
    base_url: str | None = None
    api_key: Secret | None = None
    options: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)


class TranscriptionSpec(msgspec.Struct, frozen=True):
    """What the session asks of a transcription upstream."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


# --- commands: session -> upstream ------------------------------------------------------------


class BeginTurn(msgspec.Struct, frozen=True):
    """A new turn starts; live deltas for it carry `item_id`."""

    item_id: str


class AppendAudio(msgspec.Struct, frozen=True):
    """Audio of the current turn, int16 mono at the upstream's `input_rate_hz`."""

    pcm: Pcm16


class Commit(msgspec.Struct, frozen=True):
    """End the current turn; its transcript belongs to `item_id`."""

    item_id: str


class Clear(msgspec.Struct, frozen=True):
    """Drop the current turn's audio."""


# Conversation commands, for a speech-to-speech upstream (`ConversationUpstream`). Items and
# session fields are GA-shaped wire dicts (ids are the session's); the upstream renders them
# in its own dialect.


class UpdateConversation(msgspec.Struct, frozen=True):
    """The conversation's settings now (instructions, voice, tools, output format...)."""

    session: dict[str, Any]


class CreateItem(msgspec.Struct, frozen=True):
    """Add `item` (its `id` is ours) after `previous_item_id` (None: last)."""

    item: dict[str, Any]
    previous_item_id: str | None = None


class DeleteItem(msgspec.Struct, frozen=True):
    """Remove item `item_id` from the upstream's conversation."""

    item_id: str


class TruncateItem(msgspec.Struct, frozen=True):
    """Cut assistant item `item_id`'s audio at `audio_end_ms` (what the user heard)."""

    item_id: str
    content_index: int
    audio_end_ms: int


class CreateResponse(msgspec.Struct, frozen=True):
    """Generate response `response_id` (ours) with `response` overrides (GA-shaped)."""

    response_id: str
    response: dict[str, Any]


class StopResponse(msgspec.Struct, frozen=True):
    """Stop generating `response_id` (ours); nothing more of it is wanted."""

    response_id: str


ConversationCommand = (
    UpdateConversation | CreateItem | DeleteItem | TruncateItem | CreateResponse | StopResponse
)
UpstreamCommand = BeginTurn | AppendAudio | Commit | Clear | ConversationCommand


# --- events: upstream -> session --------------------------------------------------------------


class TranscriptDelta(msgspec.Struct, frozen=True):
    """Text appended to `item_id`'s transcript (never a retraction)."""

    item_id: str
    delta: str


class TranscriptCompleted(msgspec.Struct, frozen=True):
    """The final transcript of `item_id`: the concatenation of its deltas."""

    item_id: str
    transcript: str


class TranscriptFailed(msgspec.Struct, frozen=True):
    """`item_id` could not be transcribed; `retryable` tells whether a reconnect may help."""

    item_id: str
    message: str
    retryable: bool = False


class UpstreamReconnected(msgspec.Struct, frozen=True):
    """The session's upstream dropped and was reopened; unfinished turns were replayed."""

    instance: str  # the instance now serving the session
    attempts: int  # connection attempts it took
    downtime_s: float  # from noticing the drop to the replay being sent
    replayed_items: tuple[str, ...] = ()  # turns whose audio was sent again


# The output of a response, from a responder (cascade) or a speech-to-speech upstream.


class TextOut(msgspec.Struct, frozen=True):
    """Text (or the transcript of audio to come) of the current response."""

    response_id: str
    delta: str
    item_id: str | None = None  # the output item it belongs to (None: the writer names it)


class AudioOut(msgspec.Struct, frozen=True):
    """A chunk of output audio, base64 in the output format; it covers the transcript's
    first `upto_chars` characters once played."""

    response_id: str
    audio: str
    ms: float
    upto_chars: int
    item_id: str | None = None


class ToolCallOut(msgspec.Struct, frozen=True):
    """A tool call of the current response (arguments arrive in pieces)."""

    response_id: str
    call_id: str
    name: str
    arguments_delta: str = ""
    item_id: str | None = None


class ResponseEnded(msgspec.Struct, frozen=True):
    """The responder finished `response_id` (error: it failed)."""

    response_id: str
    usage: dict[str, int] | None = None
    error: str | None = None
    code: str = "response_failed"
    incomplete_reason: str | None = None
    # a stage failed after the answer had begun: ends incomplete and is created again, once
    interrupted: str | None = None
    spear: dict[str, Any] | None = None


ResponseOutput = TextOut | AudioOut | ToolCallOut | ResponseEnded
UpstreamEvent = (
    TranscriptDelta | TranscriptCompleted | TranscriptFailed | UpstreamReconnected | ResponseOutput
)


class EventQueue:
    """Events an in-process upstream has produced, waiting for its session.

    Bounded by count: an upstream checks `full` before taking more work (its `send_nowait`
    returns False) and its `send` waits in `wait_space` until the session has read an event
    or the upstream itself calls `wake_senders`. Nothing is ever dropped.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._events: deque[UpstreamEvent] = deque()
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def full(self) -> bool:
        """True while `limit` events are unread."""
        return len(self._events) >= self.limit

    def put(self, event: UpstreamEvent) -> None:
        """Queue an event for the session."""
        self._events.append(event)
        self._ready.set()

    async def get(self) -> UpstreamEvent:
        """The next event; EndOfStream once closed and empty."""
        while not self._events:
            if self._closed:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()
        event = self._events.popleft()
        self._space.set()
        return event

    async def wait_space(self) -> None:
        """Wait until an event is read (or `wake_senders`); callers re-check their own bound."""
        self._space = anyio.Event()
        await self._space.wait()

    def wake_senders(self) -> None:
        """Let waiting senders re-check (the upstream freed some other resource)."""
        self._space.set()

    def close(self) -> None:
        """End the stream: `get` raises EndOfStream once the queue is empty."""
        self._closed = True
        self._ready.set()
        self._space.set()


class QueuedUpstream:
    """`send` and `receive` of an in-process upstream whose `send_nowait` applies a command at
    once (or returns False, having done nothing) and whose events wait in `_events`."""

    _events: EventQueue

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Apply `command` now; False while the upstream is behind (a subclass decides)."""
        raise NotImplementedError

    async def send(self, command: UpstreamCommand) -> None:
        """Like `send_nowait`, waiting while the upstream is behind: nothing is dropped."""
        while not self.send_nowait(command):
            await self._events.wait_space()

    async def receive(self) -> UpstreamEvent:
        """Next transcript event; EndOfStream once closed."""
        return await self._events.get()


class Decoder(Protocol):
    """An upstream whose decodes run in its own `decode_loop` task until it is closed."""

    async def decode_loop(self) -> None:
        """Run decodes as work arrives, forever."""
        ...

    def close(self) -> None:
        """End the event stream."""
        ...


@asynccontextmanager
async def decoding(upstream: Decoder) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Run `upstream.decode_loop` while the block runs (its task group is yielded, for other
    per-session tasks); then close the upstream's events and stop the loop."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(upstream.decode_loop)
        try:
            yield tg
        finally:
            upstream.close()
            tg.cancel_scope.cancel()


class TranscriptionUpstream(Protocol):
    """One session's connection to a transcription engine or service.

    An upstream may also offer a synchronous fast path, `send_nowait(command) -> bool`: apply
    the command without waiting, or return False (having done nothing) when it would have to
    wait, in which case the caller falls back to `await send(command)`. Callback-driven
    session drivers use it to keep the per-frame path free of task switches.
    """

    input_rate_hz: int

    async def send(self, command: UpstreamCommand) -> None:
        """Deliver one command; may wait when the upstream applies backpressure."""
        ...

    async def receive(self) -> UpstreamEvent:
        """Next event; raises `anyio.EndOfStream` once the upstream is closed."""
        ...


# --- one-shot operations -----------------------------------------------------------------------


class AudioInput(msgspec.Struct, frozen=True):
    """Audio sent for transcription: the file as uploaded, and its samples once decoded."""

    data: bytes
    filename: str
    content_type: str
    pcm: Pcm16 | None = None  # mono int16, decoded once at the edge
    rate_hz: int = 0


class OneShotRequest(msgspec.Struct, frozen=True):
    """A one-shot operation as a backend receives it.

    `payload` holds the OpenAI-shaped request fields (JSON body, or the form fields of a
    transcription upload). `raw_body` is the client's JSON body exactly as sent, so a
    pass-through backend can forward it without re-encoding when `payload` is unchanged
    (`raw_body` is None when the edge changed something, e.g. the model name).
    """

    operation: Operation
    payload: dict[str, Any]
    raw_body: bytes | None = None
    audio: AudioInput | None = None
    stream: bool = False
    timeout_s: float | None = None


class OneShotResponse(msgspec.Struct):
    """A backend's answer: a complete body, or a stream of already-framed SSE bytes.

    A stream is consumed by the edge one chunk at a time (backpressure: the next chunk is
    pulled only after the previous one was written) and closed (`aclose`) when the client
    goes away, which must cancel the upstream request.
    """

    content_type: str = "application/json"
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    usage: Usage | None = None
    status: int = 200


class BackendKind(Protocol):
    """An implementation of one or more operations, loaded by entry point.

    A kind implements `open_transcription` when it serves realtime sessions and `call` when
    it serves one-shot operations; the registry only routes an operation to instances whose
    declared `ops` include it.
    """

    name: str
    extra: str | None  # the pip extra that provides its dependencies
    defaults: InstanceDefaults

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Why this instance cannot serve right now (missing engine, binary...), or None."""
        ...

    def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Open a streaming transcription upstream for one session."""
        ...

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """Serve one one-shot request; raise `BackendFailure` (retryable, status) on failure."""
        ...


class ConversationKind(Protocol):
    """A kind whose instances hold whole conversations (speech-to-speech, `open_conversation`).

    The upstream takes the transcription commands for the user's audio (the user's turns
    become items of its conversation) and `ConversationCommand`s; it emits transcript events
    for the user's turns and `ResponseOutput` under the session's response and item ids.
    """

    def open_conversation(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Open a speech-to-speech upstream for one conversation session."""
        ...


class StreamingRecognizer(Protocol):
    """A synchronous local speech recognizer, one utterance at a time.

    Runs in a worker thread (see `spear_rt.local_asr`). Hypotheses may revise earlier words;
    the adapter turns them into append-only deltas with the stable-prefix rule.
    """

    sample_rate_hz: int

    def start_utterance(self) -> None:
        """Begin a new utterance."""
        ...

    def feed(self, pcm: Pcm16) -> str | None:
        """Feed audio; return the current full hypothesis, or None when unchanged."""
        ...

    def end_utterance(self) -> str:
        """Finish the utterance and return its final hypothesis."""
        ...

    def close(self) -> None:
        """Release the engine."""
        ...


def words(text: str) -> Sequence[str]:
    """Split a transcript into words the way every transcript comparison here does."""
    return text.split()


_LIMITERS: anyio.lowlevel.RunVar[dict[str, anyio.CapacityLimiter]] = anyio.lowlevel.RunVar(
    "spear_backend_limiters"
)


def loop_limiter(key: str, total: int) -> anyio.CapacityLimiter:
    """The CapacityLimiter named `key` of the running event loop (created with `total`).

    A kind is one object per process while a limiter belongs to one event loop: tests, and a
    process that runs loops one after another, would otherwise reuse a dead loop's limiter.
    """
    try:
        limiters = _LIMITERS.get()
    except LookupError:
        limiters = {}
        _LIMITERS.set(limiters)
    limiter = limiters.get(key)
    if limiter is None:
        limiter = limiters[key] = anyio.CapacityLimiter(total)
    return limiter


def waits_idle(tx: MemoryObjectSendStream[Any]) -> bool:
    """A receiver waits on `tx` and nothing is buffered (an item handed to a receiver that
    has not woken yet counts as buffered): what `set_sink`'s callers check before handing an
    event over directly, so that events keep their order.

    Read from the stream's state rather than `statistics()`, which builds a tuple of six
    counts; this runs for every upstream event of a relayed session.
    """
    state = tx._state  # anyio's state, shared by the stream's clones
    return not state.buffer and bool(state.waiting_receivers)
