"""Input audio formats and the byte <-> sample conversions done once at the edge.

Inside spear_rt audio is a mono `NDArray[np.int16]` plus an explicit sample rate. This module
turns client bytes (pcm16 little-endian, G.711 mu-law, G.711 A-law) into that and back, and
reads/writes the format descriptions of both protocol dialects (beta strings, GA objects).

Everything here runs once per 20 ms frame per session, so it is table lookups and
`np.frombuffer` only: no Python loop per sample. The G.711 tables follow ITU-T G.711 exactly
(the classic Sun Microsystems reference code, which is also what CPython's `audioop` used);
they are built once at import with numpy.
"""

from __future__ import annotations

import enum
import sys
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.errors import SpearError, echo

__all__ = [
    "AudioFormat",
    "AudioFormatError",
    "InputFormat",
    "alaw_decode",
    "alaw_encode",
    "decode_audio",
    "encode_audio",
    "float32_to_int16",
    "input_format_from_wire",
    "input_format_to_wire",
    "int16_to_float32",
    "pcm16_from_bytes",
    "pcm16_to_bytes",
    "ulaw_decode",
    "ulaw_encode",
]

PCM16_DEFAULT_RATE_HZ = 24000
G711_RATE_HZ = 8000
# Rates we accept for GA `audio/pcm`: OpenAI only documents 24000, but we resample anyway, so
# any common rate is harmless; the bounds only reject nonsense (0, negative, megahertz).
_MIN_PCM_RATE_HZ = 8000
_MAX_PCM_RATE_HZ = 96000

_BETA_NAMES = "'pcm16', 'g711_ulaw', 'g711_alaw'"
_GA_NAMES = "{'type': 'audio/pcm', 'rate': 24000}, {'type': 'audio/pcmu'}, {'type': 'audio/pcma'}"


class AudioFormatError(SpearError, ValueError):
    """Audio bytes or a format description that we cannot interpret."""


class AudioFormat(enum.StrEnum):
    """Sample encodings a client may send (beta protocol names)."""

    PCM16 = "pcm16"
    G711_ULAW = "g711_ulaw"
    G711_ALAW = "g711_alaw"


_GA_TYPES: dict[str, AudioFormat] = {
    "audio/pcm": AudioFormat.PCM16,
    "audio/pcmu": AudioFormat.G711_ULAW,
    "audio/pcma": AudioFormat.G711_ALAW,
}
_GA_NAMES_OF: dict[AudioFormat, str] = {fmt: name for name, fmt in _GA_TYPES.items()}


class InputFormat(msgspec.Struct, frozen=True):
    """An encoding plus its sample rate; G.711 is always 8000 Hz."""

    format: AudioFormat
    rate_hz: int

    def __post_init__(self) -> None:
        if self.format is not AudioFormat.PCM16 and self.rate_hz != G711_RATE_HZ:
            raise AudioFormatError(f"{self.format} audio is 8000 Hz, got rate {self.rate_hz}")
        if not _MIN_PCM_RATE_HZ <= self.rate_hz <= _MAX_PCM_RATE_HZ:
            raise AudioFormatError(
                f"pcm16 rate must be {_MIN_PCM_RATE_HZ}..{_MAX_PCM_RATE_HZ} Hz, got {self.rate_hz}"
            )

    @classmethod
    def default(cls) -> InputFormat:
        """The protocol default: pcm16 at 24 kHz."""
        return cls(AudioFormat.PCM16, PCM16_DEFAULT_RATE_HZ)

    @classmethod
    def of(cls, fmt: AudioFormat) -> InputFormat:
        """`fmt` at its protocol rate (24 kHz for pcm16, 8 kHz for G.711)."""
        return cls(fmt, PCM16_DEFAULT_RATE_HZ if fmt is AudioFormat.PCM16 else G711_RATE_HZ)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes one sample takes on the wire (2 for pcm16, 1 for G.711)."""
        return 2 if self.format is AudioFormat.PCM16 else 1


def input_format_from_wire(value: Any) -> InputFormat:
    """Parse a beta format string or a GA format object into an `InputFormat`."""
    if isinstance(value, str):
        try:
            return InputFormat.of(AudioFormat(value))
        except ValueError:
            pass
    elif isinstance(value, dict):
        kind = value.get("type")
        fmt = _GA_TYPES.get(kind) if isinstance(kind, str) else None
        if fmt is not None:
            rate = value.get("rate")
            if rate is None:
                return InputFormat.of(fmt)
            # bool is an int subclass; `"rate": true` is a client bug, not 1 Hz.
            if isinstance(rate, int) and not isinstance(rate, bool):
                return InputFormat(fmt, rate)
            raise AudioFormatError(f"audio format rate must be an integer in Hz, got {echo(rate)}")
    raise AudioFormatError(
        f"unsupported audio format {echo(value)}; "
        f"accepted: {_BETA_NAMES} (beta) or {_GA_NAMES} (GA)"
    )


def input_format_to_wire(fmt: InputFormat, ga: bool) -> str | dict[str, Any]:
    """Describe `fmt` in the GA (object) or beta (string) dialect."""
    if ga:
        if fmt.format is AudioFormat.PCM16:
            return {"type": "audio/pcm", "rate": fmt.rate_hz}
        return {"type": _GA_NAMES_OF[fmt.format]}
    if fmt.format is AudioFormat.PCM16 and fmt.rate_hz != PCM16_DEFAULT_RATE_HZ:
        raise AudioFormatError(f"the beta protocol has no name for pcm16 at {fmt.rate_hz} Hz")
    return str(fmt.format)


# --- linear PCM -------------------------------------------------------------------------------

_LE_INT16 = np.dtype("<i2")
_NATIVE_INT16 = np.dtype(np.int16)  # numpy's one instance: `is` tests it
_LE_HOST = sys.byteorder == "little"
_INT16_SCALE = 32768.0


def pcm16_from_bytes(data: bytes | bytearray | memoryview) -> NDArray[np.int16]:
    """Little-endian 16-bit samples from `data` (read-only view, no copy on LE hosts)."""
    if len(data) % 2:
        raise AudioFormatError(f"pcm16 audio must have an even number of bytes, got {len(data)}")
    samples = np.frombuffer(data, dtype=_LE_INT16)
    return samples if _LE_HOST else samples.astype(np.int16)  # a byte swap on big-endian ones


def pcm16_to_bytes(pcm: NDArray[np.int16]) -> bytes:
    """Little-endian bytes of 16-bit samples."""
    if _LE_HOST and type(pcm) is np.ndarray and pcm.dtype is _NATIVE_INT16:
        return pcm.tobytes()  # every append upstream: the one call, in C order for any view
    return np.asarray(pcm, dtype=np.int16).astype(_LE_INT16, copy=False).tobytes()


def int16_to_float32(pcm: NDArray[np.int16]) -> NDArray[np.float32]:
    """Samples scaled to [-1.0, 1.0) (full scale is 32768)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) * np.float32(1.0 / _INT16_SCALE)


def float32_to_int16(samples: NDArray[np.floating[Any]]) -> NDArray[np.int16]:
    """Float samples in [-1, 1] to int16, rounded, clipping anything out of range."""
    scaled: NDArray[np.float32] = np.rint(
        np.asarray(samples, dtype=np.float32) * np.float32(_INT16_SCALE)
    )
    return np.clip(scaled, -32768, 32767).astype(np.int16)


# --- G.711 ------------------------------------------------------------------------------------
# Tables are built from the reference algorithm over every input once; encoding is then one
# fancy-index into a 64 KiB table (indexed by the int16 bit pattern), decoding one into 256.

_SEG_MASK = 0x70
_QUANT_MASK = 0x0F
_SIGN_BIT = 0x80
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # 14-bit magnitude limit, after the >> 2
_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_SEG_AEND = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32)
_ALL_CODES = np.arange(256, dtype=np.int32)


def _by_bit_pattern(codes: NDArray[np.int32]) -> NDArray[np.uint8]:
    """Reorder a table over -32768..32767 so it is indexed by the int16 bit pattern."""
    table = np.empty(65536, dtype=np.uint8)
    table[_ALL_INT16.astype(np.int16).view(np.uint16)] = codes.astype(np.uint8)
    return table


def _ulaw_encode_table() -> NDArray[np.uint8]:
    pcm = _ALL_INT16 >> 2  # G.711 mu-law works on 14-bit linear
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_SEG_UEND, mag, side="left")
    uval = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & _QUANT_MASK)
    uval = np.where(seg >= 8, 0x7F, uval)
    return _by_bit_pattern((uval ^ mask).astype(np.int32))


def _ulaw_decode_table() -> NDArray[np.int16]:
    u = ~_ALL_CODES & 0xFF
    t = (((u & _QUANT_MASK) << 3) + _ULAW_BIAS) << ((u & _SEG_MASK) >> 4)
    return np.where(u & _SIGN_BIT, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_encode_table() -> NDArray[np.uint8]:
    pcm = _ALL_INT16 >> 3  # G.711 A-law works on 13-bit linear
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_SEG_AEND, mag, side="left")
    shift = np.where(seg < 2, 1, np.minimum(seg, 7))
    aval = (np.minimum(seg, 7) << 4) | ((mag >> shift) & _QUANT_MASK)
    aval = np.where(seg >= 8, 0x7F, aval)
    return _by_bit_pattern((aval ^ mask).astype(np.int32))


def _alaw_decode_table() -> NDArray[np.int16]:
    a = _ALL_CODES ^ 0x55
    seg = (a & _SEG_MASK) >> 4
    t: NDArray[np.int32] = ((a & _QUANT_MASK) << 4) + np.where(seg == 0, 8, 0x108)
    t = t << np.maximum(seg - 1, 0)
    return np.where(a & _SIGN_BIT, t, -t).astype(np.int16)


_ULAW_ENCODE = _ulaw_encode_table()
_ULAW_DECODE = _ulaw_decode_table()
_ALAW_ENCODE = _alaw_encode_table()
_ALAW_DECODE = _alaw_decode_table()


def ulaw_decode(data: bytes | bytearray | memoryview | NDArray[np.uint8]) -> NDArray[np.int16]:
    """G.711 mu-law codes to 16-bit linear samples."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(pcm: NDArray[np.int16]) -> bytes:
    """16-bit linear samples to G.711 mu-law codes."""
    return _ULAW_ENCODE[np.asarray(pcm, dtype=np.int16).view(np.uint16)].tobytes()


def alaw_decode(data: bytes | bytearray | memoryview | NDArray[np.uint8]) -> NDArray[np.int16]:
    """G.711 A-law codes to 16-bit linear samples."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(pcm: NDArray[np.int16]) -> bytes:
    """16-bit linear samples to G.711 A-law codes."""
    return _ALAW_ENCODE[np.asarray(pcm, dtype=np.int16).view(np.uint16)].tobytes()


# --- dispatch ---------------------------------------------------------------------------------


def decode_audio(fmt: InputFormat, data: bytes | bytearray | memoryview) -> NDArray[np.int16]:
    """Wire bytes in `fmt` to int16 samples at `fmt.rate_hz`."""
    match fmt.format:
        case AudioFormat.PCM16:
            return pcm16_from_bytes(data)
        case AudioFormat.G711_ULAW:
            return ulaw_decode(data)
        case AudioFormat.G711_ALAW:
            return alaw_decode(data)


def encode_audio(fmt: InputFormat, pcm: NDArray[np.int16]) -> bytes:
    """int16 samples (already at `fmt.rate_hz`) to wire bytes in `fmt`."""
    match fmt.format:
        case AudioFormat.PCM16:
            return pcm16_to_bytes(pcm)
        case AudioFormat.G711_ULAW:
            return ulaw_encode(pcm)
        case AudioFormat.G711_ALAW:
            return alaw_encode(pcm)
