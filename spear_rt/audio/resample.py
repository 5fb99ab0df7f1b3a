"""Sample-rate conversion of int16 mono audio, streaming or one-shot, on libsoxr.

The client's rate (24 kHz pcm16, 8 kHz G.711) rarely matches what a backend wants (16 kHz for
most ASR), so every session that crosses rates owns one `StreamResampler`. It keeps the
filter state between 20 ms frames, so chunk boundaries leave no clicks and streaming gives
the same samples as converting the whole signal at once.

Why float32 inside, when soxr can take int16 directly: soxr's int16 path quantises each
chunk's output on its own schedule and drifts up to 2 LSB from its one-shot result; in float32
both paths agree sample for sample once we round the same way (`float32_to_int16`). The
conversion costs a few microseconds per frame, far below the resampling itself.

Quality "HQ" (soxr's default, 20-bit precision, ~95% passband) is transparent for 16-bit
speech; "VHQ" only adds latency (~1100 output samples held back at 24k->16k against ~490).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import soxr
from numpy.typing import NDArray

from spear_rt.audio.codecs import float32_to_int16, int16_to_float32

__all__ = ["Quality", "StreamResampler", "resample"]

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]

_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_ONE_SHOT_SAMPLES = 1 << 18  # longer signals are resampled block by block (bounded memory)


def _check_rate(name: str, rate_hz: int) -> None:
    if rate_hz <= 0:
        raise ValueError(f"{name} must be a positive sample rate in Hz, got {rate_hz}")


class StreamResampler:
    """Stateful int16 resampler for one continuous stream; a pass-through if rates are equal.

    Feed chunks of any size to `process`; call `flush` at the end of the stream to get the
    samples still inside the filter. After `flush` the resampler is ready for a new stream.
    Output arrives in bursts (soxr works in blocks), so a 20 ms input chunk may yield 0 or
    ~2 chunks' worth; only the running total tracks input x ratio.
    """

    __slots__ = ("_in_rate_hz", "_out_rate_hz", "_quality", "_stream")

    def __init__(self, in_rate_hz: int, out_rate_hz: int, *, quality: Quality = "HQ") -> None:
        _check_rate("in_rate_hz", in_rate_hz)
        _check_rate("out_rate_hz", out_rate_hz)
        self._in_rate_hz = in_rate_hz
        self._out_rate_hz = out_rate_hz
        self._quality = quality
        # No soxr object at all for equal rates: the pass-through must cost nothing.
        self._stream: soxr.ResampleStream | None = None
        if in_rate_hz != out_rate_hz:
            self._stream = soxr.ResampleStream(
                in_rate_hz, out_rate_hz, 1, dtype="float32", quality=quality
            )

    @property
    def in_rate_hz(self) -> int:
        """Sample rate of the audio given to `process`."""
        return self._in_rate_hz

    @property
    def out_rate_hz(self) -> int:
        """Sample rate of the audio returned."""
        return self._out_rate_hz

    @property
    def is_passthrough(self) -> bool:
        """True when both rates are equal and audio is returned untouched."""
        return self._stream is None

    def process(self, pcm: NDArray[np.int16]) -> NDArray[np.int16]:
        """Resample the next chunk of the stream; may return fewer samples than expected."""
        if self._stream is None:
            return pcm
        if len(pcm) == 0:
            return np.zeros(0, dtype=np.int16)
        out = self._stream.resample_chunk(int16_to_float32(pcm))
        return float32_to_int16(out)

    def flush(self) -> NDArray[np.int16]:
        """End the stream: return what the filter still holds and reset for a new stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out = self._stream.resample_chunk(_EMPTY_F32, last=True)
        # soxr refuses input after `last`; clear() keeps the designed filter, so a new
        # utterance costs no re-initialisation.
        self._stream.clear()
        return float32_to_int16(out)

    def reset(self) -> None:
        """Drop any buffered audio and start a new stream."""
        if self._stream is not None:
            self._stream.clear()

    def __repr__(self) -> str:
        return f"StreamResampler({self._in_rate_hz} -> {self._out_rate_hz} Hz, {self._quality})"


def resample(
    pcm: NDArray[np.int16], in_rate_hz: int, out_rate_hz: int, *, quality: Quality = "HQ"
) -> NDArray[np.int16]:
    """Resample a whole int16 signal at once (same samples as streaming it, then flushing)."""
    _check_rate("in_rate_hz", in_rate_hz)
    _check_rate("out_rate_hz", out_rate_hz)
    if in_rate_hz == out_rate_hz:
        return pcm
    if len(pcm) == 0:
        return np.zeros(0, dtype=np.int16)
    if len(pcm) > _ONE_SHOT_SAMPLES:
        return _resample_in_blocks(pcm, in_rate_hz, out_rate_hz, quality)
    out = soxr.resample(int16_to_float32(pcm), in_rate_hz, out_rate_hz, quality=quality)
    return float32_to_int16(out)


def _resample_in_blocks(
    pcm: NDArray[np.int16], in_rate_hz: int, out_rate_hz: int, quality: Quality
) -> NDArray[np.int16]:
    """A long signal through one stream, block by block, into one int16 array.

    Same samples as the one-shot path (streaming equals one-shot), but the peak is the int16
    output plus one block, not five float32 copies of the whole signal.
    """
    resampler = StreamResampler(in_rate_hz, out_rate_hz, quality=quality)
    out = np.empty(len(pcm) * out_rate_hz // in_rate_hz + 64, dtype=np.int16)
    extra: list[NDArray[np.int16]] = []  # only if soxr gave more than the ratio says
    filled = 0

    def put(chunk: NDArray[np.int16]) -> None:
        nonlocal filled
        room = min(chunk.size, out.size - filled)
        out[filled : filled + room] = chunk[:room]
        if room < chunk.size:
            extra.append(chunk[room:])
        filled += chunk.size

    for start in range(0, len(pcm), _ONE_SHOT_SAMPLES):
        put(resampler.process(pcm[start : start + _ONE_SHOT_SAMPLES]))
    put(resampler.flush())
    return np.concatenate([out, *extra]) if extra else out[:filled]
