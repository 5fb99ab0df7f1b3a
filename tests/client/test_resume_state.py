"""`ResumeState`, the sans-I/O core of client resume: dedup by seq, the send log, the gap."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from spear_rt.client import ResumeError
from spear_rt.client.resume import ResumeState, with_query


def _created(seq: int = 1) -> dict[str, Any]:
    return {
        "type": "transcription_session.created",
        "seq": seq,
        "session": {"id": "sess_1"},
        "spear": {"resume_token": "tok", "backend": "stub"},
    }


def _append(n: int) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(n)).decode()}


def _resumed(last_event_id: str | None, audio: int) -> dict[str, Any]:
    return {
        "type": "spear.session.resumed",
        "seq": 0,
        "session_id": "sess_1",
        "last_seq": 1,
        "input_audio_bytes": audio,
        "last_event_id": last_event_id,
    }


def _ids(sent: list[bytes]) -> list[str]:
    return [msgspec.json.decode(data)["event_id"] for data in sent]


def test_created_gives_the_reconnect_query_and_token_header() -> None:
    state = ResumeState()
    assert not state.resumable
    assert state.observe(_created())
    assert state.resumable
    assert state.query() == {"session_id": "sess_1", "last_seq": "1"}
    assert state.headers() == {"Spear-Resume-Token": "tok"}


def test_events_at_or_below_the_last_seq_are_duplicates_and_gaps_are_allowed() -> None:
    state = ResumeState()
    seqs = [1, 2, 2, 5, 3, 5, 6]
    assert [state.observe({"type": "x", "seq": s}) for s in seqs] == [
        True,
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert state.last_seq == 6 and state.duplicates == 3
    assert state.observe(_resumed(None, 0))  # seq 0, not part of the log: always passes
    assert state.observe({"type": "no_seq"})


def test_dropping_before_created_cannot_resume() -> None:
    with pytest.raises(ResumeError, match=r"before session\.created"):
        ResumeState().query()


def test_record_gives_ids_in_order_and_keeps_a_callers_id() -> None:
    state = ResumeState()
    first = msgspec.json.decode(state.record({"type": "input_audio_buffer.commit"}))
    mine = msgspec.json.decode(state.record({"type": "x", "event_id": "mine"}))
    second = msgspec.json.decode(state.record({"type": "input_audio_buffer.commit"}))
    assert mine["event_id"] == "mine"
    assert first["event_id"] != second["event_id"]
    assert first["event_id"].endswith("_1") and second["event_id"].endswith("_2")


def test_the_gap_is_everything_after_the_last_applied_event() -> None:
    state = ResumeState()
    state.observe(_created())
    sent = [state.record(_append(960)) for _ in range(4)] + [state.record({"type": "c"})]
    assert state.audio_sent == 4 * 960
    ids = _ids(sent)
    assert state.answer(_resumed(ids[1], 2 * 960)) == sent[2:]
    assert state.resumes == 1
    # confirmed events are forgotten; the same point again (nothing new applied) still works
    assert state.answer(_resumed(ids[1], 2 * 960)) == sent[2:]
    assert state.answer(_resumed(ids[4], 4 * 960)) == []
    assert state.log_bytes == 0


def test_nothing_applied_resends_everything() -> None:
    state = ResumeState()
    sent = [state.record({"type": "session.update"}), state.record(_append(10))]
    assert state.answer(_resumed(None, 0)) == sent


def test_an_audio_count_that_disagrees_with_the_applied_event_is_an_error() -> None:
    state = ResumeState()
    ids = _ids([state.record(_append(960)), state.record(_append(960))])
    with pytest.raises(ResumeError, match="holds 1000 bytes of input audio, but 960 were sent"):
        state.answer(_resumed(ids[0], 1000))


def test_an_append_the_server_refused_does_not_count_as_audio_it_holds() -> None:
    state = ResumeState()
    ok, odd, after = (
        state.record(_append(960)),
        state.record(_append(961)),
        state.record(_append(2)),
    )
    ids = _ids([ok, odd, after])
    refusal = {"type": "error", "seq": 3, "error": {"code": "invalid_audio", "event_id": ids[1]}}
    assert state.observe(refusal)
    assert state.audio_sent == 962
    assert state.answer(_resumed(ids[1], 960)) == [after]
    assert state.answer(_resumed(ids[2], 962)) == []


def test_a_log_over_its_bound_forgets_the_oldest_and_says_so_when_the_gap_needs_them() -> None:
    state = ResumeState(max_log_bytes=3000)
    sent = [state.record(_append(960)) for _ in range(5)]  # ~1.35 kB each encoded
    assert state.log_bytes <= 3000
    ids = _ids(sent)
    with pytest.raises(ResumeError, match=r"max_log_bytes=3000.*cannot be covered"):
        state.answer(_resumed(ids[0], 960))
    # a point the log still reaches (or its edge) is fine
    state2 = ResumeState(max_log_bytes=3000)
    sent2 = [state2.record(_append(960)) for _ in range(5)]
    ids2 = _ids(sent2)
    assert state2.answer(_resumed(ids2[2], 3 * 960)) == sent2[3:]


def test_a_refusal_or_another_answer_is_a_resume_error() -> None:
    state = ResumeState()
    refusal = {"type": "error", "error": {"code": "resume_failed", "message": "expired"}}
    with pytest.raises(ResumeError, match="refused: expired") as info:
        state.answer(refusal)
    assert info.value.code == 4004
    with pytest.raises(ResumeError, match=r"'session\.created' instead of"):
        state.answer({"type": "session.created"})
    with pytest.raises(ResumeError, match="does not say which client event"):
        state.answer({"type": "spear.session.resumed", "input_audio_bytes": 0})


def test_with_query_replaces_and_adds_parameters() -> None:
    url = "ws://h:1/v1/realtime?intent=transcription&last_seq=3"
    assert with_query(url, {"session_id": "s", "last_seq": "9"}) == (
        "ws://h:1/v1/realtime?intent=transcription&session_id=s&last_seq=9"
    )
