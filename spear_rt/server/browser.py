"""Browser-facing safety: which web pages may call this server, and under which Host names.

Any page the user visits can make the browser open a WebSocket to 127.0.0.1 or send it a
"simple" POST (text/plain, a form, multipart) without a CORS preflight, and with DNS
rebinding (its own name re-pointed at 127.0.0.1) read the answers as same-origin. So, on
every request, before the WebSocket upgrade and before any handler (sans-I/O, headers in):

* Origin: a request that carries one must come from a page of this server (scheme, host and
  port of its Host header, or of `[server] public_url`) or of `[server] allowed_origins`
  (exact origins, or "*"); `null` (sandboxed frames, file: pages) is refused. -> 403.
  Requests without Origin (SDKs, curl, servers) are not browser pages and pass.
* Host, in open mode only (no client keys): loopback names (localhost, *.localhost,
  127.0.0.0/8, [::1]), the listen address, public_url's host and `[server] allowed_hosts`
  ("*": any). A rebinding page names its own domain. -> 421. With client keys configured a
  page has no key to send, so Host is not restricted.
* JSON endpoints take only `Content-Type: application/json` (what the OpenAI SDKs send):
  a text/plain body is a preflight-free cross-site request. -> 415 (`require_json`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from spear_rt import web
from spear_rt.config import ServerConfig
from spear_rt.server.http import HttpError, HttpRequest, Response

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_ECHO = 100  # characters of a refused Origin/Host quoted back


def _host_port(authority: str, scheme: str) -> tuple[str, int | None]:
    """(lower-case host without brackets, port or the scheme's default) of `host[:port]`."""
    authority = authority.strip().lower()
    if authority.startswith("["):  # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            host, port_text = authority, ""
    host = host.rstrip(".")  # "localhost." is localhost
    if not port_text:
        return host, DEFAULT_PORTS.get(scheme)
    return host, int(port_text) if port_text.isdigit() else -1


def _origin_tuple(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin or URL; None when it is not one."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        return None
    host, port = _host_port(parts.netloc, scheme)
    return scheme, host, port


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quoted(value: str) -> str:
    return repr(value[:MAX_ECHO])


class BrowserGuard:
    """The Origin and Host rules of one server (see the module docstring)."""

    def __init__(self, config: ServerConfig, *, tls: bool, open_mode: bool) -> None:
        self.scheme = "https" if tls else "http"
        self.open_mode = open_mode
        self.any_origin = "*" in config.allowed_origins
        self.origins = {o for o in map(_origin_tuple, config.allowed_origins) if o is not None}
        self.any_host = "*" in config.allowed_hosts
        self.hosts = {h.strip().lower().strip("[]") for h in config.allowed_hosts}
        listen_host = config.listen.rpartition(":")[0].strip("[]").lower()
        if listen_host not in ("", "0.0.0.0", "::"):
            self.hosts.add(listen_host)
        public = _origin_tuple(config.public_url) if config.public_url else None
        if public is not None:
            self.origins.add(public)
            self.hosts.add(public[1])

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Raise HttpError (421 or 403) when these request headers must not be served."""
        host_header = origin = None
        for name, value in headers:
            if name == b"host" and host_header is None:
                host_header = value.decode("latin-1")
            elif name == b"origin" and origin is None:
                origin = value.decode("latin-1")
        host = _host_port(host_header, self.scheme) if host_header is not None else None
        if self.open_mode and host is not None and not self._host_allowed(host[0]):
            raise HttpError(
                421,
                f"Host {_quoted(host_header or '')} is not served: with no client keys "
                "configured only loopback names are (localhost, 127.0.0.1, [::1]); add it "
                "to [server] allowed_hosts to serve it",
                "misdirected_request",
            )
        if origin is not None and not self._origin_allowed(origin, host):
            raise HttpError(
                403,
                f"requests from pages of {_quoted(origin)} are refused: add the origin to "
                "[server] allowed_origins to allow it",
                "origin_not_allowed",
            )

    def _host_allowed(self, host: str) -> bool:
        return self.any_host or _is_loopback_name(host) or host in self.hosts

    def _origin_allowed(self, origin: str, host: tuple[str, int | None] | None) -> bool:
        if self.any_origin:
            return True
        parsed = _origin_tuple(origin) if origin.strip().lower() != "null" else None
        if parsed is None:
            return False
        if parsed in self.origins:
            return True
        return host is not None and parsed == (self.scheme, *host)  # a page of this server


def require_json(content_type: str | None) -> None:
    """Raise 415 unless the body is declared `application/json`."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        got = f"got {_quoted(content_type)}" if content_type else "got none"
        raise HttpError(
            415,
            f"send the body as JSON with Content-Type: application/json ({got})",
            "unsupported_media_type",
        )


def page_routes() -> dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]]:
    """`GET` routes of the voice page (`spear_rt.web`): its files from memory, with its CSP."""

    def serve(body: bytes, content_type: str) -> Callable[[HttpRequest], Awaitable[Response]]:
        async def handler(request: HttpRequest) -> Response:
            return Response(200, body, content_type, list(web.SECURITY_HEADERS))

        return handler

    return {(b"GET", path): serve(*asset) for path, asset in web.assets().items()}
