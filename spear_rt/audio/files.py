"""Reading audio files into int16 mono, and cutting audio into fixed-length frames.

Used by the one-shot transcription endpoint, the CLI and tests: whatever the container
(WAV, FLAC, OGG/Vorbis/Opus, MP3 — all that the bundled libsndfile reads), the rest of
spear_rt only ever sees `NDArray[np.int16]` plus its rate. Headerless files (`.raw`, `.pcm`)
carry no rate, so the caller states it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
from numpy.typing import NDArray

from spear_rt.audio.codecs import AudioFormatError, float32_to_int16, pcm16_from_bytes

__all__ = ["RAW_SUFFIXES", "frames", "load_audio"]

RAW_SUFFIXES = frozenset({".raw", ".pcm"})


def load_audio(
    path: str | os.PathLike[str], *, raw_rate_hz: int = 16000
) -> tuple[NDArray[np.int16], int]:
    """Read an audio file as int16 mono; `.raw`/`.pcm` are headerless s16le at `raw_rate_hz`."""
    path = Path(path)
    if not path.is_file():
        # libsndfile only says "System error." for a missing file; say what it is.
        reason = "not a regular file" if path.exists() else "no such file"
        raise AudioFormatError(f"cannot read audio file {path}: {reason}")
    if path.suffix.lower() in RAW_SUFFIXES:
        return _load_raw(path), raw_rate_hz
    try:
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
