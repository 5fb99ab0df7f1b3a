"""Media store (dedup, atomic files, expiry and eviction on a fake clock); http_url SSRF policy."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from spear_rt.errors import CanonicalFailure
from spear_rt.ir import ErrorCode
from spear_rt.media import MediaStore, check_http_url, fetch_http_url, sha256_of_uri


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(root: Path, clock: FakeClock, **kw: float) -> MediaStore:
    args: dict[str, float] = {"max_bytes": 1000, "max_age_s": 60.0, **kw}
    return MediaStore(root, clock=clock, **args)  # type: ignore[arg-type]


async def expect_invalid(coro: object) -> str:
    with pytest.raises(CanonicalFailure) as info:
        await coro  # type: ignore[misc]
    assert info.value.error.code is ErrorCode.INVALID_REQUEST
    return info.value.error.message


def blobs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.endswith(".mime")}


# --- store ----------------------------------------------------------------------------------------


async def test_put_then_get_round_trips_by_sha256(tmp_path: Path) -> None:
    store = make_store(tmp_path, FakeClock())
    ref = await store.put(b"RIFF audio", "audio/wav")
    sha = hashlib.sha256(b"RIFF audio").hexdigest()
    assert (ref.sha256, ref.mime, ref.size, ref.uri) == (
        sha,
        "audio/wav",
        10,
        f"spear-media://{sha}",
    )
    assert await store.get(sha) == b"RIFF audio"
    assert await store.get(ref.uri) == b"RIFF audio"
    assert (tmp_path / sha).read_bytes() == b"RIFF audio"
    assert (tmp_path / f"{sha}.mime").read_text() == "audio/wav"
    assert blobs(tmp_path) == {sha}  # no temporary files left behind


async def test_same_bytes_are_stored_once(tmp_path: Path) -> None:
    store = make_store(tmp_path, FakeClock())
    first = await store.put(b"x" * 100, "image/png")
    second = await store.put(b"x" * 100, "image/png")
    assert first == second
    assert store.statistics() == (1, 100)
    assert len(blobs(tmp_path)) == 1
    relabelled = await store.put(b"x" * 100, "image/x-raw")
    assert relabelled.sha256 == first.sha256
    assert (await store.stat(first.sha256)).mime == "image/x-raw"
    assert (tmp_path / f"{first.sha256}.mime").read_text() == "image/x-raw"


async def test_expired_media_is_refused_and_deleted(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_age_s=60)
    ref = await store.put(b"old", "audio/wav")
    clock.now += 59
    assert await store.get(ref.sha256) == b"old"
    clock.now += 2
    assert "expired" in await expect_invalid(store.get(ref.sha256))
    assert blobs(tmp_path) == set()
    assert "not in the store" in await expect_invalid(store.get(ref.sha256))


async def test_putting_again_renews_the_age(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_age_s=60)
    ref = await store.put(b"kept", "audio/wav")
    clock.now += 50
    await store.put(b"kept", "audio/wav")
    clock.now += 50
    assert await store.get(ref.sha256) == b"kept"


async def test_oldest_media_is_evicted_past_max_bytes(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_bytes=100)
    refs = []
    for i in range(3):
        refs.append(await store.put(bytes([i]) * 40, "application/octet-stream"))
        clock.now += 1
    assert "not in the store" in await expect_invalid(store.get(refs[0].sha256))
    assert await store.get(refs[1].sha256) == b"\x01" * 40
    assert store.statistics() == (2, 80)
    assert blobs(tmp_path) == {refs[1].sha256, refs[2].sha256}


async def test_a_renewed_blob_is_evicted_after_newer_ones(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_bytes=100)
    a = await store.put(b"a" * 40, "text/plain")
    clock.now += 1
    b = await store.put(b"b" * 40, "text/plain")
    clock.now += 1
    await store.put(b"a" * 40, "text/plain")  # a is now the newest
    await store.put(b"c" * 40, "text/plain")
    assert await store.get(a.sha256) == b"a" * 40
    await expect_invalid(store.get(b.sha256))


async def test_max_items_bounds_the_count(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_items=2)
    for i in range(5):
        await store.put(bytes([i]), "text/plain")
        clock.now += 1
    assert store.statistics() == (2, 2)


async def test_evict_sweeps_expired_media(tmp_path: Path) -> None:
    clock = FakeClock()
    store = make_store(tmp_path, clock, max_age_s=10)
    await store.put(b"1", "text/plain")
    await store.put(b"2", "text/plain")
    clock.now += 11
    assert await store.evict() == 2
    assert blobs(tmp_path) == set()


async def test_bad_requests_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path, FakeClock(), max_bytes=10)
    assert "exceeds the store's limit of 10 bytes" in await expect_invalid(
        store.put(b"x" * 11, "text/plain")
    )
    assert "not a MIME type" in await expect_invalid(store.put(b"x", "text/plain\nX: y"))
    for name in ("../../etc/passwd", "ABC", "spear-media://" + "g" * 64, "a" * 63):
        assert "not a media reference" in await expect_invalid(store.get(name))


async def test_a_new_store_adopts_blobs_on_disk_and_drops_partial_writes(tmp_path: Path) -> None:
    clock = FakeClock()
    ref = await make_store(tmp_path, clock).put(b"persisted", "audio/flac")
    (tmp_path / ".tmp-deadbeef").write_bytes(b"half a write")
    reopened = make_store(tmp_path, clock)
    assert await reopened.get(ref.sha256) == b"persisted"
    assert (await reopened.stat(ref.sha256)).mime == "audio/flac"
    assert not (tmp_path / ".tmp-deadbeef").exists()


def test_sha256_of_uri() -> None:
    sha = "ab" * 32
    assert sha256_of_uri(f"spear-media://{sha}") == sha == sha256_of_uri(sha)


# --- http_url policy ------------------------------------------------------------------------------

ALLOWED = [
    "media.example.com",
    "cdn.example.org:8443",
    "*.assets.example.net",
    "10.0.0.5",
    "Secure.Example.com:443",
]


@pytest.mark.parametrize(
    "url",
    [
        "https://media.example.com/a.wav",
        "http://MEDIA.example.com./a.wav",
        "https://media.example.com:443/a.wav",  # the default port, written out
        "https://cdn.example.org:8443/x.png",
        "https://img.assets.example.net/x.png",
        "http://10.0.0.5/a.wav",
        "https://cdn.example.org:8443/y.png",
        "https://secure.example.com/a.wav",  # listed as secure.example.com:443
    ],
)
def test_allowed_urls_pass(url: str) -> None:
    check_http_url(url, ALLOWED)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("file:///etc/passwd", "scheme must be http or https"),
        ("ftp://media.example.com/a", "scheme must be http or https"),
        ("gopher://media.example.com/", "scheme must be http or https"),
        ("https://evil.com/a.wav", 'host "evil.com" is not allowed'),
        ("https://media.example.com.evil.com/", "is not allowed"),
        ("https://user:pw@media.example.com/a", "user info"),
        ("https://media.example.com@evil.com/", "user info"),
        ("https://evil.com#@media.example.com", 'host "evil.com" is not allowed'),
        ("https://media.example.com\\@evil.com/", "backslashes"),
        ("http://127.0.0.1/", 'IP address "127.0.0.1" is not allowed'),
        ("http://[::1]/", 'IP address "[::1]" is not allowed'),
        ("http://169.254.169.254/latest/meta-data/", "is not allowed"),
        ("http://2130706433/", "is not allowed"),
        ("http://0x7f.1/", "is not allowed"),
        ("https://media.example.com:8080/", '"media.example.com:8080" is not allowed'),
        ("https://cdn.example.org/x.png", "is not allowed"),  # listed with another port only
        ("https://assets.example.net/", "is not allowed"),  # the wildcard is subdomains only
        ("http://10.0.0.5:22/", "is not allowed"),
        ("https:///nohost", "no host"),
        ("https://media.example.com:99999/", "malformed"),
    ],
)
def test_refused_urls_say_why(url: str, needle: str) -> None:
    with pytest.raises(CanonicalFailure) as info:
        check_http_url(url, ALLOWED)
    assert info.value.error.code is ErrorCode.INVALID_REQUEST
    assert needle in info.value.error.message


# --- fetching from a real local server ------------------------------------------------------------

BIG = b"z" * 5000


class Handler(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.requests.append(self.path)
        if self.path == "/small.wav":
            self._send(200, b"RIFF....WAVE", {"Content-Type": "audio/wav; charset=binary"})
        elif self.path == "/big":
            self._send(200, BIG, {"Content-Type": "application/octet-stream"})
        elif self.path == "/big-unsized":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"y" * 1000)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "http://169.254.169.254/"})
        else:
            self._send(404, b"nope", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Handler.requests = []
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_fetch_from_an_allowed_host(http_port: int) -> None:
    fetched = await fetch_http_url(
        f"http://127.0.0.1:{http_port}/small.wav", [f"127.0.0.1:{http_port}"], 1000
    )
    assert (fetched.data, fetched.mime) == (b"RIFF....WAVE", "audio/wav")


async def test_fetch_refuses_a_host_not_allowed_without_connecting(http_port: int) -> None:
    message = await expect_invalid(
        fetch_http_url(f"http://127.0.0.1:{http_port}/small.wav", ["127.0.0.1"], 1000)
    )
    assert f'"127.0.0.1:{http_port}" is not allowed' in message
    assert Handler.requests == []


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/big", "5000 bytes; the limit is 1000"),
        ("/big-unsized", "exceeds the limit of 1000 bytes"),
        ("/redirect", "redirect, not followed"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_fetch_is_bounded_and_follows_no_redirects(
    http_port: int, path: str, needle: str
) -> None:
    url = f"http://127.0.0.1:{http_port}{path}"
    message = await expect_invalid(fetch_http_url(url, [f"127.0.0.1:{http_port}"], 1000))
    assert needle in message
    assert Handler.requests == [path]


async def test_fetch_reports_an_unreachable_host() -> None:
    message = await expect_invalid(fetch_http_url("http://127.0.0.1:9/", ["127.0.0.1:9"], 10))
    assert "could not fetch media URL" in message
