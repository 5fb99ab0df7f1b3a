"""The asyncio driver (callback sessions) behaves like the task-based driver, on asyncio.

Each scenario runs on asyncio with both drivers: `auto` (our Protocol, sessions from
callbacks) and `anyio` (anyio streams, task-based runner), and the two must agree.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from spear_rt.backend import (
    AppendAudio,
    InstanceDefaults,
    InstanceInfo,
    TranscriptionSpec,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.ir import Operation, Transport
from spear_rt.protocol.client_events import decode_client_event
from spear_rt.registry import BackendRegistry
from spear_rt.server.app import Server
from spear_rt_backends.stub import StubTranscription
from tests.conftest import b64, make_config, noise_pcm
from tests.server.test_realtime import COMPLETED, open_manual, types

DRIVERS = ["auto", "anyio"]


def on_asyncio(
    driver: str,
    scenario: Callable[[Server], Awaitable[Any]],
    *,
    server: str = "",
    registry: Callable[[Any], BackendRegistry] | None = None,
    uvloop: bool = False,
) -> Any:
    """Run `scenario(server)` on asyncio (or uvloop) against a server using `driver`."""

    async def main() -> Any:
        config = make_config(server=f'driver = "{driver}"\n{server}')
        srv = Server(config, registry(config) if registry else None)
        async with anyio.create_task_group() as tg:
            await tg.start(srv.serve)
            with anyio.fail_after(10):
                result = await scenario(srv)
            tg.cancel_scope.cancel()
        return result

    return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": uvloop})


async def manual_session(server: Server) -> list[str]:
    assert server.port is not None
    client = await open_manual(server.port)
    await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))})
    await client.send_text("{not json")
    await client.send_bytes(b"\x00\x01")
    await client.send({"type": "input_audio_buffer.commit"})
    events = await client.recv_until(COMPLETED)
    await client.close()
    return types(events)


def test_both_drivers_emit_the_same_session() -> None:
    """Audio, a malformed frame, a binary frame, a commit: identical event sequences."""
    # Client errors and upstream deltas are independent streams: their interleaving may differ.
    seqs = {driver: on_asyncio(driver, manual_session) for driver in DRIVERS}
    assert sorted(seqs["auto"]) == sorted(seqs["anyio"])
    assert seqs["auto"].count("error") == 2 and seqs["auto"][-1] == seqs["anyio"][-1] == COMPLETED


def test_callback_driver_runs_on_uvloop() -> None:
    """uvloop's transports (not asyncio.Transport subclasses) work with the callback driver."""
    pytest.importorskip("uvloop", reason="uvloop is installed by `make test`")
    on_uvloop = on_asyncio("auto", manual_session, uvloop=True)
    assert sorted(on_uvloop) == sorted(on_asyncio("auto", manual_session))
    assert on_uvloop[-1] == COMPLETED


@pytest.mark.parametrize("driver", DRIVERS)
def test_client_close_is_answered_on_asyncio(driver: str) -> None:
    """The client's close frame gets the server's close frame back."""

    async def scenario(server: Server) -> int | None:
        assert server.port is not None
        client = await open_manual(server.port)
        client.protocol.send_close(1000, "bye")
        await client._flush()
        code, _ = await client.wait_closed()
        await client.stream.aclose()
        return code

    assert on_asyncio(driver, scenario) == 1000


@pytest.mark.parametrize("driver", DRIVERS)
def test_oversized_frame_closes_1009_on_asyncio(driver: str) -> None:
    """A frame over max_frame_bytes closes with 1009."""

    async def scenario(server: Server) -> int | None:
        assert server.port is not None
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(48000))})
        code, _ = await client.wait_closed()
        await client.stream.aclose()
        return code

    assert on_asyncio(driver, scenario, server="max_frame_bytes = 4096\n") == 1009


class GatedUpstream:
    """A slow upstream with no fast path: every send waits for the gate (TCP backpressure)."""

    input_rate_hz = 24000

    def __init__(self, gate: anyio.Event, seen: list[int]) -> None:
        self.gate = gate
        self.seen = seen
        self.inner = StubTranscription()

    async def send(self, command: UpstreamCommand) -> None:
        await self.gate.wait()
        if isinstance(command, AppendAudio):
            self.seen.append(command.pcm.size)
        await self.inner.send(command)

    async def receive(self) -> UpstreamEvent:
        return await self.inner.receive()


class GatedKind:
    name = "gated"
    extra = None
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT}), transports=frozenset({Transport.WEBSOCKET})
    )

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.seen: list[int] = []

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        return None

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[GatedUpstream]:
        yield GatedUpstream(self.gate, self.seen)


@pytest.mark.parametrize("driver", DRIVERS)
def test_slow_upstream_pushes_back_and_loses_no_audio(driver: str) -> None:
    """While the upstream blocks, the server stops reading; once it moves, every sample arrives."""
    kind = GatedKind()
    frames, samples_per_frame = 3000, 2400  # 100 ms frames, ~19 MB: more than socket buffers hold
    append = {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(samples_per_frame))}

    async def scenario(server: Server) -> tuple[int, int]:
        assert server.port is not None
        client = await open_manual(server.port)
        sent = [0]

        async def sender() -> None:
            for _ in range(frames):
                await client.send(append)
                sent[0] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            # The behaviour under test is that sending stops making progress: give it time.
            await anyio.sleep(1.0)
            stalled_at = sent[0]
            kind.gate.set()
        await client.send({"type": "input_audio_buffer.commit"})
        await client.recv_until(COMPLETED)
        await client.close()
        return stalled_at, sum(kind.seen)

    stalled_at, samples = on_asyncio(
        driver,
        scenario,
        registry=lambda config: BackendRegistry.build(config, loader=lambda name: kind, environ={}),  # type: ignore[arg-type, return-value]
    )
    assert stalled_at < frames  # the client was pushed back
    assert samples == frames * samples_per_frame  # and nothing was dropped


class ReopeningUpstream(GatedUpstream):
    """Like a reconnecting upstream: closed, `send` waits for it; once open, the fast path
    takes commands at once, possibly before a waiting `send` has resumed."""

    def __init__(self, gate: anyio.Event, seen: list[int]) -> None:
        super().__init__(gate, seen)
        self.open = False

    def send_nowait(self, command: UpstreamCommand) -> bool:
        if not self.open:
            return False
        if isinstance(command, AppendAudio):
            self.seen.append(command.pcm.size)
        return self.inner.send_nowait(command)


def test_a_command_waiting_in_the_pump_is_not_overtaken_by_the_fast_path() -> None:
    """Audio that arrives while an earlier command's send is still waiting goes after it,
    even if the upstream's fast path opens first (a resume meeting an upstream reconnect)."""
    kind = GatedKind()
    upstreams: list[ReopeningUpstream] = []

    @asynccontextmanager
    async def open_transcription(
        instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[ReopeningUpstream]:
        upstreams.append(ReopeningUpstream(kind.gate, kind.seen))
        yield upstreams[-1]

    kind.open_transcription = open_transcription  # type: ignore[method-assign,assignment]

    async def scenario(server: Server) -> list[int]:
        assert server.port is not None
        client = await open_manual(server.port)
        (runner,) = server.sessions.sessions.values()
        up = upstreams[0]
        up.open = True
        kind.gate.set()
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(2400))})
        await client.send({"type": "spear.metrics.request"})
        await client.recv_until("spear.metrics")  # taken by the fast path
        up.open, up.gate = False, anyio.Event()  # the upstream drops
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(1200))})
        while not up.gate.statistics().tasks_waiting:  # noqa: ASYNC110
            await anyio.sleep(0.001)  # the pump waits in send() with that append
        # One synchronous step, as when a callback runs before the pump task resumes:
        up.open = True
        up.gate.set()
        event = {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(480))}
        runner.machine.client_event(decode_client_event(json.dumps(event).encode()), 0.0)
        runner._push_upstream()  # type: ignore[attr-defined]
        await client.send({"type": "input_audio_buffer.commit"})
        await client.recv_until(COMPLETED)
        await client.close()
        return kind.seen

    seen = on_asyncio(
        "auto",
        scenario,
        registry=lambda config: BackendRegistry.build(config, loader=lambda name: kind, environ={}),  # type: ignore[arg-type, return-value]
    )
    assert seen == [2400, 1200, 480]
