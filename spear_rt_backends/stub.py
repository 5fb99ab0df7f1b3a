"""A deterministic offline backend for tests, demos and benches (documented as a stub).

Transcription: every full block of ``block_ms`` (default 200 ms) of a turn's audio becomes one
word from a fixed lexicon chosen by the CRC-32 of the block's samples, emitted as a delta as
soon as the block is complete; the commit emits the completed transcript. The same audio thus
always gives the same words, which is what reconnect and replay tests compare. It runs in the
event loop (no thread hop) and costs one CRC per block.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np

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
    QueuedUpstream,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
    TranscriptionUpstream,
    UpstreamCommand,
)
from spear_rt.ir import Feature, Hosting, Operation, Transport

LEXICON = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three "
    "four five six seven eight nine zero red orange yellow green blue indigo violet north south "
    "east west up down left right near far early late open close start stop fast slow"
).split()

STUB_RATE_HZ = 24000
EVENT_BUFFER = 256  # events; the session reads them as fast as they come


class StubTranscription(QueuedUpstream):
    """One session's stub transcription upstream (in-loop, deterministic)."""

    input_rate_hz = STUB_RATE_HZ

    def __init__(self, block_ms: int = 200) -> None:
        self._block = STUB_RATE_HZ * block_ms // 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._words: list[str] = []
        self._item_id = ""
        # Events wait here for the session; past EVENT_BUFFER the stub applies backpressure.
        self._events = EventQueue(EVENT_BUFFER)

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Apply one command at once, or return False while the session lags on events."""
        if self._events.full:
            return False
        match command:
            case BeginTurn(item_id=item_id):
                self._reset(item_id)
            case AppendAudio(pcm=pcm):
                self._append(pcm)
            case Commit(item_id=item_id):
                self._events.put(TranscriptCompleted(item_id, " ".join(self._words)))
                self._reset("")
            case Clear():
                self._reset("")
        return True

    def _reset(self, item_id: str) -> None:
        self._item_id = item_id
        self._words = []
        self._pending = np.zeros(0, dtype=np.int16)

    def _append(self, pcm: np.ndarray) -> None:
        pending = np.concatenate((self._pending, pcm)) if self._pending.size else pcm
        start = 0
        while pending.size - start >= self._block:
            block = pending[start : start + self._block]
            word = LEXICON[zlib.crc32(block.tobytes()) % len(LEXICON)]
            self._events.put(
                TranscriptDelta(self._item_id, word if not self._words else " " + word)
            )
            self._words.append(word)
            start += self._block
        self._pending = pending[start:].copy() if start else pending.copy()

    async def aclose(self) -> None:
        """End the event stream; a waiting `receive` ends with EndOfStream."""
        self._events.close()


class StubKind:
    """The stub backend kind: always available, serves every operation offline."""

    name = "stub"
    extra = None
    stub = True  # one-shot answers carry `x-spear-stub: true`
    defaults = InstanceDefaults(
        ops=frozenset(Operation),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_AUDIO_OUTPUT,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_LANGUAGE,
                Feature.SUPPORTS_DIMENSIONS,
                Feature.SUPPORTS_TIMESTAMPS,
                Feature.SUPPORTS_VOICES,
            }
        ),
        transports=frozenset({Transport.HTTP, Transport.WEBSOCKET}),
        hosting=Hosting.LOCAL,
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """The stub needs nothing: always available."""
        return None

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[TranscriptionUpstream]:
        """A fresh deterministic transcription upstream."""
        block_ms = int(instance.options.get("block_ms", 200))
        upstream = StubTranscription(block_ms)
        try:
            yield upstream
        finally:
            await upstream.aclose()

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot operations: deterministic answers (see `spear_rt_backends.stub_oneshot`)."""
        from spear_rt_backends import stub_oneshot  # imports this module: load it lazily

        return await stub_oneshot.call(instance, request)


KIND = StubKind()
