"""The media store's HTTP face: what an upload stores, how a blob is served, where URLs point.

* An upload is the raw body (its Content-Type as the MIME type) or a multipart form whose
  `file` part is stored (`upload_of`); a missing or generic type is sniffed from the bytes.
* A blob is served with a type a browser will not run: audio, video and raster images keep
  theirs, anything else (text/html, SVG, XML, scripts...) is `application/octet-stream`, always
  with `X-Content-Type-Options: nosniff` and a sandboxing Content-Security-Policy
  (`serve_headers`): uploads are user content, never a page of this origin.
* URLs handed out (images as `url`) start at `[server] public_url`, else at the listen address
  (`public_base_url`), never at the client's Host header.
"""

from __future__ import annotations

from spear_rt.config import Config, listen_address
from spear_rt.server.http import HttpError, HttpRequest
from spear_rt.server.multipart import MultipartError, parse_form

__all__ = ["public_base_url", "serve_headers", "served_mime", "sniff_mime", "upload_of"]

GENERIC = "application/octet-stream"
_SAFE_IMAGES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp"}
)
_SAFE_PREFIXES = ("audio/", "video/")
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def sniff_mime(data: bytes) -> str:
    """The type of well-known audio and image files from their first bytes, else GENERIC."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data.startswith(b"OggS"):
        return "audio/ogg"
    if data.startswith(b"fLaC"):
        return "audio/flac"
    if data.startswith(b"ID3") or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    return GENERIC


def served_mime(mime: str) -> str:
    """The Content-Type a stored blob is served with: its own when a browser cannot run it."""
    base = mime.split(";")[0].strip().lower()
    if base in _SAFE_IMAGES or (base.startswith(_SAFE_PREFIXES) and "xml" not in base):
        return base
    return GENERIC


def serve_headers() -> list[tuple[str, str]]:
    """Headers on every served blob: no sniffing, no scripts, no embedding as a page."""
    return [
        ("X-Content-Type-Options", "nosniff"),
        ("Content-Security-Policy", "default-src 'none'; sandbox"),
        ("Cache-Control", "private, max-age=3600"),
    ]


async def upload_of(request: HttpRequest) -> tuple[bytes, str]:
    """The bytes and MIME type an upload stores: the body, or a multipart form's file part."""
    content_type = request.header("content-type") or ""
    if content_type.lower().startswith("multipart/"):
        try:
            form = await parse_form(request.body, content_type)
        except MultipartError as exc:
            raise HttpError(400, str(exc), "invalid_multipart") from None
        files = [p for p in form.values() if p.filename is not None]
        part = form.get("file") or (files[0] if len(files) == 1 else None)
        if part is None:
            raise HttpError(
                400,
                "a multipart upload needs one file part (curl -F file=@audio.wav)",
                "invalid_multipart",
            )
        data, declared = part.data, part.content_type or ""
    else:
        data, declared = request.body, content_type
    if not data:
        raise HttpError(400, "the upload is empty", "invalid_value")
    mime = declared.split(";")[0].strip().lower()
    if not mime or mime == GENERIC:
        mime = sniff_mime(data)
    return data, mime


def public_base_url(config: Config, port: int | None) -> str:
    """Where clients reach this server: `[server] public_url`, else the listen address
    (a wildcard address as loopback; https when TLS is configured)."""
    if config.server.public_url:
        return config.server.public_url.rstrip("/")
    host, listen_port = listen_address(config)
    host = _WILDCARD_HOSTS.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if getattr(config.server, "tls_cert", None) else "http"
    return f"{scheme}://{shown}:{port or listen_port}"
