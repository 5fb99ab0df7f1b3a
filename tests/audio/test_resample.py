"""StreamResampler and resample: pitch and level kept, streaming equals one-shot."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.audio import StreamResampler, frames, resample


def sine(freq_hz: float, rate_hz: int, seconds: float, amplitude: float = 0.5) -> NDArray[np.int16]:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return np.rint(np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767).astype(np.int16)


def peak_frequency_hz(pcm: NDArray[np.int16], rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * rate_hz / len(pcm))


def stream(
    resampler: StreamResampler, pcm: NDArray[np.int16], sizes: list[int]
) -> NDArray[np.int16]:
    """Feed `pcm` in chunks cycling through `sizes`, then flush."""
    out, start, i = [], 0, 0
    while start < len(pcm):
        out.append(resampler.process(pcm[start : start + sizes[i % len(sizes)]]))
        start += sizes[i % len(sizes)]
        i += 1
    out.append(resampler.flush())
    return np.concatenate(out)


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "freq"),
    [(24000, 16000, 440.0), (8000, 16000, 1000.0), (24000, 16000, 3000.0)],
)
def test_sine_keeps_frequency_and_amplitude(in_rate: int, out_rate: int, freq: float) -> None:
    out = resample(sine(freq, in_rate, 1.0), in_rate, out_rate)
    steady = out[out_rate // 10 : -out_rate // 10]  # away from the filter's edges
    # 1 s at out_rate: one FFT bin per Hz.
    assert abs(peak_frequency_hz(out, out_rate) - freq) <= 1.0
    rms = np.sqrt(np.mean(steady.astype(np.float64) ** 2))
    assert rms == pytest.approx(0.5 * 32767 / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(24000, 16000), (8000, 16000), (16000, 24000), (48000, 16000)]
)
def test_output_length_follows_the_rate_ratio(in_rate: int, out_rate: int) -> None:
    pcm = sine(440.0, in_rate, 1.5)
    expected = len(pcm) * out_rate / in_rate
    assert abs(len(resample(pcm, in_rate, out_rate)) - expected) <= 1
    assert (
        abs(len(stream(StreamResampler(in_rate, out_rate), pcm, [in_rate // 50])) - expected) <= 1
    )


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 16000), (8000, 16000)])
def test_streaming_20ms_chunks_matches_one_shot(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(7)
    pcm = (sine(440.0, in_rate, 2.0, 0.3) + rng.normal(0, 500, 2 * in_rate)).astype(np.int16)
    one_shot = resample(pcm, in_rate, out_rate)
    streamed = stream(StreamResampler(in_rate, out_rate), pcm, [in_rate // 50])
    assert len(streamed) == len(one_shot)
    assert np.abs(streamed.astype(np.int32) - one_shot).max() <= 1


def test_odd_sized_chunks_give_the_same_samples_as_20ms_chunks() -> None:
    pcm = sine(700.0, 24000, 1.0)
    by_frame = stream(StreamResampler(24000, 16000), pcm, [480])
    odd = stream(StreamResampler(24000, 16000), pcm, [1, 7, 333, 2, 1001, 480])
    assert len(odd) == len(by_frame)
    assert np.abs(odd.astype(np.int32) - by_frame).max() <= 1


def test_equal_rates_pass_audio_through_untouched() -> None:
    pcm = sine(440.0, 16000, 0.02)
    resampler = StreamResampler(16000, 16000)
    assert resampler.is_passthrough
    assert resampler.process(pcm) is pcm
    assert len(resampler.flush()) == 0
    assert resample(pcm, 16000, 16000) is pcm


def test_flush_readies_the_resampler_for_a_new_stream() -> None:
    pcm = sine(440.0, 24000, 0.5)
    resampler = StreamResampler(24000, 16000)
    first = stream(resampler, pcm, [480])
    second = stream(resampler, pcm, [480])
    assert np.array_equal(first, second)


def test_loud_input_clips_instead_of_wrapping() -> None:
    square = np.tile(np.array([32767] * 12 + [-32768] * 12, dtype=np.int16), 1000)
    out = resample(square, 24000, 16000)  # band-limiting a square wave overshoots (Gibbs)
    assert out.max() == 32767 and out.min() == -32768
    # wrapped samples would flip sign in the middle of a half-period
    assert np.all(np.abs(out[100:-100].astype(np.int32)) > 10000)


def test_empty_input_gives_empty_output() -> None:
    assert len(StreamResampler(24000, 16000).process(np.zeros(0, np.int16))) == 0
    assert len(resample(np.zeros(0, np.int16), 24000, 16000)) == 0


@pytest.mark.parametrize(("in_rate", "out_rate"), [(0, 16000), (16000, -1)])
def test_rejects_non_positive_rates(in_rate: int, out_rate: int) -> None:
    with pytest.raises(ValueError, match="positive sample rate"):
        StreamResampler(in_rate, out_rate)


def test_frames_feed_a_stream_resampler() -> None:
    pcm = sine(440.0, 8000, 1.0)
    resampler = StreamResampler(8000, 16000)
    out = np.concatenate([*(resampler.process(f) for f in frames(pcm, 8000)), resampler.flush()])
    assert len(out) == 16000


def test_a_long_signal_is_resampled_in_blocks_within_twice_its_output() -> None:
    """Ten minutes at 16 kHz to 24 kHz: the peak is the int16 output plus blocks, not the
    five float32 copies of the whole signal a one-shot soxr call makes (~6x the output)."""
    pcm = sine(440, 16000, 600)
    tracemalloc.start()
    try:
        out = resample(pcm, 16000, 24000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert abs(out.size - 24000 * 600) <= 2
    assert peak < 1.5 * out.nbytes
    assert np.array_equal(out, stream(StreamResampler(16000, 24000), pcm, [16000]))
