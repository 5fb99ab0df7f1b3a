"""spear_epoll_* without WASM: errno paths, records, level triggering, wake-ups, timeouts."""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor

from spear_rt.hostcalls.abi import (
    EBADF,
    EFAULT,
    EINTR,
    EINVAL,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    MAX_WATCHES,
    BytesMemory,
    EpollOp,
)
from spear_rt.hostcalls.epoll import EpollSet, FakeClock, MonotonicClock
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.params import HostPolicy
from tests.hostcalls.conftest import LEN, OUT, completed, connected, in_thread, read

ADD, MOD, DEL = EpollOp.ADD, EpollOp.MOD, EpollOp.DEL


def wait(
    epolls: EpollSet, mem: BytesMemory, epfd: int, timeout_ms: int = 0, cap: int = 512
) -> list[tuple[int, int]] | int:
    """One wait: the records, or the (negative) result."""
    mem.set_u32(LEN, cap)
    n = epolls.spear_epoll_wait(mem, epfd, OUT, LEN, timeout_ms)
    if n < 0:
        return n
    assert mem.get_u32(LEN) == n * 8
    return [struct.unpack_from("<ii", mem.data, OUT + 8 * i) for i in range(n)]


# --- ctl --------------------------------------------------------------------------------------


def test_ctl_errno_paths(table: FdTable, epolls: EpollSet) -> None:
    epfd = epolls.spear_epoll_create()
    other = epolls.spear_epoll_create()
    fd = table.rt_create()
    assert epolls.spear_epoll_ctl(999, ADD, fd, EPOLLIN) == -EBADF
    assert epolls.spear_epoll_ctl(fd, ADD, fd, EPOLLIN) == -EBADF  # an rt fd is not an epfd
    assert epolls.spear_epoll_ctl(epfd, ADD, 999, EPOLLIN) == -EBADF
    assert epolls.spear_epoll_ctl(epfd, ADD, epfd, EPOLLIN) == -EINVAL
    assert epolls.spear_epoll_ctl(epfd, ADD, other, EPOLLIN) == -EINVAL  # no nesting
    assert epolls.spear_epoll_ctl(epfd, 4, fd, EPOLLIN) == -EINVAL
    assert epolls.spear_epoll_ctl(epfd, ADD, fd, 0x100) == -EINVAL
    assert epolls.spear_epoll_ctl(epfd, MOD, fd, EPOLLIN) == -ENOENT
    assert epolls.spear_epoll_ctl(epfd, DEL, fd, 0) == -ENOENT
    assert epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN) == 0
    assert epolls.spear_epoll_ctl(epfd, DEL, fd, 0) == 0
    assert epolls.spear_epoll_close(epfd) == 0
    assert epolls.spear_epoll_close(epfd) == -EBADF


def test_more_than_4096_watches_is_enomem() -> None:
    """Per epfd (reachable only with max_fds raised past the default 1024)."""
    table = FdTable(policy=HostPolicy(max_fds=MAX_WATCHES + 2))
    epolls = EpollSet(table, FakeClock())
    epfd = epolls.spear_epoll_create()
    fds = [table.rt_create() for _ in range(MAX_WATCHES + 1)]
    for fd in fds[:MAX_WATCHES]:
        assert epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN) == 0
    assert epolls.spear_epoll_ctl(epfd, ADD, fds[-1], EPOLLIN) == -ENOMEM
    assert epolls.spear_epoll_ctl(epfd, ADD, fds[0], EPOLLOUT) == 0  # an existing watch merges
    assert epolls.spear_epoll_ctl(epfd, DEL, fds[0], 0) == 0
    assert epolls.spear_epoll_ctl(epfd, ADD, fds[-1], EPOLLIN) == 0


# --- wait: buffers ----------------------------------------------------------------------------


def test_wait_errno_paths(epolls: EpollSet, mem: BytesMemory) -> None:
    epfd = epolls.spear_epoll_create()
    assert wait(epolls, mem, 999) == -EBADF
    assert wait(epolls, mem, epfd, cap=7) == -ENOSPC
    assert mem.get_u32(LEN) == 8
    mem.set_u32(LEN, 64)
    assert epolls.spear_epoll_wait(mem, epfd, len(mem.data) - 8, LEN, 0) == -EFAULT
    assert epolls.spear_epoll_wait(mem, epfd, OUT, len(mem.data), 0) == -EFAULT
    assert epolls.spear_epoll_wait(mem, epfd, OUT, -4, 0) == -EFAULT


def test_records_are_deduplicated_and_sorted_by_fd(
    table: FdTable, epolls: EpollSet, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    a, b, c = (connected(table, mem) for _ in range(3))
    for fd in (c, a, b):
        assert epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN) == 0
    assert epolls.spear_epoll_ctl(epfd, ADD, c, EPOLLOUT) == 0  # merged: one watch, both bits
    table.push_event(table.fds[c], completed("c"))
    table.push_event(table.fds[a], completed("a"))
    assert wait(epolls, mem, epfd) == [(a, EPOLLIN), (c, EPOLLIN | EPOLLOUT)]


def test_a_small_buffer_rotates_over_ready_fds(
    table: FdTable, epolls: EpollSet, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    fds = [connected(table, mem) for _ in range(3)]
    for fd in fds:
        epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLOUT)
    first = wait(epolls, mem, epfd, cap=16 + 7)  # room for two records
    second = wait(epolls, mem, epfd, cap=16)
    assert first == [(fds[0], EPOLLOUT), (fds[1], EPOLLOUT)]
    assert second == [(fds[0], EPOLLOUT), (fds[2], EPOLLOUT)]  # fds[2] got its turn, still sorted


# --- readiness --------------------------------------------------------------------------------


def test_readiness_is_level_triggered(table: FdTable, epolls: EpollSet, mem: BytesMemory) -> None:
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN)
    assert wait(epolls, mem, epfd) == []
    table.push_event(table.fds[fd], completed("x"))
    assert wait(epolls, mem, epfd) == [(fd, EPOLLIN)]
    assert wait(epolls, mem, epfd) == [(fd, EPOLLIN)]  # still unread: still reported
    read(table, mem, fd)
    assert wait(epolls, mem, epfd) == []


def test_errors_and_hangups_are_always_reported(
    table: FdTable, epolls: EpollSet, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, 0)
    table.session_closed(table.fds[fd], 1011, "boom")
    assert wait(epolls, mem, epfd) == [(fd, EPOLLERR | EPOLLHUP)]


def test_several_epfds_watch_one_fd(table: FdTable, epolls: EpollSet, mem: BytesMemory) -> None:
    first, second = epolls.spear_epoll_create(), epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(first, ADD, fd, EPOLLIN)
    epolls.spear_epoll_ctl(second, ADD, fd, EPOLLIN | EPOLLOUT)
    table.push_event(table.fds[fd], completed("x"))
    assert wait(epolls, mem, first) == [(fd, EPOLLIN)]
    assert wait(epolls, mem, second) == [(fd, EPOLLIN | EPOLLOUT)]
    epolls.spear_epoll_close(first)
    assert wait(epolls, mem, second) == [(fd, EPOLLIN | EPOLLOUT)]


def test_closing_a_watched_fd_reports_hup_once(
    table: FdTable, epolls: EpollSet, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN)
    table.rt_close(fd)
    assert wait(epolls, mem, epfd) == [(fd, EPOLLHUP)]
    assert wait(epolls, mem, epfd) == []  # the watch went with the fd


# --- timeouts (fake clock) --------------------------------------------------------------------


def test_timeout_zero_polls(epolls: EpollSet, clock: FakeClock, mem: BytesMemory) -> None:
    epfd = epolls.spear_epoll_create()
    assert wait(epolls, mem, epfd, timeout_ms=0) == []
    assert clock.now() == 100.0


def test_positive_timeout_waits_exactly_that_long(
    epolls: EpollSet, clock: FakeClock, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    assert wait(epolls, mem, epfd, timeout_ms=250) == []
    assert clock.now() == 100.25


def test_positive_timeout_returns_at_once_when_ready(
    table: FdTable, epolls: EpollSet, clock: FakeClock, mem: BytesMemory
) -> None:
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLOUT)
    assert wait(epolls, mem, epfd, timeout_ms=5000) == [(fd, EPOLLOUT)]
    assert clock.now() == 100.0


def test_negative_timeout_waits_until_readiness_changes(
    table: FdTable, epolls: EpollSet, clock: FakeClock, mem: BytesMemory, pool: ThreadPoolExecutor
) -> None:
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN)
    waiter = in_thread(pool, wait, epolls, BytesMemory(), epfd, -1)
    assert epolls.wait_blocked(epfd)
    table.push_event(table.fds[fd], completed("x"))
    assert waiter.result(timeout=10) == [(fd, EPOLLIN)]
    assert clock.now() == 100.0


# --- wake-ups (real threads, no sleeping) -----------------------------------------------------


def test_rt_close_wakes_a_waiter(
    table: FdTable, mem: BytesMemory, pool: ThreadPoolExecutor
) -> None:
    epolls = EpollSet(table, MonotonicClock())
    epfd = epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN)
    waiter = in_thread(pool, wait, epolls, BytesMemory(), epfd, 60_000)
    assert epolls.wait_blocked(epfd)
    table.rt_close(fd)
    assert waiter.result(timeout=10) == [(fd, EPOLLHUP)]


def test_every_epfd_of_a_fd_wakes(
    table: FdTable, mem: BytesMemory, pool: ThreadPoolExecutor
) -> None:
    epolls = EpollSet(table, MonotonicClock())
    first, second = epolls.spear_epoll_create(), epolls.spear_epoll_create()
    fd = connected(table, mem)
    for epfd in (first, second):
        epolls.spear_epoll_ctl(epfd, ADD, fd, EPOLLIN)
    waiters = [in_thread(pool, wait, epolls, BytesMemory(), epfd, -1) for epfd in (first, second)]
    assert epolls.wait_blocked(first) and epolls.wait_blocked(second)
    table.push_event(table.fds[fd], completed("x"))
    assert [w.result(timeout=10) for w in waiters] == [[(fd, EPOLLIN)], [(fd, EPOLLIN)]]


def test_closing_the_epfd_wakes_its_waiter_with_ebadf(
    epolls: EpollSet, pool: ThreadPoolExecutor
) -> None:
    epfd = epolls.spear_epoll_create()
    waiter = in_thread(pool, wait, epolls, BytesMemory(), epfd, -1)
    assert epolls.wait_blocked(epfd)
    epolls.spear_epoll_close(epfd)
    assert waiter.result(timeout=10) == -EBADF


def test_shutdown_wakes_waiters(
    table: FdTable, epolls: EpollSet, mem: BytesMemory, pool: ThreadPoolExecutor
) -> None:
    idle, watching = epolls.spear_epoll_create(), epolls.spear_epoll_create()
    fd = connected(table, mem)
    epolls.spear_epoll_ctl(watching, ADD, fd, EPOLLIN)
    waiters = [in_thread(pool, wait, epolls, BytesMemory(), epfd, -1) for epfd in (idle, watching)]
    assert epolls.wait_blocked(idle) and epolls.wait_blocked(watching)
    table.shutdown()
    assert waiters[0].result(timeout=10) == -EINTR  # nothing to report
    assert waiters[1].result(timeout=10) == [(fd, EPOLLHUP)]
