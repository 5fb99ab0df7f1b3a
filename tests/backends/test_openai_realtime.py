"""The `openai_realtime` backend against a real loopback fake (tests/fakes/realtime_upstream).

Every test is bounded by `trio.fail_after`; nothing sleeps. Timeouts are checked on trio's
autojump clock (virtual time), backpressure with `wait_all_tasks_blocked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import numpy as np
import pytest
import trio
import trio.testing
from numpy.typing import NDArray

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    InstanceInfo,
    Secret,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionSpec,
    UpstreamEvent,
)
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport
from spear_rt.protocol import client_events as ce
from spear_rt.protocol.settings import Dialect
from spear_rt_backends.openai_realtime import (
    KIND,
    RATE_HZ,
    RealtimeTranscription,
    Translator,
    realtime_url,
)
from spear_rt_backends.stub import StubTranscription
from tests.conftest import noise_pcm
from tests.fakes.realtime_upstream import (
    CloseWith,
    Drop,
    FakeRealtime,
    Garbage,
    Inject,
    Refuse,
    Stall,
    stub_words,
)

KEY = "sk-test-realtime-0123456789abcdef"
MODEL = "gpt-4o-transcribe"
BOUND_S = 10  # no test comes near this; it only turns a hang into a failure
FRAME = 4800  # 200 ms at 24 kHz


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeRealtime:
    fake = FakeRealtime(api_key=KEY)
    await nursery.start(fake.serve)
    return fake


def instance(fake: FakeRealtime, dialect: str = "ga", **options: Any) -> InstanceInfo:
    return InstanceInfo(
        "rt-1",
        model=MODEL,
        base_url=fake.base_url,
        api_key=Secret(KEY),
        options={"dialect": dialect, **options},
    )


@asynccontextmanager
async def opened(info: InstanceInfo, spec: TranscriptionSpec | None = None) -> AsyncIterator[Any]:
    async with KIND.open_transcription(info, spec or TranscriptionSpec(language="en")) as up:
        assert isinstance(up, RealtimeTranscription)
        yield up


async def send_turn(up: Any, item_id: str, pcm: NDArray[np.int16], commit: bool = True) -> None:
    await up.send(BeginTurn(item_id))
    for start in range(0, pcm.size, FRAME):
        await up.send(AppendAudio(pcm[start : start + FRAME]))
    if commit:
        await up.send(Commit(item_id))


async def until_final(up: Any, item_id: str) -> tuple[list[str], UpstreamEvent]:
    """The deltas of `item_id` and its completed/failed event (events of others: an error)."""
    deltas: list[str] = []
    while True:
        event = await up.receive()
        assert event.item_id == item_id, event
        if isinstance(event, TranscriptDelta):
            deltas.append(event.delta)
        else:
            return deltas, event


async def stub_transcript(pcm: NDArray[np.int16]) -> str:
    """What spear_rt's own stub backend makes of `pcm` (in one turn)."""
    stub = StubTranscription()
    for command in (BeginTurn("x"), AppendAudio(pcm), Commit("x")):
        assert stub.send_nowait(command)
    while not isinstance(event := await stub.receive(), TranscriptCompleted):
        pass
    return event.transcript


async def failure_of(up: Any) -> BackendFailure:
    """Drain `receive` to its failure."""
    with pytest.raises(BackendFailure) as info:
        while True:
            await up.receive()
    assert KEY not in str(info.value)
    return info.value


# --- declaration and URL -------------------------------------------------------------------


def test_kind_declares_its_operations_features_and_transport() -> None:
    assert KIND.name == "openai_realtime" and KIND.extra is None
    assert KIND.defaults.ops == {Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}
    assert KIND.defaults.transports == {Transport.WEBSOCKET}
    assert KIND.defaults.hosting is Hosting.REMOTE
    assert KIND.defaults.features == {
        Feature.SUPPORTS_STREAM,
        Feature.SUPPORTS_BIDI_STREAM,
        Feature.SUPPORTS_AUDIO_INPUT,
        Feature.SUPPORTS_LANGUAGE,
    }


def test_an_instance_needs_base_url_and_valid_options() -> None:
    assert "base_url" in (KIND.unavailable_reason(InstanceInfo("x")) or "")
    bad = InstanceInfo("x", base_url="http://h/v1", options={"dialect": "v2"})
    assert "dialect" in (KIND.unavailable_reason(bad) or "")
    bad = InstanceInfo("x", base_url="http://h/v1", options={"max_send_buffer_bytes": 0})
    assert "max_send_buffer_bytes" in (KIND.unavailable_reason(bad) or "")
    assert "ftp" in (KIND.unavailable_reason(InstanceInfo("x", base_url="ftp://h/v1")) or "")
    assert KIND.unavailable_reason(InstanceInfo("x", base_url="https://api.openai.com/v1")) is None


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://api.openai.com/v1", "wss://api.openai.com/v1/realtime?intent=transcription"),
        ("http://127.0.0.1:8000/v1/", "ws://127.0.0.1:8000/v1/realtime?intent=transcription"),
        ("http://h/v1?api-version=2", "ws://h/v1/realtime?api-version=2&intent=transcription"),
        ("wss://h", "wss://h/realtime?intent=transcription"),
    ],
)
def test_url_is_built_from_base_url_like_the_official_client(base_url: str, url: str) -> None:
    assert realtime_url(base_url, {"intent": "transcription"}) == url


def _fake_in_thread(started: queue.Queue[Any], done: threading.Event) -> None:
    """A fake on its own trio loop until `done` (the official SDK is asyncio-only)."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fake = FakeRealtime(api_key=KEY)
            await nursery.start(fake.serve)
            started.put(fake)
            await trio.to_thread.run_sync(done.wait)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_url_query_and_auth_match_what_the_official_client_sends() -> None:
    openai = pytest.importorskip("openai")
    started: queue.Queue[Any] = queue.Queue()
    done = threading.Event()
    thread = threading.Thread(target=_fake_in_thread, args=(started, done), daemon=True)
    thread.start()
    fake: FakeRealtime = started.get(timeout=BOUND_S)
    try:

        async def official() -> None:
            client = openai.AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)
            async with asyncio.timeout(BOUND_S):
                query = {"intent": "transcription"}
                async with client.realtime.connect(extra_query=query) as connection:
                    assert (await connection.recv()).type == "session.created"

        async def ours() -> None:
            async with asyncio.timeout(BOUND_S), opened(instance(fake)):
                pass

        asyncio.run(official())
        asyncio.run(ours())  # and on asyncio, too
    finally:
        done.set()
        thread.join(timeout=BOUND_S)
    theirs, mine = fake.connections
    assert (mine.path, mine.query) == (theirs.path, theirs.query)
    assert (mine.path, mine.query) == ("/v1/realtime", {"intent": "transcription"})
    assert mine.headers["authorization"] == theirs.headers["authorization"] == f"Bearer {KEY}"
    assert "openai-beta" not in mine.headers and "openai-beta" not in theirs.headers


# --- translation (sans-I/O) ---------------------------------------------------------------


def _event(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def test_a_completed_without_all_its_deltas_gets_the_missing_text_as_a_delta() -> None:
    translator = Translator()
    translator.encode(BeginTurn("ours"))
    translator.encode(Commit("ours"))
    assert translator.decode(_event(type="input_audio_buffer.committed", item_id="up_1")) == []
    assert translator.decode(_event(type=DELTA, item_id="up_1", delta="hello")) == [
        TranscriptDelta("ours", "hello")
    ]
    assert translator.decode(_event(type=COMPLETED, item_id="up_1", transcript="hello world")) == [
        TranscriptDelta("ours", " world"),
        TranscriptCompleted("ours", "hello world"),
    ]
    # the item is finished: a late event for it is not attached to anything
    assert translator.decode(_event(type=DELTA, item_id="up_1", delta="late")) == []


def test_unknown_events_are_ignored_and_malformed_needed_ones_are_fatal() -> None:
    translator = Translator()
    assert translator.decode(_event(type="rate_limits.updated", rate_limits=[])) == []
    assert translator.decode(_event(type="input_audio_buffer.cleared", event_id=3)) == []
    with pytest.raises(BackendFailure, match=r"malformed conversation\.item"):
        translator.decode(_event(type=DELTA, item_id=7, delta="x"))
    with pytest.raises(BackendFailure, match="without a `type`"):
        translator.decode(b"[1, 2]")


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["beta", "ga"])
async def test_turns_are_transcribed_under_our_item_ids(fake: FakeRealtime, dialect: str) -> None:
    first, second = noise_pcm(RATE_HZ + 3000, seed=1), noise_pcm(RATE_HZ // 2, seed=2)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake, dialect)) as up:
            assert up.input_rate_hz == 24000
            await send_turn(up, "item_ours_1", first)
            deltas, done = await until_final(up, "item_ours_1")
            await send_turn(up, "item_ours_2", second)
            deltas2, done2 = await until_final(up, "item_ours_2")
        await fake.connections[0].ended.wait()
    assert isinstance(done, TranscriptCompleted) and isinstance(done2, TranscriptCompleted)
    assert "".join(deltas) == done.transcript == await stub_transcript(first)
    assert "".join(deltas2) == done2.transcript == await stub_transcript(second)
    assert len(deltas) == 5 and done.transcript.split() == stub_words(first)

    rec = fake.connections[0]
    assert rec.dialect == Dialect(dialect)
    assert (rec.path, rec.query) == ("/v1/realtime", {"intent": "transcription"})
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.headers.get("openai-beta") == ("realtime=v1" if dialect == "beta" else None)
    assert rec.types()[0] == (
        "transcription_session.update" if dialect == "beta" else "session.update"
    )
    assert rec.types().count("input_audio_buffer.commit") == 2
    assert rec.audio_bytes == (first.size + second.size) * 2
    assert rec.close_code == 1000  # closing handshake on exit


@pytest.mark.parametrize("dialect", ["beta", "ga"])
async def test_session_update_turns_vad_off_in_the_dialect(
    fake: FakeRealtime, dialect: str
) -> None:
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake, dialect), TranscriptionSpec(language="de")):
            pass
    update = fake.connections[0].events[0]
    assert isinstance(update, ce.SessionUpdate | ce.TranscriptionSessionUpdate)
    session = update.session
    if dialect == "beta":
        assert isinstance(update, ce.TranscriptionSessionUpdate)
        assert session.input_audio_format == "pcm16" and session.turn_detection is None
        transcription = session.input_audio_transcription
    else:
        assert isinstance(update, ce.SessionUpdate) and session.type == "transcription"
        assert not isinstance(session.audio, msgspec.UnsetType)
        audio_in = session.audio.input
        assert not isinstance(audio_in, msgspec.UnsetType)
        assert audio_in.format == ce.GaAudioFormat("audio/pcm", 24000)
        assert audio_in.turn_detection is None
        transcription = audio_in.transcription
    assert transcription == ce.TranscriptionWire(model=MODEL, language="de")


async def test_query_model_option_puts_the_model_in_the_url(fake: FakeRealtime) -> None:
    info = InstanceInfo(
        "rt", base_url=fake.base_url, api_key=Secret(KEY), options={"query_model": True}
    )
    with trio.fail_after(BOUND_S):
        async with opened(info, TranscriptionSpec(model="whisper-x")):
            pass
    assert fake.connections[0].query == {"model": "whisper-x", "intent": "transcription"}


async def test_send_nowait_and_live_deltas_belong_to_the_open_turn(fake: FakeRealtime) -> None:
    fake.plan(live_deltas=True)  # deltas before the commit, under an id we have not seen
    pcm = noise_pcm(RATE_HZ, seed=3)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            assert up.send_nowait(BeginTurn("live_1"))
            assert up.send_nowait(AppendAudio(pcm[: 2 * FRAME]))
            first = await up.receive()
            assert first == TranscriptDelta("live_1", stub_words(pcm)[0])
            assert up.send_nowait(AppendAudio(pcm[2 * FRAME :]))
            assert up.send_nowait(Commit("live_1"))
            deltas, done = await until_final(up, "live_1")
    assert first.delta + "".join(deltas) == await stub_transcript(pcm)
    assert done == TranscriptCompleted("live_1", await stub_transcript(pcm))


async def test_clear_drops_the_turn_audio(fake: FakeRealtime) -> None:
    dropped, kept = noise_pcm(RATE_HZ, seed=4), noise_pcm(RATE_HZ, seed=5)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "gone", dropped, commit=False)
            await up.send(Clear())
            await send_turn(up, "kept", kept)
            _, done = await until_final(up, "kept")
    assert done == TranscriptCompleted("kept", await stub_transcript(kept))
    assert "input_audio_buffer.clear" in fake.connections[0].types()


async def test_an_empty_commit_fails_that_item_and_the_session_lives_on(fake: FakeRealtime) -> None:
    pcm = noise_pcm(RATE_HZ, seed=6)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await up.send(BeginTurn("empty"))
            await up.send(Commit("empty"))
            deltas, failed = await until_final(up, "empty")
            await send_turn(up, "next", pcm)
            _, done = await until_final(up, "next")
    assert deltas == [] and isinstance(failed, TranscriptFailed)
    assert "buffer too small" in failed.message and not failed.retryable
    assert done == TranscriptCompleted("next", await stub_transcript(pcm))


async def test_the_key_is_never_logged(
    fake: FakeRealtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "a", noise_pcm(FRAME, seed=7))
            await until_final(up, "a")
    assert KEY not in caplog.text


async def test_the_bodys_own_exception_leaves_unwrapped(fake: FakeRealtime) -> None:
    with trio.fail_after(BOUND_S), pytest.raises(LookupError):
        async with opened(instance(fake)):
            raise LookupError("from the session")
    await fake.connections[0].ended.wait()
    assert fake.connections[0].close_code == 1000


# --- faults --------------------------------------------------------------------------------


async def test_a_drop_is_a_retryable_failure_after_the_events_before_it(fake: FakeRealtime) -> None:
    pcm = noise_pcm(RATE_HZ, seed=8)
    frames = 1 + 5 + 1  # update, five appends, commit: answered, then the TCP connection closes
    fake.plan(Drop(after=frames))
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "t1", pcm)
            deltas, done = await until_final(up, "t1")  # delivered before the failure
            failure = await failure_of(up)
            with pytest.raises(BackendFailure):
                await up.send(AppendAudio(pcm))
    assert done == TranscriptCompleted("t1", "".join(deltas))
    assert failure.retryable and "no close frame" in str(failure)


async def test_a_new_upstream_fed_the_turn_again_gives_the_uninterrupted_transcript(
    fake: FakeRealtime,
) -> None:
    """The reconnect contract: replay BeginTurn + the turn's audio (+ Commit) on a new one."""
    pcm = noise_pcm(2 * RATE_HZ, seed=9)
    fake.plan(Drop(after=1 + 4))  # mid-turn, before the commit
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "long", pcm[: 4 * FRAME], commit=False)
            assert (await failure_of(up)).retryable
        async with opened(instance(fake)) as up:
            await send_turn(up, "long", pcm)
            deltas, done = await until_final(up, "long")
    assert done == TranscriptCompleted("long", "".join(deltas))
    assert done.transcript == await stub_transcript(pcm)


@pytest.mark.parametrize(("status", "retryable"), [(401, False), (403, False), (404, False)])
async def test_a_refused_handshake_is_not_retryable(
    fake: FakeRealtime, status: int, retryable: bool
) -> None:
    fake.plan(refuse=Refuse(status, f"no access for key {KEY}"))
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as info:
        async with opened(instance(fake)):
            pass
    assert info.value.status == status and info.value.retryable is retryable
    assert f"HTTP {status}" in str(info.value) and KEY not in str(info.value)


async def test_a_wrong_key_is_a_non_retryable_401(fake: FakeRealtime) -> None:
    info = InstanceInfo("rt", base_url=fake.base_url, api_key=Secret("sk-wrong-key-42"))
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as caught:
        async with opened(info):
            pass
    assert caught.value.status == 401 and not caught.value.retryable
    assert "sk-wrong-key-42" not in str(caught.value)


async def test_a_503_handshake_is_retryable_with_retry_after(fake: FakeRealtime) -> None:
    fake.plan(refuse=Refuse(503, "overloaded", retry_after="7"))
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as info:
        async with opened(instance(fake)):
            pass
    assert info.value.retryable and info.value.status == 503 and info.value.retry_after_s == 7
    assert "overloaded" in str(info.value)


async def test_no_server_is_a_retryable_failure() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    info = InstanceInfo("rt", base_url=f"http://127.0.0.1:{port}/v1", api_key=Secret(KEY))
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as caught:
        async with opened(info):
            pass
    assert caught.value.retryable and "cannot connect" in str(caught.value)


async def test_a_stalled_handshake_times_out_retryably(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    stall = Stall()
    fake.plan(stall)
    start = trio.current_time()
    with trio.fail_after(BOUND_S), pytest.raises(BackendFailure) as info:
        async with opened(instance(fake, connect_timeout_s=3)):
            pass
    assert stall.reached.is_set()
    assert info.value.retryable and "timed out in the WebSocket handshake" in str(info.value)
    assert trio.current_time() - start == pytest.approx(3)


async def test_an_upstream_that_stops_answering_fails_on_the_keepalive(
    fake: FakeRealtime, autojump_clock: trio.testing.MockClock
) -> None:
    fake.plan(Stall(after=1))  # reads the session update, then nothing more
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake, ping_interval_s=5, ping_timeout_s=2)) as up:
            start = trio.current_time()
            failure = await failure_of(up)
            elapsed = trio.current_time() - start
    assert failure.retryable and "no pong within 2s" in str(failure)
    assert elapsed == pytest.approx(7)


async def test_pings_from_the_upstream_are_answered(fake: FakeRealtime) -> None:
    fake.plan(ping=b"are-you-there")
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "a", noise_pcm(FRAME, seed=10))  # the pong goes out before these
            await until_final(up, "a")
    assert fake.connections[0].pongs == [b"are-you-there"]


@pytest.mark.parametrize(
    ("garbage", "words"),
    [(Garbage(after=1), "not valid JSON"), (Garbage(after=1, data=b"\x00", binary=True), "binary")],
)
async def test_garbage_is_a_clear_non_retryable_error(
    fake: FakeRealtime, garbage: Garbage, words: str
) -> None:
    fake.plan(garbage)
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            failure = await failure_of(up)
    assert not failure.retryable and words in str(failure)


async def test_events_before_garbage_are_delivered_first(fake: FakeRealtime) -> None:
    pcm = noise_pcm(RATE_HZ, seed=14)
    fake.plan(Garbage(after=1 + 5 + 1))  # right after the answers to the commit
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            await send_turn(up, "g", pcm)
            deltas, done = await until_final(up, "g")
            failure = await failure_of(up)
    assert done == TranscriptCompleted("g", await stub_transcript(pcm)) and deltas
    assert not failure.retryable


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        ({"type": "invalid_request_error", "code": "bad_thing", "message": "nope"}, False),
        ({"type": "server_error", "message": "try again"}, True),
        ({"type": "invalid_request_error", "code": "session_expired", "message": "60 min"}, True),
    ],
)
async def test_a_session_level_error_event_ends_the_upstream(
    fake: FakeRealtime, error: dict[str, Any], retryable: bool
) -> None:
    fake.plan(Inject(after=1, event={"type": "error", "event_id": "e1", "error": error}))
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            failure = await failure_of(up)
    assert failure.retryable is retryable and error["message"] in str(failure)


async def test_a_refused_session_update_says_so(fake: FakeRealtime) -> None:
    body = {"type": "invalid_request_error", "message": "model_not_found",
            "event_id": "spear_session_update"}  # fmt: skip
    fake.plan(Inject(after=1, event={"type": "error", "event_id": "e1", "error": body}))
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            failure = await failure_of(up)
    assert not failure.retryable
    assert "refused the session configuration" in str(failure) and "model_not_found" in str(failure)


@pytest.mark.parametrize(("code", "retryable"), [(1001, True), (1011, True), (1008, False)])
async def test_an_upstream_close_is_mapped_by_its_code(
    fake: FakeRealtime, code: int, retryable: bool
) -> None:
    fake.plan(CloseWith(after=1, code=code, reason="bye"))
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake)) as up:
            failure = await failure_of(up)
    assert failure.retryable is retryable and f"({code}: bye)" in str(failure)


async def test_a_full_send_buffer_blocks_send_and_refuses_send_nowait(fake: FakeRealtime) -> None:
    stall = Stall(after=1)  # the upstream stops reading after the session update
    fake.plan(stall)
    second = noise_pcm(RATE_HZ, seed=11)
    chunk = AppendAudio(noise_pcm(RATE_HZ, seed=12))  # 1 s: 48 kB of pcm, 64 kB of base64
    limit = 200_000
    with trio.fail_after(BOUND_S):
        async with opened(instance(fake, max_send_buffer_bytes=limit)) as up:
            await up.send(BeginTurn("bp"))
            sent = 0
            while up.send_nowait(chunk):  # until the kernel's buffers and ours are full
                sent += 1
                assert sent < 2000, "the send buffer never filled"
                await trio.testing.wait_all_tasks_blocked()
            assert up.statistics().send_buffer_bytes <= limit
            done = trio.Event()

            async def blocked_send() -> None:
                await up.send(AppendAudio(second))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_send)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set() and not up.send_nowait(chunk)
                stall.release()  # the upstream reads again: the send goes through
                await done.wait()
            await up.send(Commit("bp"))
            _, completed = await until_final(up, "bp")
    assert isinstance(completed, TranscriptCompleted)
    assert fake.connections[0].audio_bytes == (sent * chunk.pcm.size + second.size) * 2


async def test_works_on_asyncio_too() -> None:
    """The same connection code on asyncio (the fake too)."""

    async def main() -> str:
        async with anyio.create_task_group() as tg:
            fake = FakeRealtime(api_key=KEY)
            await tg.start(fake.serve)
            async with opened(instance(fake, "beta")) as up:
                await send_turn(up, "a", noise_pcm(RATE_HZ, seed=13))
                _, done = await until_final(up, "a")
            tg.cancel_scope.cancel()
        assert isinstance(done, TranscriptCompleted)
        return done.transcript

    def run() -> str:
        return anyio.run(main, backend="asyncio")

    with trio.fail_after(BOUND_S):
        transcript = await trio.to_thread.run_sync(run)
    assert transcript == await stub_transcript(noise_pcm(RATE_HZ, seed=13))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_frames_of_one_batch_go_in_one_write_at_once(backend: str) -> None:
    """Corked (the session's read of its client does it), `send_nowait` holds its frames and
    `flush` writes them together; uncorked, each is written at once — on trio too, by the
    caller, not a writer task it wakes. Peeked at on the fake's socket, which nothing reads in
    between (one thread, no await)."""

    def arrived(sock: Any) -> int:
        try:
            return len(sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0

    async def main() -> list[int]:
        seen: list[int] = []
        async with anyio.create_task_group() as tg, contextlib.AsyncExitStack() as stack:
            fake = FakeRealtime(api_key=KEY)
            await tg.start(fake.serve)
            async with opened(instance(fake)) as up:
                raw = fake.connections[0].socket  # the loop's wrapper: peek through a dup
                sock = socket.socket(fileno=os.dup(raw.fileno()))
                stack.callback(sock.close)
                before = arrived(sock)
                assert up.send_nowait(BeginTurn("b"))
                up.cork()
                for _ in range(3):
                    assert up.send_nowait(AppendAudio(noise_pcm(RATE_HZ // 50, seed=5)))
                seen.append(arrived(sock) - before)  # held
                up.flush()
                seen.append(arrived(sock) - before)  # all three, at once
                flushed = arrived(sock)
                assert up.send_nowait(Commit("b"))
                seen.append(arrived(sock) - flushed)  # uncorked: written at once
                _, done = await until_final(up, "b")
                assert isinstance(done, TranscriptCompleted)
            tg.cancel_scope.cancel()
        return seen

    with trio.fail_after(BOUND_S):
        held, flushed, uncorked = await trio.to_thread.run_sync(
            lambda: anyio.run(main, backend=backend)
        )
    assert held == 0
    assert flushed > 3 * (RATE_HZ // 50) * 2  # three appends' audio, base64 and framed
    assert uncorked > 0
