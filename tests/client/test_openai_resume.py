"""`SpearResume`: the official `openai` client resuming a spear_rt session after a killed socket.

The SDK is asyncio-only; the server runs on its own event loop in a background thread, and each
test drives the SDK with `asyncio.run`, bounded by `asyncio.timeout`. The test aborts the SDK's
TCP transport (no close frame) when a chosen event arrives; the SDK reconnects through
`on_reconnecting`, and nothing may be lost: the event log and transcript equal an uninterrupted
run's, and the server holds exactly the audio sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio.abc
import anyio.from_thread
import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.client import ResumeError
from spear_rt.server.app import Server
from tests.conftest import load_fixture_24k, make_config

openai = pytest.importorskip("openai")
from spear_rt.client.openai_resume import SpearResume  # noqa: E402  (needs openai)

COMPLETED = "conversation.item.input_audio_transcription.completed"
RESUMED = "spear.session.resumed"
TIMEOUT_S = 20
FRAME = 480  # samples: 20 ms at 24 kHz
PACE_S = 0.002  # between appends: 10x realtime; pacing only, nothing waits on it
STUB_BLOCK = 4800  # samples: the stub says one word per 200 ms block
DELTA = "conversation.item.input_audio_transcription.delta"


@pytest.fixture(params=[("trio", "auto"), ("asyncio", "auto")], ids=["trio", "asyncio-callbacks"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A stub-backed server on its own event loop in a thread (trio, or asyncio with the
    callback driver that `spear-rt serve` uses there); yields its port."""
    backend, driver = request.param
    config = make_config(server=f'driver = "{driver}"')

    async def serve(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        await Server(config).serve(task_status=task_status)  # built on its own loop

    with anyio.from_thread.start_blocking_portal(backend) as portal:
        serving, bound = portal.start_task(serve)
        try:
            yield bound
        finally:
            serving.cancel()


def _client(port: int) -> Any:
    return openai.AsyncOpenAI(
        api_key="sk-anything", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    )


SESSION_UPDATE = {
    "type": "session.update",
    "session": {
        "type": "transcription",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}
        },
        "spear": {"early_deltas": True},  # the commit waits for the deltas of the open turn
    },
}


class Run:
    """What one session saw: every event (as dicts), the helper, the server's final metrics."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.resume = SpearResume()
        self.metrics: dict[str, Any] = {}


async def _session(port: int, pcm: NDArray[np.int16], kill_at: set[int]) -> Run:
    """Stream `pcm` in 20 ms appends, commit, read to the transcript, then ask for metrics.

    The commit waits for every delta of the audio (one per 200 ms block with the stub): the
    server emits `committed` at once while audio may still be on its way to the backend, so
    without this barrier where the deltas fall around it depends on timing, and the event logs
    of two runs could differ in order.
    """
    run = Run()
    resume = run.resume
    audio = pcm.astype("<i2").tobytes()
    all_deltas = asyncio.Event()
    expected_deltas, deltas = len(pcm) // STUB_BLOCK, 0
    async with asyncio.timeout(TIMEOUT_S):
        async with _client(port).realtime.connect(
            extra_query={"intent": "transcription"},
            on_reconnecting=resume.on_reconnecting,
            initial_delay=0.01,
        ) as connection:
            resume.attach(connection)

            async def send_all() -> None:
                await resume.send(SESSION_UPDATE)
                for start in range(0, len(audio), 2 * FRAME):
                    await resume.append_audio(audio[start : start + 2 * FRAME])
                    await asyncio.sleep(PACE_S)  # still sending while the resume runs
                await all_deltas.wait()
                await resume.commit()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(send_all())
                async for event in resume:
                    body = event.to_dict()
                    run.events.append(body)
                    if body.get("seq") in kill_at:
                        kill_at.discard(body["seq"])
                        connection._connection.transport.abort()  # no close frame
                    if event.type == "error":
                        raise AssertionError(f"server error: {body}")
                    if event.type == DELTA:
                        deltas += 1
                        if deltas == expected_deltas:
                            all_deltas.set()
                    if event.type == COMPLETED:
                        await resume.send({"type": "spear.metrics.request"})
                    if event.type == "spear.metrics":
                        run.metrics = body["metrics"]
                        break
    return run


def _normal(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The log up to the transcript, without ids that differ between sessions."""
    items: dict[str, int] = {}
    out = []
    for event in events:
        if event["type"] in (RESUMED, "spear.metrics"):
            continue
        item = event.get("item_id") or (event.get("item") or {}).get("id")
        number = items.setdefault(item, len(items)) if item else None
        out.append(
            (event["seq"], event["type"], number, event.get("delta", event.get("transcript")))
        )
    return out


@pytest.mark.parametrize("kill_at", [{1}, {2}, {6}, {3, 10}], ids=str)
def test_the_official_client_resumes_without_losing_an_event_or_audio(
    port: int, kill_at: set[int]
) -> None:
    pcm = load_fixture_24k("speech_go_forward.wav")

    async def main() -> tuple[Run, Run]:
        plain = await _session(port, pcm, set())
        killed = await _session(port, pcm, set(kill_at))
        return plain, killed

    plain, killed = asyncio.run(main())
    types = [e["type"] for e in killed.events]
    assert plain.resume.resumes == 0 and RESUMED not in [e["type"] for e in plain.events]
    assert killed.resume.resumes == len(kill_at) == types.count(RESUMED)
    seqs = [e["seq"] for e in killed.events if e["type"] != RESUMED]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate
    assert _normal(killed.events) == _normal(plain.events)
    transcript = [e["transcript"] for e in killed.events if e["type"] == COMPLETED]
    assert transcript == [e["transcript"] for e in plain.events if e["type"] == COMPLETED]
    sent = len(pcm) * 2
    assert killed.resume.state.audio_sent == sent
    assert killed.metrics["input_audio_bytes"] == plain.metrics["input_audio_bytes"] == sent


def test_a_refused_resume_is_a_resume_error_with_4004(port: int) -> None:
    async def main() -> None:
        resume = SpearResume()
        async with asyncio.timeout(TIMEOUT_S):
            async with _client(port).realtime.connect(
                extra_query={"intent": "transcription"},
                on_reconnecting=resume.on_reconnecting,
                initial_delay=0.01,
            ) as connection:
                resume.attach(connection)
                with pytest.raises(ResumeError, match="refused") as info:
                    async for event in resume:
                        assert event.type == "session.created"
                        resume.state.token = "not-the-token"
                        connection._connection.transport.abort()
                assert info.value.code == 4004
                with pytest.raises(ResumeError):  # and a sender learns it too
                    await resume.commit()

    asyncio.run(main())
