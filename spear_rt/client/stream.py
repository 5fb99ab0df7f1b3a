"""Streaming audio to a realtime server: `transcribe`, and the `spear-rt stream FILE` command.

`transcribe` streams one 24 kHz pcm16 signal in 20 ms frames over a `RealtimeClient` and
collects every item's transcript. The sender and the receiver are two tasks; what the server
has said so far lives in `_Progress`, fed every event, which the sender waits on.

A socket that drops mid-session is resumed (`spear_rt.client.resuming`): the transcripts are
those of an unbroken run, and no event reaches `on_event` twice.

The command converts any file soundfile reads, once, at the edge, to 24 kHz pcm16 mono (what
the realtime protocol's ``pcm16`` means). Deltas are written on one line as they arrive and the
line ends at ``completed``; ``--json`` prints every server event as one JSON line instead. An
unreadable file or an unreachable server is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO

import anyio
import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.audio import load_audio, resample
from spear_rt.client.realtime import ConnectionClosed, ServerError
from spear_rt.client.resuming import ResumePolicy, ResumingClient
from spear_rt.errors import SpearError

__all__ = [
    "JsonPrinter",
    "LivePrinter",
    "Transcript",
    "load_pcm24k",
    "stream_file",
    "stream_file_cli",
    "transcribe",
]

KEY_ENV = "SPEAR_RT_CLIENT_KEY"
RATE_HZ = 24000
FRAME_MS = 20
TRAILING_SILENCE_MS = 1000  # lets server VAD close a turn that runs to the end of the audio
Pace = Literal["realtime", "fast"]
EventCallback = Callable[[dict[str, Any]], None]


class Transcript(msgspec.Struct):
    """One committed item's result; times are event-loop times at the client."""

    item_id: str
    text: str
    deltas: str  # concatenation of the item's deltas, as they arrived
    committed_at: float
    completed_at: float
    failed: str | None = None

    @property
    def latency_s(self) -> float:
        """Seconds from the item's commit to its final transcript."""
        return self.completed_at - self.committed_at


class _Progress:
    """What the server has told us so far (fed every event; no I/O)."""

    def __init__(self) -> None:
        self.updated = 0  # transcription_session.updated (or session.updated) answers
        self.committed: list[str] = []
        self.open_turn: str | None = None  # speech started, not committed yet
        self.deltas: dict[str, list[str]] = {}
        self.committed_at: dict[str, float] = {}
        self.done: dict[str, Transcript] = {}
        self._changed = anyio.Event()

    def feed(self, event: dict[str, Any], now: float) -> None:
        """Take in one server event; an `error` event raises `ServerError`."""
        match event:
            case {"type": "error", "error": dict(error)}:
                raise ServerError(error)
            case {"type": "transcription_session.updated" | "session.updated"}:
                self.updated += 1
            case {"type": "input_audio_buffer.speech_started", "item_id": str(item_id)}:
                self.open_turn = item_id
            case {"type": "input_audio_buffer.committed", "item_id": str(item_id)}:
                self.committed.append(item_id)
                self.committed_at[item_id] = now
                self.open_turn = None
            case {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": str(item_id),
            }:
                self.deltas.setdefault(item_id, []).append(str(event.get("delta", "")))
            case {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": str(item_id),
            }:
                self._finish(item_id, str(event.get("transcript", "")), None, now)
            case {
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": str(item_id),
            }:
                body = event.get("error")
                message = str(body.get("message", body)) if isinstance(body, dict) else "failed"
                self._finish(item_id, "", message, now)
            case _:
                return
        self._changed.set()

    def _finish(self, item_id: str, text: str, failed: str | None, now: float) -> None:
        deltas = "".join(self.deltas.get(item_id, ()))
        committed_at = self.committed_at.get(item_id, now)
        self.done[item_id] = Transcript(item_id, text, deltas, committed_at, now, failed)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds (re-checked after every event)."""
        while not condition():
            await self._changed.wait()
            self._changed = anyio.Event()

    def settled(self, expected_commits: int) -> bool:
        """At least `expected_commits` items committed, and every committed item finished."""
        return len(self.committed) >= expected_commits and all(
            i in self.done for i in self.committed
        )

    def transcripts(self) -> list[Transcript]:
        """Finished items in commit order."""
        return [self.done[i] for i in self.committed if i in self.done]


def _session_update(vad: bool) -> dict[str, Any]:
    session: dict[str, Any] = {"input_audio_format": "pcm16", "turn_detection": None}
    if vad:
        session["turn_detection"] = {"type": "server_vad"}
    else:  # a live transcript of a manual turn: its words before the commit announces the item
        session["spear"] = {"early_deltas": True}
    return {"type": "transcription_session.update", "session": session}


async def _stream_frames(client: ResumingClient, pcm: NDArray[np.int16], pace: Pace) -> None:
    """Send `pcm` in 20 ms frames: on the clock (realtime) or as fast as the socket takes them."""
    size = RATE_HZ * FRAME_MS // 1000
    start = anyio.current_time()
    for n, offset in enumerate(range(0, len(pcm), size)):
        if pace == "realtime":
            await anyio.sleep_until(start + n * FRAME_MS / 1000)
        await client.send_audio(pcm[offset : offset + size].astype("<i2").tobytes())


async def _receive_all(
    client: ResumingClient, progress: _Progress, on_event: EventCallback | None
) -> None:
    while True:
        event = await client.receive()
        if on_event is not None:
            on_event(event)
        progress.feed(event, anyio.current_time())


async def _drive(
    client: ResumingClient, progress: _Progress, pcm: NDArray[np.int16], pace: Pace, vad: bool
) -> None:
    await client.send(_session_update(vad))
    await _stream_frames(client, pcm, pace)
    if not vad:
        if len(pcm):
            await client.commit()
        await progress.wait_until(lambda: progress.settled(1 if len(pcm) else 0))
        return
    await _stream_frames(client, np.zeros(RATE_HZ * TRAILING_SILENCE_MS // 1000, np.int16), pace)
    # Barrier: the answer to this update comes after every VAD event of the audio above, and
    # with turn detection off a turn the VAD left open can be committed by hand.
    await client.send(_session_update(False))
    await progress.wait_until(lambda: progress.updated >= 2)
    expected = len(progress.committed)
    if progress.open_turn is not None:
        await client.commit()
        expected += 1
    await progress.wait_until(lambda: progress.settled(expected))


async def transcribe(
    url: str,
    pcm16_24k: NDArray[np.int16],
    *,
    pace: Pace = "realtime",
    vad: bool = False,
    on_event: EventCallback | None = None,
    key: str | None = None,
    resume: ResumePolicy | None = ResumePolicy(),  # noqa: B008 (frozen)
) -> list[Transcript]:
    """Stream 24 kHz pcm16 mono to a transcription session; every item's transcript, in order.

    Manual mode commits once at the end; VAD mode lets the server split turns, sends a second
    of trailing silence and commits a turn still open. An `error` event raises `ServerError`.
    A socket that drops mid-session is resumed per `resume` (None: the drop is an error), and
    `on_event` sees `spear.session.resumed` but no event twice.
    """
    progress = _Progress()
    with _one_error():
        async with ResumingClient.connect(url, key=key, beta=True, policy=resume) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_receive_all, client, progress, on_event)
                try:
                    await _drive(client, progress, pcm16_24k, pace, vad)
                except ConnectionClosed:
                    # The receiver reports why: the server's error event or its close frame.
                    await anyio.sleep_forever()
                tg.cancel_scope.cancel()
    return progress.transcripts()


@contextmanager
def _one_error() -> Iterator[None]:
    """Unwrap a task group's exception group holding a single error."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


# --- the command --------------------------------------------------------------------------


def load_pcm24k(path: str | os.PathLike[str]) -> NDArray[np.int16]:
    """Read any audio file as 24 kHz pcm16 mono (raises AudioFormatError)."""
    pcm, rate_hz = load_audio(path)
    return resample(pcm, rate_hz, RATE_HZ)


class LivePrinter:
    """Writes transcript deltas on one line as they arrive; ends the line at completed."""

    def __init__(self, out: TextIO, prefix: str = "") -> None:
        self._out = out
        self._prefix = prefix
        self._current: str | None = None  # item whose line is open
        self._printed: dict[str, str] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        """Handle one server event (others are ignored)."""
        match event:
            case {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": str(item),
                "delta": str(delta),
            }:
                self._open(item)
                self._printed[item] = self._printed.get(item, "") + delta
                self._write(delta)
            case {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": str(item),
                "transcript": str(text),
            }:
                self._open(item)
                printed = self._printed.pop(item, "")
                if text.startswith(printed):
                    self._write(text[len(printed) :] + "\n")
                else:  # the final text revised what was shown: give it in full
                    self._write(f"\n{self._prefix}{text}\n")
                self._current = None
            case {
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": str(item),
            }:
                self._open(item)
                self._printed.pop(item, None)
                self._write(f"[transcription failed: {_failure(event)}]\n")
                self._current = None

    def _open(self, item: str) -> None:
        if self._current == item:
            return
        if self._current is not None:
            self._write("\n")
        self._current = item
        self._write(self._prefix + self._printed.get(item, ""))

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _failure(event: dict[str, Any]) -> str:
    error = event.get("error")
    return str(error.get("message", error)) if isinstance(error, dict) else "unknown error"


class JsonPrinter:
    """Writes every server event as one JSON line."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        """Print one event."""
        self._out.write(msgspec.json.encode(event).decode() + "\n")
        self._out.flush()


def _announce_backend(err: TextIO) -> EventCallback:
    """A callback that names the serving backend from session.created (spear extension)."""

    def on_event(event: dict[str, Any]) -> None:
        match event:
            case {
                "type": "transcription_session.created" | "session.created",
                "spear": {"backend": str(name)},
            }:
                kind = event["spear"].get("kind", "?")
                print(f"spear-rt: session served by backend {name} [{kind}]", file=err, flush=True)
            case {"type": "spear.session.resumed", "last_seq": int(seq)}:
                print(
                    f"spear-rt: connection dropped; resumed after event {seq}", file=err, flush=True
                )

    return on_event


def _chain(*callbacks: EventCallback) -> EventCallback:
    def on_event(event: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(event)

    return on_event


async def stream_file(
    url: str,
    pcm: NDArray[np.int16],
    *,
    pace: Pace,
    vad: bool,
    key: str | None,
    json_lines: bool,
    out: TextIO,
    err: TextIO,
    resume: bool = True,
) -> list[Transcript]:
    """Stream 24 kHz pcm16 to `url`, printing live (text or JSON lines); the transcripts."""
    on_event = JsonPrinter(out) if json_lines else _chain(_announce_backend(err), LivePrinter(out))
    policy = ResumePolicy() if resume else None
    return await transcribe(url, pcm, pace=pace, vad=vad, on_event=on_event, key=key, resume=policy)


def stream_file_cli(args: argparse.Namespace) -> int:
    """`spear-rt stream FILE`: 0 on success, 1 if an item failed, 2 on a usage/connection error."""
    key = args.key or os.environ.get(KEY_ENV) or None
    try:
        pcm = load_pcm24k(Path(args.file))
        run = partial(
            stream_file,
            args.url,
            pcm,
            pace=args.pace,
            vad=args.vad,
            key=key,
            json_lines=args.json,
            out=sys.stdout,
            err=sys.stderr,
            resume=not args.no_resume,
        )
        transcripts = anyio.run(run, backend="trio")
    except SpearError as exc:
        print(f"spear-rt: {exc}", file=sys.stderr)
        return 2
    if not args.json and not transcripts:
        print("spear-rt: no speech was transcribed", file=sys.stderr)
    return 1 if any(t.failed for t in transcripts) else 0
