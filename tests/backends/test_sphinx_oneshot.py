"""pocketsphinx one-shot segmentation: cuts in pauses, a bound on segment length."""

from __future__ import annotations

import itertools

import numpy as np

from spear_rt.audio import load_audio
from spear_rt_backends.sphinx_oneshot import MAX_SEGMENT_S, RATE_HZ, cut_points
from tests.conftest import FIXTURES


def test_one_utterance_is_one_segment_over_the_whole_file() -> None:
    pcm, _ = load_audio(FIXTURES / "speech_go_forward.wav")
    assert cut_points(pcm, 400) == [(0, pcm.size)]


def test_two_utterances_are_cut_inside_the_pause_between_them() -> None:
    pcm, _ = load_audio(FIXTURES / "speech_two_utterances.wav")
    (a, cut), (cut2, end) = cut_points(pcm, 400)
    assert (a, end) == (0, pcm.size) and cut == cut2
    level = np.abs(pcm[cut - 800 : cut + 800].astype(np.int32)).max()
    assert level < 0.05 * np.abs(pcm.astype(np.int32)).max()  # a quiet place, not a word


def test_long_speech_without_pauses_is_cut_at_most_every_max_segment() -> None:
    rng = np.random.default_rng(3)
    pcm = rng.integers(-8000, 8000, int(95 * RATE_HZ), dtype=np.int16)  # no pause at all
    ranges = cut_points(pcm, 400)
    assert ranges[0][0] == 0 and ranges[-1][1] == pcm.size
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(end - start <= MAX_SEGMENT_S * RATE_HZ for start, end in ranges)
    assert len(ranges) == 4
