"""open_local_transcription: a synchronous recognizer served as an async upstream."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import numpy as np
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    Pcm16,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionUpstream,
    UpstreamEvent,
)
from spear_rt.local_asr import LocalTranscription, open_local_transcription

VOCAB = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FRAME = 320  # 20 ms at 16 kHz
EAGER = {"min_stable_ms": 0.0, "agreement": 1, "hold_back": 0}  # every word goes out at once
BROKEN = -1  # a frame starting with this value makes the recognizer raise


def frame(word: int) -> AppendAudio:
    """20 ms of audio that the scripted recognizer hears as VOCAB[word]."""
    return AppendAudio(np.full(FRAME, word, dtype=np.int16))


class ScriptedRecognizer:
    """A real, deterministic `StreamingRecognizer`: each 20 ms frame is one word, named by its
    first sample. `gate` (when given) holds every `feed` until it is set."""

    sample_rate_hz = 16000

    def __init__(
        self,
        log: list[str],
        gate: threading.Event | None = None,
        entered: threading.Event | None = None,
    ) -> None:
        self.log = log
        self.gate = gate
        self.entered = entered or threading.Event()
        self.words: list[str] = []
        log.append("create")

    def start_utterance(self) -> None:
        self.log.append("start")
        self.words = []

    def feed(self, pcm: Pcm16) -> str | None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.log.append(f"feed {pcm.size}")
        before = len(self.words)
        for start in range(0, pcm.size, FRAME):
            if pcm[start] == BROKEN:
                raise RuntimeError("engine exploded")
            self.words.append(VOCAB[pcm[start]])
        return " ".join(self.words) if len(self.words) != before else None

    def end_utterance(self) -> str:
        self.log.append("end")
        return " ".join(self.words)

    def close(self) -> None:
        self.log.append("close")


def factory(log: list[str], **kwargs: threading.Event) -> Callable[[], ScriptedRecognizer]:
    return lambda: ScriptedRecognizer(log, **kwargs)


async def until_completed(upstream: TranscriptionUpstream, count: int = 1) -> list[UpstreamEvent]:
    """Events up to and including the `count`-th completed/failed one."""
    events: list[UpstreamEvent] = []
    with trio.fail_after(10):
        while count:
            event = await upstream.receive()
            events.append(event)
            count -= not isinstance(event, TranscriptDelta)
    return events


def text_of(events: list[UpstreamEvent], item_id: str) -> str:
    return "".join(
        e.delta for e in events if isinstance(e, TranscriptDelta) and e.item_id == item_id
    )


async def test_turns_give_deltas_then_exactly_one_completed_each_in_order() -> None:
    """Deltas of an item concatenate to its transcript; turn 1's events all precede turn 2's."""
    log: list[str] = []
    async with open_local_transcription(factory(log), limiter=None, **EAGER) as upstream:
        for command in [BeginTurn("a"), frame(1), frame(2), frame(3), Commit("a")]:
            await upstream.send(command)
        for command in [BeginTurn("b"), frame(4), Commit("b")]:
            await upstream.send(command)
        events = await until_completed(upstream, 2)
    assert [e.item_id for e in events] == sorted(e.item_id for e in events)
    done = [e for e in events if isinstance(e, TranscriptCompleted)]
    assert done == [TranscriptCompleted("a", "one two three"), TranscriptCompleted("b", "four")]
    assert text_of(events, "a") == "one two three"
    assert text_of(events, "b") == "four"
    assert log.count("create") == 1  # one recognizer serves every turn


async def test_live_deltas_arrive_before_the_commit() -> None:
    """Words settled by the stable-prefix rule go out while the turn is still open."""
    log: list[str] = []
    async with open_local_transcription(factory(log), limiter=None, **EAGER) as upstream:
        await upstream.send(BeginTurn("a"))
        await upstream.send(frame(7))
        with trio.fail_after(10):
            assert await upstream.receive() == TranscriptDelta("a", "seven")


async def test_audio_is_fed_in_one_thread_hop_per_batch() -> None:
    """Frames queued while the worker was busy reach the recognizer in one `feed` call."""
    log: list[str] = []
    async with open_local_transcription(factory(log), limiter=None, **EAGER) as upstream:
        await wait_all_tasks_blocked()
        for word in range(10):
            await upstream.send(frame(word))  # no checkpoint: the worker has not run yet
        await upstream.send(Commit("a"))
        events = await until_completed(upstream)
    assert [entry for entry in log if entry.startswith("feed")] == [f"feed {10 * FRAME}"]
    assert events[-1] == TranscriptCompleted("a", " ".join(VOCAB))


async def test_the_commit_item_id_wins_and_unnamed_deltas_wait_for_it() -> None:
    """Live deltas use the BeginTurn id; the final delta and completion use the Commit's id;
    without a BeginTurn, deltas are held and sent with the commit."""
    log: list[str] = []
    async with open_local_transcription(factory(log), limiter=None, **EAGER) as upstream:
        await upstream.send(BeginTurn("begun"))
        await upstream.send(frame(1))
        with trio.fail_after(10):
            assert await upstream.receive() == TranscriptDelta("begun", "one")
        await upstream.send(frame(2))
        await upstream.send(Commit("committed"))
        events = await until_completed(upstream)
        assert events[-1] == TranscriptCompleted("committed", "one two")

        await upstream.send(frame(3))
        await upstream.send(frame(4))
        await upstream.send(Commit("unnamed"))
        events = await until_completed(upstream)
    assert events == [
        TranscriptDelta("unnamed", "three four"),
        TranscriptCompleted("unnamed", "three four"),
    ]


async def test_clear_discards_the_turn() -> None:
    """A cleared turn emits nothing; its utterance is ended and the next turn starts fresh."""
    log: list[str] = []
    async with open_local_transcription(factory(log), limiter=None) as upstream:  # default rule
        for command in [BeginTurn("a"), frame(1), frame(2), Clear()]:
            await upstream.send(command)
        for command in [BeginTurn("b"), frame(3), Commit("b")]:
            await upstream.send(command)
        events = await until_completed(upstream)
    assert events == [TranscriptDelta("b", "three"), TranscriptCompleted("b", "three")]
    assert log.count("start") == 2 and log.count("end") == 2


async def test_a_recognizer_failure_fails_the_turn_and_the_next_turn_works() -> None:
    """An exception becomes one TranscriptFailed at the commit; a new recognizer takes over."""
    log: list[str] = []
    make = factory(log)
    async with open_local_transcription(make, limiter=None, **EAGER) as upstream:
        await upstream.send(BeginTurn("a"))
        await upstream.send(frame(1))
        with trio.fail_after(10):
            assert await upstream.receive() == TranscriptDelta("a", "one")
        await upstream.send(frame(BROKEN))
        await upstream.send(frame(2))  # dropped: the turn has failed
        await upstream.send(Commit("a"))
        failed = await until_completed(upstream)
        for command in [BeginTurn("b"), frame(3), Commit("b")]:
            await upstream.send(command)
        events = await until_completed(upstream)
    assert len(failed) == 1 and isinstance(failed[0], TranscriptFailed)
    assert failed[0].item_id == "a" and not failed[0].retryable
    assert "RuntimeError" in failed[0].message and "exploded" not in failed[0].message
    assert events == [TranscriptDelta("b", "three"), TranscriptCompleted("b", "three")]
    assert log.count("create") == 2 and log.count("close") == 2


async def test_a_recognizer_that_cannot_start_fails_turns_until_it_can() -> None:
    """Creation errors fail the turn (retryable=False); creation is retried for the next turn."""
    log: list[str] = []
    attempts = 0

    def make() -> ScriptedRecognizer:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("model missing")
        return ScriptedRecognizer(log)

    async with open_local_transcription(make, limiter=None, **EAGER) as upstream:
        for command in [
            BeginTurn("a"),
            frame(1),
            Commit("a"),
            BeginTurn("b"),
            frame(2),
            Commit("b"),
        ]:
            await upstream.send(command)
        events = await until_completed(upstream, 2)
    assert isinstance(events[0], TranscriptFailed) and events[0].item_id == "a"
    assert events[1:] == [TranscriptDelta("b", "two"), TranscriptCompleted("b", "two")]


async def test_send_waits_when_the_queue_is_full_and_resumes_when_it_drains() -> None:
    """Backpressure: past max_pending_audio_bytes (queued + in flight) send blocks, no drop."""
    log: list[str] = []
    gate = threading.Event()
    limit = 64 + 4 * 2 * FRAME  # BeginTurn's room plus four frames
    try:
        async with (
            open_local_transcription(
                factory(log, gate=gate), limiter=None, max_pending_audio_bytes=limit, **EAGER
            ) as upstream,
            trio.open_nursery() as nursery,
        ):
            assert isinstance(upstream, LocalTranscription)
            for command in [BeginTurn("a"), frame(1), frame(2), frame(3), frame(4)]:
                await upstream.send(command)
            sent = trio.Event()

            async def send_fifth() -> None:
                await upstream.send(frame(5))
                sent.set()

            nursery.start_soon(send_fifth)
            await wait_all_tasks_blocked()
            assert not sent.is_set()
            stats = upstream.statistics()
            assert (stats.pending_bytes, stats.waiting_senders) == (limit, 1)
            assert upstream.send_nowait(Commit("a")) is False  # would overtake the waiting frame
            gate.set()
            with trio.fail_after(10):
                await sent.wait()
            await upstream.send(Commit("a"))
            events = await until_completed(upstream)
    finally:
        gate.set()
    assert events[-1] == TranscriptCompleted("a", "one two three four five")


async def test_closing_waits_for_the_thread_call_then_drops_its_result() -> None:
    """Exit cancels the worker: the feed in progress finishes, its events are dropped, the
    recognizer is closed, and receive() then reports the end of the stream."""
    log: list[str] = []
    gate = threading.Event()
    entered = threading.Event()
    make = factory(log, gate=gate, entered=entered)
    exiting, closed = trio.Event(), trio.Event()
    upstreams: list[TranscriptionUpstream] = []

    async def session() -> None:
        async with open_local_transcription(make, limiter=None, **EAGER) as upstream:
            upstreams.append(upstream)
            await upstream.send(BeginTurn("a"))
            await upstream.send(frame(1))
            await trio.to_thread.run_sync(entered.wait)
            exiting.set()
        closed.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session)
            with trio.fail_after(10):
                await exiting.wait()
            await wait_all_tasks_blocked()  # the session is now inside the context's exit
            assert not closed.is_set()  # which waits for the feed in progress
            assert "close" not in log
            gate.set()
            with trio.fail_after(10):
                await closed.wait()
    finally:
        gate.set()
    assert log[-3:] == [f"feed {FRAME}", "end", "close"]
    with pytest.raises(anyio.EndOfStream):
        await upstreams[0].receive()
    with pytest.raises(anyio.ClosedResourceError):
        await upstreams[0].send(frame(2))


async def test_an_error_in_the_body_leaves_as_itself() -> None:
    """The context does not wrap the caller's exception in an ExceptionGroup."""
    log: list[str] = []
    with pytest.raises(KeyError):
        async with open_local_transcription(factory(log), limiter=None):
            raise KeyError("session bug")
    assert log.count("create") == log.count("close")  # a recognizer made is a recognizer closed


async def test_audio_must_be_one_dimensional_int16() -> None:
    """Audio in any other shape or type is refused at send."""
    async with open_local_transcription(factory([]), limiter=None) as upstream:
        with pytest.raises(ValueError):
            await upstream.send(AppendAudio(np.zeros(FRAME, dtype=np.float32)))  # type: ignore[arg-type]


async def test_a_limiter_caps_concurrent_thread_calls() -> None:
    """Two upstreams sharing a one-token limiter never run recognizer calls at the same time."""
    log: list[str] = []
    limiter = anyio.CapacityLimiter(1)
    async with (
        open_local_transcription(factory(log), limiter=limiter, **EAGER) as one,
        open_local_transcription(factory(log), limiter=limiter, **EAGER) as two,
    ):
        for upstream, item in ((one, "x"), (two, "y")):
            await upstream.send(frame(1))
            await upstream.send(Commit(item))
        assert (await until_completed(one))[-1] == TranscriptCompleted("x", "one")
        assert (await until_completed(two))[-1] == TranscriptCompleted("y", "one")
    assert limiter.borrowed_tokens == 0


def test_works_on_asyncio() -> None:
    """The same adapter runs under asyncio (smoke test)."""

    async def main() -> list[UpstreamEvent]:
        log: list[str] = []
        async with open_local_transcription(factory(log), limiter=None, **EAGER) as upstream:
            for command in [BeginTurn("a"), frame(2), frame(3), Commit("a")]:
                await upstream.send(command)
            events: list[UpstreamEvent] = []
            with anyio.fail_after(10):
                while not events or isinstance(events[-1], TranscriptDelta):
                    events.append(await upstream.receive())
            return events

    events = anyio.run(main, backend="asyncio")
    assert text_of(events, "a") == "two three"
    assert events[-1] == TranscriptCompleted("a", "two three")
