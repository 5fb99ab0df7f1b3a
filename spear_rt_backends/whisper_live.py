"""Realtime transcription from Whisper: the `Redecoder` rule driven by worker-thread decodes.

Per session::

    send_nowait() -> Redecoder (windows, on the loop: only buffering and a 10 ms energy VAD)
                        | next_request()
    decode task  --> [instance limiter, FIFO] --> to_thread: continue_window() --> decoded()
                        |
    receive()  <-  EventQueue (bounded in events)

* **Fair sharing.** Each session has at most one decode in flight, and every session of an
  instance waits for the same `loop_limiter` (`workers` tokens, FIFO): with more sessions than
  workers they take turns, so each session's partials come less often (its window grows
  between decodes) rather than some sessions starving. Finals do not jump the queue.
* **Bounds.** `send_nowait` refuses (and `send` waits) while more than `max_pending_ms` of
  audio awaits its final decode or the event queue is full: backpressure to the client, never
  a drop, never an unbounded queue. Sessions past the instance's `max_concurrency` are refused
  by the router before they start (close 1013 with a retry hint).
* **Short encoder input.** Whisper's encoder is trained on 30 s windows, and faster-whisper
  always pads to 30 s: 0.7-1.0 s per decode of tiny.en on one thread here, whatever the audio
  length. CTranslate2 takes shorter mel input: padded to the window + `PAD_FRAMES` (0.5 s) the
  same five LibriVox lines decode to the same words (WER 0.098 both ways, greedy, no
  timestamps) in 0.09-0.24 s instead of 0.84-0.98 s. That is what makes a cadence of a few
  decodes per second affordable.
* **Hallucination guard.** A decode without a prefix whose no-speech probability is over 0.6
  while its mean log-probability is under -1 (faster-whisper's rule) continues with nothing.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from spear_rt.audio import int16_to_float32
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    EventQueue,
    InstanceInfo,
    Pcm16,
    QueuedUpstream,
    TranscriptionSpec,
    UpstreamCommand,
    UpstreamEvent,
    decoding,
    loop_limiter,
)
from spear_rt.errors import BackendFailure
from spear_rt.redecode import DecodeRequest, RedecodeConfig, Redecoder
from spear_rt_backends.espeak_tts import int_option

log = logging.getLogger(__name__)

RATE_HZ = 16000
HOP = 160  # samples per mel frame (10 ms)
PAD_FRAMES = 50  # at least this much silence after the audio
MIN_FRAMES = 1000  # encoder input of at least 10 s: shorter ones loop (module docstring)
MAX_FRAMES = 3000  # Whisper's 30 s
TOKENS_PER_SECOND = 8  # a continuation longer than this per second of audio is a loop
COMPRESSION_RATIO = 2.4
MAX_TOKENS = 448  # Whisper's text context
EVENT_BUFFER = 256
MAX_PENDING_MS = 60_000
NO_SPEECH_PROB = 0.6
LOW_LOGPROB = -1.0


class _Vocabulary:
    """What every decode with one model needs besides the audio (built once per model)."""

    def __init__(self, model: Any) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        multilingual = bool(model.model.is_multilingual)
        self.tokenizer = Tokenizer(
            model.hf_tokenizer, multilingual, task="transcribe", language="en"
        )
        self.suppress = get_suppressed_tokens(self.tokenizer, [-1])


_vocabularies: dict[int, _Vocabulary] = {}
_vocabulary_lock = threading.Lock()


def _vocabulary(model: Any) -> _Vocabulary:
    with _vocabulary_lock:
        found = _vocabularies.get(id(model))
        if found is None:
            found = _vocabularies[id(model)] = _Vocabulary(model)
        return found


def repetitive(text: str) -> bool:
    """Whisper looping ("10 of clubs 10 of clubs ..."): text that compresses more than 2.4:1
    (Whisper's own compression-ratio rule)."""
    data = text.encode()
    return len(data) > 24 and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO


def repeats_tail(text: str) -> bool:
    """A short loop the ratio misses: the last 2+ words repeat the ones just before them
    ("10 of close 10 of close"). People say that too, so it earns a retry, not a drop."""
    said = [re.sub(r"[^\w']", "", w.lower()) for w in text.split()]
    return any(said[-2 * n : -n] == said[-n:] for n in range(2, len(said) // 2 + 1))


def _features(model: Any, audio: Pcm16, frames: int) -> np.ndarray:
    """Log-mel of `audio` followed by silence, `frames` frames (the encoder's input)."""
    samples = int16_to_float32(audio)
    padded = np.zeros(frames * HOP + HOP, np.float32)
    used = min(samples.size, padded.size)
    padded[:used] = samples[:used]
    mel = model.feature_extractor(padded, padding=0)[:, :frames]
    return np.ascontiguousarray(mel[None], dtype=np.float32)


def _generate(
    model: Any, features: np.ndarray, prompt: list[int], max_new: int, beam_size: int
) -> Any:
    import ctranslate2

    return model.model.generate(
        ctranslate2.StorageView.from_array(features),
        [prompt],
        beam_size=beam_size,
        max_length=min(MAX_TOKENS, len(prompt) + max_new),
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=False,
        suppress_tokens=_vocabulary(model).suppress,
    )[0]


def continue_window(model: Any, audio: Pcm16, prefix: str, context: str, beam_size: int = 1) -> str:
    """Whisper's continuation of `prefix` for `audio` (16 kHz int16), conditioned on `context`
    (a worker thread; no timestamps, encoder input cut short, module docstring)."""
    tokenizer = _vocabulary(model).tokenizer
    previous = tokenizer.encode(" " + context.strip()) if context.strip() else []
    prefix_ids = tokenizer.encode(" " + prefix.strip()) if prefix.strip() else []
    prompt = model.get_prompt(tokenizer, previous[-(MAX_TOKENS // 4) :], without_timestamps=True)
    prompt = prompt + prefix_ids
    seconds = audio.size / RATE_HZ
    max_new = int(TOKENS_PER_SECOND * seconds) + 8
    needed = audio.size // HOP + PAD_FRAMES
    for frames in (max(MIN_FRAMES, needed), MAX_FRAMES):
        frames = min(MAX_FRAMES, frames + frames % 2)  # the encoder halves the frame count
        result = _generate(model, _features(model, audio, frames), prompt, max_new, beam_size)
        ids = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        if ids[: len(prefix_ids)] == prefix_ids:
            ids = ids[len(prefix_ids) :]
        text = " ".join(str(tokenizer.decode(ids)).split())
        if not repetitive(text) and (frames == MAX_FRAMES or not repeats_tail(text)):
            break
    else:
        return ""  # looping even on a full 30 s input: no hypothesis is better than that
    if not prefix_ids and result.no_speech_prob > NO_SPEECH_PROB and result.scores[0] < LOW_LOGPROB:
        return ""
    return text


def decode(model: Any, request: DecodeRequest, beam_size: int) -> str:
    """Run one of the Redecoder's requests: a final decode with `beam_size`, a partial greedy
    (beam-3 partials made live WER worse through the gateway: see `whisper.BEAM_SIZE`)."""
    beam = beam_size if request.final else 1
    return continue_window(model, request.audio, request.prefix, request.context, beam)


class WhisperTranscription(QueuedUpstream):
    """One session's live Whisper upstream (module docstring)."""

    input_rate_hz = RATE_HZ

    def __init__(
        self,
        model_source: Any,
        limiter: anyio.CapacityLimiter,
        config: RedecodeConfig,
        max_pending_ms: int = MAX_PENDING_MS,
        beam_size: int = 1,
    ) -> None:
        self._load = model_source  # () -> model, run in a thread
        self._beam = beam_size
        self._limiter = limiter
        self._machine = Redecoder(config)
        self._max_pending = RATE_HZ * max_pending_ms // 1000
        self._events = EventQueue(EVENT_BUFFER)
        self._work = anyio.Event()

    @property
    def machine(self) -> Redecoder:
        """The window/agreement state (for metrics and tests)."""
        return self._machine

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Apply a command at once; False while too much audio awaits decoding."""
        if self._machine.pending_samples > self._max_pending or self._events.full:
            return False
        match command:
            case BeginTurn(item_id=item_id):
                self._machine.begin(item_id)
            case AppendAudio(pcm=pcm):
                self._machine.append(pcm)
            case Commit(item_id=item_id):
                self._put(self._machine.commit(item_id))
            case Clear():
                self._machine.clear()
        self._work.set()
        return True

    def _put(self, events: list[UpstreamEvent]) -> None:
        for event in events:
            self._events.put(event)

    async def decode_loop(self) -> None:
        """Run the machine's decodes one at a time, each under the instance's limiter."""
        model = await anyio.to_thread.run_sync(self._load)
        while True:
            request = self._machine.next_request()
            if request is None:
                self._work = anyio.Event()
                await self._work.wait()
                continue
            self._put(await self._decode(model, request))
            self._events.wake_senders()  # decoded audio no longer counts as pending

    async def _decode(self, model: Any, request: DecodeRequest) -> list[UpstreamEvent]:
        try:
            async with self._limiter:
                text = await anyio.to_thread.run_sync(decode, model, request, self._beam)
        except Exception as exc:
            log.warning("whisper: a live decode failed", exc_info=exc)
            return self._machine.failed(f"whisper failed ({type(exc).__name__})")
        return self._machine.decoded(text)

    def close(self) -> None:
        """End the event stream."""
        self._events.close()


def redecode_config(instance: InstanceInfo) -> RedecodeConfig:
    """The instance's cadence and window options (`step_ms`, `max_window_ms`, `pause_ms`,
    `agreement`, `hold_back`), checked."""
    defaults = RedecodeConfig()
    try:
        return RedecodeConfig(
            rate_hz=RATE_HZ,
            step_ms=int_option(instance, "step_ms", defaults.step_ms),
            max_window_ms=min(
                int_option(instance, "max_window_ms", defaults.max_window_ms), 28_000
            ),
            pause_ms=int_option(instance, "pause_ms", defaults.pause_ms),
            agreement=int_option(instance, "agreement", defaults.agreement),
            hold_back=int_option(instance, "hold_back", defaults.hold_back, minimum=0),
        )
    except ValueError as exc:
        raise BackendFailure(f"instance {instance.name}: {exc}") from None


@asynccontextmanager
async def open_transcription(
    instance: InstanceInfo, spec: TranscriptionSpec, load: Any, workers: int, beam_size: int
) -> AsyncIterator[WhisperTranscription]:
    """A live upstream for one session; `load()` returns the model (called in a thread)."""
    limiter = loop_limiter(f"whisper:{instance.name}", workers)
    upstream = WhisperTranscription(load, limiter, redecode_config(instance), beam_size=beam_size)
    async with decoding(upstream):
        yield upstream
