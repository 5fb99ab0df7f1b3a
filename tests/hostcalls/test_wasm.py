"""Guests on wasmtime: the example guests against a WebSocket client, bad pointers, limits."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.hostcalls import cli
from spear_rt.hostcalls.abi import EACCES, EFAULT, EINVAL, EIO, ENOENT, ENOSPC
from spear_rt.hostcalls.guest import guest_host, run_guest
from spear_rt.hostcalls.wasm import GuestError, GuestLimits, audio_file_source
from spear_rt.server.app import Server
from spear_rt.session.manager import SessionManager
from tests.conftest import FIXTURES, WsClient, b64, load_fixture_24k
from tests.hostcalls.conftest import lcg_pcm

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "wasm"
COMPLETED = "conversation.item.input_audio_transcription.completed"
MANUAL_BETA = {"type": "transcription_session.update", "session": {"turn_detection": None}}

# Thin exports over every import, so tests can pass any pointer through the real binding.
PROBE = """
(module
  (import "spear" "rt_create" (func $rt_create (result i32)))
  (import "spear" "rt_ctl" (func $rt_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "rt_write" (func $rt_write (param i32 i32 i32) (result i32)))
  (import "spear" "rt_read" (func $rt_read (param i32 i32 i32) (result i32)))
  (import "spear" "rt_close" (func $rt_close (param i32) (result i32)))
  (import "spear" "spear_epoll_create" (func $epoll_create (result i32)))
  (import "spear" "spear_epoll_ctl" (func $epoll_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_wait" (func $epoll_wait (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_close" (func $epoll_close (param i32) (result i32)))
  (import "spear_host" "audio_read" (func $audio_read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "create") (result i32) (call $rt_create))
  (func (export "ctl") (param i32 i32 i32 i32) (result i32)
    (call $rt_ctl (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "write") (param i32 i32 i32) (result i32)
    (call $rt_write (local.get 0) (local.get 1) (local.get 2)))
  (func (export "read") (param i32 i32 i32) (result i32)
    (call $rt_read (local.get 0) (local.get 1) (local.get 2)))
  (func (export "close") (param i32) (result i32) (call $rt_close (local.get 0)))
  (func (export "ep_create") (result i32) (call $epoll_create))
  (func (export "ep_ctl") (param i32 i32 i32 i32) (result i32)
    (call $epoll_ctl (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "ep_wait") (param i32 i32 i32 i32) (result i32)
    (call $epoll_wait (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "ep_close") (param i32) (result i32) (call $epoll_close (local.get 0)))
  (func (export "audio_read") (param i32 i32) (result i32)
    (call $audio_read (local.get 0) (local.get 1)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "spin") (loop $forever (br $forever)))
  (func (export "trap") unreachable)
  (func (export "wait_then_spin") (param $ep i32)
    (i32.store (i32.const 0) (i32.const 64))
    (drop (call $epoll_wait (local.get $ep) (i32.const 16) (i32.const 0) (i32.const -1)))
    (loop $forever (br $forever))))
"""


def transcript(events: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The deltas and the completed transcript of one session's events."""
    deltas = [e["delta"] for e in events if e["type"].endswith("transcription.delta")]
    done = [e["transcript"] for e in events if e["type"] == COMPLETED]
    assert len(done) == 1, [e["type"] for e in events]
    return deltas, done[0]


async def over_websocket(
    port: int, audio: NDArray[np.int16], chunk_bytes: int
) -> tuple[list[str], str]:
    """Stream `audio` as a beta transcription client with manual commit; its transcript."""
    data = audio.astype("<i2").tobytes()
    client = await WsClient.connect(
        port, "/v1/realtime?intent=transcription", headers=[("OpenAI-Beta", "realtime=v1")]
    )
    async with client:
        await client.recv()
        await client.send(MANUAL_BETA)
        await client.recv()
        for off in range(0, len(data), chunk_bytes):
            await client.send(
                {"type": "input_audio_buffer.append", "audio": b64(data[off : off + chunk_bytes])}
            )
        await client.send({"type": "input_audio_buffer.commit"})
        return transcript(await client.recv_until(COMPLETED))


async def run_example(
    name: str, manager: SessionManager, audio: bytes | None = None
) -> dict[int, list[dict[str, Any]]]:
    """Run an example guest's _start; the events it read, per fd."""
    events: dict[int, list[dict[str, Any]]] = {}
    await run_guest(
        EXAMPLES / name,
        manager,
        audio=audio,
        on_read=lambda fd, data: events.setdefault(fd, []).append(json.loads(data)),
    )
    return events


# --- the example guests against WebSocket clients --------------------------------------------


async def test_asr_loop_transcribes_like_a_websocket_client(server: Server) -> None:
    assert server.port is not None
    events = await run_example("asr_loop.wat", server.sessions)
    [guest_events] = events.values()
    assert guest_events[0]["type"] == "transcription_session.created"
    assert guest_events[-1]["type"] == COMPLETED
    expected = await over_websocket(server.port, lcg_pcm(24000, 12345), 4800)
    assert transcript(guest_events) == expected
    assert expected[1] == "zulu start three start xray"
    assert server.sessions.total_sessions == 2  # both went through the same session manager


async def test_asr_loop_with_host_audio_transcribes_like_a_websocket_client(server: Server) -> None:
    assert server.port is not None
    audio = audio_file_source(FIXTURES / "speech_go_forward.wav")
    [guest_events] = (await run_example("asr_loop.wat", server.sessions, audio)).values()
    expected = await over_websocket(server.port, load_fixture_24k("speech_go_forward.wav"), 9600)
    assert transcript(guest_events) == expected
    assert len(expected[1].split()) == len(audio) // 9600  # one stub word per 200 ms


async def test_two_fds_guest_matches_two_websocket_sessions(server: Server) -> None:
    assert server.port is not None
    events = await run_example("two_fds.wat", server.sessions)
    a, b = sorted(events)
    assert transcript(events[a]) == await over_websocket(server.port, lcg_pcm(24000, 12345), 4800)
    assert transcript(events[b]) == await over_websocket(server.port, lcg_pcm(33600, 777), 4800)


async def test_run_wasm_prints_every_event_as_one_json_line(tmp_path: Path) -> None:
    config = tmp_path / "stub.toml"
    config.write_text('[[backends]]\nname = "stub"\nkind = "stub"\n')
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "spear_rt.hostcalls.cli",
            str(EXAMPLES / "asr_loop.wat"),
            "--config",
            str(config),
            "--loop",
            "trio",
        ],
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["type"] == "transcription_session.created"
    assert events[-1]["type"] == COMPLETED
    assert events[-1]["transcript"] == "zulu start three start xray"
    assert f"{len(events)} events read" in result.stderr.decode()


def test_run_wasm_refuses_a_missing_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no/such/module.wat"]) == 2
    assert "no such module" in capsys.readouterr().err


# --- the binding: pointers, URLs, errors ------------------------------------------------------


@pytest.fixture
def manager(server: Server) -> SessionManager:
    return server.sessions


async def test_out_of_bounds_pointers_are_efault(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager, audio=b"\0" * 100) as run:
        guest = run.guest
        fd = await run.call("create")
        ep = await run.call("ep_create")
        assert await run.call("ctl", fd, 2, 0, 0) == 0  # CONNECT
        guest.memory_write(0, struct.pack("<I", 100))
        end = 65536
        assert await run.call("read", fd, end - 10, 0) == -EFAULT  # capacity crosses the end
        assert await run.call("read", fd, 16, end - 2) == -EFAULT  # the length slot does
        assert await run.call("read", fd, -8, 0) == -EFAULT  # 0xfffffff8: wraps past 4 GiB
        assert await run.call("write", fd, end - 2, 4) == -EFAULT
        assert await run.call("write", fd, -1, 2) == -EFAULT
        assert await run.call("ctl", fd, 1, end - 50, 0) == -EFAULT  # SET_PARAM argument
        assert await run.call("ctl", fd, 3, 16, end) == -EFAULT  # GET_STATUS length slot
        assert await run.call("ep_wait", ep, end - 8, 0, 0) == -EFAULT
        assert await run.call("ep_wait", ep, 16, -1, -1) == -EFAULT  # never blocks first
        assert await run.call("audio_read", end, 0) == -EFAULT
        guest.memory_write(0, struct.pack("<I", 1))
        assert await run.call("audio_read", 16, 0) == -ENOSPC
        assert guest.memory_read(0, 4) == struct.pack("<I", 2)
        assert await run.call("close", fd) == 0  # the host is fine afterwards


async def test_a_guest_cannot_set_a_url_or_a_key(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager) as run:
        fd = await run.call("create")

        async def set_param(key: str, value: Any) -> int:
            arg = json.dumps({"key": key, "value": value}).encode()
            run.guest.memory_write(0, struct.pack("<I", len(arg)) + arg)
            return int(await run.call("ctl", fd, 1, 4, 0))

        assert await set_param("backend", "https://api.example.com/v1") == -EACCES
        assert await set_param("model", "sk-live-0123456789abcdef") == -EACCES
        assert await set_param("base_url", "http://10.0.0.1") == -EACCES
        assert await set_param("api_key", "anything") == -EACCES
        assert await set_param("backend", "two words") == -EINVAL
        assert await set_param("nonsense", 1) == -EINVAL
        assert await set_param("backend", "stub") == 0


async def test_no_host_audio_is_enoent(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager) as run:
        assert await run.call("audio_read", 16, 0) == -ENOENT


async def test_a_failing_hostcall_is_eio_not_a_trap(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager) as run:

        def broken() -> int:
            raise RuntimeError("bug")

        run.table.rt_create = broken  # type: ignore[method-assign]
        assert await run.call("create") == -EIO
        assert await run.call("ep_create") > 0


# --- limits -----------------------------------------------------------------------------------


async def test_a_spinning_guest_runs_out_of_fuel(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager, limits=GuestLimits(fuel=2_000_000)) as run:
        with pytest.raises(GuestError, match="out of fuel"):
            await run.call("spin")


async def test_cancelling_the_host_stops_a_blocked_then_spinning_guest(
    manager: SessionManager,
) -> None:
    errors: list[GuestError] = []
    with anyio.CancelScope() as scope:
        async with guest_host(PROBE, manager) as run:
            ep = await run.call("ep_create")

            async def blocked_then_spinning() -> None:
                try:
                    await run.call("wait_then_spin", ep)
                except GuestError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked_then_spinning)
                assert await anyio.to_thread.run_sync(run.epolls.wait_blocked, ep)
                scope.cancel()
    assert "interrupted" in str(errors[0])  # the wait returned (-EINTR), then the spin stopped


async def test_memory_is_limited(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager, limits=GuestLimits(memory_bytes=1 << 20)) as run:
        assert await run.call("grow", 100) == -1
        assert await run.call("grow", 1) == 1
    big = '(module (memory (export "memory") 32) (func (export "_start")))'
    with pytest.raises(GuestError, match="guest failed"):
        async with guest_host(big, manager, limits=GuestLimits(memory_bytes=1 << 20)) as run:
            await run.start()


async def test_traps_and_missing_exports_are_guest_errors(manager: SessionManager) -> None:
    async with guest_host(PROBE, manager) as run:
        with pytest.raises(GuestError, match="unreachable"):
            await run.call("trap")
        with pytest.raises(GuestError, match="_start"):
            await run.start()
    with pytest.raises(GuestError, match="guest failed"):  # "spear" imports get -ENOSYS stubs
        async with guest_host('(module (import "nowhere" "nope" (func)))', manager) as run:
            await run.start()
