"""``spear-rt run-wasm MODULE [--audio FILE]``: run a WASM task against the configured backends.

The module (``.wasm`` or ``.wat``) runs in-process with the server's own pieces — registry,
router and session manager built from the config (the embedded default without
``--config``) — so its sessions are routed like any WebSocket client's. Every event the
guest reads with ``rt_read`` is printed on stdout as one JSON object per line (not those
upstream guests read with ``rtasr_read``: they print what they want themselves); a WASI
guest's stderr and stdout are ours (upstream's mic_rtasr writes its transcripts to stdout).
``--listen HOST:PORT`` serves the whole API on that address while the guest runs, and its
user streams (upstream's ``user_stream_*``) at the path printed before the guest starts:
``user streams: ws://HOST:PORT/api/v1/executions/<id>/streams/ws``.
``--audio FILE`` hands the guest the file's audio (pcm16 24 kHz mono) through the
``spear_host.audio_read`` import (see `spear_rt.hostcalls.wasm`), and it is what upstream's
``mic_*`` calls ``source: "device"``, played at real-time pace (`spear_rt.hostcalls.mic`).
A guest's ``log`` calls (upstream SPEAR's ``printf``) print on stdout as they come, one line
per message, each text as the guest wrote it (levels go to the server log); its ``cchat_*``
requests go through the server's one-shot path, as ``POST /v1/chat/completions`` would.

Exit status: 0 when ``_start`` returned, 1 when the guest trapped, ran out of fuel or time
(``--max-run-seconds``) or failed to link or exited non-zero, 2 for errors a user can fix
(missing file, bad config, wasmtime not installed).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from spear_rt.errors import SpearError


def add_parser(sub: Any) -> None:
    """Add the ``run-wasm`` subcommand to the ``spear-rt`` subparsers `sub`."""
    p = sub.add_parser("run-wasm", help="run a WASM task (.wasm/.wat); print the events it reads")
    p.add_argument("module", help="the guest module: binary .wasm or text .wat")
    p.add_argument("--audio", help="audio file the guest reads with spear_host.audio_read")
    p.add_argument("--config", help="TOML config file (default: the embedded default)")
    p.add_argument("--fuel", type=int, default=None, help="wasm instruction budget (default 1e10)")
    p.add_argument("--memory-mb", type=int, default=64, help="guest linear memory limit in MiB")
    p.add_argument(
        "--max-run-seconds",
        type=float,
        default=600.0,
        help="wall-clock limit of the guest's run (default 600; 0: none)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve the guest's user streams (and the whole API) on this address",
    )
    p.add_argument("--loop", choices=("trio", "asyncio", "uvloop"), default="asyncio")
    p.set_defaults(func=run_wasm_cli)


def run_wasm_cli(args: argparse.Namespace) -> int:
    """Handler of ``spear-rt run-wasm``."""
    try:
        from spear_rt.hostcalls.guest import leaves, run_guest
        from spear_rt.hostcalls.wasm import GuestError, GuestLimits, audio_file_source
    except ImportError:
        print("spear-rt: run-wasm needs wasmtime: pip install 'spear-rt[wasm]'", file=sys.stderr)
        return 2
    from spear_rt.cli import run_on_loop
    from spear_rt.config import load_config
    from spear_rt.server.app import Server
    from spear_rt.server.streams_ws import streams_url

    module = Path(args.module)
    if not module.is_file():
        print(f"spear-rt: run-wasm: no such module: {module}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        audio = audio_file_source(args.audio) if args.audio else None
    except SpearError as exc:
        print(f"spear-rt: run-wasm: {exc}", file=sys.stderr)
        return 2
    limits = GuestLimits(
        memory_bytes=args.memory_mb << 20,
        max_run_seconds=args.max_run_seconds if args.max_run_seconds > 0 else None,
    )
    if args.fuel is not None:
        limits = msgspec.structs.replace(limits, fuel=args.fuel)
    out = sys.stdout
    events = 0

    def print_event(fd: int, data: bytes) -> None:
        nonlocal events
        events += 1
        out.write(data.decode("utf-8", "replace") + "\n")
        out.flush()

    def print_log(level: str, text: str) -> None:
        out.write(text if text.endswith("\n") else text + "\n")  # one line per message
        out.flush()

    fuel_used = 0
    stopped_by: list[int] = []

    if args.listen:
        config.server.listen = args.listen

    def announce(run: Any) -> None:
        if run.streams is not None:
            host = config.server.listen.rsplit(":", 1)[0]
            url = streams_url(host, server_port[0], run.streams.execution_id)
            print(f"user streams: {url}", file=out, flush=True)

    server_port = [0]

    async def main() -> None:
        nonlocal fuel_used
        server = Server(config)  # inside the loop: it holds anyio primitives
        async with anyio.create_task_group() as tg:
            # SIGINT/SIGTERM cancel the run: a guest blocked in a host call or spinning cannot
            # take a signal itself (its thread is not the loop's), so cancelling stops it.
            tg.start_soon(_cancel_on_signal, tg.cancel_scope, stopped_by)
            if args.listen:
                server_port[0] = await tg.start(server.serve)
            fuel_used = await run_guest(
                module,
                server.sessions,
                audio=audio,
                limits=limits,
                on_read=print_event,
                oneshot=server.oneshot.handle,
                log_sink=print_log,
                stdout="inherit",
                executions=server.executions if args.listen else None,
                on_start=announce,
            )
            tg.cancel_scope.cancel()

    try:
        run_on_loop(args.loop, main)
    except (GuestError, BaseExceptionGroup) as exc:
        errors = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        if not all(isinstance(e, GuestError) for e in errors):
            raise
        if stopped_by:
            print(f"spear-rt: run-wasm: stopped by signal {stopped_by[0]}", file=sys.stderr)
            return 130
        print(f"spear-rt: run-wasm: {errors[0]}", file=sys.stderr)
        return 1
    if stopped_by:
        print(f"spear-rt: run-wasm: stopped by signal {stopped_by[0]}", file=sys.stderr)
        return 130
    summary = f"{module.name}: {events} events read, fuel used {fuel_used}"
    print(f"spear-rt: run-wasm: {summary}", file=sys.stderr)
    return 0


async def run_in_server(server: Any, module: Path, host: str, port: int) -> None:
    """``spear-rt serve --wasm MODULE``: run a guest inside a serving server; its user streams
    are served on the server's port, its log lines go to stderr, its end is said, and a
    failing guest never stops the server."""
    from spear_rt.hostcalls.guest import leaves, run_guest
    from spear_rt.hostcalls.wasm import GuestError
    from spear_rt.server.streams_ws import streams_url

    name = module.name

    def log_line(level: str, text: str) -> None:
        print(f"spear-rt: wasm {name}: {text.rstrip()}", file=sys.stderr, flush=True)

    def announce(run: Any) -> None:
        url = streams_url(host, port, run.streams.execution_id)
        print(f"spear-rt: wasm {name}: user streams: {url}", file=sys.stderr, flush=True)

    try:
        fuel = await run_guest(
            module,
            server.sessions,
            oneshot=server.oneshot.handle,
            log_sink=log_line,
            stdout="inherit",
            executions=server.executions,
            on_start=announce,
        )
    except (GuestError, BaseExceptionGroup) as exc:
        errors = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        if not all(isinstance(e, GuestError) for e in errors):
            raise
        print(f"spear-rt: wasm {name}: {errors[0]}", file=sys.stderr, flush=True)
        return
    print(f"spear-rt: wasm {name}: ended (fuel used {fuel})", file=sys.stderr, flush=True)


async def _cancel_on_signal(scope: anyio.CancelScope, stopped_by: list[int]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            stopped_by.append(signum)
            scope.cancel()
            return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spear_rt.hostcalls.cli MODULE ...`` (the same as ``spear-rt run-wasm``)."""
    parser = argparse.ArgumentParser(prog="spear-rt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["run-wasm", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
