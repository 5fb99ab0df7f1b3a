"""spear_rt.session.journal: what a new upstream is sent, and which delta text is skipped."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
)
from spear_rt.session.journal import TOO_LONG, TurnJournal


def pcm_of(*values: int) -> NDArray[np.int16]:
    return np.array(values, dtype=np.int16)


def test_replay_resends_every_unfinished_turn_in_order() -> None:
    journal = TurnJournal()
    a1, a2, b1 = pcm_of(1, 2), pcm_of(3), pcm_of(4, 5, 6)
    for command in (BeginTurn("a"), AppendAudio(a1), AppendAudio(a2), Commit("a"),
                    BeginTurn("b"), AppendAudio(b1)):  # fmt: skip
        assert journal.record_command(command)
    assert journal.replay() == [
        BeginTurn("a"), AppendAudio(a1), AppendAudio(a2), Commit("a"),
        BeginTurn("b"), AppendAudio(b1),
    ]  # fmt: skip
    assert journal.replayed_items() == ("a", "b") and journal.audio_bytes == 12


def test_a_final_event_forgets_its_turn_and_is_forwarded_as_is() -> None:
    journal = TurnJournal()
    for command in (BeginTurn("a"), AppendAudio(pcm_of(1)), Commit("a"), BeginTurn("b"),
                    AppendAudio(pcm_of(2)), Commit("b"), BeginTurn("c")):  # fmt: skip
        journal.record_command(command)
    done = TranscriptCompleted("a", "alpha")
    assert journal.record_event(done) is done
    failed = TranscriptFailed("b", "nope")
    assert journal.record_event(failed) is failed
    assert journal.replay() == [BeginTurn("c")] and journal.audio_bytes == 0
    late = TranscriptDelta("a", "late")  # an item the journal no longer knows: passed on
    assert journal.record_event(late) is late


def test_clear_drops_the_open_turn_only() -> None:
    journal = TurnJournal()
    for command in (BeginTurn("a"), AppendAudio(pcm_of(1)), Commit("a"), BeginTurn("b"),
                    AppendAudio(pcm_of(2, 3)), Clear()):  # fmt: skip
        journal.record_command(command)
    assert journal.replay() == [BeginTurn("a"), AppendAudio(pcm_of(1)), Commit("a")]
    assert journal.items == ("a",) and journal.audio_bytes == 2


def test_a_new_turn_while_one_is_open_takes_over_its_audio() -> None:
    """The upstream buffers audio until a commit or clear: it belongs to the new turn."""
    journal = TurnJournal()
    first, second = pcm_of(1), pcm_of(2)
    for command in (BeginTurn("a"), AppendAudio(first), BeginTurn("b"), AppendAudio(second)):
        journal.record_command(command)
    assert journal.replay() == [BeginTurn("b"), AppendAudio(first), AppendAudio(second)]
    assert journal.items == ("b",) and journal.audio_bytes == 4


def test_deltas_of_a_replayed_item_skip_the_text_already_forwarded() -> None:
    journal = TurnJournal()
    journal.record_command(BeginTurn("a"))
    assert journal.record_event(TranscriptDelta("a", "one")) == TranscriptDelta("a", "one")
    assert journal.record_event(TranscriptDelta("a", " two")) == TranscriptDelta("a", " two")
    assert journal.restart() == []  # a new upstream hears the turn from its start
    assert journal.record_event(TranscriptDelta("a", "one")) is None
    assert journal.record_event(TranscriptDelta("a", " tw")) is None
    assert journal.record_event(TranscriptDelta("a", "o thr")) == TranscriptDelta("a", " thr")
    assert journal.record_event(TranscriptDelta("a", "ee")) == TranscriptDelta("a", "ee")
    done = TranscriptCompleted("a", "one two three")
    assert journal.record_event(done) is done


def test_audio_over_the_bound_makes_the_open_turn_fail_at_its_commit() -> None:
    journal = TurnJournal(max_replay_audio_bytes=6)
    kept, big = pcm_of(1, 2), pcm_of(3, 4)
    for command in (BeginTurn("a"), AppendAudio(kept), Commit("a"), BeginTurn("b"),
                    AppendAudio(kept), AppendAudio(big)):  # fmt: skip
        journal.record_command(command)
    assert journal.audio_bytes == 4  # b's audio is no longer kept
    assert journal.replayed_items() == ("a",)
    assert journal.restart() == []  # b is still open: it fails when committed
    assert journal.replay() == [BeginTurn("a"), AppendAudio(kept), Commit("a")]
    assert not journal.record_command(AppendAudio(big))  # nothing more of b goes upstream
    assert not journal.record_command(Commit("b"))
    [failed] = journal.take_failures()
    assert failed.item_id == "b" and not failed.retryable and TOO_LONG in failed.message
    assert journal.take_failures() == []
    assert journal.record_command(BeginTurn("c"))  # the next turn is sent again
    assert journal.record_command(AppendAudio(kept))


def test_a_committed_turn_over_the_bound_fails_at_the_reconnect() -> None:
    journal = TurnJournal(max_replay_audio_bytes=2)
    for command in (BeginTurn("a"), AppendAudio(pcm_of(1, 2)), Commit("a"), BeginTurn("b")):
        journal.record_command(command)
    [failed] = journal.restart()
    assert failed.item_id == "a" and TOO_LONG in failed.message
    assert journal.replay() == [BeginTurn("b")] and journal.items == ("b",)
