#!/usr/bin/env python3
"""The network side of the fault bench: a fake realtime upstream and a proxy that resets it.

Two roles, each its own process (`realtime_load.py --fault` starts them on core 1):

``upstream --port P [--live-deltas]``
    tests/fakes/realtime_upstream.py's `FakeRealtime` (an OpenAI-Realtime-compatible server:
    `session.created`, `session.updated`, per-commit `committed` / deltas / `completed`, words
    by spear_rt's stub rule, so a transcript is a pure function of the turn's audio) on anyio's
    asyncio backend with uvloop. Unlike the test fixture it keeps nothing per connection
    beyond what the protocol needs (a long bench would otherwise hold every event it got), and
    with ``--live-deltas`` every connection sends each word's delta as soon as its 200 ms of
    audio is in (as the stub does), so the reconnect path that skips already-forwarded delta
    text is exercised too.

``proxy --listen P --target PORT``
    A TCP proxy (asyncio Protocols on uvloop, flow-controlled both ways) between spear_rt and
    the fake. After SIGUSR1 it resets connections every ``--every`` seconds until SIGUSR2:
    ``--mode all`` resets every open connection at once (an upstream restart: all sessions
    reconnect together), ``--mode staggered`` resets each connection ``--every`` seconds
    after it opened (or after the signal), at spread-out times. A reset is an RST towards
    spear_rt (SO_LINGER 0, then abort) and an abort towards the fake: bytes in flight either
    way are lost, as when a real upstream dies. On SIGTERM it prints one JSON line of counts.

Binds and connects to 127.0.0.1 only. Not part of spear_rt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HIGH_WATER = 256 * 1024  # bytes buffered towards one side before the other side stops reading

# =============================================================================================
# fake upstream
# =============================================================================================


def run_upstream(port: int, live_deltas: bool) -> None:
    """Serve `FakeRealtime` on 127.0.0.1:`port` until SIGTERM."""
    sys.path.insert(0, str(REPO))
    import anyio
    import anyio.abc
    from websockets.server import ServerProtocol

    from tests.fakes import realtime_upstream as fake_mod

    quiet = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
    stats = {"connections": 0, "ended_by_reset": 0, "crashed": 0}

    class BenchFake(fake_mod.FakeRealtime):
        """The test fake with bounded per-connection records and one plan for every socket."""

        async def _connection(self, stream: anyio.abc.SocketStream) -> None:
            stats["connections"] += 1
            record = fake_mod.RecordedConnection(stats["connections"])
            record.events = deque(maxlen=4)  # type: ignore[assignment]
            plan = fake_mod.Plan(live_deltas=live_deltas)
            proto = ServerProtocol(max_size=None, logger=fake_mod._ws_log)
            try:
                async with stream:
                    await self._run(stream, proto, record, plan)
            except quiet:
                stats["ended_by_reset"] += 1
            except fake_mod._Dropped:
                pass
            except Exception as exc:  # one broken connection must not end the server
                stats["crashed"] += 1
                if stats["crashed"] <= 3:
                    print(f"connection crashed: {exc!r}", flush=True)

    async def main() -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        print(f"fake upstream listening on 127.0.0.1:{port} live_deltas={live_deltas}", flush=True)
        fake = BenchFake()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, fake._connection)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
        print(json.dumps({"fake_upstream": stats}), flush=True)

    try:
        import uvloop  # noqa: F401

        options: dict[str, Any] = {"use_uvloop": True}
    except ImportError:
        options = {}
    anyio.run(main, backend="asyncio", backend_options=options)


# =============================================================================================
# resetting proxy
# =============================================================================================


class _Side(asyncio.Protocol):
    """One TCP side of a proxied connection; `peer` is the other side."""

    def __init__(self, pair: _Pair, towards_spear: bool) -> None:
        self.pair = pair
        self.towards_spear = towards_spear
        self.t: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []  # bytes from spear before the upstream side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.t is None:
            self.early.append(data)
            return
        peer.t.write(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.t is not None and peer.t.can_write_eof():
            peer.t.write_eof()
        return True  # keep our write side open: the peer may still have something to say

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self)

    def pause_writing(self) -> None:  # our buffer is full: stop reading from the peer
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.resume_reading()


class _Pair:
    """A proxied connection: spear_rt's side and the upstream's side."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.down = _Side(self, towards_spear=True)
        self.up: _Side | None = None
        self.next_reset = 0.0
        self.closed = False

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: _Side(self, towards_spear=False), "127.0.0.1", self.proxy.target
            )
        except OSError:
            self.proxy.stats["upstream_connect_failed"] += 1
            self.close(reset=False)
            return
        if self.closed:
            up.t.abort()  # type: ignore[union-attr]
            return
        self.up = up  # type: ignore[assignment]
        up.peer, self.down.peer = self.down, up  # type: ignore[attr-defined]
        for data in self.down.early:
            up.t.write(data)  # type: ignore[union-attr]
        self.down.early.clear()

    def lost(self, side: _Side) -> None:
        """One side ended: end the other (gracefully: this is not a fault we inject)."""
        if self.closed:
            return
        self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.pairs.discard(self)
        down = self.down.t
        if down is not None and not down.is_closing():
            if reset:
                sock = down.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                down.abort()
            else:
                down.close()
        up = self.up.t if self.up is not None else None
        if up is not None and not up.is_closing():
            up.abort() if reset else up.close()


class Proxy:
    """Accepts spear_rt's upstream connections and forwards them to the fake."""

    def __init__(self, target: int, every: float, mode: str) -> None:
        self.target = target
        self.every = every
        self.mode = mode
        self.pairs: set[_Pair] = set()
        self.active = False
        self.stats = {
            "accepted": 0,
            "resets": 0,
            "reset_rounds": 0,
            "upstream_connect_failed": 0,
            "max_open": 0,
        }
        self.reset_times: list[float] = []  # monotonic time of each reset round (mode all)

    def accept(self) -> _Side:
        pair = _Pair(self)
        self.pairs.add(pair)
        self.stats["accepted"] += 1
        self.stats["max_open"] = max(self.stats["max_open"], len(self.pairs))
        pair.next_reset = time.monotonic() + self.every
        asyncio.get_running_loop().create_task(pair.connect())
        return pair.down

    def start(self) -> None:
        """SIGUSR1: start injecting resets (staggered: each connection at a random phase)."""
        self.active = True
        now = time.monotonic()
        for pair in self.pairs:
            pair.next_reset = now + random.uniform(0, self.every)

    async def resetter(self) -> None:
        next_round = 0.0
        while True:
            await asyncio.sleep(0.01)
            if not self.active:
                next_round = time.monotonic() + self.every
                continue
            now = time.monotonic()
            if self.mode == "all":
                if now < next_round:
                    continue
                next_round = now + self.every
                victims = list(self.pairs)
                self.stats["reset_rounds"] += 1
                self.reset_times.append(now)
            else:
                victims = [p for p in self.pairs if p.next_reset <= now]
                for p in victims:
                    p.next_reset = now + self.every  # for a pair that outlives its reset
            for pair in victims:
                if pair.up is not None:  # one still connecting is left alone
                    pair.close(reset=True)
                    self.stats["resets"] += 1


def run_proxy(listen: int, target: int, every: float, mode: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        proxy = Proxy(target, every, mode)
        server = await loop.create_server(proxy.accept, "127.0.0.1", listen, backlog=4096)
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, proxy.start)
        loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(proxy, "active", False))
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        task = loop.create_task(proxy.resetter())
        print(
            f"proxy listening on 127.0.0.1:{listen} -> 127.0.0.1:{target} "
            f"every={every} mode={mode}",
            flush=True,
        )
        await done.wait()
        task.cancel()
        server.close()
        print(json.dumps({"proxy": proxy.stats}), flush=True)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role", required=True)
    up = sub.add_parser("upstream", help="the fake realtime upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--live-deltas", action="store_true")
    px = sub.add_parser("proxy", help="the resetting TCP proxy")
    px.add_argument("--listen", type=int, required=True)
    px.add_argument("--target", type=int, required=True)
    px.add_argument("--every", type=float, default=0.0, help="seconds between resets (0: none)")
    px.add_argument("--mode", choices=("all", "staggered"), default="all")
    args = ap.parse_args(argv)
    if args.role == "upstream":
        run_upstream(args.port, args.live_deltas)
    else:
        every = args.every if args.every > 0 else float("inf")
        run_proxy(args.listen, args.target, every, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
