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

import anyio
import numpy as np

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    InstanceDefaults,
    InstanceInfo,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
    TranscriptionUpstream,
    UpstreamCommand,
    UpstreamEvent,
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


class StubTranscription:
    """One session's stub transcription upstream (in-loop, deterministic)."""

    input_rate_hz = STUB_RATE_HZ

    def __init__(self, block_ms: int = 200) -> None:
        self._block = STUB_RATE_HZ * block_ms // 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._words: list[str] = []
        self._item_id = ""
        self._send, self._receive = anyio.create_memory_object_stream[UpstreamEvent](EVENT_BUFFER)

    async def send(self, command: UpstreamCommand) -> None:
        """Apply one command; deltas for completed blocks are queued at once."""
        match command:
            case BeginTurn(item_id=item_id):
                self._reset(item_id)
            case AppendAudio(pcm=pcm):
                await self._append(pcm)
            case Commit(item_id=item_id):
                transcript = " ".join(self._words)
                await self._send.send(TranscriptCompleted(item_id, transcript))
                self._reset("")
            case Clear():
                self._reset("")

    async def receive(self) -> UpstreamEvent:
        """Next transcript event."""
        return await self._receive.receive()

    def _reset(self, item_id: str) -> None:
        self._item_id = item_id
        self._words = []
        self._pending = np.zeros(0, dtype=np.int16)

    async def _append(self, pcm: np.ndarray) -> None:
        pending = np.concatenate((self._pending, pcm)) if self._pending.size else pcm
        start = 0
        while pending.size - start >= self._block:
            block = pending[start : start + self._block]
            word = LEXICON[zlib.crc32(block.tobytes()) % len(LEXICON)]
            delta = word if not self._words else " " + word
            self._words.append(word)
            await self._send.send(TranscriptDelta(self._item_id, delta))
            start += self._block
        self._pending = pending[start:].copy() if start else pending.copy()

    async def aclose(self) -> None:
        """Close the event stream; a waiting `receive` ends with EndOfStream."""
        await self._send.aclose()
        await self._receive.aclose()


class StubKind:
    """The stub backend kind: always available, serves every operation offline."""

    name = "stub"
    extra = None
    defaults = InstanceDefaults(
        ops=frozenset(Operation),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_LANGUAGE,
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


KIND = StubKind()
