"""`transcribe` (and `spear-rt stream`) resuming a session whose socket is killed mid-stream.

The test kills the client's TCP socket (shutdown, no close frame) when a chosen server event
arrives, or just before a chosen client event goes out; the client reconnects with
session_id/last_seq/token, resends what the server lacks and drops replayed events. What it
received (without `spear.session.resumed`) must be seq 1..N with no gap and no duplicate, equal
event for event to what the session emitted (tapped from its replay buffer), and equal to an
uninterrupted run's log but for where deltas fall among the other events (the server emits
`committed` while audio may still be on its way to the backend); the transcripts must be equal.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
import trio

from spear_rt.client import (
    ConnectionClosed,
    ResumeError,
    ResumePolicy,
    ResumingClient,
    Transcript,
    transcribe,
)
from spear_rt.client.stream import load_pcm24k, stream_file
from spear_rt.server.app import Server
from spear_rt.session.replay import ReplayBuffer
from tests.client import FIXTURES, running_server, stub_config
from tests.client.conftest import Sockets

TIMEOUT_S = 30
RESUMED = "spear.session.resumed"
DELTA = "conversation.item.input_audio_transcription.delta"
FAST_RESUME = ResumePolicy(initial_delay_s=0.01)


@pytest.fixture
def server_logs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """Every event each session emitted, as its replay buffer took it, by session id."""
    logs: dict[ReplayBuffer, list[dict[str, Any]]] = {}
    real = ReplayBuffer.append

    def append(self: ReplayBuffer, seq: int, data: bytes) -> None:
        logs.setdefault(self, []).append(msgspec.json.decode(data))
        real(self, seq, data)

    monkeypatch.setattr(ReplayBuffer, "append", append)

    class BySession(dict[str, list[dict[str, Any]]]):
        def __missing__(self, session_id: str) -> list[dict[str, Any]]:
            for log in logs.values():
                if log[0]["session"]["id"] == session_id:
                    return log
            raise KeyError(session_id)

    return BySession()


def _killer(sockets: Sockets, at: set[int], log: list[dict[str, Any]]) -> Callable[..., None]:
    """An on_event that logs events and kills the socket once an event with a seq in `at` came."""

    def on_event(event: dict[str, Any]) -> None:
        log.append(event)
        if event.get("seq") in at:
            at.discard(event["seq"])
            sockets.kill_latest()

    return on_event


def _outline(events: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], dict[int, str], int]:
    """What two runs of the same audio share: the events but deltas in order (item ids by first
    appearance), each item's delta text, the number of deltas. (Where deltas fall between the
    other events depends on timing: `committed` is emitted while audio may be on its way.)"""
    items: dict[str, int] = {}
    others, deltas, count = [], {}, 0
    for event in events:
        item = event.get("item_id") or (event.get("item") or {}).get("id")
        number = items.setdefault(item, len(items)) if item else -1
        if event["type"] == DELTA:
            deltas[number] = deltas.get(number, "") + event["delta"]
            count += 1
        elif event["type"] != RESUMED:
            others.append((event["type"], number, event.get("transcript")))
    return others, deltas, count


def _texts(transcripts: list[Transcript]) -> list[tuple[str, str, str | None]]:
    return [(t.text, t.deltas, t.failed) for t in transcripts]


async def _run(url: str, file: str, vad: bool, on_event: Callable[..., None]) -> list[Transcript]:
    pcm = load_pcm24k(FIXTURES / file)
    return await transcribe(url, pcm, pace="fast", vad=vad, on_event=on_event, resume=FAST_RESUME)


Run = tuple[list[dict[str, Any]], list[Transcript]]


def _check(
    sockets: Sockets, server_logs: dict[str, list[dict[str, Any]]], plain: Run, killed: Run
) -> None:
    """The killed run resumed once per kill and lost nothing against the plain one."""
    (plain_events, expected), (events, transcripts) = plain, killed
    assert sockets.kills >= 1
    assert len(sockets.streams) == 2 + sockets.kills  # one reconnect per kill
    received = [e for e in events if e["type"] != RESUMED]
    assert len(events) - len(received) == sockets.kills
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))  # no gap, no dup
    assert received == server_logs[received[0]["session"]["id"]]  # every event it emitted
    assert _outline(events) == _outline(plain_events)
    assert _texts(transcripts) == _texts(expected) and expected


@pytest.mark.parametrize(
    ("file", "vad", "kill_at", "before_send"),
    [
        ("speech_go_forward.wav", False, {1}, {}),  # right after session.created
        ("speech_go_forward.wav", False, {2}, {}),  # session.updated: audio still streaming
        ("speech_go_forward.wav", False, {5}, {}),  # among the deltas
        ("speech_go_forward.wav", False, {4, 9}, {}),  # twice
        ("speech_go_forward.wav", False, set(), {b"input_audio_buffer.append": 40}),
        ("speech_go_forward.wav", False, set(), {b"input_audio_buffer.commit": 1}),
        ("speech_two_utterances.wav", True, {3, 12}, {}),  # server VAD, two items
        ("speech_two_utterances.wav", True, set(), {b"transcription_session.update": 2}),
    ],
)
async def test_a_killed_socket_resumes_with_the_uninterrupted_transcripts_and_event_log(
    sockets: Sockets,
    server_logs: dict[str, list[dict[str, Any]]],
    file: str,
    vad: bool,
    kill_at: set[int],
    before_send: dict[bytes, int],
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            plain: list[dict[str, Any]] = []
            expected = await _run(url, file, vad, plain.append)
            assert sockets.kills == 0
            events: list[dict[str, Any]] = []
            sockets.before_send = before_send
            transcripts = await _run(url, file, vad, _killer(sockets, set(kill_at), events))
    _check(sockets, server_logs, (plain, expected), (events, transcripts))
    assert sockets.kills == len(kill_at) + len(before_send)


@pytest.mark.parametrize(
    ("kill_at", "before_send"),
    [({2}, {}), ({4, 9}, {}), (set(), {b"input_audio_buffer.commit": 1})],
)
def test_resume_works_the_same_against_the_asyncio_callback_driver(
    sockets: Sockets,
    server_logs: dict[str, list[dict[str, Any]]],
    kill_at: set[int],
    before_send: dict[bytes, int],
) -> None:
    file = "speech_go_forward.wav"

    async def main() -> tuple[Run, Run]:
        async with anyio.create_task_group() as tg:
            port = await tg.start(Server(stub_config()).serve)  # asyncio: the callback driver
            url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
            with anyio.fail_after(TIMEOUT_S):
                plain: list[dict[str, Any]] = []
                expected = await _run(url, file, False, plain.append)
                events: list[dict[str, Any]] = []
                sockets.before_send = before_send
                transcripts = await _run(url, file, False, _killer(sockets, set(kill_at), events))
            tg.cancel_scope.cancel()
        return (plain, expected), (events, transcripts)

    plain_run, killed_run = anyio.run(main, backend="asyncio")
    _check(sockets, server_logs, plain_run, killed_run)
    assert sockets.kills == len(kill_at) + len(before_send)


async def test_a_kill_before_the_commit_resends_just_the_commit(sockets: Sockets) -> None:
    pcm = load_pcm24k(FIXTURES / "speech_go_forward.wav")
    appends = -(-len(pcm) // 480)  # 20 ms frames
    events: list[dict[str, Any]] = []
    sockets.before_send = {b"input_audio_buffer.commit": 1}
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await _run(url, "speech_go_forward.wav", False, events.append)
    (resumed,) = [e for e in events if e["type"] == RESUMED]
    assert resumed["session_id"] == events[0]["session"]["id"]
    assert resumed["input_audio_bytes"] == 2 * len(pcm)  # every append arrived before the FIN
    assert resumed["last_event_id"].endswith(f"_{1 + appends}")  # session.update, appends
    assert len(transcripts) == 1 and transcripts[0].text


async def test_a_refused_append_does_not_upset_the_audio_check(sockets: Sockets) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            async with ResumingClient.connect(url, policy=FAST_RESUME) as client:
                await client.receive()
                await client.send_audio(bytes(960))
                await client.send_audio(bytes(961))  # odd pcm16: refused, the session lives on
                refusal = await client.receive()
                assert refusal["error"]["code"] == "invalid_audio"
                await client.send_audio(bytes(960))
                sockets.kill_latest()
                resumed = await client.receive()
    assert resumed["type"] == RESUMED and resumed["input_audio_bytes"] <= 1920
    assert client.state.audio_sent == 1920


async def test_stream_file_says_on_stderr_that_it_resumed_and_prints_the_same_text(
    sockets: Sockets,
) -> None:
    pcm = load_pcm24k(FIXTURES / "speech_open_window.wav")
    out, err = io.StringIO(), io.StringIO()
    sockets.before_send = {b"input_audio_buffer.append": 20}
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await stream_file(
                url, pcm, pace="fast", vad=False, key=None, json_lines=False, out=out, err=err
            )
    assert sockets.kills == 1
    assert out.getvalue() == transcripts[0].text + "\n"
    assert err.getvalue().splitlines()[1].startswith("spear-rt: connection dropped; resumed after")


async def test_with_resume_off_a_killed_socket_is_a_lost_connection(sockets: Sockets) -> None:
    pcm = load_pcm24k(FIXTURES / "speech_go_forward.wav")
    events: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            with pytest.raises(ConnectionClosed, match="1006") as info:
                await transcribe(
                    url, pcm, pace="fast", on_event=_killer(sockets, {2}, events), resume=None
                )
    assert not isinstance(info.value, ResumeError)
    assert len(sockets.streams) == 1


async def test_a_wrong_token_is_refused_with_4004_and_the_servers_reason(sockets: Sockets) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            async with ResumingClient.connect(url, policy=FAST_RESUME) as client:
                created = await client.receive()
                assert client.state.token == created["spear"]["resume_token"]
                client.state.token = "not-the-token"
                sockets.kill_latest()
                with pytest.raises(ResumeError) as info:
                    await client.receive()
                with pytest.raises(ResumeError):  # a sender learns it too
                    await client.commit()
    assert info.value.code == 4004
    assert "refused" in str(info.value)


async def test_a_server_without_resume_makes_the_drop_a_resume_error(sockets: Sockets) -> None:
    config = stub_config()
    config.realtime.resume_grace_seconds = 0  # no token is issued
    with trio.fail_after(TIMEOUT_S):
        async with running_server(config) as url:
            async with ResumingClient.connect(url, policy=FAST_RESUME) as client:
                await client.receive()
                sockets.kill_latest()
                with pytest.raises(ResumeError, match=r"no spear\.resume_token"):
                    await client.receive()
    assert len(sockets.streams) == 1


async def test_an_unreachable_server_gives_up_after_the_attempts(sockets: Sockets) -> None:
    policy = ResumePolicy(max_attempts=3, initial_delay_s=0.01)
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            async with ResumingClient.connect(url, policy=policy) as client:
                await client.receive()
                client._url = f"ws://127.0.0.1:{_free_port()}/v1/realtime"  # nobody listens
                sockets.kill_latest()
                with pytest.raises(ResumeError, match="gave up after 3 attempts") as info:
                    await client.receive()
    assert info.value.code == 1006 and "refused" in str(info.value)
    assert len(sockets.streams) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
