"""A client that stops reading: the server's memory for it stays within the configured
bounds (outbound queue, replay buffer), deltas are dropped and counted, and a normal client
on the same server gets every event of its turn. On every driver, over real sockets.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from spear_rt.backend import (
    AppendAudio,
    Commit,
    EventQueue,
    InstanceDefaults,
    InstanceInfo,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptionSpec,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.config import Config
from spear_rt.ir import Operation, Transport
from spear_rt.registry import BackendRegistry
from spear_rt.server.app import Server
from tests.conftest import WsClient, b64, noise_pcm
from tests.server.test_realtime import BETA, COMPLETED, DELTA, MANUAL_BETA, TRANSCRIPTION
from tests.server.test_resume import DRIVERS, IDS, run_on, until

MAX_OUTBOUND = 64 * 1024  # hard limit: 4x
REPLAY = 512 * 1024
BLOCK = 4800  # 200 ms at 24 kHz
# 16 kB per append: 600 appends outgrow what the kernel's socket buffers take (~4 MB)
WORDY_DELTA = "word " * 3200


class WordyUpstream:
    """Answers every append with a 16 kB delta and every commit with a short transcript."""

    input_rate_hz = 24000

    def __init__(self) -> None:
        self._events = EventQueue(1 << 16)
        self._item = ""

    def send_nowait(self, command: UpstreamCommand) -> bool:
        match command:
            case AppendAudio():
                self._events.put(TranscriptDelta(self._item, WORDY_DELTA))
            case Commit(item_id=item_id):
                self._events.put(TranscriptCompleted(item_id, "done"))
            case _:
                self._item = getattr(command, "item_id", self._item)
        return True

    async def send(self, command: UpstreamCommand) -> None:
        self.send_nowait(command)

    async def receive(self) -> UpstreamEvent:
        return await self._events.get()


class WordyKind:
    name = "wordy"
    extra = None
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT}), transports=frozenset({Transport.WEBSOCKET})
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        return None

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[WordyUpstream]:
        yield WordyUpstream()


def wordy_registry(config: Config) -> BackendRegistry:
    return BackendRegistry.build(config, loader=lambda name: WordyKind(), environ={})  # type: ignore[arg-type, return-value]


async def starved_socket(port: int) -> anyio.abc.SocketStream:
    """A connection whose socket advertises a tiny receive window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.connect(("127.0.0.1", port))
    await anyio.wait_writable(sock)  # type: ignore[attr-defined]
    return await anyio.abc.SocketStream.from_socket(sock)


async def starved_client(port: int) -> WsClient:
    """A session whose socket advertises a tiny receive window and is never read again."""
    stream = await starved_socket(port)
    client = await WsClient.over(stream, port, TRANSCRIPTION, headers=BETA)
    await client.recv()
    await client.send(MANUAL_BETA)
    await client.recv()
    return client


NORMAL_APPENDS = 3  # its deltas fit MAX_OUTBOUND even if all are held until the commit


async def normal_turn(port: int) -> tuple[list[dict[str, Any]], str]:
    """One turn of NORMAL_APPENDS appends, read as it comes.

    Deltas that arrive before the commit are held and released with it, in one burst; with
    five 16 kB deltas that burst alone passed the 64 kB bound (coalesced, then dropped: the
    queue's own policy, not the slow client's doing), so the test failed whenever the
    upstream answered before the commit was read (about 1 run in 10)."""
    client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA)
    created = await client.recv()
    await client.send(MANUAL_BETA)
    await client.recv()
    for i in range(NORMAL_APPENDS):
        await client.send(
            {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(BLOCK, seed=100 + i))}
        )
    await client.send({"type": "input_audio_buffer.commit"})
    events = await client.recv_until(COMPLETED)
    await client.close()
    return events, created["session"]["id"]


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_a_client_that_stops_reading_is_bounded_and_others_are_unaffected(
    backend: str, driver: str
) -> None:
    async def scenario(server: Server) -> dict[str, Any]:
        port = server.port or 0
        slow = await starved_client(port)
        (session_id,) = server.sessions.sessions
        machine = server.sessions.sessions[session_id].machine
        peak_outbound = peak_replay = 0
        audio = b64(noise_pcm(480))  # 20 ms
        appends = 0
        for _turn in range(60):
            for _ in range(10):
                await slow.send({"type": "input_audio_buffer.append", "audio": audio})
                appends += 1
                await anyio.lowlevel.checkpoint()  # let the server take it
                peak_outbound = max(peak_outbound, machine.outbound.nbytes)
                peak_replay = max(peak_replay, machine.replay.nbytes if machine.replay else 0)
            await slow.send({"type": "input_audio_buffer.commit"})
        # the server has read all of it (or closed the session by policy)
        await until(lambda: machine.input_audio_bytes == appends * 960 or machine.close is not None)
        peak_outbound = max(peak_outbound, machine.outbound.nbytes)
        other, _ = await normal_turn(port)  # while the slow one is starved
        return {
            "peak_outbound": peak_outbound,
            "peak_replay": peak_replay,
            "dropped": machine.outbound.dropped,
            "coalesced": machine.outbound.coalesced,
            "close": machine.close,
            "other": other,
            "other_dropped": server.sessions.dropped_events() - machine.outbound.dropped,
        }

    result = run_on(
        backend,
        driver,
        scenario,
        realtime=f"max_outbound_bytes = {MAX_OUTBOUND}\nreplay_buffer_bytes = {REPLAY}",
        backends='[[backends]]\nname = "wordy"\nkind = "wordy"\n',
        registry=wordy_registry,
    )
    assert result["dropped"] > 0 and result["coalesced"] > 0  # the slow path was exercised
    assert result["peak_outbound"] <= 4 * MAX_OUTBOUND + 17_000  # hard limit + one event
    assert result["peak_replay"] <= REPLAY + 17_000
    close = result["close"]
    assert close is None or close.code == 1008  # never-droppable events past the hard limit
    other = result["other"]
    deltas = [e["delta"] for e in other if e["type"] == DELTA]
    assert deltas == [WORDY_DELTA] * NORMAL_APPENDS and other[-1]["transcript"] == "done"
    assert result["other_dropped"] == 0
