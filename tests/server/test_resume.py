"""Client resume over real sockets, on every driver: trio (task runner), asyncio with the
callback runner (`auto`) and asyncio with the task runner (`anyio`).

A client that loses its socket reconnects with `session_id`, `last_seq` and the resume token;
it gets `spear.session.resumed` then every event it missed, and resends what the server
lacks. The event logs must equal an uninterrupted run's: no gap, no duplicate seq.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from spear_rt.server.app import Server
from spear_rt.session.machine import State
from tests.conftest import (
    DRIVERS,
    IDS,
    HandshakeRefused,
    WsClient,
    b64,
    make_config,
    noise_pcm,
    run_on,
)
from tests.server.test_realtime import BETA, COMPLETED, DELTA, MANUAL_BETA, TRANSCRIPTION

BLOCK = 4800  # 200 ms at 24 kHz: one stub word, so one delta per append


async def reconnect(
    port: int, session_id: str, token: str, last_seq: int, *, subprotocol: bool = False
) -> WsClient:
    """Open a resuming connection (token as header, or as subprotocol)."""
    path = f"{TRANSCRIPTION}&session_id={session_id}&last_seq={last_seq}"
    if subprotocol:
        return await WsClient.connect(
            port, path, headers=BETA, subprotocols=[f"spear-resume.{token}"]
        )
    return await WsClient.connect(port, path, headers=[*BETA, ("Spear-Resume-Token", token)])


async def drop(client: WsClient, *, reset: bool) -> None:
    """Lose the connection without a close frame: FIN, or RST (unread data is lost too)."""
    if reset:
        sock = client.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Poll until `condition` holds: the server's own state, which no event announces
    (callers bound it with a timeout)."""
    while not condition():  # noqa: ASYNC110
        await anyio.sleep(0.001)


def state_of(server: Server, session_id: str) -> State | None:
    runner = server.sessions.sessions.get(session_id)
    return runner.machine.state if runner is not None else None


def append(i: int) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.append",
        "audio": b64(noise_pcm(BLOCK, seed=i)),
        "event_id": f"e{i}",
    }


# --- a scripted client: the same events whether or not its socket is killed ----------------


def script(turns: int, appends: int) -> list[tuple[dict[str, Any], int]]:
    """Client events with how many server events each one yields (deterministic with the stub)."""
    events: list[tuple[dict[str, Any], int]] = [({**MANUAL_BETA, "event_id": "e0"}, 1)]
    for _ in range(turns):
        for _ in range(appends):
            events.append((append(len(events)), 1))  # one delta
        events.append(({"type": "input_audio_buffer.commit", "event_id": f"e{len(events)}"}, 3))
    return events


def normalized(log: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Events without their random ids: (seq, type, text), item ids as first-seen indexes."""
    items: dict[str, int] = {}
    out = []
    for event in log:
        item = event.get("item_id") or (event.get("item") or {}).get("id")
        index = items.setdefault(item, len(items)) if item else None
        text = event.get("delta") or event.get("transcript")
        out.append((event["seq"], event["type"], index, text))
    return out


async def scripted_run(server: Server, kills: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """Play the script, killing the socket `kills` times at random points and resuming.

    Returns the event log (resumed events excluded) and the audio bytes the server took.
    """
    assert server.port is not None
    rng = random.Random(seed)
    events = script(turns=3, appends=6)
    kill_at = sorted(rng.sample(range(1, len(events)), kills))
    client = await WsClient.connect(server.port, TRANSCRIPTION, headers=BETA)
    created = await client.recv()
    session_id, token = created["session"]["id"], created["spear"]["resume_token"]
    log = [created]
    sent = 0  # events[:sent] have been sent (maybe lost in flight)
    while sent < len(events):
        await client.send(events[sent][0])
        sent += 1
        if kill_at and sent == kill_at[0]:
            kill_at.pop(0)
            # Read part of what is owed (maybe nothing), then lose the connection.
            owed = 1 + sum(n for _, n in events[:sent]) - len(log)
            for _ in range(rng.randrange(owed)):
                log.append(await client.recv())
            await drop(client, reset=rng.random() < 0.5)
            if rng.random() < 0.5:  # let the server notice first, or resume into the race
                await until(lambda: state_of(server, session_id) is State.DETACHED)
            client = await reconnect(
                server.port, session_id, token, log[-1]["seq"], subprotocol=rng.random() < 0.5
            )
            resumed = await client.recv()
            assert resumed["type"] == "spear.session.resumed"
            assert resumed["last_seq"] == log[-1]["seq"]
            # resend everything after the last event the server applied
            sent = int(resumed["last_event_id"][1:]) + 1
        owed = 1 + sum(n for _, n in events[:sent]) - len(log)
        for _ in range(owed):
            log.append(await client.recv())
    runner = server.sessions.sessions[session_id]
    audio_bytes = runner.machine.input_audio_bytes
    await client.close()
    return log, audio_bytes


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_killed_and_resumed_client_sees_the_uninterrupted_event_log(
    backend: str, driver: str
) -> None:
    """Sockets killed at random points (FIN or RST, noticed or not): the same log, no gap."""

    async def scenario(server: Server) -> list[Any]:
        baseline, baseline_audio = await scripted_run(server, kills=0, seed=0)
        results = []
        for seed in range(4):
            log, audio = await scripted_run(server, kills=4, seed=seed)
            results.append((normalized(log), audio))
        return [(normalized(baseline), baseline_audio), *results]

    (baseline, baseline_audio), *runs = run_on(backend, driver, scenario)
    assert [seq for seq, *_ in baseline] == list(range(1, len(baseline) + 1))
    assert sum(1 for _, kind, *_ in baseline if kind == COMPLETED) == 3
    for log, audio in runs:
        assert log == baseline  # equal seq by seq: nothing missing, nothing twice
        assert audio == baseline_audio  # every byte of audio exactly once


# --- the resume handshake ---------------------------------------------------------------------


async def open_and_commit(server: Server) -> tuple[WsClient, str, str]:
    """A manual session with a turn of two deltas (read) just committed (events unread)."""
    assert server.port is not None
    client = await WsClient.connect(server.port, TRANSCRIPTION, headers=BETA)
    created = await client.recv()
    await client.send({**MANUAL_BETA, "event_id": "u"})
    await client.recv()
    for i in (1, 2):
        await client.send(append(i))
        assert (await client.recv())["type"] == DELTA  # the stub's deltas come asynchronously
    await client.send({"type": "input_audio_buffer.commit", "event_id": "c"})
    return client, created["session"]["id"], created["spear"]["resume_token"]


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_resume_reports_what_the_server_holds_and_replays_after_last_seq(
    backend: str, driver: str
) -> None:
    """`spear.session.resumed` (seq 0) first, then exactly the events after last_seq; the
    session then carries on, and the old connection is closed."""

    async def scenario(server: Server) -> tuple[dict[str, Any], list[str], list[int]]:
        client, session_id, token = await open_and_commit(server)
        committed = await client.recv()  # seq 5; item.created and completed go unread
        await drop(client, reset=False)
        await until(lambda: state_of(server, session_id) is State.DETACHED)
        assert server.sessions.detached() == 1
        resumed_client = await reconnect(server.port or 0, session_id, token, committed["seq"])
        resumed = await resumed_client.recv()
        replayed = await resumed_client.recv_until(COMPLETED)
        await resumed_client.send(append(3))
        live = await resumed_client.recv()
        assert (server.sessions.detached(), server.sessions.resumes()) == (0, 1)
        await resumed_client.close()
        return resumed, [e["type"] for e in replayed], [e["seq"] for e in [*replayed, live]]

    resumed, replayed, seqs = run_on(backend, driver, scenario)
    assert resumed["seq"] == 0
    assert resumed["last_seq"] == 5  # created, updated, delta, delta, committed
    assert resumed["input_audio_bytes"] == 2 * BLOCK * 2
    assert resumed["last_event_id"] == "c"
    assert replayed == ["conversation.item.created", COMPLETED]
    assert seqs == [6, 7, 8]  # the replay, then the live delta of the next append


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_resume_takes_over_a_connection_the_server_still_thinks_alive(
    backend: str, driver: str
) -> None:
    """A resume while the old socket looks open: the old one is dropped, the new one served."""

    async def scenario(server: Server) -> tuple[list[str], bool]:
        old, session_id, token = await open_and_commit(server)
        await old.recv()  # committed (seq 5)
        new = await reconnect(server.port or 0, session_id, token, 5)
        assert (await new.recv())["type"] == "spear.session.resumed"
        replayed = await new.recv_until(COMPLETED)
        await old.wait_closed()  # the server closed the old socket
        await new.close()
        return [e["type"] for e in replayed], old.eof

    replayed, old_closed = run_on(backend, driver, scenario)
    assert replayed == ["conversation.item.created", COMPLETED]
    assert old_closed


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_bad_resumes_close_4004_and_leave_the_session_resumable(backend: str, driver: str) -> None:
    """Wrong token, unknown session, last_seq from the future: 4004 with `resume_failed`;
    a good resume afterwards still works."""

    async def refused(port: int, session_id: str, token: str, last_seq: int) -> tuple[Any, ...]:
        client = await reconnect(port, session_id, token, last_seq)
        events = await client.recv_all()
        code, _ = await client.wait_closed()
        return code, events[0]["error"]["code"], events[0]["error"]["message"]

    async def scenario(server: Server) -> list[Any]:
        port = server.port or 0
        client, session_id, token = await open_and_commit(server)
        await drop(client, reset=True)
        await until(lambda: state_of(server, session_id) is State.DETACHED)
        results = [
            await refused(port, session_id, "not-the-token", 0),
            await refused(port, "sess_unknown", token, 0),
            await refused(port, session_id, token, 10_000),
        ]
        good = await reconnect(port, session_id, token, 2, subprotocol=True)
        results.append((await good.recv())["type"])
        await good.close()
        return results

    *refusals, resumed = run_on(backend, driver, scenario)
    for code, error_code, _ in refusals:
        assert (code, error_code) == (4004, "resume_failed")
    assert "token" in refusals[0][2] and "10000" in refusals[2][2]
    assert resumed == "spear.session.resumed"


def test_resume_without_a_token_or_last_seq_is_a_clear_1008() -> None:
    """Missing pieces of a resume are named, not guessed."""

    async def scenario(server: Server) -> list[Any]:
        port = server.port or 0
        out = []
        for query in ("&session_id=s&last_seq=1", "&session_id=s&last_seq=x"):
            headers = BETA if "x" not in query else [*BETA, ("Spear-Resume-Token", "t")]
            client = await WsClient.connect(port, TRANSCRIPTION + query, headers=headers)
            events = await client.recv_all()
            out.append(((await client.wait_closed())[0], events[0]["error"]["message"]))
        return out

    (code1, message1), (code2, message2) = run_on("trio", "auto", scenario)
    assert code1 == code2 == 1008
    assert "Spear-Resume-Token" in message1
    assert "last_seq" in message2


def test_client_close_frame_ends_the_session_at_once() -> None:
    """A deliberate close is not a drop: nothing waits for a resume."""

    async def scenario(server: Server) -> State | None:
        client, session_id, _ = await open_and_commit(server)
        await client.close()
        await until(lambda: session_id not in server.sessions.sessions)
        return state_of(server, session_id)

    assert run_on("trio", "auto", scenario) is None


async def test_detached_session_ends_when_the_grace_runs_out(autojump_clock: Any) -> None:
    """Nobody resumes: the session (and its upstream lease) ends exactly at the grace; a late
    resume gets 4004."""
    import trio

    from tests.conftest import running_server

    config = make_config(realtime="resume_grace_seconds = 7.0")
    async with running_server(config) as server:
        assert server.port is not None
        with trio.fail_after(100):
            client, session_id, token = await open_and_commit(server)
            await drop(client, reset=False)
            await until(lambda: state_of(server, session_id) is State.DETACHED)
            detached_at = trio.current_time()
            assert server.registry.instances["stub"].runtime.inflight == 1
            await until(lambda: session_id not in server.sessions.sessions)
            assert trio.current_time() - detached_at == pytest.approx(7.0, abs=0.01)
            assert server.registry.instances["stub"].runtime.inflight == 0
            late = await reconnect(server.port, session_id, token, 0)
            await late.recv_all()
            assert (await late.wait_closed())[0] == 4004


def test_resume_after_the_session_ended_normally_is_4004() -> None:
    """A session the client closed cannot be resumed."""

    async def scenario(server: Server) -> int | None:
        client, session_id, token = await open_and_commit(server)
        await client.close()
        await until(lambda: session_id not in server.sessions.sessions)
        late = await reconnect(server.port or 0, session_id, token, 0)
        await late.recv_all()
        return (await late.wait_closed())[0]

    assert run_on("asyncio", "auto", scenario) == 4004


def test_resume_is_refused_for_another_client_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """With client keys, only the key that opened the session can resume it."""
    monkeypatch.setenv("SPEAR_TEST_KEY_A", "key-a")
    monkeypatch.setenv("SPEAR_TEST_KEY_B", "key-b")

    async def scenario(server: Server) -> list[Any]:
        port = server.port or 0
        client = await WsClient.connect(
            port, TRANSCRIPTION, headers=[*BETA, ("Authorization", "Bearer key-a")]
        )
        created = await client.recv()
        session_id, token = created["session"]["id"], created["spear"]["resume_token"]
        await drop(client, reset=False)
        await until(lambda: state_of(server, session_id) is State.DETACHED)
        path = f"{TRANSCRIPTION}&session_id={session_id}&last_seq=1"
        out = []
        for key in ("key-b", "key-a"):
            headers = [*BETA, ("Spear-Resume-Token", token), ("Authorization", f"Bearer {key}")]
            other = await WsClient.connect(port, path, headers=headers)
            out.append((await other.recv())["type"])
            await other.close()
        return out

    async def main() -> list[Any]:
        config = make_config(server='client_keys_env = ["SPEAR_TEST_KEY_A", "SPEAR_TEST_KEY_B"]')
        server = Server(config)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            with anyio.fail_after(20):
                result = await scenario(server)
            tg.cancel_scope.cancel()
        return result

    assert anyio.run(main, backend="trio") == ["error", "spear.session.resumed"]


def test_handshake_refusal_is_not_a_resume_target() -> None:
    """Sanity: a refused handshake (wrong path) raises, it does not hang."""

    async def scenario(server: Server) -> int:
        try:
            await WsClient.connect(server.port or 0, "/v1/nope")
        except HandshakeRefused as exc:
            return exc.response.status_code
        return 0

    assert run_on("trio", "auto", scenario) == 404
