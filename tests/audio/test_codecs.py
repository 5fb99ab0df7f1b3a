"""Format descriptions of both dialects, pcm16/float conversion and G.711 per ITU-T."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.audio import (
    AudioFormat,
    AudioFormatError,
    InputFormat,
    alaw_decode,
    alaw_encode,
    decode_audio,
    encode_audio,
    float32_to_int16,
    input_format_from_wire,
    input_format_to_wire,
    int16_to_float32,
    pcm16_from_bytes,
    pcm16_to_bytes,
    ulaw_decode,
    ulaw_encode,
)
from spear_rt.errors import SpearError

ALL_CODES = bytes(range(256))
ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def test_default_format_is_pcm16_at_24k() -> None:
    assert InputFormat.default() == InputFormat(AudioFormat.PCM16, 24000)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("pcm16", InputFormat(AudioFormat.PCM16, 24000)),
        ("g711_ulaw", InputFormat(AudioFormat.G711_ULAW, 8000)),
        ("g711_alaw", InputFormat(AudioFormat.G711_ALAW, 8000)),
        ({"type": "audio/pcm", "rate": 24000}, InputFormat(AudioFormat.PCM16, 24000)),
        ({"type": "audio/pcm"}, InputFormat(AudioFormat.PCM16, 24000)),
        ({"type": "audio/pcm", "rate": 16000}, InputFormat(AudioFormat.PCM16, 16000)),
        ({"type": "audio/pcmu"}, InputFormat(AudioFormat.G711_ULAW, 8000)),
        ({"type": "audio/pcma", "rate": 8000}, InputFormat(AudioFormat.G711_ALAW, 8000)),
    ],
)
def test_input_format_from_wire_accepts_both_dialects(wire: object, expected: InputFormat) -> None:
    assert input_format_from_wire(wire) == expected


@pytest.mark.parametrize(
    "wire",
    [
        "opus",
        "PCM16",
        None,
        42,
        {"type": "audio/opus"},
        {"type": ["audio/pcm"]},
        {"rate": 24000},
        {"type": "audio/pcmu", "rate": 16000},
        {"type": "audio/pcm", "rate": True},
        {"type": "audio/pcm", "rate": "24000"},
        {"type": "audio/pcm", "rate": 0},
    ],
)
def test_input_format_from_wire_rejects_unknown_formats(wire: object) -> None:
    with pytest.raises(AudioFormatError):
        input_format_from_wire(wire)


def test_unknown_format_error_names_what_is_accepted() -> None:
    with pytest.raises(AudioFormatError) as info:
        input_format_from_wire("opus")
    message = str(info.value)
    assert '"opus"' in message  # quoted as JSON (spear_rt.errors.echo)
    for name in ("pcm16", "g711_ulaw", "g711_alaw", "audio/pcm", "audio/pcmu", "audio/pcma"):
        assert name in message
    assert isinstance(info.value, SpearError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", [InputFormat.of(f) for f in AudioFormat])
@pytest.mark.parametrize("ga", [False, True])
def test_input_format_to_wire_round_trips(fmt: InputFormat, ga: bool) -> None:
    assert input_format_from_wire(input_format_to_wire(fmt, ga)) == fmt


def test_input_format_to_wire_uses_each_dialects_names() -> None:
    assert input_format_to_wire(InputFormat.default(), ga=False) == "pcm16"
    assert input_format_to_wire(InputFormat.default(), ga=True) == {
        "type": "audio/pcm",
        "rate": 24000,
    }
    assert input_format_to_wire(InputFormat.of(AudioFormat.G711_ALAW), ga=True) == {
        "type": "audio/pcma"
    }


def test_beta_dialect_cannot_name_pcm16_at_other_rates() -> None:
    with pytest.raises(AudioFormatError, match="16000"):
        input_format_to_wire(InputFormat(AudioFormat.PCM16, 16000), ga=False)


def test_g711_formats_are_always_8k() -> None:
    with pytest.raises(AudioFormatError):
        InputFormat(AudioFormat.G711_ULAW, 16000)
    assert InputFormat.of(AudioFormat.G711_ULAW).bytes_per_sample == 1
    assert InputFormat.default().bytes_per_sample == 2


def test_pcm16_from_bytes_is_little_endian() -> None:
    pcm = pcm16_from_bytes(b"\x01\x00\xff\x7f\x00\x80\xff\xff")
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [1, 32767, -32768, -1]


def test_pcm16_from_bytes_rejects_odd_length() -> None:
    with pytest.raises(AudioFormatError, match="even number of bytes, got 3"):
        pcm16_from_bytes(b"\x00\x01\x02")


def test_pcm16_bytes_round_trip_every_value() -> None:
    data = pcm16_to_bytes(ALL_INT16)
    assert len(data) == 2 * len(ALL_INT16)
    assert np.array_equal(pcm16_from_bytes(data), ALL_INT16)


def test_float_conversion_round_trips_every_int16_value() -> None:
    floats = int16_to_float32(ALL_INT16)
    assert floats.dtype == np.float32
    assert floats.min() == -1.0 and floats.max() < 1.0
    assert np.array_equal(float32_to_int16(floats), ALL_INT16)


def test_float32_to_int16_clips_out_of_range_values() -> None:
    samples = np.array([-2.0, -1.0, 0.5, 1.0, 3.0], dtype=np.float32)
    assert float32_to_int16(samples).tolist() == [-32768, -32768, 16384, 32767, 32767]


def test_ulaw_reference_values() -> None:
    # G.711 mu-law: 0x00/0x80 are the extremes, 0xFF/0x7F the two zeros (16-bit scaling).
    assert ulaw_decode(b"\x00\x80\xff\x7f").tolist() == [-32124, 32124, 0, 0]
    assert ulaw_encode(np.array([0, 32767, -32768], dtype=np.int16)) == b"\xff\x80\x00"


def test_alaw_reference_values() -> None:
    # G.711 A-law: even bits inverted (0x55), so 0xD5/0x55 are the smallest magnitudes.
    assert alaw_decode(b"\xd5\x55\xaa\x2a").tolist() == [8, -8, 32256, -32256]
    assert alaw_encode(np.array([0, 32767, -32768], dtype=np.int16)) == b"\xd5\xaa\x2a"


def test_ulaw_encode_decode_round_trips_every_code() -> None:
    # 0x7F is mu-law's "negative zero": it decodes to 0, like 0xFF, and 0 encodes as 0xFF.
    round_trip = ulaw_encode(ulaw_decode(ALL_CODES))
    assert [c for c in range(256) if round_trip[c] != c] == [0x7F]
    assert round_trip[0x7F] == 0xFF


def test_alaw_encode_decode_round_trips_every_code() -> None:
    assert alaw_encode(alaw_decode(ALL_CODES)) == ALL_CODES


@pytest.mark.parametrize(
    ("encode", "decode"), [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)]
)
def test_g711_quantisation_is_monotonic(
    encode: Callable[[NDArray[np.int16]], bytes], decode: Callable[[bytes], NDArray[np.int16]]
) -> None:
    quantised = decode(encode(ALL_INT16)).astype(np.int32)
    assert np.all(np.diff(quantised) >= 0)
    assert len(np.unique(quantised)) in (255, 256)  # mu-law's two zeros decode alike


def test_g711_matches_audioop_reference_for_every_input() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    linear = ALL_INT16.tobytes()
    assert ulaw_encode(ALL_INT16) == audioop.lin2ulaw(linear, 2)
    assert alaw_encode(ALL_INT16) == audioop.lin2alaw(linear, 2)
    assert ulaw_decode(ALL_CODES).tobytes() == audioop.ulaw2lin(ALL_CODES, 2)
    assert alaw_decode(ALL_CODES).tobytes() == audioop.alaw2lin(ALL_CODES, 2)


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_decode_audio_inverts_encode_audio(fmt: AudioFormat) -> None:
    input_format = InputFormat.of(fmt)
    codes = ulaw_decode(ALL_CODES)  # 256 values exactly representable in every format
    wire = encode_audio(input_format, codes)
    assert len(wire) == len(codes) * input_format.bytes_per_sample
    decoded = decode_audio(input_format, wire)
    if fmt is AudioFormat.G711_ALAW:
        assert np.abs(decoded.astype(int) - codes).max() <= 1024  # a-law quantisation step
    else:
        assert np.array_equal(decoded, codes)


def test_decode_audio_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(b"\x10\x00\x20\x00")
    assert decode_audio(InputFormat.default(), data).tolist() == [16, 32]
    assert decode_audio(InputFormat.default(), memoryview(data)).tolist() == [16, 32]
    assert decode_audio(InputFormat.of(AudioFormat.G711_ULAW), memoryview(b"\xff")).tolist() == [0]
