"""load_audio across containers, downmix and raw files; frames() slicing."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile  # type: ignore[import-untyped]

from spear_rt.audio import AudioFormatError, frames, load_audio
from spear_rt.audio.files import AudioLimits, decode_audio_bytes, pcm16_wav
from tests.audio.manifest import FIXTURES, MANIFEST

RAMP = (np.arange(-16000, 16000, 8, dtype=np.int16) * 2).astype(np.int16)


@pytest.mark.parametrize("item", MANIFEST, ids=lambda item: str(item["file"]))
def test_fixtures_load_as_16k_mono_of_the_manifest_length(item: dict[str, Any]) -> None:
    pcm, rate = load_audio(FIXTURES / item["file"])
    assert pcm.dtype == np.dtype(np.int16) and pcm.ndim == 1
    assert rate == item["rate_hz"]
    assert len(pcm) * 1000 // rate == item["duration_ms"]


def test_int16_wav_loads_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "ramp.wav"
    soundfile.write(path, RAMP, 16000, subtype="PCM_16")
    pcm, rate = load_audio(path)
    assert rate == 16000
    assert np.array_equal(pcm, RAMP)


def test_flac_loads_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "ramp.flac"
    soundfile.write(path, RAMP, 22050)
    pcm, rate = load_audio(path)
    assert rate == 22050
    assert np.array_equal(pcm, RAMP)


@pytest.mark.parametrize(("suffix", "fmt"), [(".ogg", "OGG"), (".mp3", "MP3")])
def test_lossy_containers_load(tmp_path: Path, suffix: str, fmt: str) -> None:
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    t = np.arange(48000) / 48000
    tone = np.rint(np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    path = tmp_path / f"tone{suffix}"
    soundfile.write(path, tone, 48000)
    pcm, rate = load_audio(path)
    assert pcm.dtype == np.dtype(np.int16) and rate == 48000
    assert abs(len(pcm) - len(tone)) < 4800  # encoders pad; within 100 ms
    assert 8000 < np.abs(pcm).max() < 12000


def test_stereo_is_downmixed_to_the_channel_mean(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    stereo = np.stack([np.full(100, 1000), np.full(100, 3000)], axis=1).astype(np.int16)
    soundfile.write(path, stereo, 8000, subtype="PCM_16")
    pcm, rate = load_audio(path)
    assert rate == 8000
    assert pcm.tolist() == [2000] * 100


def test_hot_float_wav_is_clipped_not_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "hot.wav"
    soundfile.write(
        path, np.array([0.5, 1.5, -2.0, -0.25], dtype=np.float32), 16000, subtype="FLOAT"
    )
    pcm, _ = load_audio(path)
    assert pcm.tolist() == [16384, 32767, -32768, -8192]


@pytest.mark.parametrize("suffix", [".raw", ".pcm", ".RAW"])
def test_raw_files_are_s16le_at_the_given_rate(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"audio{suffix}"
    path.write_bytes(b"\x01\x00\xff\x7f\x00\x80")
    pcm, rate = load_audio(path)
    assert (pcm.tolist(), rate) == ([1, 32767, -32768], 16000)
    assert load_audio(path, raw_rate_hz=8000)[1] == 8000
    pcm[0] = 5  # writable: callers may process in place


def test_raw_file_with_odd_length_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(AudioFormatError, match=r"odd\.raw.*even number of bytes, got 3"):
        load_audio(path)


def test_missing_file_is_an_audio_format_error(tmp_path: Path) -> None:
    for name in ("missing.wav", "missing.raw"):
        with pytest.raises(AudioFormatError, match=rf"{name}: no such file"):
            load_audio(tmp_path / name)
    with pytest.raises(AudioFormatError, match="not a regular file"):
        load_audio(tmp_path)


def test_unreadable_file_reports_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioFormatError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message
    assert "Format not recognised" in message


def test_truncated_wav_reports_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "truncated.wav"
    path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioFormatError, match=r"truncated\.wav: .+"):
        load_audio(path)


def test_frames_cut_20ms_slices_and_keep_the_last_partial_one() -> None:
    pcm = np.arange(1000, dtype=np.int16)
    cut = list(frames(pcm, 16000))
    assert [len(f) for f in cut] == [320, 320, 320, 40]
    assert np.array_equal(np.concatenate(cut), pcm)


def test_frames_honours_frame_ms_and_rate() -> None:
    pcm = np.zeros(24000, dtype=np.int16)
    assert {len(f) for f in frames(pcm, 24000, frame_ms=10)} == {240}
    assert list(frames(np.zeros(0, np.int16), 16000)) == []


def test_frames_rejects_frames_shorter_than_a_sample() -> None:
    with pytest.raises(ValueError, match="less than one sample"):
        list(frames(np.zeros(10, np.int16), 8000, frame_ms=0))


def test_a_file_claiming_a_rate_outside_8_to_96_khz_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    """The CLI, the client and WASM hosts resample what load_audio returns: a "1 Hz" header
    would become gigabytes, so it is refused like an upload is."""
    path = tmp_path / "one_hz.wav"
    soundfile.write(path, np.zeros(1000, dtype=np.int16), 1, subtype="PCM_16")
    with pytest.raises(AudioFormatError, match=r"one_hz\.wav.*1 Hz.*8000 to 96000"):
        load_audio(path)


def _wav(pcm: np.ndarray, rate: int, subtype: str = "PCM_16", channels: int = 1) -> bytes:
    out = io.BytesIO()
    data = np.repeat(pcm[:, None], channels, axis=1) if channels > 1 else pcm
    soundfile.write(out, data, rate, format="WAV", subtype=subtype)
    return out.getvalue()


def test_pcm16_wav_reads_plain_wavs_exactly_and_declines_the_rest() -> None:
    """The speech stage's fast path: same samples as the decoder, None when it is not sure."""
    pcm = (np.arange(4801) % 2000 - 1000).astype(np.int16)
    plain = _wav(pcm, 24000)
    samples, rate = pcm16_wav(plain) or (None, 0)
    assert rate == 24000 and samples is not None and np.array_equal(samples, pcm)
    assert np.array_equal(samples, decode_audio_bytes(plain, "a.wav", AudioLimits())[0])
    assert pcm16_wav(_wav(pcm, 24000, "FLOAT")) is None
    assert pcm16_wav(_wav(pcm, 24000, channels=2)) is None
    assert pcm16_wav(_wav(pcm, 4000)) is None  # outside the rates we take
    assert pcm16_wav(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert pcm16_wav(b"ID3 not a wav at all") is None
    cut = pcm16_wav(plain[:-3])  # a body shorter than its header says: the whole samples
    assert cut is not None and np.array_equal(cut[0], pcm[:-2])
