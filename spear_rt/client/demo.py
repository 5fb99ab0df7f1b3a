"""`spear-rt demo`: start a server in-process, stream speech clips through it, score them.

With no file arguments the clips are the speech fixtures of the source tree
(``fixtures/audio/manifest.json``), each with its reference transcript; the demo prints the live
transcript, the reference, the word error rate (normalized: `spear_rt.client.scoring`) and how
long the final transcript took after the commit. It says which backend serves transcription,
and says so plainly when that is the deterministic stub (its words are not a recognition, so
its WER means nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

import anyio
import msgspec
import numpy as np
from numpy.typing import NDArray

import spear_rt
from spear_rt.client.scoring import normalized_wer
from spear_rt.client.stream import RATE_HZ, LivePrinter, Pace, load_pcm24k, transcribe
from spear_rt.config import Config, load_config
from spear_rt.errors import SpearError
from spear_rt.protocol.settings import Dialect, SessionKind
from spear_rt.server.app import Server
from spear_rt.session.admission import ConnectRequest

__all__ = [
    "Clip",
    "demo",
    "demo_cli",
    "describe_transcription_backend",
    "fixture_dir",
]


class Clip(msgspec.Struct, frozen=True):
    """One audio file to stream, with its reference transcript when one is known."""

    path: Path
    reference: str | None = None


def fixture_dir() -> Path:
    """Where the speech fixtures live in a source checkout."""
    return Path(spear_rt.__file__).resolve().parent.parent / "fixtures" / "audio"


def fixture_clips(folder: Path) -> list[Clip]:
    """The speech clips of a fixtures folder's manifest, with their references."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return [
        Clip(folder / e["file"], e["transcript"]) for e in manifest if e.get("kind") == "speech"
    ]


def _clips(files: list[str]) -> list[Clip]:
    folder = fixture_dir()
    known: dict[str, str] = {}
    if (folder / "manifest.json").is_file():
        known = {c.path.name: c.reference or "" for c in fixture_clips(folder)}
    if not files:
        if not known:
            raise SpearError(
                f"no fixtures at {folder} (not a source checkout): give audio files to stream"
            )
        return fixture_clips(folder)
    return [Clip(Path(f), known.get(Path(f).name)) for f in files]


def describe_transcription_backend(server: Server) -> tuple[str, bool]:
    """(one line naming the instance the router picks for transcription, whether it is the stub).

    With no engine to pick, a configured stub that serves only when named is named (the
    demo then streams with ``backend=<its name>``) and the line says so.
    """
    request = ConnectRequest(kind=SessionKind.TRANSCRIPTION, dialect=Dialect.BETA)
    chosen, decision = server.router.explain(server.sessions.envelope(request))
    stubs = [i.name for i in server.registry.instances.values() if i.config.kind == "stub"]
    if chosen is None and stubs:
        named = ConnectRequest(
            kind=SessionKind.TRANSCRIPTION, dialect=Dialect.BETA, backend=stubs[0]
        )
        chosen, _ = server.router.explain(server.sessions.envelope(named))
    if chosen is None:
        raise SpearError(
            f"no backend can serve transcription: {decision.rejected_reasons or 'none configured'}"
        )
    if chosen.config.kind != "stub":
        return f"{chosen.name} (real {chosen.hosting} engine, kind {chosen.config.kind})", False
    # An instance whose kind did not load declares no operation, so the router never saw it.
    reasons = dict(decision.rejected_reasons)
    reasons.update(
        {i.name: i.unavailable for i in server.registry.instances.values() if i.unavailable}
    )
    why = (
        "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        or "no speech engine is configured"
    )
    return f"{chosen.name} (deterministic stub, not a recognizer: {why})", True


async def _run_clip(
    url: str, clip: Clip, pcm: NDArray[np.int16], pace: Pace, key: str | None, out: TextIO
) -> float | None:
    """Stream one clip, print its report; its WER (None without a reference)."""
    out.write(f"\n{clip.path.name} ({len(pcm) / RATE_HZ:.1f} s)\n")
    printer = LivePrinter(out, prefix="  heard:     ")
    transcripts = await transcribe(url, pcm, pace=pace, vad=False, on_event=printer, key=key)
    hypothesis = " ".join(t.text for t in transcripts if t.text)
    latency = f"{transcripts[-1].latency_s:.2f} s after commit" if transcripts else "no item"
    if clip.reference is None:
        out.write(f"  reference: (none)\n  completed {latency}\n")
        return None
    wer, edits, n = normalized_wer(clip.reference, hypothesis)
    out.write(
        f"  reference: {clip.reference}\n  WER {wer:.2f} ({edits}/{n} words), completed {latency}\n"
    )
    out.flush()
    return wer


async def demo(
    config: Config, files: list[str], *, pace: Pace = "fast", out: TextIO = sys.stdout
) -> int:
    """Serve `config` on an ephemeral loopback port and stream the clips through it; exit status."""
    clips = _clips(files)
    audio = [load_pcm24k(c.path) for c in clips]  # unreadable files fail before anything starts
    config.server.listen = "127.0.0.1:0"
    key = next((v for env in config.server.client_keys_env if (v := os.environ.get(env))), None)
    server = Server(config)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        line, is_stub = describe_transcription_backend(server)
        out.write(f"spear-rt demo: server on 127.0.0.1:{port} ({config.source}); pace {pace}\n")
        out.write(f"transcription backend: {line}\n")
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        if is_stub:  # named: a stub may serve only requests that name it
            url += "&backend=" + line.split(" ", 1)[0]
        scores = [
            await _run_clip(url, clip, pcm, pace, key, out)
            for clip, pcm in zip(clips, audio, strict=True)
        ]
        tg.cancel_scope.cancel()
    rated = [s for s in scores if s is not None]
    mean = f"mean WER {sum(rated) / len(rated):.2f}" if rated else "no references"
    note = " (stub backend: its words are not a recognition, WER is meaningless)" if is_stub else ""
    count = f"{len(clips)} file" + ("s" if len(clips) != 1 else "")
    out.write(f"\nsummary: {count}, {mean}{note}\n")
    out.flush()
    return 0


def demo_cli(args: argparse.Namespace) -> int:
    """`spear-rt demo`: run `demo` on the embedded default config and the chosen event loop."""
    from spear_rt.cli import run_on_loop

    config = load_config(None)
    status = 1

    async def main() -> None:
        nonlocal status
        status = await demo(config, list(args.files), pace=args.pace, out=sys.stdout)

    run_on_loop(args.loop, main)
    return status
