"""StablePrefix: append-only deltas from revising hypotheses (rules in the module)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_rt.stable_prefix import StablePrefix

WORDS = st.sampled_from(["go", "forward", "ten", "meters", "four", "for", "a"])
HYPOTHESIS = st.lists(WORDS, max_size=8).map(" ".join)
# (hypothesis or None for "unchanged", milliseconds of audio since the previous update)
STEPS = st.lists(st.tuples(st.none() | HYPOTHESIS, st.sampled_from([0, 20, 100, 400])), max_size=30)
PARAMS = {
    "min_stable_ms": st.sampled_from([0, 100, 1000]),
    "agreement": st.integers(1, 4),
    "hold_back": st.integers(0, 3),
}


@settings(max_examples=300)
@given(steps=STEPS, final=HYPOTHESIS, **PARAMS)
def test_deltas_only_append_and_concatenate_to_the_transcript(
    steps: list[tuple[str | None, int]],
    final: str,
    min_stable_ms: int,
    agreement: int,
    hold_back: int,
) -> None:
    """Every delta extends what was sent; the transcript is exactly their concatenation."""
    prefix = StablePrefix(min_stable_ms=min_stable_ms, agreement=agreement, hold_back=hold_back)
    sent = ""
    now = 0
    for hypothesis, dt in steps:
        now += dt
        delta = prefix.update(hypothesis, audio_ms=now)
        if delta:
            assert delta.startswith(" ") == bool(sent)
            assert " ".join(delta.split()) == delta.lstrip(" ")  # single spaces, none trailing
        sent += delta
        assert prefix.committed == sent  # nothing sent is ever changed
    last, transcript = prefix.finish(final)
    assert sent + last == transcript
    assert transcript.startswith(sent)


@settings(max_examples=300)
@given(steps=STEPS, tail=st.lists(WORDS, max_size=4), **PARAMS)
def test_transcript_equals_final_when_the_final_extends_the_committed_words(
    steps: list[tuple[str | None, int]],
    tail: list[str],
    min_stable_ms: int,
    agreement: int,
    hold_back: int,
) -> None:
    """If the final keeps the committed words, the transcript is the final, word for word."""
    prefix = StablePrefix(min_stable_ms=min_stable_ms, agreement=agreement, hold_back=hold_back)
    now = 0
    for hypothesis, dt in steps:
        now += dt
        prefix.update(hypothesis, audio_ms=now)
    final = " ".join([*prefix.committed.split(), *tail])
    _, transcript = prefix.finish(final)
    assert transcript == final
    assert not prefix.diverged


@settings(max_examples=300)
@given(steps=STEPS, **PARAMS)
def test_committed_words_held_long_enough_in_enough_hypotheses(
    steps: list[tuple[str | None, int]], min_stable_ms: int, agreement: int, hold_back: int
) -> None:
    """At each commit, the last `agreement` distinct hypotheses and every hypothesis since
    `min_stable_ms` ago start with the committed words, and `hold_back` words follow them."""
    prefix = StablePrefix(min_stable_ms=min_stable_ms, agreement=agreement, hold_back=hold_back)
    seen: list[tuple[int, list[str]]] = []  # distinct hypotheses with their arrival time
    now = 0
    for hypothesis, dt in steps:
        now += dt
        if hypothesis is not None and (not seen or seen[-1][1] != hypothesis.split()):
            seen.append((now, hypothesis.split()))
        if not prefix.update(hypothesis, audio_ms=now):
            continue
        committed = prefix.committed.split()
        assert len(seen) >= agreement
        assert all(h[: len(committed)] == committed for _, h in seen[-agreement:])
        settled = [i for i, (arrived, _) in enumerate(seen) if arrived <= now - min_stable_ms]
        assert settled, "a word went out before it had held for min_stable_ms"
        assert all(h[: len(committed)] == committed for _, h in seen[settled[-1] :])
        assert len(seen[-1][1]) - len(committed) >= hold_back


def test_a_word_waits_for_min_stable_ms_of_audio() -> None:
    """A word goes out once it has stood for min_stable_ms of audio, unchanged updates included."""
    prefix = StablePrefix(min_stable_ms=500, agreement=1, hold_back=0)
    assert prefix.update("go", audio_ms=100) == ""
    assert prefix.update(None, audio_ms=400) == ""  # "go" has held 300 ms
    assert prefix.update("go forward", audio_ms=600) == "go"  # 500 ms; "forward" is new
    assert prefix.update(None, audio_ms=1000) == ""
    assert prefix.update(None, audio_ms=1100) == " forward"


def test_a_revision_restarts_the_clock_of_the_revised_words_only() -> None:
    """Words behind a revision keep their age; the revised word and those after it restart."""
    prefix = StablePrefix(min_stable_ms=500, agreement=1, hold_back=0)
    assert prefix.update("go far", audio_ms=0) == ""
    assert prefix.update("go forward", audio_ms=400) == ""
    assert prefix.update(None, audio_ms=500) == "go"
    assert prefix.update(None, audio_ms=800) == ""
    assert prefix.update(None, audio_ms=900) == " forward"


def test_a_word_waits_for_agreement_and_hold_back() -> None:
    """agreement=2, hold_back=1: a word goes out once two hypotheses agree and one follows it."""
    prefix = StablePrefix(min_stable_ms=0, agreement=2, hold_back=1)
    assert prefix.update("go") == ""  # one hypothesis is no agreement
    assert prefix.update("go for") == "go"
    assert prefix.update("go forward") == ""  # "for" was revised
    assert prefix.update("go forward ten") == " forward"  # "ten" is held back
    assert prefix.finish("go forward ten meters") == (" ten meters", "go forward ten meters")


def test_repeated_hypotheses_are_not_new_evidence() -> None:
    """The same hypothesis reported again does not count towards agreement."""
    prefix = StablePrefix(min_stable_ms=0, agreement=2, hold_back=0)
    assert prefix.update("go") == ""
    assert prefix.update("go") == ""
    assert prefix.update("go") == ""
    assert prefix.update("go forward") == "go"


def test_revised_words_are_not_committed() -> None:
    """Pocketsphinx-like revisions of the first words hold everything back until they settle."""
    prefix = StablePrefix(min_stable_ms=0, agreement=3, hold_back=1)
    out = [
        prefix.update(h)
        for h in [
            "ali",
            "ali a",
            "lol yet",
            "ali i'd",
            "lol yeah i'd",
            "lol yeah i'd i'd",
            "lol yeah i'd i'd wanna",
        ]
    ]
    assert "".join(out) == "lol yeah i'd"
    assert prefix.finish("lol yeah i'd i'd wanna do") == (
        " i'd wanna do",
        "lol yeah i'd i'd wanna do",
    )


def test_a_hypothesis_contradicting_committed_words_commits_nothing() -> None:
    """Committed words stay; later words wait until the hypotheses come back to them."""
    prefix = StablePrefix(agreement=1, hold_back=0)
    assert prefix.update("go forward") == "go forward"
    assert prefix.update("so far where") == ""
    assert prefix.update("go forward ten") == " ten"


def test_committed_words_win_over_a_disagreeing_final() -> None:
    """The price of never retracting: committed words stay, the final's later words follow."""
    prefix = StablePrefix(agreement=1, hold_back=0)
    assert prefix.update("so far") == "so far"
    delta, transcript = prefix.finish("go forward ten meters")
    assert (delta, transcript) == (" ten meters", "so far ten meters")
    assert prefix.diverged


def test_final_shorter_than_the_committed_words_keeps_them() -> None:
    """A final with fewer words than were sent adds nothing and takes nothing back."""
    prefix = StablePrefix(agreement=1, hold_back=0)
    prefix.update("go forward ten")
    assert prefix.finish("go") == ("", "go forward ten")


def test_finish_resets_for_the_next_utterance() -> None:
    """After finish (or reset), the next utterance starts from nothing."""
    prefix = StablePrefix(agreement=1, hold_back=0)
    prefix.update("one two")
    prefix.finish("one two")
    assert prefix.committed == ""
    assert prefix.update("three") == "three"
    prefix.reset()
    assert prefix.committed == ""
    assert prefix.finish("") == ("", "")


def test_whitespace_is_normalised_to_single_spaces() -> None:
    """Deltas join words with single spaces whatever the recognizer's spacing."""
    prefix = StablePrefix(agreement=1, hold_back=0)
    assert prefix.update("  go   forward ") == "go forward"
    assert prefix.finish("go  forward\tten") == (" ten", "go forward ten")


@pytest.mark.parametrize(
    ("min_stable_ms", "agreement", "hold_back"), [(-1, 1, 0), (0, 0, 0), (0, 1, -1)]
)
def test_invalid_parameters_are_refused(min_stable_ms: int, agreement: int, hold_back: int) -> None:
    """min_stable_ms and hold_back must not be negative, agreement must be at least 1."""
    with pytest.raises(ValueError):
        StablePrefix(min_stable_ms=min_stable_ms, agreement=agreement, hold_back=hold_back)
