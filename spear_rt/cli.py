"""`spear-rt serve | stream | demo | talk | demo-voice`: the command line.

Errors a user can fix (bad config, unreadable audio file, server not reachable) print one
line and exit 2; nothing here prints a traceback for them.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from spear_rt.config import Config, load_config
from spear_rt.errors import ConfigError, SpearError
from spear_rt.redact import install_log_redactor

if TYPE_CHECKING:
    from spear_rt.server.app import Server

LOOPS = ("trio", "asyncio", "uvloop")
DEFAULT_LOOP = "uvloop"  # falls back to asyncio; see README "Event loops": chosen by measurement


def run_on_loop(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on the named event loop (uvloop falls back to asyncio with a warning)."""
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print(
                "spear-rt: uvloop is not installed (pip install 'spear-rt[uvloop]'); using asyncio",
                file=sys.stderr,
            )
            loop = "asyncio"
        else:
            anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
            return
    anyio.run(main, backend=loop)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if getattr(args, "listen", None):
        config.server.listen = args.listen
        from spear_rt.config import check_listen

        check_listen(config)  # HOST:PORT, and a node's address when listening on a wildcard
    return config


async def serve(
    config: Config,
    *,
    config_path: str | None = None,
    announce: Callable[[int], None] | None = None,
    wasm: Sequence[str] = (),
    worker: int | None = None,
) -> int:
    """Run the server until a signal; returns the exit code; `wasm` guests run inside it.

    SIGTERM or a first SIGINT drains (`Server.drain`) and exits 0 once every session and
    request is done (or `drain_deadline_s` + 5 s passed); a second SIGINT/SIGTERM exits at
    once (130 / 143). SIGHUP reloads the config.
    """
    from spear_rt.server.app import Server

    server = Server(config, config_path=config_path, worker=worker)
    exit_code = 0
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        # What start-up made (modules, config, backends) lives as long as the process: kept
        # out of the collector's full passes, which otherwise walk it every few seconds
        # under load (a pause of tens of ms in every session's latency; issue 16).
        gc.freeze()

        async def drain_then_stop(name: str) -> None:
            deadline = server.config.realtime.drain_deadline_s
            await server.drain(deadline)
            print(
                f"spear-rt: {name}: draining, listener closed (up to {deadline:g}s; "
                "send SIGINT again to exit at once)",
                file=sys.stderr,
            )
            with anyio.move_on_after(deadline + 5):
                await server.wait_drained()
            tg.cancel_scope.cancel()

        draining = False
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            _announce(server, port)  # once the signals are ours: a SIGTERM from now on drains
            if announce is not None:
                announce(port)
            host = server.config.server.listen.rpartition(":")[0]
            for module in wasm:
                from spear_rt.hostcalls.cli import run_in_server

                tg.start_soon(run_in_server, server, Path(module), host, port)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reload(server)
                elif draining:
                    print("spear-rt: second signal: exiting now", file=sys.stderr)
                    exit_code = 128 + int(signum)  # 130 for SIGINT, 143 for SIGTERM
                    tg.cancel_scope.cancel()
                else:
                    draining = True
                    tg.start_soon(drain_then_stop, signal.Signals(signum).name)
    return exit_code


def _announce(server: Server, port: int) -> None:
    """The start-up lines: each backend's state, then where the server listens."""
    for inst in server.registry.instances.values():
        state = "ready" if inst.unavailable is None else f"unavailable ({inst.unavailable})"
        print(f"spear-rt: backend {inst.name} [{inst.config.kind}] {state}", file=sys.stderr)
    host = server.config.server.listen.rpartition(":")[0]
    scheme = "https" if server.ssl_context is not None else "http"
    print(
        f"spear-rt: listening on {scheme}://{host}:{port} (config: {server.config.source})",
        file=sys.stderr,
    )


def _reload(server: Server) -> None:
    """SIGHUP: reload the config file, or keep the old one and say why."""
    try:
        summary = server.reload()
    except ConfigError as exc:
        print(f"spear-rt: reload refused, keeping the old config: {exc}", file=sys.stderr)
    else:
        print(f"spear-rt: reloaded {summary['config']}: {summary['backends']}", file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    code = 0

    missing = [m for m in args.wasm if not Path(m).is_file()]
    if missing:
        print(f"spear-rt: serve: no such module: {missing[0]}", file=sys.stderr)
        return 2
    from spear_rt.cluster.workers import supervise, worker_count

    try:
        workers = worker_count(args.workers)
    except ValueError:
        print(f"spear-rt: serve: --workers takes a number or auto, not {args.workers!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if workers > 1 and args.worker is None:
        serve_args = ["--loop", args.loop, *(["--config", args.config] if args.config else [])]
        common = ["-v"] if args.verbose else []
        return supervise(config, workers, common, serve_args, args.wasm)

    async def main() -> None:
        nonlocal code
        # `kill -USR1 <pid>`: every thread's stack on stderr, for a server that seems stuck
        # (registered once the loop runs: uvloop resets signal handlers when it starts)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        code = await serve(config, config_path=args.config, wasm=args.wasm, worker=args.worker)

    run_on_loop(args.loop, main)
    return code


def _cmd_stream(args: argparse.Namespace) -> int:
    from spear_rt.client.stream import stream_file_cli

    return stream_file_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from spear_rt.client.demo import demo_cli

    return demo_cli(args)


def _cmd_talk(args: argparse.Namespace) -> int:
    from spear_rt.client.talk import talk_cli

    return talk_cli(args)


def _cmd_demo_voice(args: argparse.Namespace) -> int:
    from spear_rt.client.talk_demo import demo_voice_cli

    return demo_voice_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="spear-rt", description="spear_rt realtime voice gateway")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--config", help="TOML config file (default: the embedded default)")
    p.add_argument("--listen", help="HOST:PORT to bind (overrides the config)")
    p.add_argument("--loop", choices=LOOPS, default=DEFAULT_LOOP, help="event loop")
    p.add_argument(
        "--wasm",
        action="append",
        default=[],
        metavar="MODULE",
        help="run this WASM guest inside the server (repeatable); its user streams are served",
    )
    p.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="serving processes on the one port (SO_REUSEPORT; auto: one per core; default 1)",
    )
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a child of --workers
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "stream", help="stream an audio file to a server and print the live transcript"
    )
    p.add_argument(
        "file", help="any format soundfile reads (wav, flac, ogg, mp3), or .raw s16le 16 kHz"
    )
    p.add_argument("--url", default="ws://127.0.0.1:8787/v1/realtime?intent=transcription")
    p.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    p.add_argument(
        "--vad", action="store_true", help="let server VAD split turns (default: one manual commit)"
    )
    p.add_argument("--key", help="client key (default: $SPEAR_RT_CLIENT_KEY)")
    p.add_argument("--json", action="store_true", help="print every server event as JSON lines")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="end instead of resuming the session when the connection drops",
    )
    p.set_defaults(func=_cmd_stream)

    p = sub.add_parser(
        "demo", help="start a server on the embedded default and stream the fixtures through it"
    )
    p.add_argument("--loop", choices=LOOPS, default=DEFAULT_LOOP)
    p.add_argument(
        "--pace",
        choices=("realtime", "fast"),
        default="realtime",
        help="realtime: 20 ms frames every 20 ms, like a microphone (default)",
    )
    p.add_argument("files", nargs="*", help="audio files (default: fixtures/audio speech clips)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "talk", help="talk to a server: each audio file is a spoken turn; prints and saves answers"
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="audio files (any format soundfile reads)"
    )
    p.add_argument(
        "--url", default="ws://127.0.0.1:8787", help="server; /v1/realtime is added to a bare URL"
    )
    p.add_argument("--model", default="gpt-realtime", help="the session's model (?model=)")
    p.add_argument("--out", default=".", metavar="DIR", help="where answer-N.wav files go")
    p.add_argument("--instructions", metavar="TEXT", help="the assistant's instructions")
    p.add_argument("--voice", metavar="V", help="the assistant's voice")
    p.add_argument("--text-only", action="store_true", help="answers in text only (no audio)")
    p.add_argument("--fast", action="store_true", help="send audio as fast as the socket takes it")
    p.add_argument("--key", help="client key (default: $SPEAR_RT_CLIENT_KEY)")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="end instead of resuming the session when the connection drops",
    )
    p.set_defaults(func=_cmd_talk)

    p = sub.add_parser(
        "demo-voice", help="start a server on the embedded default and talk to it with fixtures"
    )
    p.add_argument("--loop", choices=LOOPS, default=DEFAULT_LOOP)
    p.add_argument("--fast", action="store_true", help="send audio faster than real time")
    p.add_argument("--out", metavar="DIR", help="where answer-N.wav go (default: a new temp dir)")
    p.add_argument("files", nargs="*", help="audio files (default: three speech fixtures)")
    p.set_defaults(func=_cmd_demo_voice)

    from spear_rt.hostcalls.cli import add_parser as add_run_wasm_parser

    add_run_wasm_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spear-rt` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redactor()  # upstream keys never reach a log line
    try:
        try:
            return int(args.func(args))
        except BaseExceptionGroup as group:
            raise _only_error(group) from None
    except ConfigError as exc:
        print(f"spear-rt: config error: {exc}", file=sys.stderr)
        return 2
    except SpearError as exc:
        print(f"spear-rt: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _only_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group wrapped (a failed start), else the group itself."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    single = len(leaves) == 1 and isinstance(leaves[0], (SpearError, KeyboardInterrupt))
    return leaves[0] if single else group


if __name__ == "__main__":
    sys.exit(main())
