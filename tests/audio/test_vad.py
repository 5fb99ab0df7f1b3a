"""VoiceActivityDetector: fixture segmentation, chunking invariance, clicks, threshold mapping."""

from __future__ import annotations

from itertools import cycle
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.audio import (
    SpeechStarted,
    SpeechStopped,
    VadConfig,
    VadEvent,
    VoiceActivityDetector,
    frames,
    load_audio,
    resample,
)
from spear_rt.errors import ConfigError
from tests.audio.manifest import FIXTURES, fixture_items

ONSET_TOLERANCE_MS = 150
# Speech tails fade out slowly (espeak's last phoneme decays through -40..-50 dBFS), so the
# detected end may come a little before the last sample the manifest counts.
END_TOLERANCE_MS = 200
ODD_SIZES = [1, 3, 7, 160, 1013, 2, 319, 1, 4099]


def run(
    pcm: NDArray[np.int16],
    rate_hz: int,
    config: VadConfig | None = None,
    sizes: list[int] | None = None,
) -> list[VadEvent]:
    """All events from feeding `pcm` in 20 ms frames, or in chunks cycling through `sizes`."""
    vad = VoiceActivityDetector(config or VadConfig(), rate_hz)
    events: list[VadEvent] = []
    if sizes is None:
        for frame in frames(pcm, rate_hz):
            events += vad.process(frame)
        return events
    start = 0
    for size in cycle(sizes):
        if start >= len(pcm):
            return events
        events += vad.process(pcm[start : start + size])
        start += size
    raise AssertionError("unreachable")


def tone(ms: int, dbfs: float, rate_hz: int = 16000, freq_hz: float = 300.0) -> NDArray[np.int16]:
    t = np.arange(rate_hz * ms // 1000) / rate_hz
    amplitude = float(32768 * 10 ** (dbfs / 20) * np.sqrt(2))  # RMS of the tone = dbfs
    return np.rint(np.sin(2 * np.pi * freq_hz * t) * amplitude).astype(np.int16)


def silence(ms: int, rate_hz: int = 16000) -> NDArray[np.int16]:
    return np.zeros(rate_hz * ms // 1000, dtype=np.int16)


def ids(item: dict[str, Any]) -> str:
    return str(item["file"])


@pytest.mark.parametrize("item", fixture_items("speech"), ids=ids)
def test_each_utterance_gives_one_start_stop_pair_at_its_true_bounds(item: dict[str, Any]) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    events = run(pcm, rate, VadConfig(prefix_padding_ms=0))
    expected: list[type[VadEvent]] = [SpeechStarted, SpeechStopped] * len(item["utterances"])
    assert [type(e) for e in events] == expected
    for (start, stop), (true_start, true_end) in zip(
        zip(events[::2], events[1::2], strict=True), item["segments_ms"], strict=True
    ):
        assert isinstance(start, SpeechStarted) and isinstance(stop, SpeechStopped)
        assert abs(start.audio_start_ms - true_start) <= ONSET_TOLERANCE_MS
        assert abs(stop.audio_end_ms - true_end) <= END_TOLERANCE_MS


@pytest.mark.parametrize("item", fixture_items("speech"), ids=ids)
def test_speech_started_is_moved_back_by_the_prefix_padding(item: dict[str, Any]) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    unpadded = run(pcm, rate, VadConfig(prefix_padding_ms=0))
    padded = run(pcm, rate, VadConfig())  # default prefix_padding_ms=300
    assert padded == [
        SpeechStarted(max(0, e.audio_start_ms - 300)) if isinstance(e, SpeechStarted) else e
        for e in unpadded
    ]


@pytest.mark.parametrize("item", fixture_items("silence", "noise"), ids=ids)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_silence_and_noise_never_start_speech(item: dict[str, Any], threshold: float) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    assert run(pcm, rate, VadConfig(threshold=threshold)) == []


@pytest.mark.parametrize("item", fixture_items("speech"), ids=ids)
def test_odd_sized_chunks_give_the_same_events_as_20ms_frames(item: dict[str, Any]) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    assert run(pcm, rate, sizes=ODD_SIZES) == run(pcm, rate)


def test_one_sample_at_a_time_gives_the_same_events() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_open_window.wav")
    assert run(pcm, rate, sizes=[1]) == run(pcm, rate)


def test_whole_file_in_one_chunk_gives_the_same_events() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_two_utterances.wav")
    assert run(pcm, rate, sizes=[len(pcm)]) == run(pcm, rate)


@pytest.mark.parametrize("click_ms", [10, 30, 60, 100])
def test_short_clicks_do_not_start_speech(click_ms: int) -> None:
    audio = np.concatenate([silence(500), tone(click_ms, -10.0), silence(1000)])
    assert run(audio, 16000) == []


def test_a_train_of_clicks_does_not_start_speech() -> None:
    click = np.concatenate([tone(30, -10.0), silence(170)])
    assert run(np.concatenate([silence(300), *[click] * 10]), 16000) == []


def test_sustained_sound_starts_and_stops_speech_at_its_edges() -> None:
    audio = np.concatenate([silence(500), tone(400, -20.0), silence(800)])
    assert run(audio, 16000, VadConfig(prefix_padding_ms=0)) == [
        SpeechStarted(500),
        SpeechStopped(900),
    ]


def test_prefix_padding_is_clamped_at_zero() -> None:
    audio = np.concatenate([silence(100), tone(400, -20.0), silence(800)])
    assert run(audio, 16000)[0] == SpeechStarted(0)


def test_events_arrive_when_they_become_certain() -> None:
    vad = VoiceActivityDetector(VadConfig(prefix_padding_ms=0, silence_duration_ms=300), 16000)
    audio = np.concatenate([silence(200), tone(500, -20.0), silence(600)])
    seen: dict[int, list[VadEvent]] = {}
    for i, frame in enumerate(frames(audio, 16000, frame_ms=10)):
        if events := vad.process(frame):
            seen[(i + 1) * 10] = events  # audio time at the end of this frame
        if 200 + 120 <= (i + 1) * 10 < 700 + 300:
            assert vad.in_speech
        else:
            assert not vad.in_speech
    assert seen == {320: [SpeechStarted(200)], 1000: [SpeechStopped(700)]}


def test_short_pauses_inside_speech_do_not_stop_it() -> None:
    audio = np.concatenate(
        [silence(300), tone(400, -20.0), silence(300), tone(400, -20.0), silence(700)]
    )
    events = run(audio, 16000, VadConfig(prefix_padding_ms=0, silence_duration_ms=500))
    assert events == [SpeechStarted(300), SpeechStopped(1400)]


@pytest.mark.parametrize(("threshold", "detected"), [(0.2, True), (0.5, True), (0.8, False)])
def test_higher_threshold_needs_louder_speech(threshold: float, detected: bool) -> None:
    # -40 dBFS: above the absolute minimum at 0.5 (-45 dBFS), below it at 0.8 (-39 dBFS).
    audio = np.concatenate([silence(300), tone(600, -40.0), silence(700)])
    assert bool(run(audio, 16000, VadConfig(threshold=threshold))) is detected


def test_speech_must_rise_above_the_noise_floor() -> None:
    rng = np.random.default_rng(3)
    noise = np.rint(rng.normal(0, 32768 * 10 ** (-30 / 20), 16000 * 3)).astype(np.int16)
    weak = noise.copy()
    weak[16000:24000] += tone(500, -28.0)  # 2 dB over -30 dBFS noise: not speech
    strong = noise.copy()
    strong[16000:24000] += tone(500, -10.0)
    assert run(weak, 16000) == []
    events = run(strong, 16000, VadConfig(prefix_padding_ms=0))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    assert abs(events[0].audio_start_ms - 1000) <= 30  # type: ignore[union-attr]


@pytest.mark.parametrize("rate_hz", [8000, 24000, 22050])
def test_detects_the_same_onset_at_other_sample_rates(rate_hz: int) -> None:
    pcm, rate = load_audio(FIXTURES / "speech_go_forward.wav")
    reference = run(pcm, rate)
    events = run(resample(pcm, rate, rate_hz), rate_hz)
    assert [type(e) for e in events] == [type(e) for e in reference]
    assert abs(events[0].audio_start_ms - reference[0].audio_start_ms) <= 20  # type: ignore[union-attr]


def test_reset_starts_over_at_time_zero() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_go_forward.wav")
    vad = VoiceActivityDetector(VadConfig(), rate)
    first = vad.process(pcm[: len(pcm) // 2])
    assert vad.in_speech
    vad.reset()
    assert not vad.in_speech and vad.audio_ms == 0
    assert first + vad.process(pcm[len(pcm) // 2 :]) != run(pcm, rate)
    vad.reset()
    assert vad.process(pcm) == run(pcm, rate)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": -0.1},
        {"threshold": 1.5},
        {"prefix_padding_ms": -1},
        {"silence_duration_ms": -5},
    ],
)
def test_config_rejects_out_of_range_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="turn_detection"):
        VadConfig(**kwargs)


@pytest.mark.parametrize(
    ("threshold", "abs_db", "margin_db"),
    [(0.0, -55.0, 6.0), (0.5, -45.0, 15.0), (1.0, -35.0, 24.0)],
)
def test_threshold_maps_to_documented_levels(
    threshold: float, abs_db: float, margin_db: float
) -> None:
    config = VadConfig(threshold=threshold)
    assert (config.start_abs_db, config.start_margin_db) == (abs_db, margin_db)
