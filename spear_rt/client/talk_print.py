"""What `spear-rt talk` prints: live lines per turn, the answers' WAVs, the summary table.

`TalkPrinter` is called with the `Note`s of each server event (talk_turns.py). A turn's heard
and answer lines grow with their deltas; a line another line interrupted is shown again with
what it held. Latencies are seconds from the end of the user's speech (`Turn.ended_at`).
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from spear_rt.client.stream import RATE_HZ
from spear_rt.client.talk_turns import (
    AnswerDelta,
    Answered,
    Heard,
    HeardDelta,
    Note,
    TalkBook,
    Turn,
    Unanswered,
)
from spear_rt.errors import SpearError

__all__ = ["TalkPrinter", "write_wav"]

HEARD = "  heard:     "
ANSWER = "  assistant: "


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def write_wav(path: Path, pcm16: bytes, rate_hz: int = RATE_HZ) -> None:
    """Write mono pcm16 little-endian bytes as a WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate_hz)
        wav.writeframes(pcm16[: len(pcm16) // 2 * 2])


class TalkPrinter:
    """Shows the notes of a `TalkBook` as they come, writes the answers' WAVs, and the table."""

    def __init__(self, out: TextIO, out_dir: Path | None) -> None:
        self._out = out
        self._dir = out_dir
        self._line: tuple[str, int] | None = None  # (prefix, turn number) of the open line
        self._shown: dict[tuple[str, int], str] = {}
        self.wavs: dict[int, Path] = {}

    def file_started(self, index: int, count: int, name: str, seconds: float) -> None:
        """File `index` of `count` starts going out."""
        self._end_line()
        self._write(f"\n[{index}/{count}] {name} ({seconds:.1f} s)\n")

    def no_speech(self) -> None:
        """The file ended with no turn: the VAD heard no speech."""
        self._end_line()
        self._write(f"{HEARD}(no speech detected: nothing to answer)\n")

    def __call__(self, notes: list[Note]) -> None:
        """Show what one server event brought."""
        for note in notes:
            match note:
                case HeardDelta(turn=turn, delta=delta):
                    self._more(HEARD, turn, delta)
                case Heard(turn=turn) if turn.heard_failed is not None:
                    self._finish(HEARD, turn, f"[transcription failed: {turn.heard_failed}]")
                case Heard(turn=turn):
                    self._finish(HEARD, turn, turn.heard or "(nothing)")
                case AnswerDelta(turn=turn, delta=delta):
                    self._more(ANSWER, turn, delta)
                case Unanswered(turn=turn):
                    self._finish(ANSWER, turn, "(no answer: nothing was heard)")
                case Answered(turn=turn):
                    self._answered(turn)

    def _answered(self, turn: Turn) -> None:
        text = turn.answer or "(no text)"
        if turn.status != "completed":
            text += f"  [{turn.status}{': ' + turn.reason if turn.reason else ''}]"
        self._finish(ANSWER, turn, text)
        saved = ""
        if turn.audio and self._dir is not None:
            path = self._dir / f"answer-{turn.number}.wav"
            try:
                write_wav(path, bytes(turn.audio))
            except OSError as exc:
                raise SpearError(f"cannot write {path}: {exc.strerror or exc}") from None
            self.wavs[turn.number] = path
            saved = f"; answer {len(turn.audio) / 2 / RATE_HZ:.1f} s -> {path}"
        self._write(
            f"  latency:   heard {_secs(turn.since_end(turn.heard_at))}, first text "
            f"{_secs(turn.since_end(turn.first_text_at))}, voice-to-voice "
            f"{_secs(turn.since_end(turn.first_audio_at))}, total "
            f"{_secs(turn.since_end(turn.done_at))}{saved}\n"
        )

    def summary(self, book: TalkBook, files: Sequence[str]) -> None:
        """The table of every turn, and who answered."""
        self._end_line()
        turns = book.turns
        answered = [t for t in turns if t.answered]
        v2v = [v for t in answered if (v := t.since_end(t.first_audio_at)) is not None]
        line = f"\nsummary: {len(turns)} turn{'s' * (len(turns) != 1)} from {len(files)} file"
        line += f"{'s' * (len(files) != 1)}, {len(answered)} answered"
        if v2v:
            line += (
                f"; voice-to-voice mean {sum(v2v) / len(v2v):.2f} s "
                f"(min {min(v2v):.2f} s, max {max(v2v):.2f} s)"
            )
        rows: list[tuple[str, ...]] = [
            ("turn", "file", "heard", "first text", "voice-to-voice", "total", "answer")
        ]
        for name in dict.fromkeys(files):
            mine = [t for t in turns if t.file == name]
            for i, t in enumerate(mine):
                later = next((u for u in mine[i + 1 :] if u.answered), None)
                merged = later is not None and not t.answered and t.expects_answer
                note = f"answered with turn {later.number}" if later and merged else ""
                rows.append(self._row(t, note))
            if not mine:
                rows.append(("-", name, "-", "-", "-", "-", "no speech detected"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        self._write(line + "\n")
        for r in rows:
            cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:6], widths[2:6], strict=True)] + [r[6]]
            self._write("  " + "  ".join(cells).rstrip() + "\n")
        served = next((t.served_by for t in reversed(answered) if t.served_by), None)
        if served and "chat" in served:
            stub = " (deterministic stub, not a model)" if served.get("chat_stub") else ""
            speech = f", speech {served['speech']}" if "speech" in served else ""
            self._write(f"answered by chat {served['chat']}{stub}{speech}\n")

    def _row(self, t: Turn, note: str) -> tuple[str, ...]:
        audio = f"{len(t.audio) / 2 / RATE_HZ:.1f} s" if t.audio else (note or "-")
        wav = self.wavs.get(t.number)
        status = "" if t.status in (None, "completed") else f" ({t.status})"
        return (
            str(t.number),
            t.file,
            _secs(t.since_end(t.heard_at)),
            _secs(t.since_end(t.first_text_at)),
            _secs(t.since_end(t.first_audio_at)),
            _secs(t.since_end(t.done_at)),
            audio + (f" {wav.name}" if wav else "") + status,
        )

    def _more(self, prefix: str, turn: Turn, delta: str) -> None:
        key = (prefix, turn.number)
        self._open(key)
        self._shown[key] = self._shown.get(key, "") + delta
        self._write(delta)

    def _finish(self, prefix: str, turn: Turn, text: str) -> None:
        key = (prefix, turn.number)
        self._open(key)
        shown = self._shown.pop(key, "")
        if text.startswith(shown):
            self._write(text[len(shown) :] + "\n")
        else:  # the final text is not what the deltas said: give it in full
            self._write(f"\n{prefix}{text}\n")
        self._line = None

    def _open(self, key: tuple[str, int]) -> None:
        if self._line == key:
            return
        self._end_line()
        self._line = key
        self._write(key[0] + self._shown.get(key, ""))

    def _end_line(self) -> None:
        if self._line is not None:
            self._write("\n")
            self._line = None

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
