"""Hostile client events over real sockets, on every driver: trio (task runner), asyncio with
the task runner, asyncio callbacks (server/aio.py) and uvloop callbacks.

* deeply nested JSON is an `error` event and the session lives on (it killed the callback
  driver's transport: no error, no close frame, the session DETACHED for the resume grace);
* a failure while handling a message is an `error` event and close 1011, never a dead socket;
* a flood of bad events from a client that reads its errors gets every error, with the echoed
  event_id capped, outbound bytes bounded, and no 1008; once the sessions end, nothing of them
  is left on the server (manager tables empty, machines and runners collected).
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from spear_rt.protocol.client_events import MAX_EVENT_ID_CHARS
from spear_rt.server.app import Server
from spear_rt.session import runner as task_runner
from spear_rt.session.machine import SessionMachine
from spear_rt.session.runner import NOT_READING
from tests.conftest import WsClient, make_config
from tests.server.test_realtime import TRANSCRIPTION, commit_works, open_manual
from tests.server.test_resume import until

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False

# (event loop, [server] driver)
DRIVERS = [
    ("trio", "auto"),
    ("asyncio", "anyio"),
    ("asyncio", "auto"),
    pytest.param(
        "uvloop",
        "auto",
        marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"),
    ),
]
IDS = ["trio", "asyncio-tasks", "asyncio-callbacks", "uvloop-callbacks"]
MAX_OUTBOUND = 16 * 1024  # hard limit 64 KiB


def run(
    loop: str,
    driver: str,
    scenario: Callable[[Server], Awaitable[Any]],
    realtime: str = "resume_grace_seconds = 30.0",
) -> Any:
    """Run `scenario(server)` on `loop` against a fresh server using `driver`."""

    async def main() -> Any:
        config = make_config(server=f'driver = "{driver}"', realtime=realtime)
        server = Server(config)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            with anyio.fail_after(20):
                result = await scenario(server)
            tg.cancel_scope.cancel()
        return result

    if loop == "trio":
        return anyio.run(main, backend="trio")
    return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


DEEP = 1200


@pytest.mark.parametrize(("loop", "driver"), DRIVERS, ids=IDS)
def test_deep_json_is_an_error_event_and_the_session_lives(loop: str, driver: str) -> None:
    async def scenario(server: Server) -> list[dict[str, Any]]:
        assert server.port is not None
        client = await open_manual(server.port)
        frames = [
            "[" * DEEP + "]" * DEEP,
            '{"type": "input_audio_buffer.commit", "x": ' + "[" * DEEP + "]" * DEEP + "}",
            '{"type": "conversation.item.create", "event_id": "d", "item": '
            + '{"a":' * DEEP
            + "1"
            + "}" * DEEP
            + "}",
        ]
        errors = []
        for frame in frames:
            await client.send_text(frame)
            errors.append(await client.recv())
        await commit_works(client)  # the same session still transcribes
        (runner,) = server.sessions.sessions.values()
        assert runner.machine.state.value == "active"
        await client.close()
        return errors

    errors = run(loop, driver, scenario)
    assert [e["type"] for e in errors] == ["error"] * 3
    assert {e["error"]["type"] for e in errors} == {"invalid_request_error"}
    assert errors[1]["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(("loop", "driver"), DRIVERS, ids=IDS)
def test_a_crash_handling_a_message_is_an_error_and_1011(
    loop: str, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the machine raises on one event; the client hears of it and the
    session ends (it is not left DETACHED, counting against the caps)."""
    original = SessionMachine.client_event

    def client_event(self: SessionMachine, event: Any, now: float) -> None:
        if getattr(event, "event_id", None) == "boom":
            raise RuntimeError("injected")
        original(self, event, now)

    monkeypatch.setattr(SessionMachine, "client_event", client_event)

    async def scenario(server: Server) -> tuple[list[dict[str, Any]], int | None]:
        assert server.port is not None
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.clear", "event_id": "boom"})
        events = await client.recv_all()
        code, _ = await client.wait_closed()
        await until(lambda: not server.sessions.sessions)
        return events, code

    events, code = run(loop, driver, scenario)
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"]["code"] == "internal_error"
    assert "injected" not in json.dumps(events) and "Traceback" not in json.dumps(events)
    assert code == 1011


SESSIONS = 4
BAD = 1500  # bad events per session
BATCH = 250  # frames per TCP write: many frames per server read


async def flooding_client(port: int, got: list[int], ids: list[set[str]], pad: int) -> None:
    """Send BAD unknown-type events (event ids padded by `pad` chars) in batches while reading
    the errors."""
    client = await WsClient.connect(port, TRANSCRIPTION)
    await client.recv()
    lock = anyio.Lock()  # the reader answers control frames: one writer at a time
    flush = client._flush

    async def locked_flush() -> None:
        async with lock:
            await flush()

    client._flush = locked_flush  # type: ignore[method-assign]
    errors = 0
    seen: set[str] = set()

    async def reader() -> None:
        nonlocal errors
        while errors < BAD:
            event = await client.recv()
            assert event["type"] == "error", event
            errors += 1
            seen.add(event["error"].get("event_id", ""))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        for start in range(0, BAD, BATCH):
            for i in range(start, start + BATCH):
                event = {"type": "no.such.event", "event_id": f"{i:06d}" + "x" * pad}
                client.protocol.send_text(json.dumps(event).encode())
            async with lock:
                await client.stream.send(b"".join(client.protocol.data_to_send()))  # one write
    got.append(errors)
    ids.append(seen)
    await client.close()


@pytest.mark.parametrize("pad", [2000, 0], ids=["long-ids", "tiny-frames"])
@pytest.mark.parametrize(("loop", "driver"), DRIVERS, ids=IDS)
def test_a_flood_of_bad_events_is_answered_in_full_bounded_and_released(
    loop: str, driver: str, pad: int
) -> None:
    async def scenario(server: Server) -> dict[str, Any]:
        assert server.port is not None
        got: list[int] = []
        ids: list[set[str]] = []
        refs: list[weakref.ref[Any]] = []
        peak = 0
        closes = []

        async def watch() -> None:
            nonlocal peak
            while True:
                for runner in list(server.sessions.sessions.values()):
                    machine = runner.machine
                    if not any(r() is machine for r in refs):
                        # the machine (queues, replay buffer), its runner and its link: the
                        # connection object and websockets' protocol with its buffers
                        link = [getattr(runner, a, None) for a in ("connection", "ws", "conn")]
                        refs.extend(weakref.ref(o) for o in [machine, runner, *link] if o)
                    peak = max(peak, machine.outbound.nbytes)
                    if machine.close is not None and machine.close.code != 1000:
                        closes.append(machine.close)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as clients:
                for _ in range(SESSIONS):
                    clients.start_soon(flooding_client, server.port, got, ids, pad)
            await until(lambda: not server.sessions.sessions)
            tg.cancel_scope.cancel()
        gc.collect()
        return {
            "got": got,
            "ids": ids,
            "peak": peak,
            "closes": closes,
            "alive": [r for r in refs if r() is not None],
            "tables": (server.sessions._owners, server.sessions._per_key),
            "refs": len(refs),
        }

    result = run(loop, driver, scenario, realtime=f"max_outbound_bytes = {MAX_OUTBOUND}")
    assert result["closes"] == []  # no 1008: these clients read
    assert result["got"] == [BAD] * SESSIONS  # every error delivered
    for seen in result["ids"]:
        assert {len(i) for i in seen} == {min(6 + pad, MAX_EVENT_ID_CHARS)}  # echoed, capped
        assert len(seen) == BAD
    assert result["peak"] <= 4 * MAX_OUTBOUND  # never near the hard limit
    assert result["refs"] >= 3 * SESSIONS
    assert result["alive"] == []  # machines and runners (and all they hold) were collected
    assert result["tables"] == ({}, {})


@pytest.mark.parametrize(("loop", "driver"), DRIVERS, ids=IDS)
def test_a_flooding_client_that_never_reads_is_closed_1008(
    loop: str, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same flood from a client that reads nothing: its events wait for room, the socket
    takes nothing for WRITE_STALL_S, close 1008; the outbound queue stayed bounded."""
    monkeypatch.setattr(task_runner, "WRITE_STALL_S", 0.5)

    async def scenario(server: Server) -> tuple[Any, int]:
        assert server.port is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", server.port))
        await anyio.wait_writable(sock)  # type: ignore[attr-defined]
        stream = await anyio.abc.SocketStream.from_socket(sock)
        client = await WsClient.over(stream, server.port, TRANSCRIPTION)
        await client.recv()
        (runner,) = server.sessions.sessions.values()
        machine = runner.machine
        peak = 0

        async def flood() -> None:
            for i in range(10**6):
                event = {"type": "no.such.event", "event_id": f"{i:06d}"}
                client.protocol.send_text(json.dumps(event).encode())
                if i % 100 == 99:
                    await client.stream.send(b"".join(client.protocol.data_to_send()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            while machine.close is None:
                peak = max(peak, machine.outbound.nbytes)
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        await client.stream.aclose()  # (the session then ends within CLOSE_GRACE_S)
        return machine.close, peak

    close, peak = run(loop, driver, scenario, realtime=f"max_outbound_bytes = {MAX_OUTBOUND}")
    assert close == NOT_READING
    assert peak <= 4 * MAX_OUTBOUND
