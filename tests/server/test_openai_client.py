"""The official `openai` package's realtime clients (beta and GA) against our server.

The SDK is asyncio-only; our server runs on its own trio loop in a background thread, and each
test drives the SDK with `asyncio.run`, bounded by `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from spear_rt.config import Config
from spear_rt.server.app import Server
from tests.conftest import b64, load_fixture_24k, make_config, noise_pcm

openai = pytest.importorskip("openai")

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
TIMEOUT_S = 10


def _serve_in_thread(config: Config, started: queue.Queue[Any]) -> None:
    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(Server(config).serve)
                started.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope, port))
        except BaseException as exc:  # report a failed start instead of hanging the test
            started.put(exc)
            raise

    trio.run(main)


@pytest.fixture
def threaded_port() -> Iterator[int]:
    """A server on its own trio loop in a thread; yields its port, stops it afterwards."""
    started: queue.Queue[Any] = queue.Queue()
    thread = threading.Thread(target=_serve_in_thread, args=(make_config(), started), daemon=True)
    thread.start()
    item = started.get(timeout=TIMEOUT_S)
    if isinstance(item, BaseException):
        raise item
    token, scope, port = item
    try:
        yield port
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=TIMEOUT_S)
        assert not thread.is_alive()


def client(port: int, *, beta: bool = False) -> Any:
    """An SDK client for our server; GA derives ws:// from base_url by itself."""
    return openai.AsyncOpenAI(
        api_key="sk-anything",
        base_url=f"http://127.0.0.1:{port}/v1",
        # the beta connector always builds wss:// from base_url (3.54): name ws:// explicitly
        websocket_base_url=f"ws://127.0.0.1:{port}/v1" if beta else None,
        max_retries=0,
    )


async def collect_until_completed(connection: Any, items: int = 1) -> list[Any]:
    events = []
    done = 0
    async for event in connection:
        events.append(event)
        if event.type == "error":
            raise AssertionError(f"server error: {event}")
        if event.type == COMPLETED:
            done += 1
            if done == items:
                return events
    raise AssertionError("the connection closed before the transcript was completed")


def test_ga_realtime_client_runs_a_transcription_session(threaded_port: int) -> None:
    """GA `client.realtime.connect`: session.update type=transcription, append, commit, deltas,
    completed (the SDK parses every event into its typed models)."""

    async def main() -> list[Any]:
        async with asyncio.timeout(TIMEOUT_S):
            async with client(threaded_port).realtime.connect(
                extra_query={"intent": "transcription"}
            ) as conn:
                created = await conn.recv()
                assert created.type == "session.created"
                await conn.session.update(
                    session={
                        "type": "transcription",
                        "audio": {
                            "input": {
                                "format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": None,
                            }
                        },
                    }
                )
                updated = await conn.recv()
                assert updated.type == "session.updated", updated
                await conn.input_audio_buffer.append(audio=b64(noise_pcm(24000)))
                await conn.input_audio_buffer.commit()
                return await collect_until_completed(conn)

    events = asyncio.run(main())
    others = [e for e in events if e.type != DELTA]  # live deltas may come before the commit
    assert [e.type for e in others] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        COMPLETED,
    ]
    deltas = [e for e in events if e.type == DELTA]
    assert len(deltas) == 5
    assert "".join(d.delta for d in deltas) == events[-1].transcript
    assert {d.item_id for d in deltas} == {others[0].item_id} == {events[-1].item_id}


def test_ga_realtime_client_with_server_vad(threaded_port: int) -> None:
    """GA client streaming a fixture under server VAD: speech started/stopped, then a transcript."""
    pcm = load_fixture_24k("speech_go_forward.wav")

    async def main() -> list[Any]:
        async with asyncio.timeout(TIMEOUT_S):
            async with client(threaded_port).realtime.connect(
                extra_query={"intent": "transcription"}
            ) as conn:
                await conn.recv()
                for start in range(0, len(pcm), 480):
                    await conn.input_audio_buffer.append(audio=b64(pcm[start : start + 480]))
                return await collect_until_completed(conn)

    events = asyncio.run(main())
    types = [e.type for e in events if e.type != DELTA]
    assert types[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]


def test_beta_realtime_client_runs_a_transcription_session(threaded_port: int) -> None:
    """Beta `client.beta.realtime.connect` (OpenAI-Beta: realtime=v1, intent=transcription):
    transcription_session.update, append, commit, then deltas and completed."""

    async def main() -> list[Any]:
        async with asyncio.timeout(TIMEOUT_S):
            async with client(threaded_port, beta=True).beta.realtime.connect(
                model="gpt-4o-transcribe", extra_query={"intent": "transcription"}
            ) as conn:
                created = await conn.recv()
                assert created.type == "transcription_session.created", created
                await conn.transcription_session.update(
                    session={"turn_detection": None, "input_audio_format": "pcm16"}
                )
                updated = await conn.recv()
                assert updated.type == "transcription_session.updated", updated
                await conn.input_audio_buffer.append(audio=b64(noise_pcm(12000)))
                await conn.input_audio_buffer.commit()
                return await collect_until_completed(conn)

    events = asyncio.run(main())
    others = [e.type for e in events if e.type != DELTA]
    assert others == ["input_audio_buffer.committed", "conversation.item.created", COMPLETED]
    assert events[-1].transcript.count(" ") == 1  # 500 ms: two stub words
