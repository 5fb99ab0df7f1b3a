"""`spear-rt talk FILE...`: a spoken conversation with a realtime server, from audio files.

One GA conversation session (``/v1/realtime?model=M``) whose server VAD answers each turn it
ends (``create_response``). Each file, converted once to 24 kHz pcm16 mono, is streamed as the
user's turn in 20 ms frames (on the clock, or ``--fast``), then a second of silence so the VAD
ends the turn; the next file waits until the answer is done. Printed live: what was heard, the
answer's text as it streams and, per turn, the seconds from the end of speech (the client's
``speech_stopped``) to the final transcript, to the first answer text, to the first answer
audio (voice to voice) and to ``response.done``. Each answer's audio is written to
``DIR/answer-N.wav``; a table ends the run. The bookkeeping is sans-I/O (talk_turns.py), the
printing in talk_print.py.

The end of a file is a barrier, not a timer: after its silence the client sends a
``session.update`` that changes nothing, whose ``session.updated`` comes after every VAD event
of the audio before it. A turn the VAD left open is then committed by hand (with
``response.create``), and a file without speech is reported instead of waited on.

A dropped socket is resumed by `ResumingClient`, as in ``spear-rt stream``: no event is seen
twice and an answer's audio is whole. Every failure (no server, unreadable file, an ``error``
event, a close) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TextIO
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.client.realtime import ConnectError, ConnectionClosed
from spear_rt.client.resume import with_query
from spear_rt.client.resuming import ResumePolicy, ResumingClient
from spear_rt.client.stream import (
    KEY_ENV,
    RATE_HZ,
    TRAILING_SILENCE_MS,
    EventCallback,
    Pace,
    _announce_backend,
    _one_error,
    _stream_frames,
    load_pcm24k,
)
from spear_rt.client.talk_print import TalkPrinter
from spear_rt.client.talk_turns import TalkBook, Turn
from spear_rt.errors import SpearError

__all__ = [
    "Speech",
    "TalkOptions",
    "realtime_url",
    "session_update",
    "talk",
    "talk_cli",
    "talk_status",
]

DEFAULT_MODEL = "gpt-realtime"
_BARRIER = {"type": "session.update", "session": {"type": "realtime"}}  # changes nothing


class Speech(NamedTuple):
    """One file's audio to speak: its name and 24 kHz pcm16 mono samples."""

    name: str
    pcm: NDArray[np.int16]


class TalkOptions(msgspec.Struct, frozen=True):
    """How the session answers, and how fast the audio is sent."""

    instructions: str | None = None
    voice: str | None = None
    text_only: bool = False
    pace: Pace = "realtime"


def session_update(options: TalkOptions) -> dict[str, Any]:
    """The GA `session.update` that opens the conversation: server VAD answering each turn."""
    audio: dict[str, Any] = {
        "input": {
            "format": {"type": "audio/pcm", "rate": RATE_HZ},
            "turn_detection": {"type": "server_vad", "create_response": True},
        }
    }
    if options.voice:
        audio["output"] = {"voice": options.voice}
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["text"] if options.text_only else ["audio"],
        "audio": audio,
    }
    if options.instructions:
        session["instructions"] = options.instructions
    return {"type": "session.update", "session": session}


def realtime_url(base: str, model: str = DEFAULT_MODEL) -> str:
    """`base` (``ws://host:port``, any path) as a conversation URL: /v1/realtime, ?model=."""
    parts = urlsplit(base)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/v1/realtime")
    url = urlunsplit(parts)
    if any(name == "model" for name, _ in parse_qsl(parts.query)):
        return url
    return with_query(url, {"model": model})


# --- the session ------------------------------------------------------------------------------


class _Changed:
    """Wakes the one task waiting for the book to change."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()
            self._event = anyio.Event()


async def _receive(
    client: ResumingClient,
    book: TalkBook,
    changed: _Changed,
    printer: TalkPrinter,
    on_event: EventCallback,
) -> None:
    while True:
        event = await client.receive()
        on_event(event)
        printer(book.feed(event, anyio.current_time()))
        changed.set()


async def _converse(
    client: ResumingClient,
    book: TalkBook,
    changed: _Changed,
    printer: TalkPrinter,
    speech: Sequence[Speech],
    options: TalkOptions,
) -> None:
    await client.send(session_update(options))
    await changed.wait_until(lambda: book.updates >= 1)
    silence = np.zeros(RATE_HZ * TRAILING_SILENCE_MS // 1000, np.int16)
    for index, clip in enumerate(speech, 1):
        book.begin_file(clip.name)
        printer.file_started(index, len(speech), clip.name, len(clip.pcm) / RATE_HZ)
        await _stream_frames(client, clip.pcm, options.pace)
        await _stream_frames(client, silence, options.pace)
        barrier = book.updates + 1
        await client.send(_BARRIER)
        await changed.wait_until(partial(book.passed, barrier))
        if book.open_item is not None:  # the VAD has not ended it: end it by hand
            book.manual_commit(anyio.current_time())
            await client.commit()
            await client.send({"type": "response.create"})
        await changed.wait_until(partial(book.file_settled, barrier))
        if not book.file_turns():
            printer.no_speech()


async def talk(
    url: str,
    speech: Sequence[Speech],
    *,
    options: TalkOptions = TalkOptions(),  # noqa: B008 (frozen)
    out_dir: Path | None = None,
    key: str | None = None,
    resume: ResumePolicy | None = ResumePolicy(),  # noqa: B008 (frozen)
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    on_event: EventCallback | None = None,
) -> list[Turn]:
    """Speak each file as a user turn in one conversation session; every turn, in order.

    Prints live to `out` (and the table at the end); answers' audio goes to
    `out_dir`/answer-N.wav (None: not written). An `error` event raises `ServerError`; a
    dropped socket is resumed per `resume` (None: the drop is an error), and `on_event` sees
    `spear.session.resumed` but no event twice.
    """
    book, changed, printer = TalkBook(), _Changed(), TalkPrinter(out, out_dir)
    announce = _announce_backend(err)

    def seen(event: dict[str, Any]) -> None:
        announce(event)
        if on_event is not None:
            on_event(event)

    with _one_error():
        async with ResumingClient.connect(url, key=key, beta=False, policy=resume) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_receive, client, book, changed, printer, seen)
                try:
                    await _converse(client, book, changed, printer, speech, options)
                except ConnectionClosed:
                    # The receiver reports why: the server's error event or its close frame.
                    await anyio.sleep_forever()
                tg.cancel_scope.cancel()
    printer.summary(book, [s.name for s in speech])
    return book.turns


def talk_status(turns: Sequence[Turn], files: Sequence[str]) -> int:
    """0 if every file got a completed answer, else 1."""
    answered = {t.file for t in turns if t.answered and t.status == "completed"}
    return 0 if all(f in answered for f in files) else 1


# --- the command ------------------------------------------------------------------------------


def load_speech(files: Sequence[str | os.PathLike[str]]) -> list[Speech]:
    """Every file as 24 kHz pcm16 mono, named by its file name (raises AudioFormatError)."""
    return [Speech(Path(f).name, load_pcm24k(f)) for f in files]


def answers_dir(path: str | os.PathLike[str]) -> Path:
    """The folder for the answers' WAVs, made if missing (raises SpearError)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpearError(f"cannot write answers to {folder}: {exc.strerror or exc}") from None
    return folder


def talk_cli(args: argparse.Namespace) -> int:
    """`spear-rt talk FILE...`: 0 if every file was answered, 1 if not, 2 on an error."""
    key = args.key or os.environ.get(KEY_ENV) or None
    url = realtime_url(args.url, args.model)
    options = TalkOptions(
        instructions=args.instructions,
        voice=args.voice,
        text_only=args.text_only,
        pace="fast" if args.fast else "realtime",
    )
    try:
        speech = load_speech(args.files)
        out_dir = None if args.text_only else answers_dir(args.out)
        run = partial(
            talk,
            url,
            speech,
            options=options,
            out_dir=out_dir,
            key=key,
            resume=None if args.no_resume else ResumePolicy(),
        )
        turns = anyio.run(run, backend="trio")
    except ConnectError as exc:
        print(f"spear-rt: {exc} (is `spear-rt serve` running?)", file=sys.stderr)
        return 2
    except SpearError as exc:
        print(f"spear-rt: {exc}", file=sys.stderr)
        return 2
    return talk_status(turns, [s.name for s in speech])
