"""pocketsphinx_live: pocketsphinx with live word-by-word partials (opt-in kind).

The default `pocketsphinx` kind (`spear_rt_backends.sphinx`) decodes pause-delimited
segments in worker processes: one delta per segment, three-pass accuracy, and the event loop
is never blocked. This kind trades those for live words: it decodes in a worker *thread*, and
pocketsphinx holds the GIL while decoding, so the event loop stalls for each decode call
(p99 ~40 ms measured here with 20 ms blocks). Use it where live partials matter more than the
latency of other sessions on the same server (a dedicated server, few sessions).

Streaming goes through `spear_rt.local_asr`: `PocketsphinxRecognizer` implements
`StreamingRecognizer`, and live partial hypotheses become append-only deltas by the
stable-prefix rule. Choices, each measured here (espeak-ng speech and recorded speech):

* **One search pass** (``fwdflat=False, bestpath=False``). With the default three passes the
  final result comes from later searches that partials never show, and it changed a word that
  had stood in every partial for a second or more in about half of the utterances tried: a
  gateway that never retracts could not give the engine's own transcript. With one pass the
  final is the last partial. ``topn=8, lw=7.5`` win back accuracy: word error rate on 12
  recorded clips 0.36 (three passes) -> 0.27, on 22 espeak-ng sentences 0.34 -> 0.46 (synthetic
  speech is what the second pass helped most); CPU real-time factor 0.31 -> 0.34.
* **A fixed cepstral-mean prior per utterance.** pocketsphinx adapts its CMN across utterances;
  left alone, words would depend on which session used a pooled decoder before. Every
  utterance starts from `CMN_PRIOR`, fitted on speech (with the decoder's own "40,3,-1" the
  error rate of a first utterance is about doubled).
* **20 ms blocks.** The decoder holds the GIL inside `process_raw`, so each call stalls the
  event loop for as long as it runs. Audio is fed in fixed 320-sample blocks whatever the
  caller's framing, which bounds a stall to one block's decode (a few ms) and makes the result
  independent of how audio was batched: streaming equals `transcribe_pcm16`.
* **Long turns in engine segments.** A pocketsphinx utterance grows by ~0.4 MB per second of
  speech (measured: 72 s of continuous speech, 159 -> 188 MB), so a turn of any length is
  decoded as engine utterances of at most `max_segment_ms` (default 30 s): within the last
  `CUT_WINDOW_MS` of a segment the first quiet 20 ms block (energy under a tenth of the
  segment's mean, a gap between words) ends it, else its length does; the next starts from
  the CMN prior. The turn's hypothesis is the finished segments' words then the open one's,
  so deltas stay append-only and the turn never has to end for memory to be freed.
* **Pooled decoders.** A decoder takes 0.5-1 s and ~95 MB to create. A recognizer borrows one
  per utterance from its instance's pool and gives it back at the end, so memory follows the
  number of turns being spoken, not of sessions open; up to ``idle_decoders`` wait idle.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import numpy as np

from spear_rt.audio import resample
from spear_rt.backend import (
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    Pcm16,
    TranscriptionSpec,
    TranscriptionUpstream,
    loop_limiter,
)
from spear_rt.errors import BackendFailure, CanonicalFailure, echo
from spear_rt.ir import ErrorCode, Feature, Hosting, Operation, Transport, Usage
from spear_rt.local_asr import open_local_transcription
from spear_rt.stable_prefix import DEFAULT_AGREEMENT, DEFAULT_HOLD_BACK, DEFAULT_MIN_STABLE_MS

RATE_HZ = 16000
BLOCK_SAMPLES = 320  # 20 ms: the unit of every process_raw call (see the module docstring)
# One search pass, so partials and the final come from the same search (module docstring).
DECODER_CONFIG: dict[str, Any] = {
    "fwdflat": False,
    "bestpath": False,
    "topn": 8,
    "lw": 7.5,
    "loglevel": "ERROR",
}
CMN_PRIOR = "60,0.21,2.16,16.42,-22.26,4.72,-21.68,0.11,-8.50,-0.99,10.69,-13.77,9.81"
LANGUAGES = ("", "en", "en-us")  # compared lowercased; None (unset) is English too
DEFAULT_WORKERS = 2
MAX_SEGMENT_MS = 30_000  # one engine utterance at most (option max_segment_ms)
CUT_WINDOW_MS = 3000  # where a long segment looks for a quiet block to end at
QUIET_FRACTION = 0.1  # a block quieter than this share of the segment's mean energy is a gap


class DecoderPool:
    """Idle pocketsphinx decoders of one configuration; thread-safe.

    Overflow policy: `acquire` never waits (it creates a decoder when none is idle, in the
    calling worker thread); `release` keeps at most `max_idle` and drops the rest.
    """

    def __init__(self, *, max_idle: int = DEFAULT_WORKERS, cmn_prior: str = CMN_PRIOR) -> None:
        self.max_idle = max_idle
        self.cmn_prior = cmn_prior
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.created = 0

    def acquire(self) -> Any:
        """An idle decoder, or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        from pocketsphinx import Decoder

        return Decoder(**DECODER_CONFIG)

    def release(self, decoder: Any) -> None:
        """Give a decoder back (outside an utterance)."""
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(decoder)

    def idle(self) -> int:
        """How many decoders wait idle."""
        return len(self._idle)


class PocketsphinxRecognizer:
    """A `StreamingRecognizer` at 16 kHz that borrows a pooled decoder for each utterance."""

    sample_rate_hz = RATE_HZ

    def __init__(
        self, pool: DecoderPool, *, prewarm: bool = True, max_segment_ms: int = MAX_SEGMENT_MS
    ) -> None:
        self._pool = pool
        self._decoder: Any = None
        self._rest = np.zeros(0, dtype=np.int16)  # samples short of a whole block
        self._last: str | None = None
        self._max_blocks = max(RATE_HZ * max_segment_ms // 1000 // BLOCK_SAMPLES, 2)
        self._window_blocks = min(
            RATE_HZ * CUT_WINDOW_MS // 1000 // BLOCK_SAMPLES, self._max_blocks // 2
        )
        self._done = ""  # words of this utterance's finished engine segments
        self._blocks = 0  # blocks fed to the open engine segment
        self._energy = 0.0  # their total energy (mean square per block, summed)
        self.segments = 0  # engine segments finished in this utterance (tests, metrics)
        if prewarm and not pool.idle():
            pool.release(pool.acquire())  # load a decoder now, not at the first word

    def start_utterance(self) -> None:
        """Borrow a decoder and start it from the CMN prior."""
        if self._decoder is not None:
            raise RuntimeError("an utterance is already open")
        decoder = self._pool.acquire()
        decoder.set_cmn(self._pool.cmn_prior)
        decoder.start_utt()
        self._decoder = decoder
        self._rest = np.zeros(0, dtype=np.int16)
        self._last = ""
        self._done, self._blocks, self._energy, self.segments = "", 0, 0.0, 0

    def feed(self, pcm: Pcm16) -> str | None:
        """Decode whole blocks of `pcm`; the hypothesis, or None when it did not change."""
        decoder = self._open_decoder()
        audio = np.concatenate([self._rest, pcm]) if self._rest.size else pcm
        whole = audio.size - audio.size % BLOCK_SAMPLES
        raw = audio[:whole].astype("<i2", copy=False).tobytes()
        step = 2 * BLOCK_SAMPLES
        blocks = audio[:whole].astype(np.float32).reshape(-1, BLOCK_SAMPLES)
        energies = np.einsum("ij,ij->i", blocks, blocks) / BLOCK_SAMPLES
        for n, start in enumerate(range(0, len(raw), step)):
            decoder.process_raw(raw[start : start + step])
            self._blocks += 1
            self._energy += float(energies[n])
            if self._segment_ends(float(energies[n])):
                self._next_segment(decoder)
        self._rest = audio[whole:].copy()
        if not whole:
            return None
        hypothesis = _join(self._done, _text(decoder.hyp()))
        if hypothesis == self._last:
            return None
        self._last = hypothesis
        return hypothesis

    def end_utterance(self) -> str:
        """Decode the last partial block, finish, give the decoder back; the final text."""
        decoder = self._open_decoder()
        self._decoder = None
        if self._rest.size:
            decoder.process_raw(self._rest.astype("<i2", copy=False).tobytes())
        self._rest = np.zeros(0, dtype=np.int16)
        decoder.end_utt()
        text = _join(self._done, _text(decoder.hyp()))
        self._pool.release(decoder)  # only a decoder that finished cleanly goes back
        return text

    def _segment_ends(self, energy: float) -> bool:
        """Whether the engine segment ends after this block (see the module docstring)."""
        if self._blocks >= self._max_blocks:
            return True
        if self._blocks < self._max_blocks - self._window_blocks:
            return False
        return energy < QUIET_FRACTION * self._energy / self._blocks

    def _next_segment(self, decoder: Any) -> None:
        """End the engine utterance, keep its words, start the next from the CMN prior."""
        decoder.end_utt()
        self._done = _join(self._done, _text(decoder.hyp()))
        decoder.set_cmn(self._pool.cmn_prior)
        decoder.start_utt()
        self._blocks, self._energy = 0, 0.0
        self.segments += 1

    def close(self) -> None:
        """End an open utterance (its decoder is dropped, not pooled: its state is unknown)."""
        self._decoder = None

    def _open_decoder(self) -> Any:
        if self._decoder is None:
            raise RuntimeError("no utterance is open")
        return self._decoder


def _text(hyp: Any) -> str:
    return " ".join(hyp.hypstr.split()) if hyp is not None else ""


def _join(done: str, current: str) -> str:
    return f"{done} {current}" if done and current else done or current


_default_pool = DecoderPool()


def transcribe_pcm16(pcm16_16k: Pcm16, *, pool: DecoderPool | None = None) -> str:
    """The engine's transcript of a whole 16 kHz recording as one utterance (blocking)."""
    recognizer = PocketsphinxRecognizer(pool or _default_pool, prewarm=False)
    recognizer.start_utterance()
    try:
        recognizer.feed(np.asarray(pcm16_16k, dtype=np.int16))
    except BaseException:
        recognizer.close()
        raise
    return recognizer.end_utterance()


def check_language(language: str | None) -> None:
    """Raise `InvalidRequest` unless `language` names English (or is unset)."""
    if language is not None and language.lower() not in LANGUAGES:
        raise CanonicalFailure.of(
            ErrorCode.INVALID_REQUEST,
            f"pocketsphinx recognizes English only; language {echo(language)} is not supported "
            "(use 'en' or 'en-US', or leave it unset)",
        )


class PocketsphinxKind:
    """The `pocketsphinx` backend kind (extra `local-asr`).

    Operations: `speech_to_text` (one-shot over HTTP, and transcription sessions, which the
    session manager routes with transport `websocket`) and `realtime_voice` (voice sessions
    transcribe their input through the same upstream). Transports: `websocket` and `http` make
    those routable; `in_process` says where it runs.
    """

    name = "pocketsphinx_live"
    extra = "local-asr"
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_LANGUAGE,  # English only; anything else is InvalidRequest
            }
        ),
        transports=frozenset({Transport.WEBSOCKET, Transport.HTTP, Transport.IN_PROCESS}),
        hosting=Hosting.LOCAL,
    )

    def __init__(self) -> None:
        self._pools: dict[str, DecoderPool] = {}

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Why the instance cannot serve: the pocketsphinx package is missing, or None."""
        if importlib.util.find_spec("pocketsphinx") is None:
            return "pocketsphinx is not installed: pip install 'spear-rt[local-asr]'"
        return None

    def pool(self, instance: InstanceInfo) -> DecoderPool:
        """The instance's decoder pool (options `idle_decoders`, `cmn_prior`)."""
        pool = self._pools.get(instance.name)
        if pool is None:
            pool = self._pools[instance.name] = DecoderPool(
                max_idle=int(instance.options.get("idle_decoders", _workers(instance))),
                cmn_prior=str(instance.options.get("cmn_prior", CMN_PRIOR)),
            )
        return pool

    def limiter(self, instance: InstanceInfo) -> anyio.CapacityLimiter:
        """The worker threads all sessions of the instance share (option `workers`)."""
        return loop_limiter(f"pocketsphinx_live:{instance.name}", _workers(instance))

    def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """A streaming upstream: `open_local_transcription` over a pooled recognizer."""
        check_language(spec.language)
        return self._open(instance)

    @asynccontextmanager
    async def _open(self, instance: InstanceInfo) -> AsyncIterator[TranscriptionUpstream]:
        pool = self.pool(instance)
        max_segment_ms = int(instance.options.get("max_segment_ms", MAX_SEGMENT_MS))

        def make() -> PocketsphinxRecognizer:
            return PocketsphinxRecognizer(pool, max_segment_ms=max_segment_ms)

        async with open_local_transcription(
            make,
            limiter=self.limiter(instance),
            input_rate_hz=RATE_HZ,
            min_stable_ms=float(instance.options.get("min_stable_ms", DEFAULT_MIN_STABLE_MS)),
            agreement=int(instance.options.get("agreement", DEFAULT_AGREEMENT)),
            hold_back=int(instance.options.get("hold_back", DEFAULT_HOLD_BACK)),
        ) as upstream:
            yield upstream

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot transcription of an uploaded file (`/v1/audio/transcriptions`)."""
        audio = request.audio
        if request.operation is not Operation.SPEECH_TO_TEXT or audio is None or audio.pcm is None:
            raise BackendFailure("pocketsphinx serves speech_to_text uploads only")
        check_language(request.payload.get("language"))
        upload, rate_hz = audio.pcm, audio.rate_hz
        pool = self.pool(instance)
        text = await anyio.to_thread.run_sync(  # resampled there too: not on the loop
            lambda: transcribe_pcm16(resample(upload, rate_hz, RATE_HZ), pool=pool),
            limiter=self.limiter(instance),
        )
        usage = Usage(audio_seconds=upload.size / rate_hz)
        if request.payload.get("response_format") == "text":
            return OneShotResponse("text/plain; charset=utf-8", text.encode(), usage=usage)
        return OneShotResponse(body=msgspec.json.encode({"text": text}), usage=usage)


def _workers(instance: InstanceInfo) -> int:
    return max(1, int(instance.options.get("workers", DEFAULT_WORKERS)))


KIND = PocketsphinxKind()
