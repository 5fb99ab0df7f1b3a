"""A small, strict multipart/form-data parser for uploads (transcriptions).

The whole body is already in memory (bounded by `max_http_body_bytes`), so parsing is a
split on the boundary with `bytes.find`; file parts are sliced out of the body once. Any
malformation is a `MultipartError` with a message the client can act on.
"""

from __future__ import annotations

import re

import msgspec


class MultipartError(ValueError):
    """The body is not valid multipart/form-data."""


class Part(msgspec.Struct, frozen=True):
    """One form field or file."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_DISPOSITION = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
MAX_PARTS = 64


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data content type."""
    if content_type is None or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected Content-Type: multipart/form-data with a boundary")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MultipartError("the multipart Content-Type has no boundary")
    boundary = match.group(1) or match.group(2)
    if not 1 <= len(boundary) <= 200:
        raise MultipartError("the multipart boundary must be 1..200 characters")
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, content_type: str | None) -> dict[str, Part]:
    """Parse a form; repeated names keep the last value (OpenAI's fields are single)."""
    delimiter = b"--" + boundary_of(content_type)
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("the body does not contain the multipart boundary")
    parts: dict[str, Part] = {}
    pos = start + len(delimiter)
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed multipart delimiter line")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise MultipartError("a multipart part has no header end")
        headers = _headers(body[pos + 2 : head_end])
        next_delim = body.find(b"\r\n" + delimiter, head_end + 4)
        if next_delim < 0:
            raise MultipartError("the multipart body is truncated (no closing boundary)")
        part = _part(headers, body[head_end + 4 : next_delim])
        parts[part.name] = part
        if len(parts) > MAX_PARTS:
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
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise MultipartError("every multipart part needs Content-Disposition: form-data")
    params = {k.lower(): v.replace('\\"', '"') for k, v in _DISPOSITION.findall(disposition)}
    if "name" not in params:
        raise MultipartError("a multipart part has no name")
    return Part(params["name"], data, params.get("filename"), headers.get("content-type"))
