"""Media by reference: a content-addressed store on local disk, and the http_url host policy.

Large audio and images move through spear_rt as a `MediaRef` instead of inline base64. A
``file`` ref names bytes kept in `MediaStore` by their SHA-256 (``spear-media://<sha256>``);
an ``http_url`` ref is fetched only from hosts the config allows (`check_http_url`), so a
client can never make the server request an arbitrary address (SSRF).

Store rules:

* a blob lives in ``<root>/<sha256>`` with its MIME type in ``<root>/<sha256>.mime``; both are
  written to a temporary file first and renamed into place, so a reader never sees half a file;
* putting bytes that are already stored writes nothing and renews their age (dedup);
* a blob older than ``max_age_s`` (since its last put) is gone: `get` says so and eviction
  deletes it; past ``max_bytes`` in total or ``max_items`` blobs, the oldest are deleted first;
  a single blob larger than ``max_bytes`` is refused;
* the index lives in memory and is rebuilt from the directory on first use, ages taken from
  file modification times.

File I/O runs in a worker thread (`anyio.to_thread.run_sync`); time comes from ``clock``
(the event loop's by default), read in the event loop and handed to the thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from spear_rt.errors import CanonicalFailure, echo
from spear_rt.ir import ErrorCode

__all__ = [
    "MEDIA_SCHEME",
    "FetchedMedia",
    "MediaStore",
    "StoredMedia",
    "check_http_url",
    "fetch_http_url",
    "sha256_of_uri",
]

MEDIA_SCHEME = "spear-media://"
DEFAULT_MIME = "application/octet-stream"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_TMP_PREFIX = ".tmp-"


def _invalid(message: str) -> CanonicalFailure:
    return CanonicalFailure.of(ErrorCode.INVALID_REQUEST, message)


class StoredMedia(msgspec.Struct, frozen=True):
    """A blob in the store: what a ``file`` MediaRef carries (plus its size)."""

    sha256: str
    mime: str
    size: int
    uri: str


class _Entry(msgspec.Struct):
    mime: str
    size: int
    stored_at: float


def sha256_of_uri(uri: str) -> str:
    """The SHA-256 named by a ``spear-media://`` URI (or a bare hex digest)."""
    sha = uri[len(MEDIA_SCHEME) :] if uri.startswith(MEDIA_SCHEME) else uri
    if not _SHA256.fullmatch(sha):
        raise _invalid(f"{echo(uri)} is not a media reference: expected {MEDIA_SCHEME}<sha256 hex>")
    return sha


class MediaStore:
    """Content-addressed blobs on local disk, bounded in total size, count and age."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        max_age_s: float,
        *,
        max_items: int = 100_000,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        if max_bytes <= 0 or max_age_s <= 0 or max_items <= 0:
            raise ValueError("max_bytes, max_age_s and max_items must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._clock = clock
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # oldest put first
        self._total = 0
        self._loaded = False
        self._lock = threading.Lock()  # the index is shared by worker threads

    # --- async API (what the event loop calls) --------------------------------------------------

    async def put(self, data: bytes, mime: str = DEFAULT_MIME) -> StoredMedia:
        """Store `data` (or renew it, if present) and return its reference."""
        now = self._clock()
        return await anyio.to_thread.run_sync(self.put_sync, data, mime, now)

    async def get(self, sha256: str) -> bytes:
        """The bytes of a stored blob; InvalidRequest when unknown or expired."""
        now = self._clock()
        return await anyio.to_thread.run_sync(self.get_sync, sha256, now)

    async def stat(self, sha256: str) -> StoredMedia:
        """A stored blob's reference, without reading it."""
        now = self._clock()
        return await anyio.to_thread.run_sync(self.stat_sync, sha256, now)

    async def evict(self) -> int:
        """Delete what is expired or over the bounds now; the number of blobs deleted."""
        now = self._clock()
        return await anyio.to_thread.run_sync(self.evict_sync, now)

    def statistics(self) -> tuple[int, int]:
        """(blobs, bytes) currently indexed."""
        with self._lock:
            return len(self._index), self._total

    # --- sync implementation (worker threads; `now` comes from the caller) ----------------------

    def put_sync(self, data: bytes, mime: str, now: float) -> StoredMedia:
        """`put` for a worker thread."""
        if not _MIME.fullmatch(mime):
            raise _invalid(f"{echo(mime)} is not a MIME type such as 'audio/wav'")
        if len(data) > self.max_bytes:
            raise _invalid(
                f"media of {len(data)} bytes exceeds the store's limit of {self.max_bytes} bytes"
            )
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._load(now)
            entry = self._index.get(sha)
            renewed = entry is not None
            if entry is not None:  # dedup: renew instead of writing again
                mime_changed = entry.mime != mime
                entry.stored_at, entry.mime = now, mime
                self._index.move_to_end(sha)
        if renewed:
            try:
                os.utime(self.root / sha)  # its age on disk, for the next restart
                if mime_changed:
                    self._write(self.root / f"{sha}.mime", mime.encode())
            except FileNotFoundError:  # evicted by another thread meanwhile
                renewed = False
        if not renewed:
            self._write(self.root / f"{sha}.mime", mime.encode())
            self._write(self.root / sha, data)
        with self._lock:
            if sha not in self._index:
                self._index[sha] = _Entry(mime, len(data), now)
                self._total += len(data)
            self._evict_locked(now, keep=sha)
        return StoredMedia(sha, mime, len(data), MEDIA_SCHEME + sha)

    def get_sync(self, sha256: str, now: float) -> bytes:
        """`get` for a worker thread."""
        sha = self.stat_sync(sha256, now).sha256
        try:
            return (self.root / sha).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._drop_locked(sha)
            raise _invalid(f"media {sha} is not in the store") from None

    def stat_sync(self, sha256: str, now: float) -> StoredMedia:
        """`stat` for a worker thread."""
        sha = sha256_of_uri(sha256)
        with self._lock:
            self._load(now)
            entry = self._index.get(sha)
            if entry is not None and now - entry.stored_at > self.max_age_s:
                self._evict_locked(now)
                raise _invalid(
                    f"media {sha} has expired (kept {self.max_age_s:g} s); upload it again"
                )
            if entry is None:
                raise _invalid(f"media {sha} is not in the store (never stored, or evicted)")
            return StoredMedia(sha, entry.mime, entry.size, MEDIA_SCHEME + sha)

    def evict_sync(self, now: float) -> int:
        """`evict` for a worker thread."""
        with self._lock:
            self._load(now)
            return self._evict_locked(now)

    def _evict_locked(self, now: float, keep: str | None = None) -> int:
        removed = 0
        while self._index:
            sha, entry = next(iter(self._index.items()))
            over = self._total > self.max_bytes or len(self._index) > self.max_items
            if sha == keep or not (over or now - entry.stored_at > self.max_age_s):
                break
            self._drop_locked(sha)
            removed += 1
        return removed

    def _drop_locked(self, sha: str) -> None:
        entry = self._index.pop(sha, None)
        if entry is not None:
            self._total -= entry.size
        for path in (self.root / sha, self.root / f"{sha}.mime"):
            path.unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
            os.replace(tmp, path)  # atomic within one directory
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _load(self, now: float) -> None:
        """Index what is already on disk (once); remove leftovers of interrupted writes."""
        if self._loaded:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, _Entry]] = []
        wall = time.time()  # file times are wall-clock; only their age is used
        for path in self.root.iterdir():
            name = path.name
            if name.startswith(_TMP_PREFIX):
                path.unlink(missing_ok=True)
            elif _SHA256.fullmatch(name) and path.is_file():
                st = path.stat()
                try:
                    mime = (self.root / f"{name}.mime").read_text().strip()
                except OSError:
                    mime = DEFAULT_MIME
                age = max(0.0, wall - st.st_mtime)
                found.append((st.st_mtime, name, _Entry(mime, st.st_size, now - age)))
        for _, sha, entry in sorted(found):
            self._index[sha] = entry
            self._total += entry.size
        self._loaded = True


# --- http_url: host policy and a bounded fetch ----------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_key(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def check_http_url(url: str, allowed_hosts: Iterable[str]) -> None:
    """Refuse (InvalidRequest) any URL spear_rt must not fetch for a client.

    Allowed: scheme http or https, no user info, a host listed in `allowed_hosts` — as
    ``host`` for the scheme's default port, as ``host:port`` otherwise (``[::1]:8080`` for
    IPv6); ``*.example.com`` allows the subdomains of example.com. IP literals pass only when
    listed, like any host. Redirects are never followed (`fetch_http_url`).
    """
    if any(c in url for c in "\\\t\r\n ") or not url.isprintable():
        raise _invalid("media URL contains whitespace, backslashes or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"media URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _invalid(f"media URL scheme must be http or https, not {parts.scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise _invalid("media URL must not carry user info (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _invalid("media URL has no host")
    if port == _DEFAULT_PORTS[scheme]:
        port = None
    key = _host_key(host, port)
    allowed = {h.strip().lower() for h in allowed_hosts if h.strip()}
    if key in allowed or (port is None and f"{key}:{_DEFAULT_PORTS[scheme]}" in allowed):
        return
    if port is None and not _is_ip(host):
        labels = host.split(".")
        if any("*." + ".".join(labels[i:]) in allowed for i in range(1, len(labels))):
            return
    what = "IP address" if _is_ip(host) else "host"
    raise _invalid(
        f"media URL {what} {echo(key)} is not allowed; the server fetches media only from its "
        "configured allowed hosts"
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class FetchedMedia(msgspec.Struct, frozen=True):
    """Bytes fetched from an allowed URL, with the MIME type the server gave."""

    data: bytes
    mime: str


async def fetch_http_url(
    url: str,
    allowed_hosts: Iterable[str],
    max_bytes: int,
    *,
    client: httpx.AsyncClient | None = None,
) -> FetchedMedia:
    """GET an allowed URL, reading at most `max_bytes` (InvalidRequest past that).

    No redirects, no proxies from the environment; with no `client`, a short-lived one with a
    10 s timeout is used. Callers bound the total time with `anyio.fail_after`.
    """
    check_http_url(url, allowed_hosts)
    if client is None:
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=10.0) as own:
            return await _fetch(own, url, max_bytes)
    return await _fetch(client, url, max_bytes)


async def _fetch(client: httpx.AsyncClient, url: str, max_bytes: int) -> FetchedMedia:
    try:
        headers = {"accept-encoding": "identity"}
        async with client.stream("GET", url, headers=headers, follow_redirects=False) as response:
            if response.is_redirect:
                raise _invalid(
                    f"media URL answered {response.status_code} (a redirect, not followed)"
                )
            if response.status_code != 200:
                raise _invalid(f"media URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _invalid(f"media at URL is {declared} bytes; the limit is {max_bytes}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():  # decoded bytes count
                size += len(chunk)
                if size > max_bytes:
                    raise _invalid(f"media at URL exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
            mime = response.headers.get("content-type", DEFAULT_MIME).split(";")[0].strip()
            return FetchedMedia(b"".join(chunks), mime or DEFAULT_MIME)
    except httpx.HTTPError as exc:
        raise _invalid(f"could not fetch media URL: {type(exc).__name__}: {exc}") from None
