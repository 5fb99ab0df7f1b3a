"""Long turns through the openai_realtime relay and the stub: progress while the turn is open.

The relay keeps no turn audio of its own (a bounded send buffer that the socket drains), so a
turn of any length flows upstream; the upstream's own limits come back as that item's
`TranscriptFailed` (as its refusal of an empty commit does, tested beside the relay). The
stub emits a word per 200 ms of audio whatever the turn's length.
"""

from __future__ import annotations

import trio

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Commit,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionUpstream,
)
from spear_rt_backends.openai_realtime import RATE_HZ
from spear_rt_backends.stub import StubTranscription
from tests.backends.test_openai_realtime import FRAME, fake, instance, opened
from tests.conftest import noise_pcm
from tests.fakes.realtime_upstream import FakeRealtime

__all__ = ["fake"]  # the fake upstream fixture, shared with the relay tests

SECONDS = 60  # a long turn, in 200 ms frames: 300 frames
WORDS = SECONDS * 5  # one per 200 ms (the stub, and the fake upstream's live deltas)


async def long_turn(up: TranscriptionUpstream) -> tuple[int, str, str]:
    """Stream SECONDS of audio while reading; (deltas before the commit, deltas, completed)."""
    pcm = noise_pcm(RATE_HZ * SECONDS, seed=21)
    deltas: list[str] = []
    done: list[str] = []
    every_word = trio.Event()  # a delta for each 200 ms of audio, all before the commit

    async def read() -> None:
        while not isinstance(event := await up.receive(), TranscriptCompleted):
            assert isinstance(event, TranscriptDelta) and event.item_id == "long"
            deltas.append(event.delta)
            if len(deltas) == WORDS:
                every_word.set()
        done.append(event.transcript)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await up.send(BeginTurn("long"))
        for start in range(0, pcm.size, FRAME):
            await up.send(AppendAudio(pcm[start : start + FRAME]))
        await every_word.wait()
        before_commit = len(deltas)
        await up.send(Commit("long"))
    return before_commit, "".join(deltas), done[0]


async def test_the_relay_streams_a_long_turn(fake: FakeRealtime) -> None:
    """A minute of audio in one turn: the upstream's live deltas all arrive before the
    commit, then completed; every send returned (nothing held the turn back)."""
    fake.plan(live_deltas=True)
    with trio.fail_after(30):
        async with opened(instance(fake)) as up:
            before, deltas, completed = await long_turn(up)
    assert before == WORDS
    assert deltas == completed and len(completed.split()) == WORDS


async def test_the_stub_streams_a_long_turn() -> None:
    """The stub: one word per 200 ms before the commit, then completed."""
    stub = StubTranscription()
    with trio.fail_after(30):
        before, deltas, completed = await long_turn(stub)
        await stub.aclose()
    assert before == WORDS
    assert deltas == completed
