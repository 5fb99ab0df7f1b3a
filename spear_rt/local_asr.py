"""Run a synchronous `StreamingRecognizer` as an async `TranscriptionUpstream` (anyio).

Layout, per session::

    send() -> [command queue, bounded in bytes] -> worker task -> to_thread(batch) -> recognizer
                                                        |
    receive() <- [event stream, bounded in events] <----+

* **Backpressure, never a drop.** `send` waits while queued *and in-flight* audio exceeds
  ``max_pending_audio_bytes``; the worker waits while the event stream is full. So a session
  that stops reading events ends up blocked in `send`, and stops reading its client.
* **One thread hop per batch.** The worker takes everything queued since its last hop (up to
  `_MAX_BATCH_BYTES` of audio), runs it through `_TurnDriver.apply` in a worker thread, then
  emits the resulting events in order. Consecutive audio is fed in one `feed` call.
* **The recognizer is only touched in worker threads**, one call at a time: created there (an
  engine load takes ~0.5 s and must not block the event loop), used, and closed there.
* **Closing** the context cancels the worker. A thread call in progress is not abandoned: it
  finishes (at most one bounded batch), its events are dropped, then the recognizer is closed.
* An engine that holds the GIL while it decodes stalls the event loop for as long as each call
  into it lasts, so a recognizer should feed its engine in small pieces (pocketsphinx_live: 20 ms).

Turn rules (`_TurnDriver`): `BeginTurn` names the current turn (audio already sent for it is
kept); the utterance starts lazily with its first audio; `Commit(item_id)` ends it and emits the
last delta plus exactly one `TranscriptCompleted` -- or one `TranscriptFailed` if the recognizer
raised during the turn -- under the **Commit's** item id (the session is expected to repeat the
BeginTurn id; if it does not, the Commit's wins). Live deltas go out under the BeginTurn id;
before any BeginTurn they are held and sent with the commit. `Clear` ends and discards the
utterance. A recognizer exception fails the current turn only; the recognizer is closed and a
new one is made for the next turn.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import msgspec
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    Pcm16,
    StreamingRecognizer,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionUpstream,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.stable_prefix import (
    DEFAULT_AGREEMENT,
    DEFAULT_HOLD_BACK,
    DEFAULT_MIN_STABLE_MS,
    StablePrefix,
)

log = logging.getLogger(__name__)

# A control command costs this much queue room, so a flood of commits/clears is bounded too.
_CONTROL_COST = 64
# Audio per thread hop: bounds how long closing waits for a hop in progress (~2 s at 16 kHz).
_MAX_BATCH_BYTES = 64 * 1024


def _cost(command: UpstreamCommand) -> int:
    return command.pcm.nbytes if isinstance(command, AppendAudio) else _CONTROL_COST


class LocalStatistics(msgspec.Struct, frozen=True):
    """Queue occupancy of one local upstream (for metrics and tests); bytes include in-flight."""

    pending_bytes: int
    max_pending_bytes: int
    pending_commands: int
    waiting_senders: int


class _CommandQueue:
    """FIFO of commands bounded in bytes (audio bytes, `_CONTROL_COST` per control command).

    Overflow policy: `put` waits until the command fits; nothing is ever dropped. Bytes stay
    counted until the worker has *processed* a batch (`release`), so the bound covers audio in
    flight too. A single command larger than the bound is accepted when the queue is empty
    (otherwise it could never be sent).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[UpstreamCommand] = deque()
        self._bytes = 0
        self._waiting = 0
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _fits(self, size: int) -> bool:
        return not self._bytes or self._bytes + size <= self.max_bytes

    def put_nowait(self, command: UpstreamCommand) -> bool:
        """Queue `command` if it fits and nobody is waiting ahead of it; else do nothing."""
        size = _cost(command)
        if self._waiting or not self._fits(size):
            return False
        self._items.append(command)
        self._bytes += size
        self._notify()
        return True

    async def put(self, command: UpstreamCommand) -> None:
        """Queue `command`, waiting until it fits."""
        size = _cost(command)
        while not self._fits(size):
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1
        self._items.append(command)
        self._bytes += size
        self._notify()

    async def take_batch(self) -> tuple[list[UpstreamCommand], int]:
        """Wait for commands; take those queued (up to `_MAX_BATCH_BYTES`, at least one)."""
        while not self._items:
            await self._changed.wait()
        batch: list[UpstreamCommand] = []
        size = 0
        while self._items and (not batch or size + _cost(self._items[0]) <= _MAX_BATCH_BYTES):
            command = self._items.popleft()
            batch.append(command)
            size += _cost(command)
        return batch, size

    def release(self, size: int) -> None:
        """Free the room of a processed batch."""
        self._bytes -= size
        self._notify()

    def statistics(self) -> LocalStatistics:
        return LocalStatistics(self._bytes, self.max_bytes, len(self._items), self._waiting)


class _TurnDriver:
    """The synchronous side, called in worker threads one call at a time: commands -> events."""

    def __init__(
        self,
        make_recognizer: Callable[[], StreamingRecognizer],
        rate_hz: int,
        prefix: StablePrefix,
    ) -> None:
        self._make = make_recognizer
        self._rate_hz = rate_hz
        self._prefix = prefix
        self._recognizer: StreamingRecognizer | None = None
        self._item_id: str | None = None  # from BeginTurn
        self._in_utterance = False
        self._samples = 0  # audio fed in this utterance: the stable-prefix clock
        self._failure: str | None = None  # why the current turn failed
        self._held = ""  # deltas committed before any BeginTurn named the turn

    def apply(self, batch: list[UpstreamCommand]) -> list[UpstreamEvent]:
        """Apply commands in order; consecutive audio goes to the recognizer in one `feed`."""
        out: list[UpstreamEvent] = []
        audio: list[Pcm16] = []
        for command in batch:
            if isinstance(command, AppendAudio):
                audio.append(command.pcm)
                continue
            self._feed(audio, out)
            audio = []
            match command:
                case BeginTurn(item_id=item_id):
                    self._item_id = item_id
                    if self._held:
                        out.append(TranscriptDelta(item_id, self._held))
                        self._held = ""
                case Commit(item_id=item_id):
                    self._commit(item_id, out)
                case Clear():
                    self._end_turn()
        self._feed(audio, out)
        return out

    def prepare(self) -> None:
        """Create the recognizer ahead of the first turn (a failure shows at that turn)."""
        self._recognizer_or_fail()

    def close(self) -> None:
        """Close the recognizer, ending an open utterance first."""
        self._drop_recognizer()

    def _recognizer_or_fail(self) -> StreamingRecognizer | None:
        if self._recognizer is None and self._failure is None:
            try:
                recognizer = self._make()
            except Exception as exc:
                self._fail("could not start the recognizer", exc)
                return None
            if recognizer.sample_rate_hz != self._rate_hz:
                recognizer.close()
                self._failure = f"recognizer at {recognizer.sample_rate_hz} Hz, not {self._rate_hz}"
                return None
            self._recognizer = recognizer
        return self._recognizer

    def _feed(self, chunks: list[Pcm16], out: list[UpstreamEvent]) -> None:
        if not chunks:
            return
        recognizer = self._recognizer_or_fail()
        if recognizer is None:
            return  # the turn has failed: its audio is dropped, the Commit reports it
        pcm = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        try:
            if not self._in_utterance:
                recognizer.start_utterance()
                self._in_utterance = True
            hypothesis = recognizer.feed(pcm)
        except Exception as exc:
            self._fail("recognizer failed", exc)
            return
        self._samples += pcm.size
        # Even an unchanged hypothesis (None) may commit words: they have held for longer.
        delta = self._prefix.update(hypothesis, audio_ms=self._samples * 1000 / self._rate_hz)
        if not delta:
            return
        if self._item_id is None:
            self._held += delta
        else:
            out.append(TranscriptDelta(self._item_id, delta))

    def _commit(self, item_id: str, out: list[UpstreamEvent]) -> None:
        final = ""
        if self._in_utterance and self._recognizer is not None and self._failure is None:
            try:
                final = self._recognizer.end_utterance()
            except Exception as exc:
                self._fail("recognizer failed", exc)
            self._in_utterance = False
        if self._failure is not None:
            out.append(TranscriptFailed(item_id, self._failure, retryable=False))
        else:
            delta, transcript = self._prefix.finish(final)
            if self._held + delta:
                out.append(TranscriptDelta(item_id, self._held + delta))
            out.append(TranscriptCompleted(item_id, transcript))
        self._end_turn()

    def _end_turn(self) -> None:
        """Forget the turn (after Commit, on Clear); a failed recognizer is replaced."""
        if self._in_utterance and self._recognizer is not None:
            try:
                self._recognizer.end_utterance()  # result discarded
            except Exception as exc:
                self._fail("recognizer failed", exc)
        self._in_utterance = False
        self._samples = 0
        self._prefix.reset()
        self._item_id = None
        self._held = ""
        self._failure = None

    def _fail(self, what: str, exc: Exception) -> None:
        # Engine details stay in the log; the client sees what failed, not a traceback.
        log.warning("local ASR: %s", what, exc_info=exc)
        self._failure = f"{what} ({type(exc).__name__})"
        self._in_utterance = False
        self._drop_recognizer()

    def _drop_recognizer(self) -> None:
        recognizer, self._recognizer = self._recognizer, None
        ending, self._in_utterance = self._in_utterance, False
        if recognizer is None:
            return
        try:
            if ending:
                recognizer.end_utterance()  # its result is not wanted
        except Exception:
            log.warning("local ASR: ending an utterance failed", exc_info=True)
        try:
            recognizer.close()
        except Exception:
            log.warning("local ASR: closing the recognizer failed", exc_info=True)


class LocalTranscription:
    """The `TranscriptionUpstream` handed out by `open_local_transcription`."""

    def __init__(
        self,
        input_rate_hz: int,
        queue: _CommandQueue,
        events: MemoryObjectReceiveStream[UpstreamEvent],
    ) -> None:
        self.input_rate_hz = input_rate_hz
        self._queue = queue
        self._events = events
        self._closed = False

    def _check(self, command: UpstreamCommand) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if isinstance(command, AppendAudio) and (
            command.pcm.dtype != np.int16 or command.pcm.ndim != 1
        ):
            raise ValueError("AppendAudio.pcm must be a 1-D int16 array")

    async def send(self, command: UpstreamCommand) -> None:
        """Queue one command; waits while the queue is full (see `_CommandQueue`)."""
        self._check(command)
        await self._queue.put(command)

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Queue one command without waiting; False (nothing done) when `send` would wait."""
        self._check(command)
        return self._queue.put_nowait(command)

    async def receive(self) -> UpstreamEvent:
        """Next event in order; `anyio.EndOfStream` once the upstream is closed."""
        try:
            return await self._events.receive()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    def statistics(self) -> LocalStatistics:
        """Current queue occupancy."""
        return self._queue.statistics()


@asynccontextmanager
async def open_local_transcription(
    make_recognizer: Callable[[], StreamingRecognizer],
    *,
    limiter: anyio.CapacityLimiter | None,
    input_rate_hz: int = 16000,
    max_pending_audio_bytes: int = 1 << 20,
    max_pending_events: int = 64,
    min_stable_ms: float = DEFAULT_MIN_STABLE_MS,
    agreement: int = DEFAULT_AGREEMENT,
    hold_back: int = DEFAULT_HOLD_BACK,
) -> AsyncIterator[TranscriptionUpstream]:
    """Serve `make_recognizer()`'s recognizer as an upstream until the context exits.

    `limiter` caps the worker threads all sessions of an engine instance share (None: anyio's
    default). `send` waits once `max_pending_audio_bytes` are queued or being decoded, the
    worker once `max_pending_events` events are unread. The last three parameters are the
    stable-prefix rule's. An exception raised by the body leaves the context as itself.
    """
    queue = _CommandQueue(max_pending_audio_bytes)
    prefix = StablePrefix(min_stable_ms=min_stable_ms, agreement=agreement, hold_back=hold_back)
    driver = _TurnDriver(make_recognizer, input_rate_hz, prefix)
    events_tx, events_rx = anyio.create_memory_object_stream[UpstreamEvent](max_pending_events)
    upstream = LocalTranscription(input_rate_hz, queue, events_rx)
    raised: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_work, queue, driver, events_tx, limiter)
            try:
                yield upstream
            except BaseException as exc:  # re-raised below as itself, not in an ExceptionGroup
                raised = exc
            finally:
                upstream._closed = True
                tg.cancel_scope.cancel()
    finally:
        events_rx.close()
        # The worker is gone, so no thread call can be using the recognizer any more.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(driver.close)  # cheap: no limiter token needed
    if raised is not None:
        raise raised


async def _work(
    queue: _CommandQueue,
    driver: _TurnDriver,
    events: MemoryObjectSendStream[UpstreamEvent],
    limiter: anyio.CapacityLimiter | None,
) -> None:
    async with events:
        await anyio.to_thread.run_sync(driver.prepare, limiter=limiter)
        while True:
            batch, size = await queue.take_batch()
            # Not abandoned on cancel: the hop finishes, then cancellation drops its events.
            out = await anyio.to_thread.run_sync(driver.apply, batch, limiter=limiter)
            queue.release(size)
            for event in out:
                await events.send(event)
