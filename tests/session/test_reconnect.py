"""spear_rt.session.reconnect: `ReconnectingUpstream` through the
real `openai_realtime` kind against the loopback fake (tests/fakes/realtime_upstream).

Time is trio's autojump clock (virtual): backoffs and pacing cost no wall time, and loopback I/O
always settles before the clock moves. Every test is bounded by `trio.fail_after`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import numpy as np
import pytest
import trio
import trio.testing
from numpy.typing import NDArray

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Commit,
    InstanceInfo,
    Secret,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionSpec,
    TranscriptionUpstream,
    UpstreamEvent,
    UpstreamReconnected,
)
from spear_rt.errors import BackendFailure, CanonicalFailure, ConfigError
from spear_rt.ir import ErrorCode
from spear_rt.protocol import client_events as ce
from spear_rt.session.journal import TOO_LONG
from spear_rt.session.reconnect import (
    ReconnectingUpstream,
    ReconnectPolicy,
    reconnecting_upstream,
)
from spear_rt_backends.openai_realtime import KIND, RATE_HZ
from tests.conftest import noise_pcm
from tests.fakes.realtime_upstream import Drop, FakeRealtime, Garbage, Refuse, Stall, stub_words

KEY = "sk-test-reconnect-0123456789"
BOUND_S = 30  # virtual seconds; only turns a hang into a failure
CHUNK = RATE_HZ // 50  # 20 ms
BLOCK = RATE_HZ // 5  # 200 ms: one stub word
POLICY = ReconnectPolicy()


def half() -> float:
    """A 'random' value that makes every backoff exact (no jitter)."""
    return 0.5


def pcm_of(*values: int) -> NDArray[np.int16]:
    return np.array(values, dtype=np.int16)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    policy = ReconnectPolicy(initial_backoff_s=0.1, max_backoff_s=2.0, jitter=0.2)
    assert [policy.backoff_s(n, 0.5) for n in (1, 2, 3, 5, 6, 9)] == pytest.approx(
        [0.1, 0.2, 0.4, 1.6, 2.0, 2.0]
    )
    assert policy.backoff_s(1, 0.0) == pytest.approx(0.08)
    assert policy.backoff_s(6, 1.0) == pytest.approx(2.4)
    with pytest.raises(ConfigError, match="max_attempts"):
        ReconnectPolicy(max_attempts=0)
    with pytest.raises(ConfigError, match="jitter"):
        ReconnectPolicy(jitter=1.5)


# --- against the fake upstream -------------------------------------------------------------


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeRealtime:
    fake = FakeRealtime(api_key=KEY)
    await nursery.start(fake.serve)
    return fake


class Opener:
    """Opens the `openai_realtime` kind on the fake; records the attempt numbers."""

    def __init__(self, fake: FakeRealtime) -> None:
        self.info = InstanceInfo(
            "rt-1", model="gpt-4o-transcribe", base_url=fake.base_url, api_key=Secret(KEY),
            options={"ping_interval_s": 0},
        )  # fmt: skip
        self.attempts: list[int] = []

    def __call__(
        self, attempt: int
    ) -> AbstractAsyncContextManager[tuple[TranscriptionUpstream, str]]:
        self.attempts.append(attempt)
        return self._open()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[tuple[TranscriptionUpstream, str]]:
        async with KIND.open_transcription(self.info, TranscriptionSpec(language="en")) as up:
            yield up, self.info.name


def opened(
    fake: FakeRealtime, policy: ReconnectPolicy = POLICY, opener: Opener | None = None
) -> AbstractAsyncContextManager[ReconnectingUpstream]:
    return reconnecting_upstream(opener or Opener(fake), policy, rng=half)


async def speak(
    up: ReconnectingUpstream, item_id: str, pcm: NDArray[np.int16], *, chunk: int = BLOCK,
    pace_s: float = 0.0, commit: bool = True,
) -> None:  # fmt: skip
    """A turn: BeginTurn, its audio in `chunk`s (one every `pace_s`), Commit."""
    await up.send(BeginTurn(item_id))
    for start in range(0, pcm.size, chunk):
        await up.send(AppendAudio(pcm[start : start + chunk]))
        await anyio.sleep(pace_s)
    if commit:
        await up.send(Commit(item_id))


async def collect(up: ReconnectingUpstream, items: set[str], out: list[UpstreamEvent]) -> None:
    """Read events into `out` until every one of `items` is completed or failed."""
    pending = set(items)
    while pending:
        event = await up.receive()
        out.append(event)
        if isinstance(event, TranscriptCompleted | TranscriptFailed):
            pending.discard(event.item_id)


def deltas(events: list[UpstreamEvent], item_id: str) -> list[str]:
    return [e.delta for e in events if isinstance(e, TranscriptDelta) and e.item_id == item_id]


def finals(events: list[UpstreamEvent]) -> list[UpstreamEvent]:
    return [e for e in events if isinstance(e, TranscriptCompleted | TranscriptFailed)]


def reconnects(events: list[UpstreamEvent]) -> list[UpstreamReconnected]:
    return [e for e in events if isinstance(e, UpstreamReconnected)]


def audio_of(fake: FakeRealtime, connection: int) -> bytes:
    """The audio connection `connection` (0-based) received, in order."""
    events = fake.connections[connection].events
    return b"".join(e.audio for e in events if isinstance(e, ce.InputAudioBufferAppend))


async def test_ten_drops_in_one_utterance_give_the_uninterrupted_transcript_and_deltas(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    pcm = noise_pcm(4 * RATE_HZ, seed=21)  # 200 chunks of 20 ms: 20 words, as live deltas
    drops = [5 + 15 * k for k in range(1, 11)]  # after chunk 20, 35, ... 155
    clean: list[UpstreamEvent] = []
    interrupted: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        fake.plan(live_deltas=True)
        async with opened(fake) as up, trio.open_nursery() as nursery:
            nursery.start_soon(collect, up, {"utt"}, clean)
            await speak(up, "utt", pcm, chunk=CHUNK, pace_s=0.02)
        for sent in drops:  # update + the chunks sent so far (the replay counts too)
            fake.plan(Drop(after=1 + sent), live_deltas=True)
        fake.plan(live_deltas=True)
        async with opened(fake) as up, trio.open_nursery() as nursery:
            nursery.start_soon(collect, up, {"utt"}, interrupted)
            await speak(up, "utt", pcm, chunk=CHUNK, pace_s=0.02)
            assert up.statistics().reconnects == 10
    expected = TranscriptCompleted("utt", " ".join(stub_words(pcm)))
    assert finals(clean) == finals(interrupted) == [expected]
    assert deltas(interrupted, "utt") == deltas(clean, "utt")
    assert "".join(deltas(clean, "utt")) == expected.transcript and len(deltas(clean, "utt")) == 20
    events = reconnects(interrupted)
    assert len(events) == 10 and not reconnects(clean)
    for event in events:
        assert (event.instance, event.attempts, event.replayed_items) == ("rt-1", 1, ("utt",))
        assert event.downtime_s == pytest.approx(0.1)  # the first backoff, jitter fixed
    assert len(fake.connections) == 1 + 11
    for number in range(2, 12):  # each new connection hears the utterance from its start
        heard = audio_of(fake, number)
        assert heard == pcm.tobytes()[: len(heard)] and len(heard) > drops[number - 2] * CHUNK * 2
    assert audio_of(fake, 11) == pcm.tobytes()  # the last one: all of it, nothing twice


async def test_a_completed_turn_is_not_sent_again(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    one, two = noise_pcm(RATE_HZ, seed=22), noise_pcm(RATE_HZ, seed=23)
    fake.plan(Drop(after=1 + 5 + 1 + 3))  # update, turn one, three chunks of turn two
    events: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        async with opened(fake) as up:
            await speak(up, "one", one)
            await collect(up, {"one"}, events)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, up, {"two"}, events)
                await speak(up, "two", two, pace_s=0.02)
    assert finals(events) == [
        TranscriptCompleted("one", " ".join(stub_words(one))),
        TranscriptCompleted("two", " ".join(stub_words(two))),
    ]
    assert [e.replayed_items for e in reconnects(events)] == [("two",)]
    assert audio_of(fake, 0) == one.tobytes() + two[: 3 * BLOCK].tobytes()
    assert audio_of(fake, 1) == two.tobytes()  # none of turn one
    assert fake.connections[1].types().count("input_audio_buffer.commit") == 1


async def test_a_commit_whose_answer_was_lost_is_replayed_with_its_commit(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    pcm = noise_pcm(RATE_HZ, seed=24)
    fake.plan(Drop(after=1 + 5 + 1, unanswered=True))  # the commit is read, never answered
    events: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        async with opened(fake) as up:
            await speak(up, "c", pcm)
            await collect(up, {"c"}, events)
    assert finals(events) == [TranscriptCompleted("c", " ".join(stub_words(pcm)))]
    assert [e.replayed_items for e in reconnects(events)] == [("c",)]
    assert audio_of(fake, 1) == pcm.tobytes()
    assert fake.connections[1].types()[-1] == "input_audio_buffer.commit"


async def test_a_turn_too_long_to_replay_fails_and_the_next_one_works(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    long, short = noise_pcm(RATE_HZ, seed=25), noise_pcm(RATE_HZ // 2, seed=26)
    policy = ReconnectPolicy(max_replay_audio_bytes=3 * BLOCK * 2)  # 600 ms of audio
    fake.plan(Drop(after=1 + 4))
    events: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        async with opened(fake, policy) as up:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, up, {"long"}, events)
                await speak(up, "long", long, pace_s=0.02)
            await speak(up, "short", short)
            await collect(up, {"short"}, events)
    failed, done = finals(events)
    assert isinstance(failed, TranscriptFailed) and failed.item_id == "long"
    assert TOO_LONG in failed.message and not failed.retryable
    assert done == TranscriptCompleted("short", " ".join(stub_words(short)))
    assert [e.replayed_items for e in reconnects(events)] == [()]
    assert audio_of(fake, 1) == short.tobytes()  # nothing of the long turn after the drop


async def test_a_send_during_a_reconnect_is_neither_lost_nor_sent_twice(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    pcm = noise_pcm(RATE_HZ, seed=27)
    chunks = [AppendAudio(pcm[i : i + BLOCK]) for i in range(0, pcm.size, BLOCK)]
    fake.plan(Drop(after=1 + 2))
    events: list[UpstreamEvent] = []
    done = trio.Event()
    with trio.fail_after(BOUND_S):
        async with opened(fake) as up:
            for command in (BeginTurn("f"), chunks[0], chunks[1]):
                assert up.send_nowait(command)
            await trio.sleep(0.05)  # the drop is noticed; the 0.1 s backoff runs
            assert not up.statistics().connected
            assert not up.send_nowait(chunks[2])  # nothing done: the caller awaits send

            async def late_send() -> None:
                await up.send(chunks[2])
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(late_send)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()  # waits for the reconnect
            assert up.statistics().connected and trio.current_time() == pytest.approx(0.1)
            for command in (chunks[3], chunks[4], Commit("f")):
                assert up.send_nowait(command)
            await collect(up, {"f"}, events)
    assert audio_of(fake, 0) == pcm[: 2 * BLOCK].tobytes()
    assert audio_of(fake, 1) == pcm.tobytes()
    assert finals(events) == [TranscriptCompleted("f", " ".join(stub_words(pcm)))]


@pytest.mark.parametrize("status", [401, 503])
async def test_a_failed_first_open_leaves_unchanged(fake: FakeRealtime, status: int) -> None:
    fake.plan(refuse=Refuse(status))
    opener = Opener(fake)
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as info:
        async with opened(fake, opener=opener):
            pytest.fail("opened")
    assert type(info.value) is BackendFailure and info.value.status == status
    assert opener.attempts == [0] and len(fake.connections) == 1  # the first open is not retried


async def test_a_canonical_failure_of_the_first_open_leaves_unchanged() -> None:
    refused = CanonicalFailure.of(ErrorCode.NO_CANDIDATE_BACKEND, "no instance")

    @asynccontextmanager
    async def nothing(attempt: int) -> AsyncIterator[tuple[TranscriptionUpstream, str]]:
        raise refused
        yield  # pragma: no cover

    with trio.fail_after(BOUND_S), pytest.raises(CanonicalFailure) as info:
        async with reconnecting_upstream(nothing, POLICY):
            pytest.fail("opened")
    assert info.value is refused


async def test_an_outer_timeout_cancels_the_first_open(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    fake.plan(Stall())  # the handshake is never answered
    with trio.fail_after(BOUND_S):
        with trio.move_on_after(3) as scope:
            async with opened(fake):
                pytest.fail("opened")
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(3)


async def test_a_non_retryable_failure_comes_after_the_events_before_it(
    fake: FakeRealtime,
) -> None:
    pcm = noise_pcm(RATE_HZ, seed=28)
    fake.plan(Garbage(after=1 + 5 + 1))  # right after the answers to the commit
    events: list[UpstreamEvent] = []
    opener = Opener(fake)
    with trio.fail_after(BOUND_S):
        async with opened(fake, opener=opener) as up:
            await speak(up, "g", pcm)
            with pytest.raises(BackendFailure) as info:
                while True:
                    events.append(await up.receive())
            with pytest.raises(BackendFailure) as sent:
                await up.send(BeginTurn("h"))
            with pytest.raises(BackendFailure):
                up.send_nowait(BeginTurn("h"))
    assert not info.value.retryable and "not valid JSON" in str(info.value)
    assert sent.value is info.value
    assert finals(events) == [TranscriptCompleted("g", " ".join(stub_words(pcm)))]
    assert "".join(deltas(events, "g")) == " ".join(stub_words(pcm))
    assert opener.attempts == [0]


async def test_a_non_retryable_refusal_on_reopening_is_final(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    fake.plan(Drop(after=1))
    fake.plan(refuse=Refuse(401))
    opener = Opener(fake)
    with trio.fail_after(BOUND_S):
        async with opened(fake, opener=opener) as up:
            with pytest.raises(BackendFailure) as info:
                await up.receive()
            with pytest.raises(BackendFailure) as sent:
                await up.send(BeginTurn("x"))
    assert info.value.status == 401 and not info.value.retryable and sent.value is info.value
    assert opener.attempts == [0, 1]


async def test_attempts_exhausted_is_final_after_the_backoffs(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    fake.plan(Drop(after=1))
    for _ in range(3):
        fake.plan(refuse=Refuse(503, "overloaded"))
    opener = Opener(fake)
    with trio.fail_after(BOUND_S):
        async with opened(fake, ReconnectPolicy(max_attempts=3), opener) as up:
            start = trio.current_time()
            with pytest.raises(BackendFailure) as info:
                await up.receive()
            elapsed = trio.current_time() - start
            with pytest.raises(BackendFailure):
                await up.send(BeginTurn("x"))
    assert "could not be reopened in 3 attempts" in str(info.value) and "overloaded" in str(
        info.value
    )
    assert elapsed == pytest.approx(0.1 + 0.2 + 0.4)
    assert opener.attempts == [0, 1, 2, 3] and len(fake.connections) == 4


async def test_retry_after_and_a_timed_out_reopen_count_as_attempts(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    pcm = noise_pcm(RATE_HZ // 2, seed=29)
    fake.plan(Drop(after=1))
    fake.plan(refuse=Refuse(503, retry_after="1"))  # the next wait is 1 s, not 0.2 s
    fake.plan(Stall())  # times out after connect_timeout_s
    events: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        async with opened(fake, ReconnectPolicy(connect_timeout_s=2)) as up:
            reconnected = await up.receive()
            await speak(up, "r", pcm)
            await collect(up, {"r"}, events)
    assert isinstance(reconnected, UpstreamReconnected)
    assert (reconnected.attempts, reconnected.replayed_items) == (3, ())
    assert reconnected.downtime_s == pytest.approx(0.1 + 1 + 2 + 0.4)
    assert finals(events) == [TranscriptCompleted("r", " ".join(stub_words(pcm)))]


async def test_events_wait_in_a_bounded_queue(fake: FakeRealtime) -> None:
    pcm = noise_pcm(RATE_HZ, seed=30)
    events: list[UpstreamEvent] = []
    with trio.fail_after(BOUND_S):
        async with opened(fake, ReconnectPolicy(max_pending_events=2)) as up:
            await speak(up, "q", pcm)  # five deltas and a completed come back
            await trio.testing.wait_all_tasks_blocked()
            assert up.statistics().events_buffered == 2
            await collect(up, {"q"}, events)
    assert len(events) == 6 and "".join(deltas(events, "q")) == " ".join(stub_words(pcm))


async def test_leaving_the_context_closes_the_upstream(fake: FakeRealtime) -> None:
    with trio.fail_after(BOUND_S):
        async with opened(fake) as up:
            pass
        await fake.connections[0].ended.wait()
        with pytest.raises(anyio.EndOfStream):
            await up.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await up.send(BeginTurn("x"))
    assert fake.connections[0].close_code == 1000


# --- a scripted upstream, for what the fake cannot do ------------------------------------------


class Scripted:
    """An in-memory upstream: `send` fails (retryably) at command `fail_at`; `receive` gives
    what the test puts and never ends by itself (so the drain after a failed send must time out).
    """

    input_rate_hz = RATE_HZ

    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list[object] = []
        self.fail_at = fail_at
        self.events, self._events = trio.open_memory_channel[UpstreamEvent](16)

    async def send(self, command: object) -> None:
        if len(self.sent) == self.fail_at:
            raise BackendFailure("write failed", retryable=True)
        self.sent.append(command)

    async def receive(self) -> UpstreamEvent:
        return await self._events.receive()


async def test_a_failed_send_is_replayed_and_the_next_send_waits_for_the_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstreams = [Scripted(fail_at=3), Scripted()]

    @asynccontextmanager
    async def opener(attempt: int) -> AsyncIterator[tuple[TranscriptionUpstream, str]]:
        yield upstreams[attempt], f"scripted-{attempt}"

    chunks = [AppendAudio(pcm_of(n)) for n in range(3)]
    policy = ReconnectPolicy(drain_timeout_s=1.0)
    with trio.fail_after(BOUND_S):
        async with reconnecting_upstream(opener, policy, rng=half) as up:
            for command in (BeginTurn("s"), chunks[0], chunks[1]):
                await up.send(command)
            upstreams[0].events.send_nowait(TranscriptDelta("s", "before"))
            await up.send(chunks[2])  # fails on the first upstream: journaled, taken at once
            assert trio.current_time() == 0.0
            await up.send(Commit("s"))  # waits for the new upstream
            assert trio.current_time() == pytest.approx(1.0 + 0.1)  # drain, then backoff
            first, second = await up.receive(), await up.receive()
    assert first == TranscriptDelta("s", "before")  # drained before the reconnect
    assert isinstance(second, UpstreamReconnected) and second.instance == "scripted-1"
    assert upstreams[0].sent == [BeginTurn("s"), chunks[0], chunks[1]]
    assert upstreams[1].sent == [BeginTurn("s"), *chunks, Commit("s")]


async def test_works_on_asyncio_too() -> None:
    """One drop and a reconnect with anyio on asyncio (the fake on asyncio too)."""
    pcm = noise_pcm(RATE_HZ, seed=31)

    async def main() -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        async with anyio.create_task_group() as tg:
            fake = FakeRealtime(api_key=KEY)
            await tg.start(fake.serve)
            fake.plan(Drop(after=1 + 2))
            async with opened(fake) as up:
                await speak(up, "a", pcm, commit=False)
                await up.send(Commit("a"))
                while not isinstance(event := await up.receive(), TranscriptCompleted):
                    events.append(event)
                events.append(event)
            tg.cancel_scope.cancel()
        return events

    with trio.fail_after(BOUND_S):
        events = await trio.to_thread.run_sync(lambda: anyio.run(main, backend="asyncio"))
    assert finals(events) == [TranscriptCompleted("a", " ".join(stub_words(pcm)))]
    assert [e.replayed_items for e in reconnects(events)] == [("a",)]
