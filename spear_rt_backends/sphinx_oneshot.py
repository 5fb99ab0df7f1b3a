"""pocketsphinx one-shot transcription with timings: every `response_format` from the engine.

The file (resampled to 16 kHz in a worker thread) is cut at pauses of `pause_ms` (the same
energy VAD as streaming; a cut falls in the middle of the pause) and at most every
`MAX_SEGMENT_S` (at the quietest 10 ms of the segment's last third). Each segment is decoded
in a worker process by the process's own decoder (`spear_rt_backends.sphinx`), whose word
segmentation (`Decoder.seg()`: start and end frame at 100 frames/s) gives the word timings.
A recording without an inner pause is one segment: the words of a direct decode of it.
"""

from __future__ import annotations

import itertools

import anyio
import anyio.to_thread
import numpy as np

from spear_rt.audio import VadConfig, VoiceActivityDetector, resample
from spear_rt.audio.vad import SpeechStarted, SpeechStopped
from spear_rt.backend import InstanceInfo, OneShotRequest, OneShotResponse, Pcm16
from spear_rt.errors import BackendFailure
from spear_rt.ir import Operation
from spear_rt.transcripts import Segment, Transcript, Word, granularities, render, response_format
from spear_rt_backends.worker_processes import run_in_worker

RATE_HZ = 16000
FRAMES_PER_S = 100  # pocketsphinx's default frame rate (-frate)
MAX_SEGMENT_S = 30.0
_FRAME = RATE_HZ // 100  # 10 ms


def decode_timed(pcm_bytes: bytes) -> tuple[str, list[tuple[str, int, int]]]:
    """Decode one segment (s16le, 16 kHz): its text and (word, start frame, end frame)."""
    from spear_rt_backends.sphinx import decode_utterance  # that module imports this one

    decoder = decode_utterance(pcm_bytes)
    hyp = decoder.hyp()
    if hyp is None:
        return "", []
    words = []
    for seg in decoder.seg():
        word = str(seg.word)
        if word.startswith(("<", "[")):  # <s>, </s>, <sil>, [NOISE]: not words
            continue
        words.append((word.split("(")[0], int(seg.start_frame), int(seg.end_frame)))
    return " ".join(hyp.hypstr.split()), words


def cut_points(pcm: Pcm16, pause_ms: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges covering `pcm`: cut mid-pause, and at most MAX_SEGMENT_S."""
    vad = VoiceActivityDetector(
        VadConfig(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=pause_ms), RATE_HZ
    )
    events = vad.process(pcm)
    cuts = [
        min(pcm.size, (event.audio_end_ms + pause_ms // 2) * RATE_HZ // 1000)
        for event in events
        if isinstance(event, SpeechStopped)
    ]
    onsets = [e.audio_start_ms * RATE_HZ // 1000 for e in events if isinstance(e, SpeechStarted)]
    bounds = [0, *[c for c in cuts if 0 < c < pcm.size], pcm.size]
    # A range without a speech onset (the pause after the last words) joins the one before.
    keep = [
        cut
        for cut, after in itertools.pairwise(bounds[1:])
        if not onsets or any(cut <= onset < after for onset in onsets)
    ]
    ranges: list[tuple[int, int]] = []
    longest = int(MAX_SEGMENT_S * RATE_HZ)
    for start, end in itertools.pairwise([0, *keep, pcm.size]):
        while end - start > longest:
            cut = _quietest(pcm, start + longest * 2 // 3, start + longest)
            ranges.append((start, cut))
            start = cut
        if end > start:
            ranges.append((start, end))
    return ranges


def _quietest(pcm: Pcm16, lo: int, hi: int) -> int:
    """The start of the quietest 10 ms frame in [lo, hi)."""
    frames = pcm[lo : lo + (hi - lo) // _FRAME * _FRAME].astype(np.float32).reshape(-1, _FRAME)
    return lo + int(np.argmin((frames * frames).sum(axis=1))) * _FRAME


def _prepare(pcm: Pcm16, rate_hz: int, pause_ms: int) -> tuple[Pcm16, list[tuple[int, int]]]:
    """Resample to 16 kHz and cut (CPU-bound: runs in a worker thread)."""
    pcm16k = np.ascontiguousarray(resample(pcm, rate_hz, RATE_HZ))
    return pcm16k, cut_points(pcm16k, pause_ms)


async def transcribe_timed(
    pcm: Pcm16, rate_hz: int, limiter: anyio.CapacityLimiter, pause_ms: int = 400
) -> Transcript:
    """The whole file's transcript with segment and word timings."""
    pcm16k, ranges = await anyio.to_thread.run_sync(_prepare, pcm, rate_hz, pause_ms)
    segments = []
    for start, end in ranges:
        audio = pcm16k[start:end].astype("<i2").tobytes()
        text, words = await run_in_worker(decode_timed, audio, limiter=limiter)
        if not text:
            continue
        offset = start / RATE_HZ
        timed = tuple(
            Word(w, offset + a / FRAMES_PER_S, offset + (b + 1) / FRAMES_PER_S) for w, a, b in words
        )
        first = timed[0].start if timed else offset
        last = timed[-1].end if timed else end / RATE_HZ
        segments.append(Segment(first, min(last, end / RATE_HZ), text, timed))
    text = " ".join(s.text for s in segments)
    return Transcript(text, pcm16k.size / RATE_HZ, tuple(segments))


async def call(
    instance: InstanceInfo, request: OneShotRequest, limiter: anyio.CapacityLimiter
) -> OneShotResponse:
    """One-shot transcription of an uploaded file in any `response_format`."""
    audio = request.audio
    if request.operation is not Operation.SPEECH_TO_TEXT or audio is None or audio.pcm is None:
        raise BackendFailure("pocketsphinx serves speech_to_text uploads only")
    response_format(request.payload)  # a bad format fails before any decoding
    granularities(request.payload)
    pause_ms = int(instance.options.get("pause_ms", 400))
    transcript = await transcribe_timed(audio.pcm, audio.rate_hz, limiter, pause_ms)
    return render(transcript, request.payload)


__all__ = ["call", "cut_points", "decode_timed", "transcribe_timed"]
