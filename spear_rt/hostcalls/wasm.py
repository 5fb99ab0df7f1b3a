"""The wasmtime binding: ``rt_*`` / ``spear_epoll_*`` as imports of module ``"spear"``.

A guest is a WASI-style command: the host compiles it (binary or WAT), links the ``"spear"``
imports with the spec's exact signatures (upstream SPEAR's families too: `upstream`), plus
WASI when the guest imports it (stderr is the host's; stdout discarded, the host's or a
file) and the host-provided audio source below, instantiates it and calls its exported
``_start``; its linear memory is exported as ``memory``. Every pointer is
bounds-checked against that memory (``-EFAULT``, never a host crash); an unexpected host
error is logged and returned as ``-EIO`` rather than trapping the guest.

Host functions are synchronous, so each guest runs in a worker thread while its sessions run
in the event loop (`spear_rt.hostcalls.guest`). Guests run
with fuel (a spinning guest traps with out-of-fuel), epoch interruption (cancelling the host
interrupts a running guest; so does a timer at ``max_run_seconds``, which also wakes a guest
blocked in ``spear_epoll_wait``: "guest exceeded its time limit of N s") and a memory limit
(``Store.set_limits``).

Host-provided audio (an extra import, outside the spec's ``"spear"`` functions)::

    (import "spear_host" "audio_read" (func (param i32 i32) (result i32)))

``audio_read(out_ptr, out_len_ptr)`` copies the next bytes of the host's audio (pcm16, 24000
Hz, mono: the fd default) under the ``(out_ptr, out_len_ptr)`` contract and returns how many
it wrote (whole samples; 0 at the end), or ``-ENOENT`` when the host has no audio for the
guest (``run-wasm`` without ``--audio``), so a guest can fall back on audio of its own.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import wasmtime

from spear_rt.errors import SpearError
from spear_rt.hostcalls.abi import (
    EFAULT,
    EIO,
    ENOENT,
    ENOSPC,
    GuestMemory,
    MemoryFault,
    out_capacity,
    u32,
    write_u32,
)
from spear_rt.hostcalls.cchat import error_body
from spear_rt.hostcalls.chatcalls import StartStream
from spear_rt.hostcalls.epoll import EpollSet
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.oneshotfd import Send, Sent, chat_over
from spear_rt.hostcalls.upstream import LogSink, UpstreamImports, guarded, link_upstream
from spear_rt.hostcalls.userstream import UserStreams

log = logging.getLogger(__name__)

_I32 = wasmtime.ValType.i32()


class GuestError(SpearError):
    """A guest did not run to completion: bad module, trap, out of fuel or interrupted."""


class GuestLimits(msgspec.Struct, frozen=True):
    """Per-guest budgets: wasm instructions (fuel), linear memory bytes and wall-clock time."""

    fuel: int = 10_000_000_000
    memory_bytes: int = 64 << 20
    # Seconds from the guest's first call; a loop over host calls burns almost no fuel, so
    # only this stops it. None: no limit.
    max_run_seconds: float | None = 600.0


DEFAULT_LIMITS = GuestLimits()


class WasmMemory:
    """`GuestMemory` over a guest's exported ``memory``, valid inside one host call."""

    def __init__(self) -> None:
        self._mem: wasmtime.Memory | None = None
        self._store: Any = None
        self._size = 0
        self._base = 0  # address of byte 0, valid for the current host call only

    def bind(self, caller: wasmtime.Caller) -> None:
        """Use `caller` as the store context of the accesses that follow."""
        self._store = caller
        if self._mem is None:
            export = caller.get("memory")
            self._mem = export if isinstance(export, wasmtime.Memory) else None
        # Only the guest grows (and so moves) its memory, and it is not running during a
        # host call: size and address hold until the call returns.
        self._size = 0 if self._mem is None else self._mem.data_len(caller)
        if self._size:
            assert self._mem is not None
            self._base = ctypes.addressof(self._mem.data_ptr(caller).contents)

    def check(self, ptr: int, length: int) -> None:
        """Raise `MemoryFault` unless ``[ptr, ptr + length)`` is inside memory."""
        end = u32(ptr) + u32(length)
        if end > self._size:
            raise MemoryFault(f"[{u32(ptr)}, {end}) is outside the guest's {self._size} bytes")

    def read(self, ptr: int, length: int) -> bytes:
        """Bytes at `ptr` (bounds-checked, then copied straight out of linear memory)."""
        self.check(ptr, length)
        return ctypes.string_at(self._base + u32(ptr), u32(length)) if length else b""

    def write(self, ptr: int, data: bytes) -> None:
        """Store bytes at `ptr` (bounds-checked, then copied straight into linear memory)."""
        self.check(ptr, len(data))
        if data:
            ctypes.memmove(self._base + u32(ptr), data, len(data))


class AudioSource:
    """Audio the host hands a guest through ``spear_host.audio_read`` (pcm16 24 kHz mono)."""

    def __init__(self, pcm: bytes | None) -> None:
        self._data = pcm
        self._pos = 0

    def audio_read(self, mem: GuestMemory, out_ptr: int, out_len_ptr: int) -> int:
        """Bytes copied (whole samples, 0 at the end), or -ENOENT / -ENOSPC / -EFAULT."""
        if self._data is None:
            return -ENOENT
        capacity = out_capacity(mem, out_ptr, out_len_ptr)
        if capacity < 2:
            write_u32(mem, out_len_ptr, 2)
            return -ENOSPC
        chunk = self._data[self._pos : self._pos + (capacity & ~1)]
        self._pos += len(chunk)
        mem.write(out_ptr, chunk)
        write_u32(mem, out_len_ptr, len(chunk))
        return len(chunk)


def audio_file_source(path: str | Path) -> bytes:
    """An audio file as pcm16 at 24000 Hz mono bytes (raises AudioFormatError)."""
    from spear_rt.audio import load_audio, pcm16_to_bytes, resample

    pcm, rate = load_audio(path)
    return pcm16_to_bytes(resample(pcm, rate, 24000))


class WasmGuest:
    """One guest module linked to one fd table; compile and calls happen in its worker thread."""

    def __init__(
        self,
        module: bytes | str | Path,
        table: FdTable,
        epolls: EpollSet,
        *,
        limits: GuestLimits = DEFAULT_LIMITS,
        audio: bytes | None = None,
        send: Send | None = None,
        start_stream: StartStream | None = None,
        log_sink: LogSink | None = None,
        stdout: str | None = None,
        streams: UserStreams | None = None,
    ) -> None:
        self.table = table
        self.stdout = stdout  # WASI stdout: None discarded, "inherit" the host's, else a file
        self.epolls = epolls
        self.limits = limits
        self._source = module
        self._audio = AudioSource(audio)
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self._engine = wasmtime.Engine(config)
        self._store: wasmtime.Store | None = None
        self._instance: wasmtime.Instance | None = None
        self._memory = WasmMemory()
        self.upstream = UpstreamImports(
            table,
            self._memory,
            chat_over(send or _no_router),
            log_sink,
            epolls.clock.now,
            audio,
            streams,
            send or _no_router,
            start_stream,
        )
        self._deadline: float | None = None  # monotonic; set by the first call
        self._timed_out = False

    def instantiate(self) -> None:
        """Compile, link and instantiate (worker thread); raises GuestError."""
        source = self._source
        if isinstance(source, Path):
            data = source.read_bytes()
            source = data.decode() if source.suffix == ".wat" else data
        store = wasmtime.Store(self._engine)
        store.set_fuel(self.limits.fuel)
        store.set_epoch_deadline(1)
        store.set_limits(memory_size=self.limits.memory_bytes)
        try:
            module = wasmtime.Module(self._engine, source)
            linker = self._linker(module, store)
            self._instance = linker.instantiate(store, module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise _guest_error(exc) from None
        self._store = store

    def call(self, export: str, *args: int) -> Any:
        """Call an exported function (worker thread); raises GuestError on a trap or timeout."""
        timer = self._arm_timer()
        try:
            result = self._call(export, *args)
        except GuestError:
            if self._timed_out:  # the interrupt (or the woken wait's fallout) was the timer's
                raise self._timeout_error() from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if self._timed_out:  # returned after the timer fired (say, from a woken wait)
            raise self._timeout_error()
        return result

    def _call(self, export: str, *args: int) -> Any:
        if self._instance is None:
            self.instantiate()
        assert self._instance is not None and self._store is not None
        func = self._instance.exports(self._store).get(export)
        if not isinstance(func, wasmtime.Func):
            raise GuestError(f"the module exports no function {export!r}")
        try:
            return func(self._store, *args)
        except wasmtime.ExitTrap as exc:
            if exc.code:
                raise GuestError(f"the guest exited with status {exc.code}") from None
            return None
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise _guest_error(exc) from None

    def _arm_timer(self) -> threading.Timer | None:
        """A timer that stops the guest at its deadline (counted from its first call)."""
        limit = self.limits.max_run_seconds
        if limit is None:
            return None
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + limit
        if self._timed_out:
            return None
        timer = threading.Timer(max(self._deadline - now, 0.0), self._time_out)
        timer.daemon = True
        timer.start()
        return timer

    def _time_out(self) -> None:
        """The deadline passed (timer thread): wake blocked host calls, interrupt the wasm."""
        self._timed_out = True
        self.table.shutdown()
        self._engine.increment_epoch()

    def _timeout_error(self) -> GuestError:
        return GuestError(f"guest exceeded its time limit of {self.limits.max_run_seconds:g} s")

    def close(self) -> None:
        """Free the store now (with WASI, leaving it to interpreter exit can abort the process)."""
        self._instance = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def interrupt(self) -> None:
        """Stop the guest at its next loop or call (any thread)."""
        self._engine.increment_epoch()

    def global_value(self, name: str) -> Any:
        """The value of an exported global (tests read results guests leave there)."""
        assert self._instance is not None and self._store is not None
        glob = self._instance.exports(self._store).get(name)
        if not isinstance(glob, wasmtime.Global):
            raise GuestError(f"the module exports no global {name!r}")
        return glob.value(self._store)

    def memory_read(self, ptr: int, length: int) -> bytes:
        """Bytes of the guest's memory, between calls (tests, benches)."""
        memory, store = self._exported_memory()
        return bytes(memory.read(store, ptr, ptr + length))

    def memory_write(self, ptr: int, data: bytes) -> None:
        """Store bytes in the guest's memory, between calls (tests, benches)."""
        memory, store = self._exported_memory()
        memory.write(store, data, ptr)

    def _exported_memory(self) -> tuple[wasmtime.Memory, wasmtime.Store]:
        if self._instance is None:
            self.instantiate()
        assert self._instance is not None and self._store is not None
        memory = self._instance.exports(self._store).get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise GuestError("the module exports no memory")
        return memory, self._store

    @property
    def fuel_used(self) -> int:
        """Fuel consumed so far."""
        return 0 if self._store is None else self.limits.fuel - self._store.get_fuel()

    def _linker(self, module: wasmtime.Module, store: wasmtime.Store) -> wasmtime.Linker:
        linker = wasmtime.Linker(self._engine)
        table, ep = self.table, self.epolls
        plain: dict[str, tuple[int, Callable[..., int]]] = {
            "rt_create": (0, table.rt_create),
            "rt_close": (1, table.rt_close),
            "spear_epoll_create": (0, ep.spear_epoll_create),
            "spear_epoll_ctl": (4, ep.spear_epoll_ctl),
            "spear_epoll_close": (1, ep.spear_epoll_close),
        }
        with_memory: dict[str, tuple[int, Callable[..., int]]] = {
            "rt_ctl": (4, table.rt_ctl),
            "rt_write": (3, table.rt_write),
            "rt_read": (3, table.rt_read),
            "spear_epoll_wait": (4, ep.spear_epoll_wait),
        }
        for name, (arity, fn) in plain.items():
            linker.define_func("spear", name, _func_type(arity), guarded(name, fn))
        for name, (arity, fn) in with_memory.items():
            linker.define_func("spear", name, _func_type(arity), self._with_memory(name, fn), True)
        link_upstream(linker, module, self.upstream, self._with_memory, {*plain, *with_memory})
        audio_read = self._with_memory("audio_read", self._audio.audio_read)
        linker.define_func("spear_host", "audio_read", _func_type(2), audio_read, True)
        if any(imp.module.startswith("wasi") for imp in module.imports):
            linker.define_wasi()
            # stderr is the host's; stdout as asked (`stdout`). No Python callback for either:
            # wasmtime may call one from its own threads at exit.
            wasi = wasmtime.WasiConfig()
            wasi.inherit_stderr()
            if self.stdout == "inherit":
                wasi.inherit_stdout()
            elif self.stdout is not None:
                wasi.stdout_file = self.stdout
            store.set_wasi(wasi)
        return linker

    def _with_memory(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        memory = self._memory

        def call(caller: wasmtime.Caller, *args: int) -> int:
            try:
                memory.bind(caller)
                return fn(memory, *args)
            except MemoryFault:
                return -EFAULT  # the fd table checks its own; this is for audio_read
            except Exception:
                log.exception("hostcall %s failed", name)
                return -EIO

        return call


def _no_router(path: str, content_type: str, body: bytes, *_routing: Any) -> Sent:
    """What every request answers when the guest runs without a router (unit tests)."""
    return Sent(503, error_body("no_backend", "this host routes no requests"), "application/json")


def _func_type(arity: int) -> wasmtime.FuncType:
    return wasmtime.FuncType([_I32] * arity, [_I32])


def _guest_error(exc: wasmtime.WasmtimeError | wasmtime.Trap) -> GuestError:
    code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
    if code is wasmtime.TrapCode.OUT_OF_FUEL:
        return GuestError("guest stopped: out of fuel (a spinning guest?)")
    if code is wasmtime.TrapCode.INTERRUPT:
        return GuestError("guest interrupted: the host is shutting down")
    # wasmtime puts the cause last ("Caused by: wasm trap: ..."), after a backtrace.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return GuestError(f"guest failed: {lines[-1] if lines else type(exc).__name__}")
