"""Per-guest bounds a hostcall loop cannot pass: wall-clock time, open fds, epoll watches.

Fuel counts wasm instructions, so a guest looping over a cheap host call burns almost none
(the default fuel lasts hours of it): the wall-clock bound (epoch interruption) stops it.
Descriptors (rt fds and epfds) are capped per guest (``-EMFILE``), epoll watches too
(``-ENOMEM``), so nothing a guest can call in a loop grows without bound.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from spear_rt.hostcalls.abi import EMFILE, ENOMEM
from spear_rt.hostcalls.guest import guest_host
from spear_rt.hostcalls.params import HostPolicy
from spear_rt.hostcalls.wasm import GuestError, GuestLimits
from spear_rt.server.app import Server
from spear_rt.session.manager import SessionManager

# $churn: rt_create + rt_close forever (nothing but host calls; no fd is left open).
# $create(n): n rt_create calls; $opened counts successes, $first_error keeps the first -errno.
# $watch_all(n, fd): n epoll_create calls, each new epfd watching fd, none closed.
GUEST = """
(module
  (import "spear" "rt_create" (func $rt_create (result i32)))
  (import "spear" "rt_close" (func $rt_close (param i32) (result i32)))
  (import "spear" "spear_epoll_create" (func $epoll_create (result i32)))
  (import "spear" "spear_epoll_ctl" (func $epoll_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_wait" (func $epoll_wait (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $opened (export "opened") (mut i32) (i32.const 0))
  (global $first_error (export "first_error") (mut i32) (i32.const 0))
  (func $note (param $rc i32)
    (if (i32.ge_s (local.get $rc) (i32.const 0))
      (then (global.set $opened (i32.add (global.get $opened) (i32.const 1))))
      (else (if (i32.eqz (global.get $first_error))
        (then (global.set $first_error (local.get $rc)))))))
  (func $churn (export "churn")
    (loop $forever
      (drop (call $rt_close (call $rt_create)))
      (br $forever)))
  (func (export "block_forever") (param $ep i32)
    (i32.store (i32.const 0) (i32.const 64))
    (drop (call $epoll_wait (local.get $ep) (i32.const 16) (i32.const 0) (i32.const -1))))
  (func (export "ep_create") (result i32) (call $epoll_create))
  (func $create (export "create") (param $n i32)
    (loop $again
      (call $note (call $rt_create))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $again (i32.gt_s (local.get $n) (i32.const 0)))))
  (func (export "watch_all") (param $n i32) (param $fd i32)
    (local $ep i32)
    (loop $again
      (local.set $ep (call $epoll_create))
      (if (i32.lt_s (local.get $ep) (i32.const 0))
        (then (call $note (local.get $ep)))
        (else (call $note (call $epoll_ctl (local.get $ep) (i32.const 1) (local.get $fd)
                                            (i32.const 1)))))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $again (i32.gt_s (local.get $n) (i32.const 0)))))
  (func (export "_start") (call $create (i32.const 2000))))
"""


@pytest.fixture
def manager(server: Server) -> SessionManager:
    return server.sessions


async def test_a_guest_looping_over_a_host_call_is_stopped_by_its_time_limit(
    manager: SessionManager,
) -> None:
    """rt_create + rt_close forever uses almost no fuel: the 0.5 s wall-clock bound stops it
    with a guest error that names the limit."""
    with anyio.fail_after(30):
        async with guest_host(GUEST, manager, limits=GuestLimits(max_run_seconds=0.5)) as run:
            with pytest.raises(GuestError) as info:
                await run.call("churn")
            assert run.guest.fuel_used < GuestLimits().fuel // 100
    assert str(info.value) == "guest exceeded its time limit of 0.5 s"


async def test_a_guest_blocked_in_a_host_call_is_stopped_by_its_time_limit(
    manager: SessionManager,
) -> None:
    """epoll_wait(-1) on nothing: the limit wakes the wait and the guest stops, same error."""
    with anyio.fail_after(30):
        async with guest_host(GUEST, manager, limits=GuestLimits(max_run_seconds=0.5)) as run:
            ep = await run.call("ep_create")
            with pytest.raises(GuestError, match=r"time limit of 0\.5 s"):
                await run.call("block_forever", ep)


async def test_rt_create_past_the_fd_cap_is_emfile(manager: SessionManager) -> None:
    """2000 rt_create with a cap of 100: 100 fds, then -EMFILE; the table holds 100."""
    async with guest_host(GUEST, manager, policy=HostPolicy(max_fds=100)) as run:
        await run.call("create", 2000)
        assert run.guest.global_value("opened") == 100
        assert run.guest.global_value("first_error") == -EMFILE
        assert len(run.table.fds) == 100


async def test_epfds_count_against_the_fd_cap(manager: SessionManager) -> None:
    """Every descriptor counts: 10 rt fds, then epoll_create stops at the cap of 12."""
    async with guest_host(GUEST, manager, policy=HostPolicy(max_fds=12)) as run:
        await run.call("create", 10)
        assert await run.call("ep_create") > 0
        assert await run.call("ep_create") > 0
        assert await run.call("ep_create") == -EMFILE
        assert len(run.table.fds) + len(run.epolls.epolls) == 12


async def test_epoll_watches_are_capped_per_guest(manager: SessionManager) -> None:
    """Each epfd may watch 4096 fds, but one guest's watches together stop at max_watches."""
    policy = HostPolicy(max_fds=1000, max_watches=50)
    async with guest_host(GUEST, manager, policy=policy) as run:
        await run.call("create", 1)
        fd = next(iter(run.table.fds))
        await run.call("watch_all", 100, fd)
        assert run.guest.global_value("first_error") == -ENOMEM
        watches = sum(len(ep.watches) for ep in run.epolls.epolls.values())
        assert watches == 50 and run.table.watch_count == 50


async def test_a_long_hostcall_loop_stays_bounded(manager: SessionManager) -> None:
    """200k rt_create at the default cap (1024): the table never holds more than the cap."""
    async with guest_host(GUEST, manager) as run:
        await run.call("create", 200_000)
        assert run.guest.global_value("opened") == HostPolicy().max_fds == 1024
        assert len(run.table.fds) == 1024


async def test_run_wasm_takes_a_time_limit(tmp_path: Path) -> None:
    """`run-wasm --max-run-seconds 0.5`: a _start churning host calls exits 1, one line."""
    module = tmp_path / "churn.wat"
    module.write_text(GUEST.replace("(call $create (i32.const 2000))", "(call $churn)"))
    config = tmp_path / "stub.toml"
    config.write_text('[[backends]]\nname = "stub"\nkind = "stub"\n')
    argv = [sys.executable, "-m", "spear_rt.hostcalls.cli", str(module), "--config", str(config)]
    with anyio.fail_after(60):
        result = await anyio.run_process([*argv, "--max-run-seconds", "0.5"], check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "spear-rt: run-wasm: guest exceeded its time limit of 0.5 s"
    )
