"""pocketsphinx: a real offline English recognizer (CMU; the wheel carries its en-US model).

Stable-prefix rule, and why it is not "agreement of partial hypotheses":
pocketsphinx's partial hypotheses come from its first (tree) search pass and are far less
accurate than its final result after the fwdflat and bestpath passes (on our fixtures the
partials of "the quick brown fox ..." read "luckily all my thoughts dumb ..."). Committing
words that merely repeat across partials would lock those errors in. So the unit of stability
is the *segment*: a turn's audio is cut at pauses of `pause_ms` (energy VAD, in audio time),
each segment is decoded to its final hypothesis, and its words are emitted as one
append-only delta. Contract: deltas never retract; `completed.transcript` is the
concatenation of the item's deltas; a turn shorter than `max_segment_ms` without an inner
pause is one segment and gives exactly the words the engine gives for the whole recording
(tested on the fixtures).

Long turns stream: once the open turn holds `max_segment_ms` (default 15 s) with no pause,
it is cut at its quietest 20 ms within the last `CUT_WINDOW_MS` (between words, as a rule)
and that part is decoded while the speaker goes on. So a turn of any length makes progress,
and the pending bound (`max_pending_ms`, default 60 s, at least twice the segment) only ever
waits for segments already queued for decoding, which free it as they finish.

pocketsphinx holds the GIL while decoding (a decoder in a thread stalled the event loop for
up to 190 ms here), so segments are decoded in worker processes (`worker_processes`: made by
a fork server, never by forking this threaded server), each keeping one loaded decoder; the
event loop only buffers audio.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np

from spear_rt import redecode
from spear_rt.audio import VadConfig, VoiceActivityDetector
from spear_rt.audio.vad import SpeechStopped
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    EventQueue,
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    Pcm16,
    QueuedUpstream,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionSpec,
    UpstreamCommand,
    decoding,
    loop_limiter,
)
from spear_rt.errors import CanonicalFailure, echo
from spear_rt.ir import ErrorCode, Feature, Hosting, Operation, Transport
from spear_rt_backends.worker_processes import run_in_worker

RATE_HZ = 16000
MAX_SEGMENT_MS = 15_000  # an open turn without a pause is cut by then (option max_segment_ms)
MAX_PENDING_MS = 60_000  # undecoded audio; past it, send() waits (option max_pending_ms)
CUT_WINDOW_MS = 3000  # a long segment is cut at the quietest frame of its last 3 s
_FRAME = RATE_HZ // 50  # 20 ms
EVENT_BUFFER = 256
LANGUAGES = (None, "en", "en-US", "en-us")

_decoder: Any = None  # one per worker process

# Cepstral mean prior applied before every utterance. pocketsphinx adapts CMN across
# utterances, so without a reset the words depend on which worker decoded what before
# (nondeterministic). This prior was fitted on speech here: fixture WER 1.01 -> 0.35 and
# LibriVox WER 0.42 -> 0.27 against a fresh decoder's prior "40,3,-1,0,...".
CMN_PRIOR = "58,0.21,2.16,16.42,-22.26,4.72,-21.68,0.11,-8.50,-0.99,10.69,-13.77,9.81"


def decode_utterance(pcm_bytes: bytes) -> Any:
    """Decode s16le 16 kHz audio as one utterance with the process's decoder (made on first
    use, in a worker process) and the CMN prior; returns the decoder for `hyp()` / `seg()`."""
    global _decoder
    if _decoder is None:
        from pocketsphinx import Decoder

        _decoder = Decoder(loglevel="ERROR")
    decoder = _decoder
    decoder.set_cmn(CMN_PRIOR)
    decoder.start_utt()
    for start in range(0, len(pcm_bytes), 32000):  # 1 s per call keeps memory flat
        decoder.process_raw(pcm_bytes[start : start + 32000], False, False)
    decoder.end_utt()
    return decoder


def decode_segment(pcm_bytes: bytes) -> str:
    """Decode one segment (s16le, 16 kHz) to its final hypothesis (runs in a worker process)."""
    hyp = decode_utterance(pcm_bytes).hyp()
    return " ".join(hyp.hypstr.split()) if hyp is not None else ""


async def transcribe_pcm16(pcm16_16k: Pcm16, limiter: anyio.CapacityLimiter | None = None) -> str:
    """The engine's transcript of a whole recording as one utterance (the direct reference)."""
    if limiter is None:
        limiter = anyio.CapacityLimiter(1)
    return await run_in_worker(decode_segment, pcm16_16k.astype("<i2").tobytes(), limiter=limiter)


def quietest_cut(audio: Pcm16, window: int) -> int:
    """Where to cut `audio`: the middle of its quietest 20 ms frame among the last `window`
    samples (the latest of equals), or its end when it is shorter than a frame."""
    return redecode.quietest_cut(audio, window, _FRAME)


class SphinxTranscription(QueuedUpstream):
    """One session's pocketsphinx upstream: buffers the turn, decodes segments in order."""

    input_rate_hz = RATE_HZ

    def __init__(
        self,
        limiter: anyio.CapacityLimiter,
        pause_ms: int,
        *,
        max_segment_ms: int = MAX_SEGMENT_MS,
        max_pending_ms: int = MAX_PENDING_MS,
    ) -> None:
        self._limiter = limiter
        self._max_segment = max(RATE_HZ * max_segment_ms // 1000, 2 * _FRAME)
        # At least two segments: the open turn alone can never fill it (that was a hang).
        self._max_pending = max(RATE_HZ * max_pending_ms // 1000, 2 * self._max_segment)
        self._window = min(RATE_HZ * CUT_WINDOW_MS // 1000, self._max_segment // 2)
        self._pause = VadConfig(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=pause_ms)
        self._events = EventQueue(EVENT_BUFFER)
        self._segments: deque[tuple[str, Pcm16 | None, bool]] = deque()  # (item, audio, ends turn)
        self._work = anyio.Event()
        # Undecoded samples (open turn + queued segments), kept as a running count: summing
        # the buffers on every 20 ms frame made a long turn quadratic.
        self._pending = 0
        self._open_samples = 0  # the open turn's share of `_pending`
        self._cleared: set[str] = set()  # items dropped by Clear whose segments are still queued
        self._reset("")

    def _reset(self, item_id: str) -> None:
        self._item_id = item_id
        self._pending -= self._open_samples  # a dropped turn's audio is no longer pending
        self._chunks: list[Pcm16] = []
        self._open_samples = 0
        self._vad = VoiceActivityDetector(self._pause, RATE_HZ)

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Buffer audio / cut segments at once; False while too much audio awaits decoding."""
        if self._pending > self._max_pending or self._events.full:
            return False
        match command:
            case BeginTurn(item_id=item_id):
                self._reset(item_id)
            case AppendAudio(pcm=pcm):
                self._chunks.append(pcm)
                self._open_samples += pcm.size
                self._pending += pcm.size
                if any(isinstance(e, SpeechStopped) for e in self._vad.process(pcm)):
                    self._cut(ends_turn=False)
                while self._open_samples >= self._max_segment:
                    self._cut_long()
            case Commit(item_id=item_id):
                self._item_id = item_id
                self._cut(ends_turn=True)
                self._reset("")
            case Clear():
                if any(item == self._item_id for item, _, _ in self._segments):
                    self._cleared.add(self._item_id)  # its cut segments must not be decoded
                self._reset("")
        return True

    def _cut(self, *, ends_turn: bool) -> None:
        audio = np.concatenate(self._chunks) if self._chunks else None
        self._chunks = []
        self._open_samples = 0  # still pending, now as a queued segment
        self._segments.append((self._item_id, audio, ends_turn))
        self._work.set()

    def _cut_long(self) -> None:
        """Queue the open turn's first `max_segment` samples, cut at their quietest point."""
        audio = np.concatenate(self._chunks)
        cut = quietest_cut(audio[: self._max_segment], self._window)
        rest = audio[cut:]
        self._chunks = [rest] if rest.size else []
        self._open_samples = int(rest.size)  # the cut part stays pending, as a segment
        self._segments.append((self._item_id, audio[:cut], False))
        self._work.set()

    def _segment_done(self, audio: Pcm16 | None) -> None:
        self._segments.popleft()
        self._pending -= audio.size if audio is not None else 0
        self._events.wake_senders()  # the segment's audio no longer counts as pending

    async def decode_loop(self) -> None:
        """Decode segments in order; each segment's words become one delta."""
        words: dict[str, list[str]] = {}
        while True:
            while not self._segments:
                self._work = anyio.Event()
                await self._work.wait()
            item_id, audio, ends_turn = self._segments[0]
            if item_id in self._cleared:
                self._segment_done(audio)
                if not any(item == item_id for item, _, _ in self._segments):
                    self._cleared.discard(item_id)
                    words.pop(item_id, None)
                continue
            try:
                text = (
                    await transcribe_pcm16(audio, self._limiter)
                    if audio is not None and audio.size
                    else ""
                )
            except Exception as exc:
                self._segment_done(audio)
                words.pop(item_id, None)
                self._events.put(TranscriptFailed(item_id, f"pocketsphinx failed: {exc}"))
                continue
            self._segment_done(audio)
            said = words.setdefault(item_id, [])
            if text:
                self._events.put(TranscriptDelta(item_id, (" " if said else "") + text))
                said.extend(text.split())
            if ends_turn:
                self._events.put(TranscriptCompleted(item_id, " ".join(words.pop(item_id))))

    def close(self) -> None:
        """End the event stream."""
        self._events.close()


# Instances whose workers this event loop has started (a RunVar: ids of dead loops' tokens
# are reused, so a set keyed by id() mixed loops up).
_warmed: anyio.lowlevel.RunVar[set[str]] = anyio.lowlevel.RunVar("sphinx_warmed")


async def _warm(instance: InstanceInfo, limiter: anyio.CapacityLimiter) -> None:
    """Start every worker process and load its decoder (~1 s each) before the first segment."""
    async with anyio.create_task_group() as tg:
        for _ in range(int(limiter.total_tokens)):
            tg.start_soon(partial(run_in_worker, decode_segment, b"", limiter=limiter))


def _limiter(instance: InstanceInfo) -> anyio.CapacityLimiter:
    # A limiter belongs to one event loop (a process that ran trio, then asyncio, must not
    # share one between them: that was a 500 on the second loop).
    return loop_limiter(f"pocketsphinx:{instance.name}", int(instance.options.get("workers", 2)))


def _check_language(language: str | None) -> None:
    if language not in LANGUAGES:
        raise CanonicalFailure.of(
            ErrorCode.INVALID_REQUEST,
            f"pocketsphinx recognizes English only; language {echo(language)} is not supported "
            "(use 'en')",
        )


class SphinxKind:
    """The `pocketsphinx` backend kind (extra `local-asr`)."""

    name = "pocketsphinx"
    extra = "local-asr"
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_LANGUAGE,
                Feature.SUPPORTS_TIMESTAMPS,  # one-shot: word timings from the engine
            }
        ),
        transports=frozenset({Transport.WEBSOCKET, Transport.HTTP}),
        hosting=Hosting.LOCAL,
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """Unavailable when the pocketsphinx package is not installed."""
        if importlib.util.find_spec("pocketsphinx") is None:
            return "pocketsphinx is not installed: pip install 'spear-rt[local-asr]'"
        return None

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[SphinxTranscription]:
        """A streaming upstream whose segments decode in worker processes."""
        _check_language(spec.language)
        limiter = _limiter(instance)
        options = instance.options
        upstream = SphinxTranscription(
            limiter,
            int(options.get("pause_ms", 400)),
            max_segment_ms=int(options.get("max_segment_ms", MAX_SEGMENT_MS)),
            max_pending_ms=int(options.get("max_pending_ms", MAX_PENDING_MS)),
        )
        async with decoding(upstream) as tg:
            try:
                warmed = _warmed.get()
            except LookupError:
                warmed = set()
                _warmed.set(warmed)
            if instance.name not in warmed:  # workers are per event loop
                warmed.add(instance.name)
                tg.start_soon(_warm, instance, limiter)
            yield upstream

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot transcription of an uploaded file, every `response_format` with timings."""
        from spear_rt_backends import sphinx_oneshot  # imports this module: load it lazily

        _check_language(request.payload.get("language") or None)
        return await sphinx_oneshot.call(instance, request, _limiter(instance))


KIND = SphinxKind()
