"""Media by reference on a real socket: POST/GET /v1/media, transcription by `file_ref` and
`file_url` (allowed hosts only), and images answered as URLs into the media store.

The media root is the test's `tmp_path`; `file_url` is served by a tiny local HTTP server.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import trio

from spear_rt.server.app import Server
from tests.conftest import FIXTURES, ServerFactory, make_config

BOUND_S = 10
WAV = (FIXTURES / "speech_turn_left.wav").read_bytes()


def media_config(root: Path, allowed_hosts: list[str] | None = None) -> str:
    hosts = ", ".join(f'"{h}"' for h in allowed_hosts or [])
    return f'[media]\nroot = "{root}"\nallowed_hosts = [{hosts}]\n'


@pytest.fixture
async def server(serve: ServerFactory, tmp_path: Path) -> Server:
    return await serve(make_config(extra=media_config(tmp_path / "media")))


async def request(server: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        with trio.fail_after(BOUND_S):
            return await client.request(method, path, **kw)


async def transcribe(
    server: Server, files: dict[str, Any] | None = None, data: dict[str, str] | None = None
) -> httpx.Response:
    """A multipart transcription request (fields as (None, value) parts: always multipart)."""
    fields = {"model": "whisper-1", **(data or {})}
    parts = {**(files or {}), **{k: (None, v) for k, v in fields.items()}}
    return await request(server, "POST", "/v1/audio/transcriptions", files=parts)


def error_code(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    return error


# --- store endpoints ------------------------------------------------------------------------------


async def test_upload_then_get_round_trips_bytes_and_mime(server: Server, tmp_path: Path) -> None:
    response = await request(
        server, "POST", "/v1/media", content=WAV, headers={"content-type": "audio/wav"}
    )
    assert response.status_code == 201, response.text
    sha = hashlib.sha256(WAV).hexdigest()
    assert response.json() == {
        "sha256": sha,
        "uri": f"spear-media://{sha}",
        "size": len(WAV),
        "mime": "audio/wav",
    }
    assert (tmp_path / "media" / sha).read_bytes() == WAV  # the configured root

    got = await request(server, "GET", f"/v1/media/{sha}")
    assert got.status_code == 200
    assert got.headers["content-type"] == "audio/wav"
    assert got.content == WAV


async def test_missing_media_is_404(server: Server) -> None:
    for name in ("0" * 64, "not-a-sha"):
        response = await request(server, "GET", f"/v1/media/{name}")
        assert error_code(response, 404)["code"] == "media_not_found"
    response = await request(server, "DELETE", f"/v1/media/{'0' * 64}")
    assert response.status_code == 405


async def test_media_endpoints_need_a_client_key_when_keys_are_set(
    serve: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEAR_TEST_MEDIA_KEY", "sk-client-media")
    server = await serve(
        make_config(
            server='client_keys_env = ["SPEAR_TEST_MEDIA_KEY"]', extra=media_config(tmp_path)
        )
    )
    assert (await request(server, "POST", "/v1/media", content=b"x")).status_code == 401
    assert (await request(server, "GET", f"/v1/media/{'0' * 64}")).status_code == 401
    auth = {"authorization": "Bearer sk-client-media"}
    put = await request(server, "POST", "/v1/media", content=b"x", headers=auth)
    assert put.status_code == 201
    got = await request(server, "GET", f"/v1/media/{put.json()['sha256']}", headers=auth)
    assert got.content == b"x"


# --- transcription by reference -------------------------------------------------------------------


async def test_transcription_by_file_ref_matches_the_upload(server: Server) -> None:
    direct = await transcribe(server, files={"file": ("a.wav", WAV, "audio/wav")})
    assert direct.status_code == 200, direct.text
    uri = (
        await request(
            server, "POST", "/v1/media", content=WAV, headers={"content-type": "audio/wav"}
        )
    ).json()["uri"]
    by_ref = await transcribe(server, data={"file_ref": uri})
    assert by_ref.status_code == 200, by_ref.text
    assert by_ref.json()["text"] == direct.json()["text"]
    assert by_ref.json()["text"]


async def test_file_ref_unknown_or_combined_is_400(server: Server) -> None:
    unknown = await transcribe(server, data={"file_ref": f"spear-media://{'1' * 64}"})
    error = error_code(unknown, 400)
    assert (error["code"], error["param"]) == ("media_not_found", "file_ref")
    both = await transcribe(
        server,
        files={"file": ("a.wav", WAV, "audio/wav")},
        data={"file_ref": f"spear-media://{'1' * 64}"},
    )
    assert "exactly one" in error_code(both, 400)["message"]


class Handler(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.send_header("Content-Length", str(len(WAV)))
        self.end_headers()
        self.wfile.write(WAV)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.requests = []
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def test_file_url_is_refused_unless_its_host_is_allowed(
    server: Server, serve: ServerFactory, tmp_path: Path, http_port: int
) -> None:
    url = f"http://127.0.0.1:{http_port}/speech.wav"
    disabled = error_code(await transcribe(server, data={"file_url": url}), 400)
    assert (disabled["code"], disabled["param"]) == ("url_not_allowed", "file_url")
    assert "media.allowed_hosts" in disabled["message"]

    other = await serve(make_config(extra=media_config(tmp_path / "b", ["media.example.com"])))
    refused = error_code(await transcribe(other, data={"file_url": url}), 400)
    assert refused["code"] == "url_not_allowed"
    assert f'"127.0.0.1:{http_port}" is not allowed' in refused["message"]
    assert Handler.requests == []  # refused without connecting


async def test_file_url_from_an_allowed_host_is_transcribed(
    serve: ServerFactory, tmp_path: Path, http_port: int
) -> None:
    server = await serve(make_config(extra=media_config(tmp_path, [f"127.0.0.1:{http_port}"])))
    direct = await transcribe(server, files={"file": ("a.wav", WAV, "audio/wav")})
    fetched = await transcribe(
        server, data={"file_url": f"http://127.0.0.1:{http_port}/speech.wav"}
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["text"] == direct.json()["text"]
    assert Handler.requests == ["/speech.wav"]


# --- images as URLs -------------------------------------------------------------------------------


async def test_image_response_format_url_points_into_the_media_store(server: Server) -> None:
    body = {"prompt": "a dot", "size": "256x256", "n": 2, "response_format": "url"}
    response = await request(server, "POST", "/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-spear-instance"] == "stub"
    data = response.json()["data"]
    assert len(data) == 2
    for item in data:
        assert "b64_json" not in item
        url = item["url"]
        assert url.startswith(f"http://127.0.0.1:{server.port}/v1/media/")
        async with httpx.AsyncClient() as client:
            with trio.fail_after(BOUND_S):
                image = await client.get(url)
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
