"""Cutting streamed text into sentences for speech, as early as a sentence is complete.

Rule: a sentence ends after `.`, `!`, `?` or `;` (any closing quotes or brackets included)
followed by whitespace, or at a newline; a run longer than `max_chars` is cut at its last
space (or hard at `max_chars`). Every piece is an exact slice of the text fed, so the pieces
concatenate back to it: the responder tracks how much of the transcript each piece covers.
"""

from __future__ import annotations

import re

_END = re.compile(r"[.!?;][\"')\]]*\s+|\n+")


class SentenceCutter:
    """Feed text deltas, get complete sentences; `flush` returns the rest."""

    def __init__(self, max_chars: int = 240) -> None:
        self._pending = ""
        self._max = max_chars

    def feed(self, text: str) -> list[str]:
        """The sentences `text` completes (possibly none)."""
        self._pending += text
        out: list[str] = []
        while True:
            match = _END.search(self._pending)
            if match is not None and match.end() <= self._max:
                cut = match.end()
            elif len(self._pending) > self._max:
                space = self._pending.rfind(" ", 0, self._max)
                cut = space + 1 if space > 0 else self._max
            else:
                return out
            out.append(self._pending[:cut])
            self._pending = self._pending[cut:]

    def flush(self) -> str:
        """What is left (the last sentence, without its end)."""
        rest, self._pending = self._pending, ""
        return rest
