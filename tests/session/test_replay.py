"""The replay buffer and the machine's DETACHED state, sans-I/O: exact bytes, exact times."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear_rt.backend import TranscriptDelta
from spear_rt.protocol.client_events import decode_client_event
from spear_rt.protocol.settings import Dialect, SessionKind, SessionSettings
from spear_rt.session.machine import ResumeError, SessionMachine, State, Timeouts
from spear_rt.session.outbound import OutboundQueue
from spear_rt.session.replay import ReplayBuffer


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=60), st.integers(1, 400))
def test_replay_buffer_keeps_the_newest_within_its_bound(sizes: list[int], bound: int) -> None:
    """Never over the bound (except one oversized newest event), oldest evicted first, and
    `since` is exact or None."""
    buffer = ReplayBuffer(bound)
    for seq, size in enumerate(sizes, 1):
        buffer.append(seq, bytes([seq % 256]) * size)
        assert buffer.nbytes <= bound or len(buffer) == 1
    kept = list(range(buffer.evicted_through + 1, len(sizes) + 1))
    assert len(buffer) == len(kept)
    for last_seq in range(len(sizes) + 1):
        newer = buffer.since(last_seq)
        if last_seq < buffer.evicted_through:
            assert newer is None
        else:
            assert newer == [bytes([s % 256]) * sizes[s - 1] for s in kept if s > last_seq]


def machine(*, replay_bytes: int | None = 1 << 20) -> SessionMachine:
    m = SessionMachine(
        session_id="sess_0123456789abcdef",
        upstream_rate_hz=24000,
        settings=SessionSettings(kind=SessionKind.TRANSCRIPTION),
        dialect=Dialect.GA,
        outbound=OutboundQueue(1 << 20),
        timeouts=Timeouts(idle_timeout_s=600.0, max_session_seconds=3600.0),
        resume_token="tok",
        replay=ReplayBuffer(replay_bytes) if replay_bytes is not None else None,
    )
    m.start(0.0)
    return m


def sent(m: SessionMachine) -> list[dict[str, Any]]:
    return [json.loads(data) for data in m.outbound.take_all()]


def test_detached_events_are_replayed_after_last_seq() -> None:
    """Events produced while detached reach the client on resume, after `resumed` (seq 0)."""
    m = machine()
    m.client_event(decode_client_event(b'{"type":"spear.metrics.request","event_id":"x1"}'), 1.0)
    assert [e["seq"] for e in sent(m)] == [1, 2]
    assert m.detach(2.0, 30.0) and m.state is State.DETACHED
    m.upstream_event(TranscriptDelta("item_1", "hello"))
    assert m.outbound.take_all() == []  # nothing queued for a socket that is gone
    first, *replayed = (json.loads(d) for d in m.resume(3.0, 1))
    assert first == {
        "type": "spear.session.resumed",
        "event_id": first["event_id"],
        "seq": 0,
        "session_id": "sess_0123456789abcdef",
        "last_seq": 1,
        "input_audio_bytes": 0,
        "last_event_id": "x1",
    }
    assert [(e["seq"], e["type"]) for e in replayed] == [
        (2, "spear.metrics"),
        (3, "conversation.item.input_audio_transcription.delta"),
    ]
    assert m.state is State.ACTIVE
    m.upstream_event(TranscriptDelta("item_1", " again"))
    assert [e["seq"] for e in sent(m)] == [4]  # live again


def test_resume_refusals_change_nothing() -> None:
    """Not detached, last_seq ahead, or evicted events: ResumeError, session as it was."""
    m = machine()
    with pytest.raises(ResumeError, match="not waiting"):
        m.resume(1.0, 0)
    m.detach(1.0, 30.0)
    with pytest.raises(ResumeError, match=r"outside 0\.\.1"):
        m.resume(1.0, 2)
    assert m.state is State.DETACHED
    assert m.resume(1.0, 1)[1:] == []


def test_eviction_while_detached_closes_the_session() -> None:
    """The detached client can no longer get every event: close instead of a lossy resume."""
    m = machine(replay_bytes=600)
    m.detach(1.0, 30.0)
    for i in range(3):
        m.upstream_event(TranscriptDelta("item_1", "x" * 150))
        assert m.close is None or i > 0
    assert m.state is State.CLOSED
    assert m.close is not None and "replay buffer" in m.close.reason


def test_grace_runs_out_at_exactly_the_deadline() -> None:
    """tick() before the deadline keeps the session; at the deadline it closes."""
    m = machine()
    m.detach(10.0, 5.0)
    assert m.next_deadline() == 15.0
    m.tick(14.999)
    assert m.state is State.DETACHED
    m.tick(15.0)
    assert m.state is State.CLOSED and m.close is not None
    assert "resume_grace_seconds" in m.close.reason


def test_without_a_replay_buffer_a_drop_ends_the_session() -> None:
    """Resume off (grace 0): detach refuses and the session is over."""
    m = machine(replay_bytes=None)
    assert not m.detach(1.0, 30.0)
    assert m.state is State.CLOSED


def test_drain_closes_a_detached_session() -> None:
    """Nobody to tell and no resume on a draining server: close at once."""
    m = machine()
    m.detach(1.0, 30.0)
    m.drain(2.0, 10.0)
    assert m.state is State.CLOSED and m.close is not None and m.close.code == 1001


def test_detach_twice_is_one_detach() -> None:
    """A resume that took over first, then the old reader noticing its drop: still detached."""
    m = machine()
    assert m.detach(1.0, 30.0)
    assert m.detach(2.0, 30.0)
    assert m.state is State.DETACHED
    assert m.next_deadline() == 31.0
