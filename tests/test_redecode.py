"""`spear_rt.redecode.Redecoder` rules, driven with a deterministic fake recognizer.

Audio is made of "words": 200 ms tone bursts, word k at 300 + 100 k Hz, with short gaps. The
fake recognizer names every complete burst in a request's audio by its frequency ("w3") and
returns what follows the forced prefix, so a window's hypotheses grow as its audio does, the
way a real recognizer's would, and every answer is computed from the request itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from spear_rt.backend import TranscriptCompleted, TranscriptDelta, TranscriptFailed, UpstreamEvent
from spear_rt.redecode import (
    LEAD_MS,
    DecodeRequest,
    RedecodeConfig,
    Redecoder,
    joined,
    quietest_cut,
)

RATE = 16000
MS = RATE // 1000
WORD_MS, GAP_MS = 200, 100
FRAME = 20 * MS  # appends of 20 ms, like a client


def tone(word: int, ms: int = WORD_MS) -> np.ndarray:
    t = np.arange(ms * MS) / RATE
    return (8000 * np.sin(2 * np.pi * (300 + 100 * word) * t)).astype(np.int16)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * MS, np.int16)


def speech(first: int, count: int, gap_ms: int = GAP_MS) -> np.ndarray:
    """`count` words from word `first`, each followed by `gap_ms` of silence."""
    return np.concatenate(
        [np.concatenate([tone(k), silence(gap_ms)]) for k in range(first, first + count)]
    )


def recognize(request: DecodeRequest) -> str:
    """Name each complete burst of the request's audio; return what follows the prefix."""
    frames = request.audio[: request.audio.size // (10 * MS) * 10 * MS].reshape(-1, 10 * MS)
    loud = np.abs(frames.astype(np.int32)).max(axis=1) > 1000
    heard: list[str] = []
    start = None
    for i, is_loud in enumerate([*loud, False]):
        if is_loud and start is None:
            start = i
        elif not is_loud and start is not None:
            if i - start >= WORD_MS // 10 - 1 and i < len(loud):  # complete, not cut off
                burst = frames[start:i].reshape(-1).astype(np.float64)
                hz = np.argmax(np.abs(np.fft.rfft(burst))) * RATE / burst.size
                heard.append(f"w{round((hz - 300) / 100)}")
            start = None
    prefix = request.prefix.split()
    assert heard[: len(prefix)] == prefix, (prefix, heard)  # the recognizer continues it
    return " ".join(heard[len(prefix) :])


class Driver:
    """Feeds audio in 20 ms appends and runs every decode the machine asks for at once."""

    def __init__(self, config: RedecodeConfig | None = None) -> None:
        self.machine = Redecoder(config or RedecodeConfig(rate_hz=RATE))
        self.events: list[UpstreamEvent] = []
        self.requests: list[DecodeRequest] = []

    def feed(self, pcm: np.ndarray) -> None:
        for start in range(0, pcm.size, FRAME):
            self.machine.append(pcm[start : start + FRAME])
            self.drain()

    def drain(self) -> None:
        while (request := self.machine.next_request()) is not None:
            self.requests.append(request)
            self.events += self.machine.decoded(recognize(request))

    def commit(self, item_id: str) -> None:
        self.events += self.machine.commit(item_id)
        self.drain()

    def deltas(self, item_id: str) -> list[str]:
        return [
            e.delta for e in self.events if isinstance(e, TranscriptDelta) and e.item_id == item_id
        ]

    def completed(self, item_id: str) -> list[str]:
        return [
            e.transcript
            for e in self.events
            if isinstance(e, TranscriptCompleted) and e.item_id == item_id
        ]


def words_of(first: int, count: int) -> str:
    return " ".join(f"w{k}" for k in range(first, first + count))


def test_words_stream_before_the_commit_and_add_up_to_the_transcript() -> None:
    driver = Driver()
    driver.machine.begin("a")
    driver.feed(np.concatenate([silence(300), speech(0, 8), silence(200)]))
    live = driver.deltas("a")
    assert (live and live[0] == "w0") or live[0].startswith("w0 "), live  # no leading space
    assert all(d.startswith(" ") for d in live[1:]), live
    driver.commit("a")
    deltas = driver.deltas("a")
    assert deltas[: len(live)] == live  # what was sent stays: later events only append
    assert driver.completed("a") == ["".join(deltas)] == [words_of(0, 8)]


def test_a_pause_cuts_the_window_and_its_words_become_context() -> None:
    driver = Driver()
    driver.machine.begin("a")
    driver.feed(np.concatenate([speech(0, 3), silence(900), speech(3, 3), silence(200)]))
    driver.commit("a")
    assert driver.completed("a") == [words_of(0, 6)]
    later = [r for r in driver.requests if "w3" in recognize_all(r)]
    assert later and all("w0" not in recognize_all(r) for r in later)  # a new window
    assert all(r.context.startswith(words_of(0, 3)) for r in later)


def recognize_all(request: DecodeRequest) -> str:
    return recognize(DecodeRequest(request.audio, "", request.context, request.final))


def test_a_turn_without_pauses_is_cut_at_max_window_so_no_decode_grows_past_it() -> None:
    config = RedecodeConfig(rate_hz=RATE, max_window_ms=6000)
    driver = Driver(config)
    driver.machine.begin("a")
    driver.feed(speech(0, 60, gap_ms=100))  # 18 s, never a 500 ms pause
    driver.commit("a")
    assert max(r.audio.size for r in driver.requests) <= 6000 * MS
    assert sum(r.final for r in driver.requests) >= 3  # cut into windows, each finalized
    # a burst cut in two at a window edge is lost to both halves: the rest come in order
    heard = driver.completed("a")[0].split()
    assert heard == sorted(heard, key=lambda w: int(w[1:])) and len(heard) >= 55


def two_windows_unread(second_words: int) -> Redecoder:
    """A machine fed a turn with a pause (one window cut, one open), no decode asked for yet."""
    machine = Redecoder(RedecodeConfig(rate_hz=RATE))
    machine.begin("a")
    pcm = np.concatenate([speech(0, 3), silence(900), speech(3, second_words)])
    for start in range(0, pcm.size, FRAME):
        machine.append(pcm[start : start + FRAME])
    return machine


def test_one_decode_in_flight_and_closed_windows_go_first() -> None:
    machine = two_windows_unread(second_words=4)
    request = machine.next_request()
    assert request is not None and request.final  # the cut window, not a partial of the open one
    assert machine.busy and machine.next_request() is None
    machine.decoded(recognize(request))
    assert not machine.busy
    partial = machine.next_request()
    assert partial is not None and not partial.final


def test_the_forced_prefix_is_the_windows_committed_words() -> None:
    driver = Driver()
    driver.machine.begin("a")
    driver.feed(np.concatenate([speech(0, 6), silence(100)]))
    committed = "".join(driver.deltas("a"))
    driver.commit("a")
    final = [r for r in driver.requests if r.final][-1]
    assert committed and final.prefix == committed
    assert driver.completed("a")[0].startswith(committed)


def test_clear_drops_the_turn_and_a_result_in_flight_for_it() -> None:
    machine = Redecoder(RedecodeConfig(rate_hz=RATE))
    machine.begin("a")
    for start in range(0, speech(0, 4).size, FRAME):
        machine.append(speech(0, 4)[start : start + FRAME])
    request = machine.next_request()
    assert request is not None
    machine.clear()
    assert machine.decoded(recognize(request)) == []
    assert machine.next_request() is None and machine.pending_samples == 0
    driver = Driver()
    driver.machine = machine
    machine.begin("b")
    driver.feed(speech(5, 3))
    driver.commit("b")
    assert driver.completed("b") == [words_of(5, 3)] and not driver.deltas("a")


def test_a_failed_decode_fails_its_turn_once_and_the_next_turn_works() -> None:
    driver = Driver()
    machine = driver.machine
    machine.begin("a")
    pcm = np.concatenate([speech(0, 3), silence(900), speech(3, 3)])
    for start in range(0, pcm.size, FRAME):
        machine.append(pcm[start : start + FRAME])
    request = machine.next_request()
    assert request is not None
    events = machine.failed("engine crashed")
    assert events == [TranscriptFailed("a", "engine crashed")]
    assert machine.next_request() is None  # the turn's other windows are not decoded
    assert machine.commit("a") == []
    machine.begin("b")
    driver.feed(speech(7, 2))
    driver.commit("b")
    assert driver.completed("b") == [words_of(7, 2)]
    assert not [e for e in driver.events if getattr(e, "item_id", "") == "a"]


def test_a_silent_turn_completes_at_once_and_silence_is_not_kept() -> None:
    machine = Redecoder(RedecodeConfig(rate_hz=RATE))
    machine.begin("a")
    for _ in range(500):  # 10 s of digital silence
        machine.append(silence(20))
    assert machine.pending_samples <= LEAD_MS * MS
    assert machine.next_request() is None
    assert machine.commit("a") == [TranscriptCompleted("a", "")]


def test_pending_samples_count_undecoded_audio() -> None:
    machine = two_windows_unread(second_words=3)
    before = machine.pending_samples
    assert before >= speech(0, 3).size
    request = machine.next_request()
    assert request is not None and request.final
    machine.decoded(recognize(request))
    assert machine.pending_samples == before - request.audio.size


def test_a_commit_naming_another_item_wins() -> None:
    driver = Driver()
    driver.machine.begin("first-name")
    driver.feed(speech(0, 4))
    driver.commit("real")
    assert driver.completed("real") == [words_of(0, 4)]
    assert not driver.completed("first-name")


@pytest.mark.parametrize(
    ("words", "after_text", "text"),
    [
        (["hello", ",", "world", "."], False, "hello, world."),
        (["again", "."], True, " again."),
        ([",", "so"], False, ", so"),
        ([",", "so"], True, ", so"),
        ([], True, ""),
    ],
)
def test_punctuation_only_words_stick_to_the_word_before(
    words: list[str], after_text: bool, text: str
) -> None:
    assert joined(words, after_text=after_text) == text


def test_quietest_cut_is_the_middle_of_the_quietest_frame_in_the_search_window() -> None:
    audio = np.concatenate([tone(1, 400), silence(20), tone(2, 400), tone(3, 100)])
    cut = quietest_cut(audio, window=audio.size, frame=20 * MS)
    assert cut == 400 * MS + 10 * MS
    assert quietest_cut(audio[:100], window=audio.size, frame=20 * MS) == 100  # shorter


@pytest.mark.parametrize("bad", [{"step_ms": 0}, {"pause_ms": 0}, {"max_window_ms": 5000}])
def test_bad_cadence_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RedecodeConfig(rate_hz=RATE, **bad)
