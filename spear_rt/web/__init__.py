"""The browser voice page: static assets packaged with spear_rt, served at `GET /`.

Read once from the package at start (a few KiB), served from memory. Every response carries a
strict Content-Security-Policy: scripts, styles, the audio worklet and the WebSocket only from
this server; no inline code, no third-party request, no framing.
"""

from __future__ import annotations

from importlib import resources

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
    ("Permissions-Policy", "microphone=(self)"),
]
ASSETS = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/worklet.js": ("worklet.js", "text/javascript; charset=utf-8"),
    "/web/style.css": ("style.css", "text/css; charset=utf-8"),
}


def assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type) of every file of the page."""
    static = resources.files(__package__) / "static"
    return {path: ((static / name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()}
