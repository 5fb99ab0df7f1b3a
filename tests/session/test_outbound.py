"""OutboundQueue: byte accounting, coalescing, dropping oldest deltas, never-dropped events."""

from __future__ import annotations

import json
from typing import Any

from spear_rt.protocol import server_events as se
from spear_rt.session.outbound import OutboundQueue

_seq = 0


def stamp(event: se.ServerEvent) -> se.ServerEvent:
    global _seq
    _seq += 1
    event.seq = _seq
    event.event_id = f"event_{_seq}"
    return event


def delta(item_id: str, text: str) -> se.ServerEvent:
    return stamp(se.TranscriptionDelta(item_id=item_id, delta=text))


def completed(item_id: str, text: str) -> se.ServerEvent:
    return stamp(se.TranscriptionCompleted(item_id=item_id, transcript=text))


def error() -> se.ServerEvent:
    return stamp(se.Error(error=se.ErrorBody(type="server_error", message="x" * 40)))


def decoded(queue: OutboundQueue) -> list[dict[str, Any]]:
    return [json.loads(data) for data in queue.take_all()]


def size(event: se.ServerEvent) -> int:
    return len(se.encode_server_event(event))


def test_under_budget_events_pass_through_in_order() -> None:
    """Below max_bytes nothing is merged or dropped; take_all empties the queue."""
    queue = OutboundQueue(1 << 20)
    events = [delta("a", "one"), delta("a", " two"), completed("a", "one two")]
    for event in events:
        queue.push(event)
    assert len(queue) == 3
    assert queue.nbytes == sum(size(e) for e in events)
    out = decoded(queue)
    assert [e["seq"] for e in out] == [e.seq for e in events]
    assert len(queue) == 0 and queue.nbytes == 0
    assert queue.coalesced == queue.dropped == 0


def test_push_returns_the_encoding() -> None:
    """push returns exactly the bytes that will be sent (for the replay buffer)."""
    queue = OutboundQueue(1 << 20)
    event = delta("a", "hi")
    data = queue.push(event)
    assert queue.take_all() == [data]
    assert json.loads(data)["delta"] == "hi"


def test_over_budget_consecutive_deltas_of_one_item_coalesce() -> None:
    """Over budget, same-item deltas merge into one with the text joined and the later seq."""
    one = size(delta("a", "w00"))
    queue = OutboundQueue(max_bytes=one * 3)
    pushed = [delta("a", f" w{i:02}") for i in range(6)]
    for event in pushed:
        queue.push(event)
    out = decoded(queue)
    assert queue.dropped == 0
    assert queue.coalesced >= 3
    assert "".join(e["delta"] for e in out) == "".join(e.delta for e in pushed)  # type: ignore[attr-defined]
    assert out[-1]["seq"] == pushed[-1].seq
    assert all(e["item_id"] == "a" for e in out)


def test_deltas_of_different_items_do_not_merge() -> None:
    """Coalescing never joins text across items, nor across an event in between."""
    queue = OutboundQueue(max_bytes=1)  # everything is over budget: shrink on every push
    queue.push(delta("a", "x"))
    queue.push(completed("a", "x"))
    queue.push(delta("b", "y"))
    queue.push(delta("c", "z"))
    kept = [e for e in decoded(queue) if e["type"].endswith(".delta")]
    assert all(e["delta"] in ("x", "y", "z") for e in kept)


def test_oldest_deltas_are_dropped_and_counted_when_coalescing_is_not_enough() -> None:
    """Deltas of alternating items cannot merge: the oldest are dropped, counters say how many."""
    probe = delta("a", "word")
    queue = OutboundQueue(max_bytes=size(probe) * 4)
    pushed = [delta("ab"[i % 2], "word") for i in range(12)]
    for event in pushed:
        queue.push(event)
    out = decoded(queue)
    assert queue.dropped == 12 - len(out)
    assert queue.dropped > 0
    assert [e["seq"] for e in out] == [e.seq for e in pushed[-len(out) :]]  # the newest survive
    assert not queue.overflowed


def test_completed_and_errors_are_never_dropped() -> None:
    """Under pressure only deltas go; every completed and error event is delivered."""
    probe = completed("a", "some transcript")
    queue = OutboundQueue(max_bytes=size(probe) * 3, hard_limit_factor=100)
    must_keep = []
    for i in range(10):
        queue.push(delta(f"i{i}", "partial"))
        for event in (completed(f"i{i}", "some transcript"), error()):
            queue.push(event)
            must_keep.append(event.seq)
    out_seqs = {e["seq"] for e in decoded(queue)}
    assert set(must_keep) <= out_seqs
    assert queue.dropped > 0


def test_overflowed_when_undroppable_events_pass_the_hard_limit() -> None:
    """Only undroppable events and past max_bytes x factor: overflowed turns true, not before."""
    queue = OutboundQueue(max_bytes=400, hard_limit_factor=2)
    total = 0
    while total <= queue.hard_limit_bytes:
        assert not queue.overflowed
        event = completed("item", "text")
        total += size(event)
        queue.push(event)
    assert queue.overflowed
    assert queue.nbytes == total  # nothing was dropped to get there
    assert queue.dropped == 0


def test_nbytes_matches_what_is_queued_after_coalescing_and_dropping() -> None:
    """The byte counter equals the size of what take_all returns, whatever happened."""
    for stop in (5, 17, 50):
        queue = OutboundQueue(max_bytes=300)
        for i in range(stop):
            queue.push(delta("ab"[i % 3 == 0], f"w{i}"))
            if i % 7 == 0:
                queue.push(completed("a", "t"))
        assert queue.coalesced + queue.dropped > 0
        assert queue.nbytes == sum(len(d) for d in queue.take_all())
