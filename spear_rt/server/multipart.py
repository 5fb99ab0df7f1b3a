"""A small, strict multipart/form-data parser for uploads (transcriptions, media).

The whole body is already in memory (bounded by `max_http_body_bytes`), so parsing is a
split on the boundary with `bytes.find`; file parts are sliced out of the body once. Header
parameters (`name="..."; filename="..."`) are read left to right by `header_params`, with
`str.find` for each delimiter: linear in the header's length (a regular expression with
backtracking took ~12 s for 60 kB of letters). Part heads are bounded (MAX_PART_HEAD_BYTES),
and `parse_form` runs large bodies in a worker thread. Any malformation is a `MultipartError`
with a one-line message the client can act on.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import anyio
import msgspec


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


class Part(msgspec.Struct, frozen=True):
    """One form field or file."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    earlier: tuple[bytes, ...] = ()  # values of earlier parts with this name, in order

    def values(self) -> list[bytes]:
        """Every value sent under this name, in order (`name[]` list fields repeat)."""
        return [*self.earlier, self.data]


_QUOTED_STOP = re.compile(r'["\\]')  # one character class: no backtracking
MAX_PARTS = 64
MAX_PART_HEAD_BYTES = 16384  # all header lines of one part
OFF_LOOP_BYTES = 64 * 1024  # bodies past this are parsed in a worker thread


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `main; key=token; key="quoted \\" string"` into the main value and its parameters.

    Keys are lower-cased; a repeated key keeps its first value; text that is not `key=value`
    is malformed. Linear: every search starts past the previous one (`_Finder`).
    """
    size = len(value)
    find = _Finder(value)
    end = find(";", 0)
    main, pos = value[:end].strip(), end + 1
    params: dict[str, str] = {}
    while pos < size:
        eq, semi = find("=", pos), find(";", pos)
        if semi < eq or eq == size:  # a segment without `=`: only a blank one is allowed
            if value[pos:semi].strip():
                raise MultipartError("malformed multipart header parameter (expected key=value)")
            pos = semi + 1
            continue
        key = value[pos:eq].strip().lower()
        if not key or any(c in key for c in ' \t"'):
            raise MultipartError("malformed multipart header parameter name")
        pos = eq + 1
        while pos < size and value[pos] in " \t":
            pos += 1
        if pos < size and value[pos] == '"':
            text, pos = _quoted(value, pos + 1)
        else:
            stop = find(";", pos)
            text, pos = value[pos:stop].strip(), stop
        params.setdefault(key, text)
        semi = find(";", pos)
        if value[pos:semi].strip():
            raise MultipartError("malformed multipart header parameter (text after a value)")
        pos = semi + 1
    return main, params


class _Finder:
    """`text.find(char, pos)` (len(text) when absent), remembering each answer: callers move
    forward, so a search reruns only once `pos` passed its last answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.found: dict[str, int] = {}

    def __call__(self, char: str, pos: int) -> int:
        found = self.found.get(char, -1)
        if found < pos:
            found = self.text.find(char, pos)
            found = len(self.text) if found < 0 else found
            self.found[char] = found
        return found


def _quoted(value: str, pos: int) -> tuple[str, int]:
    """The quoted string starting after its opening quote, and the position past its end."""
    out: list[str] = []
    while True:
        match = _QUOTED_STOP.search(value, pos)
        if match is None:
            raise MultipartError("unterminated quoted string in a multipart header")
        stop = match.start()
        out.append(value[pos:stop])
        if value[stop] == '"':
            return "".join(out), stop + 1
        if stop + 1 >= len(value):
            raise MultipartError("unterminated quoted string in a multipart header")
        out.append(value[stop + 1])  # a backslash escapes the next character
        pos = stop + 2


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data content type."""
    if content_type is None or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected Content-Type: multipart/form-data with a boundary")
    _, params = header_params(content_type)
    boundary = params.get("boundary")
    if boundary is None:
        raise MultipartError("the multipart Content-Type has no boundary")
    if not 1 <= len(boundary) <= 200:
        raise MultipartError("the multipart boundary must be 1..200 characters")
    return boundary.encode("latin-1")


async def parse_form(body: bytes, content_type: str | None) -> dict[str, Part]:
    """`parse_multipart`, in a worker thread for bodies over OFF_LOOP_BYTES."""
    if len(body) > OFF_LOOP_BYTES:
        return await anyio.to_thread.run_sync(_parse_in_thread, body, content_type)
    return parse_multipart(body, content_type)


def _parse_in_thread(body: bytes, content_type: str | None) -> dict[str, Part]:
    return parse_multipart(body, content_type)  # looked up at call time (tests spy on it)


def parse_multipart(body: bytes, content_type: str | None) -> dict[str, Part]:
    """Parse a form; a repeated name maps to its last part, which keeps the earlier values."""
    delimiter = b"--" + boundary_of(content_type)
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("the body does not contain the multipart boundary")
    parts: dict[str, Part] = {}
    count = 0
    pos = start + len(delimiter)
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed multipart delimiter line")
        head_end = body.find(b"\r\n\r\n", pos + 2, pos + 2 + MAX_PART_HEAD_BYTES + 4)
        if head_end < 0:
            if len(body) - pos > MAX_PART_HEAD_BYTES:
                raise MultipartError(
                    f"a multipart part's headers are over {MAX_PART_HEAD_BYTES} bytes"
                )
            raise MultipartError("a multipart part has no header end")
        headers = _headers(body[pos + 2 : head_end])
        next_delim = body.find(b"\r\n" + delimiter, head_end + 4)
        if next_delim < 0:
            raise MultipartError("the multipart body is truncated (no closing boundary)")
        part = _part(headers, body[head_end + 4 : next_delim])
        if (previous := parts.get(part.name)) is not None:  # bounded by MAX_PARTS
            part = msgspec.structs.replace(part, earlier=(*previous.earlier, previous.data))
        parts[part.name] = part
        count += 1
        if count > MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} multipart fields")
        pos = next_delim + 2 + len(delimiter)


def _headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed multipart part header")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
    return headers


def _part(headers: dict[str, str], data: bytes) -> Part:
    kind, params = header_params(headers.get("content-disposition", ""))
    if kind.lower() != "form-data":
        raise MultipartError("every multipart part needs Content-Disposition: form-data")
    if "name" not in params:
        raise MultipartError("a multipart part has no name")
    filename = params.get("filename")
    extended = params.get("filename*")  # RFC 5987: charset'language'percent-encoded
    if extended is not None:
        charset, _, rest = extended.partition("'")
        _, _, encoded = rest.partition("'")
        try:
            filename = unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise MultipartError("a multipart filename* is not validly encoded") from None
    return Part(params["name"], data, filename, headers.get("content-type"))
