"""AudioHistory: slices by absolute sample index across chunks, and bounded retention."""

from __future__ import annotations

import numpy as np

from spear_rt.session.history import AudioHistory


def ramp(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int16)


def test_slice_spans_chunk_boundaries() -> None:
    """A slice across three chunks returns exactly those absolute samples."""
    history = AudioHistory(keep_samples=1000)
    for start in range(0, 300, 100):
        history.append(ramp(start, 100), start)
    assert np.array_equal(history.slice(50, 250), ramp(50, 200))


def test_slice_inside_one_chunk_and_at_edges() -> None:
    """Slices within a chunk, at its edges and empty ranges."""
    history = AudioHistory(keep_samples=1000)
    history.append(ramp(0, 100), 0)
    history.append(ramp(100, 100), 100)
    assert np.array_equal(history.slice(10, 20), ramp(10, 10))
    assert np.array_equal(history.slice(100, 200), ramp(100, 100))
    assert history.slice(150, 150).size == 0
    assert history.slice(200, 300).size == 0  # the future is not there yet


def test_old_audio_is_discarded_past_keep_samples() -> None:
    """Only keep_samples (plus at most one chunk) are held; older samples are gone."""
    history = AudioHistory(keep_samples=250)
    for start in range(0, 1000, 100):
        history.append(ramp(start, 100), start)
    held = history.slice(0, 1000)
    assert 250 <= held.size <= 350
    assert np.array_equal(held, ramp(1000 - held.size, held.size))  # the newest, contiguous
    assert history.slice(0, 500).size == 0


def test_slice_reaching_before_what_is_held_returns_the_rest() -> None:
    """A slice starting before the retained window returns the part still held (its tail)."""
    history = AudioHistory(keep_samples=100)
    for start in range(0, 400, 100):
        history.append(ramp(start, 100), start)
    held = history.slice(0, 400)
    assert 0 < held.size < 400
    assert np.array_equal(held, ramp(400 - held.size, held.size))
