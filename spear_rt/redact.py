"""Secret redaction: upstream API keys never reach a client or a log line.

Redaction runs on the whole text *before* anything is cut to length (a cut first would
leave all but the cut-off part of a key), and matches case-insensitively (an upstream that
echoes the key upper-cased is caught too). Relayed bodies are redacted whole; a streamed
body through `StreamRedactor`, which holds back only a chunk's tail that could be the start
of a key, so a key split across two chunks is caught while an SSE event that ends in a
newline is passed on at once. Keys shorter than `MIN_BODY_SECRET` characters (placeholders
such as `ollama`) are not looked for in bodies, where they would mangle ordinary words;
they are still redacted from messages and logs.

`LogRedactor` is a logging filter that redacts every key registered with `register_secret`
from each record (message and traceback) reaching the handlers it is installed on.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

import anyio.lowlevel

MASK = "***"
MIN_BODY_SECRET = 8
SLICE_BYTES = 1 << 20  # a large body is scanned in slices, yielding to the loop between


def _pattern(secrets: list[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    alternatives = "|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))
    return re.compile(alternatives, re.IGNORECASE)


class Redactor:
    """Masks the given secrets in text and bytes, case-insensitively."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._text = _pattern(self.secrets)
        body = [s for s in self.secrets if len(s) >= MIN_BODY_SECRET]
        self._lowered = [s.lower().encode() for s in body]
        self._bytes = (
            re.compile(b"|".join(re.escape(s.encode()) for s in body), re.IGNORECASE)
            if body
            else None
        )
        self.longest = max((len(s) for s in self._lowered), default=0)

    def text(self, text: str) -> str:
        """`text` with every secret replaced by `***` (run before any truncation)."""
        return self._text.sub(MASK, text) if self._text is not None else text

    def body(self, data: bytes) -> bytes:
        """A relayed body with every (body-length) secret replaced by `***`."""
        if self._bytes is None:
            return data
        lowered = data.lower()  # a fast scan first: bodies almost never hold a key
        if not any(s in lowered for s in self._lowered):
            return data
        return self._bytes.sub(MASK.encode(), data)

    def held_tail(self, data: bytes) -> int:
        """Bytes at the end of `data` that could begin a secret (to be held back)."""
        lowered = data[-self.longest + 1 :].lower() if self.longest > 1 else b""
        for start in range(len(lowered)):
            tail = lowered[start:]
            if any(s.startswith(tail) for s in self._lowered):
                return len(tail)
        return 0

    def stream(self) -> StreamRedactor:
        """A redactor for one streamed body."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts a body that arrives in chunks, keys split across chunks included."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What can be passed on now (may be empty while a possible key is held back)."""
        if self._redactor.longest == 0:
            return chunk
        data = self._redactor.body(self._held + chunk)
        hold = self._redactor.held_tail(data)
        self._held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold]

    def end(self) -> bytes:
        """The held-back tail, at the end of the body (it did not become a key)."""
        held, self._held = self._held, b""
        return held


@functools.lru_cache(maxsize=64)
def redactor_for(secret: str | None) -> Redactor:
    """The (cached) redactor of one secret."""
    return Redactor([secret])


async def redact_body(redactor: Redactor, data: bytes) -> bytes:
    """`redactor.body(data)` that lets the event loop run every SLICE_BYTES (~3 ms of scan)."""
    if len(data) <= SLICE_BYTES or redactor.longest == 0:
        return redactor.body(data)
    stream, out = redactor.stream(), []
    for start in range(0, len(data), SLICE_BYTES):
        out.append(stream.feed(data[start : start + SLICE_BYTES]))
        await anyio.lowlevel.checkpoint()
    out.append(stream.end())
    return b"".join(out)


# --- logs ------------------------------------------------------------------------------------

_registered: set[str] = set()
_log_redactor = Redactor(())


def register_secret(secret: str | None) -> None:
    """Redact `secret` from log records from now on (see `LogRedactor`)."""
    global _log_redactor
    if secret and secret not in _registered:
        _registered.add(secret)
        _log_redactor = Redactor(_registered)


class LogRedactor(logging.Filter):
    """A handler filter: registered secrets are masked in each record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        redactor = _log_redactor
        if not redactor.secrets:
            return True
        message = record.getMessage()
        redacted = redactor.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.text(record.exc_text)
        return True


def install_log_redactor(logger: logging.Logger | None = None) -> None:
    """Put a `LogRedactor` on every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, LogRedactor) for f in handler.filters):
            handler.addFilter(LogRedactor())
