"""Property tests of the hostcall ABI (hypothesis, derandomized and bounded).

Random sequences of calls with hostile arguments (pointers across or past the end of memory,
lengths, fds, control codes, epoll ops and masks, i32 extremes, garbage in the length slots and
the JSON arguments) go to the host-side functions (`FdTable` / `EpollSet` on a `BytesMemory`,
with the loop side pushing random server events and ending sessions), and through the real
wasmtime binding to a guest that forwards its exports to every import. Whatever arrives: no
exception escapes the host, every result is a count/fd or a known ``-errno``, and what the
host keeps per guest stays within its caps (descriptors, queue bytes), so memory is bounded.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_rt.hostcalls import abi
from spear_rt.hostcalls.abi import BytesMemory, EpollOp, write_u32
from spear_rt.hostcalls.epoll import EpollSet, FakeClock
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.rtfd import HARD_LIMIT_FACTOR, FdState
from spear_rt.hostcalls.wasm import GuestLimits, WasmGuest
from tests.hostcalls.conftest import RecordingPort

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ERRNOS = {v for k, v in vars(abi).items() if k[:1] == "E" and k.isupper() and isinstance(v, int)}
ERRNOS -= {abi.EPOLLIN, abi.EPOLLOUT, abi.EPOLLERR, abi.EPOLLHUP, abi.EPOLL_ALL}
MEM = 65536
MAX_FDS = 1024  # the default per-guest cap on rt fds + epfds
MAX_EVENT = 300_100  # the largest event a test pushes or writes
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
EDGES = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    -1,
    -2,
    -4,
    -8,
    MEM - 8,
    MEM - 4,
    MEM - 1,
    MEM,
    MEM + 4,
    1 << 20,
    I32_MAX,
    I32_MIN,
    I32_MAX - 3,
    0x7FFF_FFF8,
]
I32 = st.one_of(st.sampled_from(EDGES), st.integers(I32_MIN, I32_MAX))
PTR = st.one_of(st.sampled_from(EDGES), st.integers(0, MEM + 64), I32)
FD = st.one_of(st.integers(-2, 12), I32)
CMD = st.one_of(st.integers(0, 9), I32)
OP = st.one_of(st.sampled_from([int(o) for o in EpollOp]), st.integers(-1, 5), I32)
TIMEOUT = st.one_of(st.just(0), st.integers(1, I32_MAX))  # negative = wait forever: not fuzzed

_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
)
JSON_VALUE = st.recursive(
    _JSON_LEAF,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
KEY = st.one_of(
    st.sampled_from(
        [
            "input_audio_format",
            "input_sample_rate_hz",
            "model",
            "backend",
            "turn_detection",
            "max_send_queue_bytes",
            "max_recv_queue_bytes",
            "drop_policy",
            "api_key",
            "url",
        ]
    ),
    st.text(max_size=20),
)
ARG_BYTES = st.one_of(
    st.builds(lambda k, v: json.dumps({"key": k, "value": v}).encode(), KEY, JSON_VALUE),
    st.builds(lambda v: json.dumps(v).encode(), JSON_VALUE),
    st.binary(max_size=300),
    st.integers(100, 3000).map(lambda n: b"[" * n + b"]" * n),  # deep JSON
)
EVENT_BYTES = st.one_of(
    st.just(b'{"type":"transcription_session.created","session":{}}'),
    st.builds(
        lambda t, v: json.dumps({"type": t, "x": v}).encode(),
        st.sampled_from(
            [
                "error",
                "conversation.item.input_audio_transcription.delta",
                "conversation.item.input_audio_transcription.completed",
                "x",
            ]
        ),
        JSON_VALUE,
    ),
    st.binary(max_size=200),
    st.integers(100, 3000).map(lambda n: b'{"type":' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 300_000).map(lambda n: b'{"type":"x","p":"' + b"a" * n + b'"}'),
)

# One hostile call: (name, args...). "poke" is the guest writing its own memory;
# "set_param"/"send_event" place JSON at a pointer first; "push", "end" are the loop side.
CALL = st.one_of(
    st.tuples(st.just("create")),
    st.tuples(st.just("close"), FD),
    st.tuples(st.just("ctl"), FD, CMD, PTR, PTR),
    st.tuples(st.just("arg_ctl"), FD, st.sampled_from([1, 4]), ARG_BYTES),
    st.tuples(st.just("write"), FD, PTR, st.one_of(st.integers(-4, 4096), I32)),
    st.tuples(st.just("read"), FD, PTR, PTR),
    st.tuples(st.just("ep_create")),
    st.tuples(st.just("ep_ctl"), FD, OP, FD, I32),
    st.tuples(st.just("ep_wait"), FD, PTR, PTR, TIMEOUT),
    st.tuples(st.just("ep_close"), FD),
    st.tuples(st.just("poke"), st.integers(0, MEM - 4), I32),
    st.tuples(st.just("push"), st.integers(0, 8), EVENT_BYTES),
    st.tuples(st.just("end"), st.integers(0, 8), st.integers(-1, 5000), st.text(max_size=30)),
)


def check(result: Any, call: tuple[Any, ...]) -> None:
    """A count/fd or a known -errno, as an int."""
    assert isinstance(result, int) and not isinstance(result, bool), (call, result)
    assert I32_MIN <= result <= I32_MAX, (call, result)
    assert result >= 0 or -result in ERRNOS, (call, result)


class Host:
    """The host side of one guest, driven one call at a time."""

    def __init__(self) -> None:
        self.mem = BytesMemory(MEM)
        self.table = FdTable(RecordingPort())
        self.epolls = EpollSet(self.table, FakeClock(100.0))
        self.fds: list[int] = []

    def fd(self, n: int) -> int:
        """A created fd (the n-th, cycling), or n itself when none exists."""
        return self.fds[n % len(self.fds)] if self.fds else n

    def do(self, call: tuple[Any, ...]) -> int | None:
        """Perform `call`; the hostcall's result (None for the loop side and pokes)."""
        t, m, name, args = self.table, self.mem, call[0], call[1:]
        if name == "create":
            fd = t.rt_create()
            self.fds += [fd] if fd > 0 else []
            return fd
        if name == "ep_create":
            return self.epolls.spear_epoll_create()
        if name == "poke":
            m.set_u32(args[0], args[1] & 0xFFFF_FFFF)
            return None
        if name in ("push", "end"):
            rt = t.fds.get(self.fd(args[0]))
            if rt is not None and rt.state is not FdState.INIT:
                if name == "push":
                    t.push_event(rt, args[1])
                else:
                    t.session_closed(rt, args[1], args[2])
            return None
        if name == "arg_ctl":
            arg = args[2][: MEM - 64]
            m.put(64, arg)
            write_u32(m, 0, len(arg))
            return t.rt_ctl(m, args[0], args[1], 64, 0)
        fns = {
            "close": t.rt_close,
            "ctl": lambda *a: t.rt_ctl(m, *a),
            "write": lambda *a: t.rt_write(m, *a),
            "read": lambda *a: t.rt_read(m, *a),
            "ep_ctl": self.epolls.spear_epoll_ctl,
            "ep_wait": lambda *a: self.epolls.spear_epoll_wait(m, *a),
            "ep_close": self.epolls.spear_epoll_close,
        }
        return int(fns[name](*args))

    def check_bounds(self) -> None:
        """Every per-guest structure within its cap."""
        assert len(self.table.fds) + len(self.epolls.epolls) <= MAX_FDS
        for rt in self.table.fds.values():
            assert rt.send_bytes <= rt.params.max_send_queue_bytes + MAX_EVENT
            # undroppable events may pass the bound up to HARD_LIMIT_FACTOR x, then the fd ends
            limit = HARD_LIMIT_FACTOR * rt.params.max_recv_queue_bytes
            assert rt.recv_bytes <= limit + MAX_EVENT


def _resolve(host: Host, call: tuple[Any, ...]) -> tuple[Any, ...]:
    """Small fd arguments name created fds half the time, so calls reach live ones."""
    name = call[0]
    if name in ("close", "ctl", "arg_ctl", "write", "read") and 0 <= call[1] <= 12:
        return (name, host.fd(call[1]), *call[2:])
    if name == "ep_ctl" and 0 <= call[3] <= 12:
        return (name, call[1], call[2], host.fd(call[3]), call[4])
    return call


@settings(FUZZ, max_examples=200)
@given(calls=st.lists(CALL, min_size=1, max_size=40))
def test_host_functions_never_raise_and_stay_bounded(calls: list[tuple[Any, ...]]) -> None:
    host = Host()
    for call in calls:
        call = _resolve(host, call)
        result = host.do(call)
        if result is not None:
            check(result, call)
        host.check_bounds()
    host.table.shutdown()
    for fd in list(host.table.fds):
        check(host.table.rt_close(fd), ("close", fd))
    for ep in list(host.epolls.epolls):
        check(host.epolls.spear_epoll_close(ep), ("ep_close", ep))


def test_many_descriptors_are_capped_not_grown() -> None:
    """10 000 rt_create + 10 000 epoll_create: a cap (-EMFILE), a few MB at most."""
    host = Host()
    tracemalloc.start()
    try:
        results = [host.table.rt_create() for _ in range(10_000)]
        results += [host.epolls.spear_epoll_create() for _ in range(10_000)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for r in results:
        check(r, ("create",))
    assert -abi.EMFILE in results
    assert peak < 16 << 20, peak


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
    (call $audio_read (local.get 0) (local.get 1))))
"""
LEN = st.one_of(st.integers(-4, 4096), I32)
WASM_ARGS = {
    "create": st.tuples(),
    "ctl": st.tuples(FD, CMD, PTR, PTR),
    "write": st.tuples(FD, PTR, LEN),
    "read": st.tuples(FD, PTR, PTR),
    "close": st.tuples(FD),
    "ep_create": st.tuples(),
    "ep_ctl": st.tuples(FD, OP, FD, I32),
    "ep_wait": st.tuples(FD, PTR, PTR, TIMEOUT),
    "ep_close": st.tuples(FD),
    "audio_read": st.tuples(PTR, PTR),
}
WASM_CALL = st.one_of(
    *(st.tuples(st.just(name), args.map(list)) for name, args in WASM_ARGS.items()),
    st.tuples(
        st.just("poke"),
        st.tuples(st.integers(0, MEM - 8), st.binary(min_size=1, max_size=8)).map(list),
    ),
)


@pytest.fixture(scope="module")
def guest() -> Any:
    table = FdTable(RecordingPort())
    g = WasmGuest(
        PROBE,
        table,
        EpollSet(table, FakeClock(100.0)),
        limits=GuestLimits(max_run_seconds=None),
        audio=b"\1\0" * 500,
    )
    g.instantiate()
    yield g
    table.shutdown()
    g.close()


@settings(FUZZ, max_examples=100)
@given(calls=st.lists(WASM_CALL, min_size=1, max_size=30))
def test_wasm_binding_turns_any_arguments_into_errno(
    guest: WasmGuest, calls: list[tuple[str, list[Any]]]
) -> None:
    for name, args in calls:
        if name == "poke":
            guest.memory_write(args[0], args[1])
            continue
        check(guest.call(name, *args), (name, *args))
    table = guest.table
    assert len(table.fds) + len(guest.epolls.epolls) <= MAX_FDS
    # the guest is still healthy: a fresh fd is created and closed
    fd = guest.call("create")
    if fd > 0:
        assert guest.call("close", fd) == 0
    else:
        assert fd == -abi.EMFILE
