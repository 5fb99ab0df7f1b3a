"""Media operations of the stub backend: images, speech to text, text to speech (a stub).

Deterministic, documented in `spear_rt_backends.stub_oneshot`, which dispatches here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import zlib
from typing import Any

import anyio
import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.audio import AudioFormatError, float32_to_int16, resample
from spear_rt.audio.files import AudioLimits, decode_audio_bytes
from spear_rt.backend import AudioInput, InstanceInfo, OneShotRequest, OneShotResponse
from spear_rt.errors import echo
from spear_rt.ir import Usage
from spear_rt.transcripts import Segment, Transcript, Word, granularities, render, response_format
from spear_rt_backends.espeak_tts import (
    DEFAULT_MAX_CHARS,
    encode_speech,
    int_option,
    invalid,
    parse_speech_request,
)
from spear_rt_backends.stub import LEXICON, STUB_RATE_HZ

CREATED = 1700000000  # a fixed timestamp: answers are byte-for-byte reproducible
DEFAULT_DIMENSIONS = 1536
MAX_DIMENSIONS = 8192
MAX_EMBEDDING_INPUTS = 2048
# Bounds on what one request may make the stub produce (its answers never outgrow the input
# by more than these): floats per embeddings answer (~11 MB of JSON), seconds of speech.
MAX_EMBEDDING_VALUES = 1 << 20
MAX_SPEECH_SECONDS = 60.0
MIN_SPEECH_SECONDS = 1.0
SPEECH_SECONDS_PER_CHAR = 0.1  # ~2x a person's pace: the tones of the shortest words fit
MAX_PROMPT_CHARS = 32000
IMAGE_SIZES = {
    "auto": (1024, 1024),
    "256x256": (256, 256),
    "512x512": (512, 512),
    "1024x1024": (1024, 1024),
    "1536x1024": (1536, 1024),
    "1024x1536": (1024, 1536),
    "1792x1024": (1792, 1024),
    "1024x1792": (1024, 1792),
}

_json = msgspec.json.Encoder()


def _ok(answer: dict[str, Any], usage: Usage) -> OneShotResponse:
    return OneShotResponse(body=_json.encode(answer), usage=usage)


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model", "stub")
    if not isinstance(model, str):
        raise invalid(f"`model` must be a string, got {type(model).__name__}")
    return model


def _int_field(payload: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = payload.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"`{key}` must be a whole number from {low} to {high}, got {echo(value)}")
    return value


# --- images -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def stub_png(width: int, height: int, seed: bytes) -> bytes:
    """A checkered 4-colour indexed PNG; colours and pattern come from `seed` (>= 16 bytes)."""
    block = 16 << (seed[12] % 3)  # 16, 32 or 64 px squares
    cols = np.arange(width) // block
    rows = np.arange(height) // block
    index = (cols[None, :] * (1 + seed[13] % 3) + rows[:, None] * (1 + seed[14] % 3)) % 4
    scanlines = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 per row
    scanlines[:, 1:] = index
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
            _png_chunk(b"PLTE", seed[:12]),
            _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def image_generation(payload: dict[str, Any]) -> OneShotResponse:
    """`n` deterministic PNGs of the asked size, as `b64_json`."""
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("you must provide `prompt`: a non-empty string describing the image")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(f"`prompt` is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    n = _int_field(payload, "n", 1, 1, 10)
    size = payload.get("size") or "auto"
    if not isinstance(size, str) or size not in IMAGE_SIZES:  # a dict is unhashable
        raise invalid(f"`size` must be one of {', '.join(IMAGE_SIZES)}, got {echo(size)}")
    response_format = payload.get("response_format") or "b64_json"
    if response_format == "url":
        raise invalid(
            "the stub backend hosts no images, so it cannot answer with a URL; "
            "ask for response_format 'b64_json'"
        )
    if response_format != "b64_json":
        raise invalid(f"`response_format` must be 'b64_json' or 'url', got {echo(response_format)}")
    output_format = payload.get("output_format") or "png"
    if output_format != "png":
        raise invalid(f"the stub only draws PNG images; `output_format` {output_format!r} is not")
    width, height = IMAGE_SIZES[size]
    data = []
    for i in range(n):
        seed = hashlib.sha256(f"{i}:{prompt}".encode()).digest()
        png = stub_png(width, height, seed)
        data.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": prompt})
    return _ok({"created": CREATED, "data": data}, Usage(images=n))


# --- speech to text -----------------------------------------------------------------------------


def transcribe(pcm: NDArray[np.int16], rate_hz: int, block_ms: int = 200) -> list[str]:
    """The stub's words for `pcm`: one per full `block_ms` block at 24 kHz (as in realtime)."""
    pcm24 = np.ascontiguousarray(resample(np.asarray(pcm, dtype=np.int16), rate_hz, STUB_RATE_HZ))
    block = STUB_RATE_HZ * block_ms // 1000
    return [
        LEXICON[zlib.crc32(pcm24[start : start + block].tobytes()) % len(LEXICON)]
        for start in range(0, pcm24.size - block + 1, block)
    ]


def _decode_upload(data: bytes, filename: str) -> tuple[NDArray[np.int16], int]:
    try:
        return decode_audio_bytes(data, filename, AudioLimits())
    except AudioFormatError as exc:
        raise invalid(str(exc)) from None


def _transcript(audio: AudioInput, block_ms: int, language: str | None) -> Transcript:
    """The stub's transcript: one word per block, one segment over the whole file."""
    if audio.pcm is not None and audio.rate_hz > 0:
        pcm, rate_hz = audio.pcm, audio.rate_hz
    else:
        pcm, rate_hz = _decode_upload(audio.data, audio.filename)
    words = transcribe(pcm, rate_hz, block_ms)
    step = block_ms / 1000
    text = " ".join(words)
    duration = pcm.size / rate_hz
    timed = tuple(Word(w, i * step, (i + 1) * step) for i, w in enumerate(words))
    return Transcript(text, duration, (Segment(0.0, duration, text, timed),), language or "english")


async def speech_to_text(instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
    """A transcription in any `response_format` (see `spear_rt.transcripts`), off the loop."""
    payload, audio = request.payload, request.audio
    if audio is None:
        raise invalid("you must provide `file`: the audio to transcribe (a multipart upload)")
    response_format(payload)  # an unknown format fails before any work
    granularities(payload)
    language = payload.get("language")
    if language is not None and not isinstance(language, str):
        raise invalid("`language` must be a language code such as 'en'")
    block_ms = int_option(instance, "block_ms", 200)
    transcript = await anyio.to_thread.run_sync(_transcript, audio, block_ms, language)
    return render(transcript, payload)


# --- text to speech -----------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]*>")


def speech_budget_s(text: str) -> float:
    """The most audio the stub speaks for `text`: bounded by its length and by a hard cap."""
    return min(MAX_SPEECH_SECONDS, max(MIN_SPEECH_SECONDS, len(text) * SPEECH_SECONDS_PER_CHAR))


def tones(text: str, rate_hz: int, speed: float) -> NDArray[np.int16]:
    """One tone per word: pitch from its CRC-32, length from its letters; 50 ms gaps.

    When the words would last longer than `speech_budget_s(text)`, every tone and gap is
    shortened by the same factor so that they fit (the output is bounded by the input).
    """
    words = _TAG.sub(" ", text).split()
    gap_s = 0.05 / speed
    lengths_s = [(0.12 + 0.02 * min(len(word), 12)) / speed for word in words]
    scale = min(1.0, speech_budget_s(text) / (sum(lengths_s) + gap_s * max(len(words), 1)))
    parts = []
    gap = np.zeros(int(gap_s * scale * rate_hz), dtype=np.float32)
    for word, length_s in zip(words, lengths_s, strict=True):
        freq = 200 + zlib.crc32(word.lower().encode()) % 600
        count = int(length_s * scale * rate_hz)
        tone = 0.25 * np.sin(
            np.arange(count, dtype=np.float32) * np.float32(2 * np.pi * freq / rate_hz)
        )
        fade = min(count // 2, rate_hz // 200)  # 5 ms ramps: no clicks
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        tone[:fade] *= ramp
        tone[count - fade :] *= ramp[::-1]
        parts += [tone, gap]
    return float32_to_int16(np.concatenate(parts) if parts else gap)


async def text_to_speech(instance: InstanceInfo, payload: dict[str, Any]) -> OneShotResponse:
    """Tones for the words of `input`, encoded in `response_format`."""
    speech = parse_speech_request(
        payload, max_chars=int_option(instance, "max_chars", DEFAULT_MAX_CHARS)
    )
    fmt = speech.format

    def speak() -> bytes:
        return encode_speech(tones(speech.text, fmt.rate_hz, speech.speed), fmt.rate_hz, fmt)

    if fmt.container in (None, "WAV") and len(speech.text) <= 64:  # cheaper than a thread hop
        body = speak()
    else:
        body = await anyio.to_thread.run_sync(speak)
    return OneShotResponse(
        content_type=fmt.content_type, body=body, usage=Usage(characters=len(payload["input"]))
    )
