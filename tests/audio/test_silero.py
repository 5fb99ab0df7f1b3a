"""SileroVad: fixture segmentation, silence and noise, chunking invariance, rates, rules."""

from __future__ import annotations

import sys
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
    frames,
    load_audio,
    resample,
    silero,
)
from spear_rt.audio.silero import DetectorUnavailable, SileroVad
from tests.audio.manifest import FIXTURES, fixture_items

try:
    silero.require()
except DetectorUnavailable as exc:  # pragma: no cover - the test extra installs it
    pytest.skip(str(exc), allow_module_level=True)

# The network hears speech a little after the -50 dBFS edge the manifest counts and lets go a
# little before it (espeak's tails fade through -40..-50 dBFS); windows are 32 ms.
ONSET_TOLERANCE_MS = 150
END_TOLERANCE_MS = 200
ODD_SIZES = [1, 3, 7, 160, 1013, 2, 319, 1, 4099]


def run(
    pcm: NDArray[np.int16],
    rate_hz: int,
    config: VadConfig | None = None,
    sizes: list[int] | None = None,
) -> list[VadEvent]:
    """All events from feeding `pcm` in 20 ms frames, or in chunks cycling through `sizes`."""
    vad = SileroVad(config or VadConfig(detector="silero"), rate_hz)
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


def unpadded(**kwargs: Any) -> VadConfig:
    return VadConfig(detector="silero", prefix_padding_ms=0, **kwargs)


def ids(item: dict[str, Any]) -> str:
    return str(item["file"])


@pytest.mark.parametrize("item", fixture_items("speech"), ids=ids)
def test_each_utterance_gives_one_start_stop_pair_at_its_true_bounds(item: dict[str, Any]) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    events = run(pcm, rate, unpadded())
    expected: list[type[VadEvent]] = [SpeechStarted, SpeechStopped] * len(item["utterances"])
    assert [type(e) for e in events] == expected
    for (start, stop), (true_start, true_end) in zip(
        zip(events[::2], events[1::2], strict=True), item["segments_ms"], strict=True
    ):
        assert isinstance(start, SpeechStarted) and isinstance(stop, SpeechStopped)
        assert abs(start.audio_start_ms - true_start) <= ONSET_TOLERANCE_MS
        assert abs(stop.audio_end_ms - true_end) <= END_TOLERANCE_MS


def test_two_utterances_give_two_turns_at_24k() -> None:
    """At the protocol's own rate (resampled inside): two turns, the pause between them."""
    pcm, rate = load_audio(FIXTURES / "speech_two_utterances.wav")
    events = run(resample(pcm, rate, 24000), 24000, unpadded())
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped] * 2
    assert events[1].audio_end_ms < 3000 < events[2].audio_start_ms  # type: ignore[union-attr]


@pytest.mark.parametrize("item", fixture_items("silence", "noise"), ids=ids)
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
def test_silence_and_noise_never_start_speech(item: dict[str, Any], threshold: float) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    assert run(pcm, rate, VadConfig(detector="silero", threshold=threshold)) == []


def test_speech_started_is_moved_back_by_the_prefix_padding() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_two_utterances.wav")
    bare = run(pcm, rate, unpadded())
    padded = run(pcm, rate, VadConfig(detector="silero"))  # prefix_padding_ms=300
    assert padded == [
        SpeechStarted(max(0, e.audio_start_ms - 300)) if isinstance(e, SpeechStarted) else e
        for e in bare
    ]


@pytest.mark.parametrize("rate_hz", [16000, 24000, 8000])
def test_odd_sized_chunks_give_the_same_events_as_20ms_frames(rate_hz: int) -> None:
    pcm, rate = load_audio(FIXTURES / "speech_two_utterances.wav")
    pcm = resample(pcm, rate, rate_hz)
    framed = run(pcm, rate_hz)
    assert len(framed) == 4
    assert run(pcm, rate_hz, sizes=ODD_SIZES) == framed
    assert run(pcm, rate_hz, sizes=[len(pcm)]) == framed


def test_whole_file_in_one_call_gives_the_same_events_as_one_window_at_a_time() -> None:
    """One `run` over many windows equals one per window (the model scans its batch)."""
    pcm, rate = load_audio(FIXTURES / "speech_in_noise.wav")
    assert run(pcm, rate, sizes=[len(pcm)]) == run(pcm, rate, sizes=[512])


def test_a_short_burst_of_speech_does_not_start_it() -> None:
    """64 ms of a word (two windows) is shorter than the 96 ms a start needs."""
    pcm, rate = load_audio(FIXTURES / "speech_go_forward.wav")
    burst = pcm[rate * 600 // 1000 : rate * 664 // 1000]
    audio = np.concatenate([np.zeros(rate // 2, np.int16), burst, np.zeros(rate, np.int16)])
    assert run(audio, rate) == []


def test_events_arrive_when_they_become_certain() -> None:
    """SpeechStarted 3 windows after its onset, SpeechStopped `silence_duration_ms` after its end
    (16 kHz: no resampler delay); in_speech in between."""
    pcm, rate = load_audio(FIXTURES / "speech_open_window.wav")
    vad = SileroVad(unpadded(silence_duration_ms=320), rate)
    seen: list[tuple[int, VadEvent]] = []
    for i in range(0, len(pcm), 512):
        for event in vad.process(pcm[i : i + 512]):
            seen.append((vad.audio_ms, event))
    (t_start, start), (t_stop, stop) = seen
    assert isinstance(start, SpeechStarted) and isinstance(stop, SpeechStopped)
    assert t_start == start.audio_start_ms + 3 * 32
    assert t_stop == stop.audio_end_ms + 320


def test_longer_silence_duration_bridges_the_pause_between_utterances() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_two_utterances.wav")  # a 1.2 s pause
    pcm = np.concatenate([pcm, np.zeros(2 * rate, np.int16)])
    events = run(pcm, rate, unpadded(silence_duration_ms=1500))
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]


def test_reset_starts_over_at_time_zero() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_go_forward.wav")
    vad = SileroVad(VadConfig(detector="silero"), rate)
    first = vad.process(pcm[: len(pcm) // 2])
    assert vad.in_speech and first
    vad.reset()
    assert not vad.in_speech and vad.audio_ms == 0
    assert vad.process(pcm) == run(pcm, rate)


def test_detectors_share_one_model_but_not_state() -> None:
    pcm, rate = load_audio(FIXTURES / "speech_go_forward.wav")
    a = SileroVad(VadConfig(detector="silero"), rate)
    b = SileroVad(VadConfig(detector="silero"), rate)
    assert a._model is b._model
    a.process(pcm[: len(pcm) // 2])
    assert a.in_speech and not b.in_speech
    assert b.process(pcm) == run(pcm, rate)


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(silero, "_session", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(DetectorUnavailable) as info:
        silero.require()
    message = str(info.value)
    assert "onnxruntime" in message and "pip install 'spear-rt[whisper]'" in message
    assert "\n" not in message


def test_model_file_is_found_without_importing_faster_whisper() -> None:
    path = silero.model_path()
    assert path is not None and path.name == "silero_vad_v6.onnx" and path.is_file()
