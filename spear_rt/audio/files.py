"""Reading audio files into int16 mono, and cutting audio into fixed-length frames.

Used by the one-shot transcription endpoint, the CLI and tests: whatever the container
(WAV, FLAC, OGG/Vorbis/Opus, MP3 — all that the bundled libsndfile reads), the rest of
spear_rt only ever sees `NDArray[np.int16]` plus its rate. Headerless files (`.raw`, `.pcm`)
carry no rate, so the caller states it.

Uploads (`decode_audio_bytes`) are bounded before a sample is decoded: a header is a promise
of how much audio comes out (a 2 KB WAV "at 1 Hz" holds 17 minutes, a gigabyte once
resampled to 24 kHz), so the header is read first and checked against `AudioLimits`; the
decode then runs in blocks into one int16 array and stops at the limit whatever the header
said. libsndfile and soxr release the GIL, so a caller runs this in a worker thread.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import soundfile
from numpy.typing import NDArray

from spear_rt.audio.codecs import AudioFormatError, float32_to_int16, pcm16_from_bytes
from spear_rt.errors import echo

__all__ = [
    "MAX_CHANNELS",
    "MAX_RATE_HZ",
    "MIN_RATE_HZ",
    "RAW_SUFFIXES",
    "AudioLimitError",
    "AudioLimits",
    "decode_audio_bytes",
    "frames",
    "load_audio",
    "pcm16_wav",
]

RAW_SUFFIXES = frozenset({".raw", ".pcm"})
# The realtime path's bounds on a client's rate: below 8 kHz is not speech audio, above
# 96 kHz is not a microphone; both are what a crafted header claims to amplify the decode.
MIN_RATE_HZ = 8000
MAX_RATE_HZ = 96000
MAX_CHANNELS = 8
NAME_CHARS = 256  # of a file name or path quoted in an error (an upload names its own file)
_BLOCK_SAMPLES = 1 << 18  # interleaved samples per decoded block: 1 MiB of float32


def _quoted(name: str) -> str:
    return echo(name, NAME_CHARS)


class AudioLimits(msgspec.Struct, frozen=True):
    """How much audio one upload may decode to (`[server] max_audio_seconds` / `_samples`)."""

    max_seconds: float = 1200.0
    max_samples: int = 57_600_000  # 20 min at 48 kHz: 115 MB as int16 mono


class AudioLimitError(AudioFormatError):
    """An upload refused before decoding: `code` is "unsupported_audio" or "audio_too_long"."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _check_rate(rate: int, name: str) -> None:
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise AudioLimitError(
            f"the audio file {_quoted(name)} is at {rate} Hz; accepted rates are "
            f"{MIN_RATE_HZ} to {MAX_RATE_HZ} Hz",
            "unsupported_audio",
        )


def _check_header(info: soundfile._SoundFileInfo, name: str, limits: AudioLimits) -> None:
    """Refuse what the header says before a sample is decoded."""
    rate, channels, frames_ = int(info.samplerate), int(info.channels), int(info.frames)
    _check_rate(rate, name)
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioLimitError(
            f"the audio file {_quoted(name)} has {channels} channels; at most {MAX_CHANNELS}",
            "unsupported_audio",
        )
    _check_length(frames_, rate, name, limits)


def _check_length(samples: int, rate: int, name: str, limits: AudioLimits) -> None:
    if samples > limits.max_seconds * rate:
        raise AudioLimitError(
            f"the audio file {_quoted(name)} is {samples / rate:.1f} s long; this server takes at "
            f"most {limits.max_seconds:g} s per request (max_audio_seconds)",
            "audio_too_long",
        )
    if samples > limits.max_samples:
        raise AudioLimitError(
            f"the audio file {_quoted(name)} holds {samples} samples at {rate} Hz; this server "
            f"takes at most {limits.max_samples} per request (max_audio_samples)",
            "audio_too_long",
        )


def decode_audio_bytes(
    data: bytes, name: str, limits: AudioLimits
) -> tuple[NDArray[np.int16], int]:
    """Decode an uploaded file to int16 mono within `limits` (AudioLimitError before decoding).

    Any other undecodable input raises AudioFormatError; CPU-bound: call it off the loop.
    """
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioFormatError(
            f"could not decode the audio file {_quoted(name)}: {_reason(exc)}"
        ) from None
    _check_header(info, name, limits)
    rate, channels = int(info.samplerate), int(info.channels)
    cap = min(int(limits.max_seconds * rate), limits.max_samples)
    out = np.empty(max(0, min(int(info.frames), cap)), dtype=np.int16)
    extra: list[NDArray[np.int16]] = []  # only when the header under-reported its length
    filled = 0
    block = max(1, _BLOCK_SAMPLES // channels)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sf:
            while True:
                chunk = sf.read(block, dtype="float32", always_2d=True)
                if not len(chunk):
                    break
                mono = chunk[:, 0] if channels == 1 else chunk.mean(axis=1, dtype=np.float32)
                pcm = float32_to_int16(mono)
                _check_length(filled + pcm.size, rate, name, limits)  # the header lied
                room = min(pcm.size, out.size - filled)
                out[filled : filled + room] = pcm[:room]
                if room < pcm.size:
                    extra.append(pcm[room:])
                filled += pcm.size
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioFormatError(
            f"could not decode the audio file {_quoted(name)}: {_reason(exc)}"
        ) from None
    if filled == 0:
        raise AudioFormatError(f"the audio file {_quoted(name)} holds no samples")
    pcm = np.concatenate([out, *extra]) if extra else out[:filled]
    return pcm, rate


def _reason(exc: Exception) -> str:
    """One line naming what libsndfile (or soundfile) could not do; never a repr."""
    if isinstance(exc, soundfile.LibsndfileError):
        return str(exc.error_string).strip() or "unreadable"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.replace("<", "").replace(">", "")[:200]


def load_audio(
    path: str | os.PathLike[str], *, raw_rate_hz: int = 16000
) -> tuple[NDArray[np.int16], int]:
    """Read an audio file as int16 mono; `.raw`/`.pcm` are headerless s16le at `raw_rate_hz`.

    A header claiming a rate outside 8-96 kHz is refused before reading (callers resample).
    """
    path = Path(path)
    if not path.is_file():
        # libsndfile only says "System error." for a missing file; say what it is.
        reason = "not a regular file" if path.exists() else "no such file"
        raise AudioFormatError(f"cannot read audio file {path}: {reason}")
    if path.suffix.lower() in RAW_SUFFIXES:
        return _load_raw(path), raw_rate_hz
    try:
        _check_rate(int(soundfile.info(path).samplerate), str(path))
        # float32 rather than int16: libsndfile's own float->short conversion does not clip
        # and wraps around on hot float files; our conversion clips. int16 sources
        # round-trip exactly through float32, so nothing is lost for them.
        data, rate_hz = soundfile.read(path, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        raise AudioFormatError(f"cannot read audio file {path}: {exc.error_string}") from exc
    except (OSError, RuntimeError, TypeError) as exc:
        # soundfile raises plain RuntimeError/TypeError for some malformed headers.
        raise AudioFormatError(f"cannot read audio file {path}: {exc}") from exc
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return float32_to_int16(mono), int(rate_hz)


def _load_raw(path: Path) -> NDArray[np.int16]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AudioFormatError(f"cannot read audio file {path}: {exc.strerror or exc}") from exc
    if len(data) % 2:
        raise AudioFormatError(
            f"cannot read audio file {path}: raw s16le audio must have an even number of "
            f"bytes, got {len(data)}"
        )
    # Copy so the array is writable and does not alias the bytes object.
    return pcm16_from_bytes(data).copy()


def frames(pcm: NDArray[np.int16], rate_hz: int, frame_ms: int = 20) -> Iterator[NDArray[np.int16]]:
    """Yield consecutive `frame_ms` slices of `pcm` (views); the last may be shorter."""
    size = rate_hz * frame_ms // 1000
    if size <= 0:
        raise ValueError(f"{frame_ms} ms at {rate_hz} Hz is less than one sample")
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def pcm16_wav(data: bytes) -> tuple[NDArray[np.int16], int] | None:
    """The samples and rate of a plain mono 16-bit PCM WAV, read straight from its chunks
    (cheap enough for the event loop); None for anything else (decode it with
    `decode_audio_bytes`). A speech backend's WAV took ~1 ms through libsndfile."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    at, rate = 12, None
    while at + 8 <= len(data):
        kind, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        body = data[at + 8 : at + 8 + size]
        if kind == b"fmt ":
            if len(body) < 16:
                return None
            tag, channels = int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little")
            bits = int.from_bytes(body[14:16], "little")
            if tag != 1 or channels != 1 or bits != 16:
                return None
            rate = int.from_bytes(body[4:8], "little")
            if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
                return None
        elif kind == b"data":
            if rate is None:
                return None
            usable = len(body) - len(body) % 2  # a size past the end (streamed WAV): what came
            return np.frombuffer(body[:usable], dtype="<i2").astype(np.int16), rate
        at += 8 + size + (size & 1)  # chunks are padded to even sizes
    return None
