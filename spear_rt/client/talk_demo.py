"""`spear-rt demo-voice`: start a server in-process and talk to it with speech fixtures.

Like `spear-rt demo` (demo.py), the server runs on an ephemeral loopback port in this process,
on the embedded default config: pocketsphinx hears, the configured chat answers (the stub,
whose replies start "stub:", when no local chat model is installed) and espeak-ng speaks.
`talk` (talk.py) then speaks a few short fixtures as user turns and prints, for each turn, what
was heard, what the assistant said and the latencies, voice to voice included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import anyio

from spear_rt.client.demo import fixture_dir
from spear_rt.client.stream import Pace
from spear_rt.client.talk import TalkOptions, answers_dir, load_speech, talk, talk_status
from spear_rt.config import Config, load_config
from spear_rt.errors import SpearError
from spear_rt.server.app import Server

__all__ = ["DEMO_FIXTURES", "demo_voice", "demo_voice_cli"]

# short single-utterance clips the default recognizer gets (nearly) right
DEMO_FIXTURES = ("speech_open_window.wav", "speech_go_forward.wav", "speech_phone_number.wav")


def _demo_files(files: list[str]) -> list[str]:
    if files:
        return files
    folder = fixture_dir()
    paths = [folder / name for name in DEMO_FIXTURES]
    if not all(p.is_file() for p in paths):
        raise SpearError(
            f"no fixtures at {folder} (not a source checkout): give audio files to speak"
        )
    return [str(p) for p in paths]


async def demo_voice(
    config: Config,
    files: list[str],
    *,
    pace: Pace = "realtime",
    out_dir: Path | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Serve `config` on an ephemeral loopback port and talk to it; the exit status."""
    speech = load_speech(_demo_files(files))  # unreadable files fail before anything starts
    folder = answers_dir(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="spear-rt-voice-"))
    config.server.listen = "127.0.0.1:0"
    key = next((v for env in config.server.client_keys_env if (v := os.environ.get(env))), None)
    server = Server(config)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        out.write(
            f"spear-rt demo-voice: server on 127.0.0.1:{port} ({config.source}); pace {pace}; "
            f"answers in {folder}\n"
        )
        out.flush()
        url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        turns = await talk(
            url,
            speech,
            options=TalkOptions(pace=pace),
            out_dir=folder,
            key=key,
            out=out,
            err=err,
        )
        tg.cancel_scope.cancel()
    return talk_status(turns, [s.name for s in speech])


def demo_voice_cli(args: argparse.Namespace) -> int:
    """`spear-rt demo-voice`: run `demo_voice` on the embedded default and the chosen loop."""
    from spear_rt.cli import run_on_loop

    config = load_config(None)
    status = 1
    pace: Pace = "fast" if args.fast else "realtime"

    async def main() -> None:
        nonlocal status
        status = await demo_voice(
            config, list(args.files), pace=pace, out_dir=Path(args.out) if args.out else None
        )

    run_on_loop(args.loop, main)
    return status
