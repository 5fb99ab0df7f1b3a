"""rt fds as real sessions (no WASM): the session manager, the stub backend, the thread bridge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trio.testing

from spear_rt.hostcalls.abi import EIO, EPOLLERR, EPOLLHUP, EPOLLIN, BytesMemory, Cmd, EpollOp
from spear_rt.hostcalls.epoll import EpollSet
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.link import SessionHost
from spear_rt.registry import BackendRegistry
from spear_rt.router import Router
from spear_rt.session.manager import SessionManager
from tests.conftest import make_config
from tests.hostcalls.conftest import LEN, ctl, get, lcg_pcm, read, set_param, write

COMPLETED = "conversation.item.input_audio_transcription.completed"


class Guest:
    """The guest's side of the ABI, called from the test; blocking waits go to a thread."""

    def __init__(self, table: FdTable) -> None:
        self.table = table
        self.epolls = EpollSet(table)
        self.mem = BytesMemory(1 << 20)
        self.epfd = self.epolls.spear_epoll_create()

    def open(self, **params: Any) -> int:
        fd = self.table.rt_create()
        for key, value in {"turn_detection": None, **params}.items():
            assert set_param(self.table, self.mem, fd, key, value) == 0
        assert ctl(self.table, self.mem, fd, Cmd.CONNECT) == 0
        assert self.epolls.spear_epoll_ctl(self.epfd, EpollOp.ADD, fd, EPOLLIN) == 0
        return fd

    async def wait(self) -> dict[int, int]:
        """One blocking epoll wait, in a worker thread: {fd: events}."""
        mem = BytesMemory(4096)
        mem.set_u32(LEN, 1024)
        n = await anyio.to_thread.run_sync(
            self.epolls.spear_epoll_wait, mem, self.epfd, 64, LEN, -1
        )
        assert n > 0, n
        return {mem.get_u32(64 + 8 * i): mem.get_u32(68 + 8 * i) for i in range(n)}

    async def events_until(self, fd: int, last: str) -> list[dict[str, Any]]:
        """Read `fd`'s events, waiting with epoll between drains, through one of type `last`."""
        events: list[dict[str, Any]] = []
        while True:
            await self.wait()
            while isinstance(data := read(self.table, self.mem, fd), bytes):
                events.append(json.loads(data))
                if events[-1]["type"] == last:
                    return events
            assert data < 0 or last == "", data


@asynccontextmanager
async def hosted(manager: SessionManager) -> AsyncIterator[Guest]:
    table = FdTable()
    host = SessionHost(manager, table)
    async with anyio.create_task_group() as tg:
        await tg.start(host.run)
        yield Guest(table)
        tg.cancel_scope.cancel()


@pytest.fixture
def manager() -> SessionManager:
    config = make_config()
    router = Router(BackendRegistry.build(config))
    return SessionManager(config, lambda: router)


async def test_an_fd_is_a_session_of_the_manager(manager: SessionManager) -> None:
    async with hosted(manager) as guest:
        fd = guest.open()
        events = await guest.events_until(fd, "transcription_session.updated")
        assert [e["type"] for e in events] == [
            "transcription_session.created",
            "transcription_session.updated",
        ]
        assert events[0]["spear"]["backend"] == "stub"
        assert events[1]["session"]["turn_detection"] is None
        [runner] = manager.sessions.values()
        assert runner.conn.rt.fd == fd  # type: ignore[attr-defined]
        assert get(guest.table, guest.mem, fd, Cmd.GET_STATUS)["state"] == "open"


async def test_audio_and_commit_give_the_stub_transcript(manager: SessionManager) -> None:
    async with hosted(manager) as guest:
        fd = guest.open()
        audio = lcg_pcm(24000, 12345).tobytes()
        for off in range(0, len(audio), 4800):
            assert write(guest.table, guest.mem, fd, audio[off : off + 4800]) == 4800
        assert ctl(guest.table, guest.mem, fd, Cmd.COMMIT) == 0
        events = await guest.events_until(fd, COMPLETED)
        deltas = [e["delta"] for e in events if e["type"].endswith(".delta")]
        assert "".join(deltas) == events[-1]["transcript"] == "zulu start three start xray"


async def test_rt_close_cancels_the_session(manager: SessionManager) -> None:
    async with hosted(manager) as guest:
        fd = guest.open()
        await guest.events_until(fd, "transcription_session.updated")
        assert len(manager.sessions) == 1
        assert guest.table.rt_close(fd) == 0
        await trio.testing.wait_all_tasks_blocked()
        assert manager.sessions == {}


async def test_shutdown_write_finishes_the_turn_then_hangs_up(manager: SessionManager) -> None:
    async with hosted(manager) as guest:
        fd = guest.open()
        assert write(guest.table, guest.mem, fd, lcg_pcm(9600, 5).tobytes()) == 19200
        assert ctl(guest.table, guest.mem, fd, Cmd.SHUTDOWN_WRITE) == 0
        events = await guest.events_until(fd, COMPLETED)
        assert events[-1]["transcript"].count(" ") == 1  # two 200 ms stub words
        while (ready := await guest.wait()) and not ready[fd] & EPOLLHUP:
            while isinstance(read(guest.table, guest.mem, fd), bytes):
                pass
        assert read(guest.table, guest.mem, fd) == 0  # end of file
        assert get(guest.table, guest.mem, fd, Cmd.GET_STATUS)["state"] == "closed"


async def test_an_unroutable_session_is_an_error_on_the_fd(manager: SessionManager) -> None:
    async with hosted(manager) as guest:
        fd = guest.open(backend="nope")
        ready = await guest.wait()
        while not ready[fd] & EPOLLHUP:
            ready = await guest.wait()
        assert ready[fd] & EPOLLERR
        assert json.loads(read(guest.table, guest.mem, fd))["type"] == "error"  # type: ignore[arg-type]
        status = get(guest.table, guest.mem, fd, Cmd.GET_STATUS)
        assert status["state"] == "error" and "nope" in status["last_error"]


async def test_cancelling_the_host_hangs_up_every_fd(manager: SessionManager) -> None:
    table = FdTable()
    host = SessionHost(manager, table)
    guest = Guest(table)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            fd = guest.open()
            await guest.events_until(fd, "transcription_session.updated")
            scope.cancel()
    assert manager.sessions == {}
    assert table.fds[fd].events() & EPOLLHUP
    assert table.rt_create() == -EIO  # the table is down for good


def test_the_bridge_works_on_asyncio(manager: SessionManager) -> None:
    async def main() -> str:
        async with hosted(SessionManager(make_config(), manager._router)) as guest:
            fd = guest.open()
            assert write(guest.table, guest.mem, fd, lcg_pcm(4800, 9).tobytes()) == 9600
            assert ctl(guest.table, guest.mem, fd, Cmd.COMMIT) == 0
            events = await guest.events_until(fd, COMPLETED)
            return str(events[-1]["transcript"])

    assert len(anyio.run(main, backend="asyncio").split()) == 1
