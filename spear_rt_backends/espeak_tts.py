"""Local text-to-speech with Debian's espeak-ng, plus the speech helpers every TTS backend shares.

The ``espeak`` kind runs ``espeak-ng --stdout`` once per request (no shell, text on stdin, so
nothing in the text can become an option), reads the 22050 Hz mono WAV it writes, resamples it
to the rate of the asked ``response_format`` and encodes it:

=========  ===============================  ========
format     container / codec                rate
=========  ===============================  ========
mp3        MPEG-2 layer III                 24 kHz
opus       OGG/Opus                         48 kHz
flac       FLAC, 16 bit                     24 kHz
wav        RIFF WAV, 16 bit                 24 kHz
pcm        raw s16le, no header (OpenAI's)  24 kHz
aac        not supported (InvalidRequest)
=========  ===============================  ========

Voices: OpenAI's names (alloy, echo, nova, ...) map to fixed espeak-ng voices; an espeak-ng
voice name (``en-us``, ``en-gb+f3``) is used as given. ``speed`` (0.25-4.0) scales the speaking
rate of 175 words per minute. An input that starts with ``<speak`` is SSML (``-m``); SSML
``<audio>`` is refused, since espeak-ng would read the file it names from our disk.

Each instance runs at most ``max_processes`` espeak-ng processes at once (option; default the
CPU count), so N parallel requests queue instead of forking N processes. A cancelled request
kills its process. espeak-ng is started and waited for in a worker thread, never from the
event loop's thread (a spawn there can block the loop: see worker_processes.py). Options:
``max_chars`` (default 4096, OpenAI's limit), ``max_processes``, ``words_per_minute``
(default 175).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np
import soundfile  # type: ignore[import-untyped]  # ships no type hints
from numpy.typing import NDArray

from spear_rt.audio import pcm16_to_bytes, resample
from spear_rt.backend import (
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    loop_limiter,
)
from spear_rt.errors import BackendFailure, CanonicalFailure, echo
from spear_rt.ir import ErrorCode, Feature, Hosting, Operation, Transport, Usage

__all__ = [
    "KIND",
    "SPEECH_FORMATS",
    "EspeakKind",
    "SpeechFormat",
    "SpeechRequest",
    "encode_speech",
    "invalid",
    "parse_speech_request",
]

DEFAULT_MAX_CHARS = 4096  # OpenAI's limit for /v1/audio/speech
DEFAULT_WPM = 175  # espeak-ng's own default speaking rate
MIN_WPM, MAX_WPM = 80, 450  # what espeak-ng accepts
MISSING = "espeak-ng is not installed (apt-get install espeak-ng)"


def invalid(message: str) -> CanonicalFailure:
    """A request the backend cannot accept as sent (HTTP 400)."""
    return CanonicalFailure.of(ErrorCode.INVALID_REQUEST, message)


# --- the OpenAI speech request ------------------------------------------------------------------


class SpeechFormat(msgspec.Struct, frozen=True):
    """One `response_format`: how it is written and at which rate."""

    rate_hz: int
    content_type: str
    container: str | None  # soundfile format; None for headerless pcm
    subtype: str | None = None


SPEECH_FORMATS: dict[str, SpeechFormat] = {
    "mp3": SpeechFormat(24000, "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "opus": SpeechFormat(48000, "audio/ogg", "OGG", "OPUS"),
    "flac": SpeechFormat(24000, "audio/flac", "FLAC", "PCM_16"),
    "wav": SpeechFormat(24000, "audio/wav", "WAV", "PCM_16"),
    "pcm": SpeechFormat(24000, "audio/pcm", None),
}
_FORMAT_NAMES = ", ".join(SPEECH_FORMATS)


class SpeechRequest(msgspec.Struct, frozen=True):
    """A validated text-to-speech request."""

    text: str
    voice: str
    format_name: str
    format: SpeechFormat
    speed: float = 1.0
    ssml: bool = False


# Control characters other than tab and newline have no place in speech text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def parse_speech_request(payload: dict[str, Any], *, max_chars: int) -> SpeechRequest:
    """Validate the OpenAI-shaped fields of a speech request; raise InvalidRequest if wrong."""
    text = payload.get("input")
    if text is None:
        raise invalid("you must provide `input`: the text to speak")
    if not isinstance(text, str):
        raise invalid(f"`input` must be a string, got {type(text).__name__}")
    if not text.strip():
        raise invalid("`input` is empty; give the text to speak")
    if len(text) > max_chars:
        raise invalid(
            f"`input` is {len(text)} characters; this backend speaks at most {max_chars} "
            "per request (split the text)"
        )
    voice = payload.get("voice", "alloy")
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):
        voice = voice["id"]
    if not isinstance(voice, str) or not voice:
        raise invalid("`voice` must be a voice name such as 'alloy' (or {'id': name})")
    name = payload.get("response_format", "mp3")
    if name == "aac":
        raise invalid(f"response_format 'aac' is not supported here; use one of {_FORMAT_NAMES}")
    if not isinstance(name, str) or name not in SPEECH_FORMATS:
        raise invalid(f"response_format must be one of {_FORMAT_NAMES}, got {echo(name)}")
    speed = payload.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        raise invalid(f"`speed` must be a number from 0.25 to 4.0, got {echo(speed)}")
    stream_format = payload.get("stream_format", "audio")
    if stream_format != "audio":
        raise invalid(f"stream_format {stream_format!r} is not supported here; use 'audio'")
    text = _CONTROL.sub(" ", text)
    ssml = text.lstrip().startswith("<speak")
    if ssml and re.search(r"<\s*audio\b", text, re.IGNORECASE):
        raise invalid("SSML <audio> elements are not allowed (they name files on the server)")
    return SpeechRequest(text, voice, name, SPEECH_FORMATS[name], float(speed), ssml)


def encode_speech(pcm: NDArray[np.int16], rate_hz: int, fmt: SpeechFormat) -> bytes:
    """Resample mono int16 audio to `fmt`'s rate and write it in `fmt` (CPU-bound: run in a
    worker thread for anything longer than a few words)."""
    pcm = resample(pcm, rate_hz, fmt.rate_hz)
    if fmt.container is None:
        return pcm16_to_bytes(pcm)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, fmt.rate_hz, format=fmt.container, subtype=fmt.subtype)
    return buffer.getvalue()


def int_option(instance: InstanceInfo, key: str, default: int, minimum: int = 1) -> int:
    """An integer option of `instance` of at least `minimum`, or `default` when unset."""
    value = instance.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise BackendFailure(f"instance {instance.name}: option {key} must be {what}")
    return value


# --- espeak-ng ----------------------------------------------------------------------------------

# OpenAI voice -> espeak-ng voice (language + variant); fixed so that a voice always sounds alike.
OPENAI_VOICES: dict[str, str] = {
    "alloy": "en-us+f3",
    "ash": "en-us+m4",
    "ballad": "en-gb+m2",
    "cedar": "en-us+m5",
    "coral": "en-us+f4",
    "echo": "en-us+m1",
    "fable": "en-gb-x-rp+m3",
    "marin": "en-us+f1",
    "nova": "en-us+f2",
    "onyx": "en-us+m7",
    "sage": "en-gb+f3",
    "shimmer": "en-us+f5",
    "verse": "en-us+m2",
}
# An espeak-ng voice: a language tag, optionally "+variant". Never starts with "-".
_ESPEAK_VOICE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{1,12}){0,3}(\+[A-Za-z0-9_]{1,20})?")


def espeak_voice(voice: str) -> str:
    """The espeak-ng voice for an OpenAI voice name or an espeak-ng voice name."""
    mapped = OPENAI_VOICES.get(voice.lower())
    if mapped is not None:
        return mapped
    if _ESPEAK_VOICE.fullmatch(voice):
        return voice
    raise invalid(
        f"unknown voice {voice!r}: use an OpenAI voice ({', '.join(OPENAI_VOICES)}) or an "
        "espeak-ng voice such as 'en-us' or 'en-gb+f3'"
    )


def espeak_args(binary: str, request: SpeechRequest, base_wpm: int) -> list[str]:
    """The argv of one espeak-ng run (the text goes to stdin, never into argv)."""
    wpm = min(max(round(base_wpm * request.speed), MIN_WPM), MAX_WPM)
    args = [binary, "--stdout", "-b", "1", "-v", espeak_voice(request.voice), "-s", str(wpm)]
    if request.ssml:
        args.append("-m")
    return args


def parse_wav(data: bytes) -> tuple[NDArray[np.int16], int]:
    """Samples and rate of espeak-ng's 16-bit mono WAV.

    Written to a pipe, the header's sizes are placeholders (0x7fffffff), so the data chunk is
    taken to run to the end of the bytes rather than trusted.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise BackendFailure("espeak-ng did not write a WAV file")
    pos, rate_hz, bits, channels = 12, 0, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt " and size >= 16:
            _, channels, rate_hz, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
        elif chunk == b"data":
            if bits != 16 or channels != 1 or rate_hz <= 0:
                raise BackendFailure(
                    f"espeak-ng wrote {bits}-bit {channels}-channel audio at {rate_hz} Hz; "
                    "expected 16-bit mono"
                )
            end = min(len(data), body + size)
            end -= (end - body) % 2
            return np.frombuffer(data[body:end], dtype="<i2").astype(np.int16), rate_hz
        pos = body + size + (size & 1)
    raise BackendFailure("espeak-ng wrote a WAV file without audio data")


class EspeakKind:
    """The ``espeak`` backend kind: text_to_speech with the local espeak-ng binary."""

    name = "espeak"
    extra = None  # a Debian package, not a pip extra
    defaults = InstanceDefaults(
        ops=frozenset({Operation.TEXT_TO_SPEECH}),
        features=frozenset(
            {Feature.SUPPORTS_VOICES, Feature.SUPPORTS_SSML, Feature.SUPPORTS_AUDIO_OUTPUT}
        ),
        transports=frozenset({Transport.HTTP}),
        hosting=Hosting.LOCAL,
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Unavailable when the espeak-ng binary is not on PATH."""
        return None if shutil.which("espeak-ng") else MISSING

    def _limiter(self, instance: InstanceInfo) -> anyio.CapacityLimiter:
        total = int_option(instance, "max_processes", os.cpu_count() or 2)
        return loop_limiter(f"espeak:{instance.name}", total)

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """Speak `request.payload["input"]` and answer with audio in the asked format."""
        if request.operation is not Operation.TEXT_TO_SPEECH:
            raise invalid(f"the espeak backend only does text_to_speech, not {request.operation}")
        max_chars = int_option(instance, "max_chars", DEFAULT_MAX_CHARS)
        speech = parse_speech_request(request.payload, max_chars=max_chars)
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise BackendFailure(MISSING, retryable=True)
        args = espeak_args(binary, speech, int_option(instance, "words_per_minute", DEFAULT_WPM))
        async with self._limiter(instance):
            done = await run_off_loop(args, speech.text.encode())
        if done.returncode != 0 or not done.stdout:
            message = done.stderr.decode("utf-8", "replace").strip() or f"exit {done.returncode}"
            if "voice does not exist" in message:
                raise invalid(f"espeak-ng has no voice {speech.voice!r}")
            raise BackendFailure(f"espeak-ng failed: {message[:200]}")
        pcm, rate_hz = parse_wav(done.stdout)
        body = await anyio.to_thread.run_sync(encode_speech, pcm, rate_hz, speech.format)
        return OneShotResponse(
            content_type=speech.format.content_type,
            body=body,
            usage=Usage(characters=len(request.payload["input"])),
        )


async def run_off_loop(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run `args` with `data` on stdin, started and waited for in a worker thread: a spawn
    from the loop's thread in this threaded server can block the loop (worker_processes).
    Cancelled: the process is killed."""

    def start() -> subprocess.Popen[bytes]:
        pipe = subprocess.PIPE
        return subprocess.Popen(args, stdin=pipe, stdout=pipe, stderr=pipe)

    process = await anyio.to_thread.run_sync(start)
    try:
        out, err = await anyio.to_thread.run_sync(process.communicate, data, abandon_on_cancel=True)
    except BaseException:
        process.kill()  # the thread's communicate returns once it is gone
        raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


KIND = EspeakKind()
