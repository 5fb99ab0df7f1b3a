"""The media store as a browser sees it, on a real socket: uploads are served as types no
browser runs, with nosniff; URLs handed out come from the config, never the Host header;
multipart uploads store their file part; an undecodable stored file fails in one clean line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from spear_rt.server.app import Server
from tests.conftest import ServerFactory, make_config
from tests.server.test_media_endpoints import WAV, media_config

BOUND_S = 10
PAGE = b"<html><script>alert(document.cookie)</script></html>"


@pytest.fixture
async def server(serve: ServerFactory, tmp_path: Path) -> Server:
    return await serve(make_config(extra=media_config(tmp_path / "media")))


async def call(server: Server, method: str, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        with trio.fail_after(BOUND_S):
            return await client.request(method, path, **kw)


async def upload_and_get(server: Server, data: bytes, mime: str) -> httpx.Response:
    stored = await call(server, "POST", "/v1/media", content=data, headers={"content-type": mime})
    assert stored.status_code == 201, stored.text
    return await call(server, "GET", f"/v1/media/{stored.json()['sha256']}")


@pytest.mark.parametrize(
    "mime",
    ["text/html", "image/svg+xml", "application/xhtml+xml", "text/javascript", "text/plain"],
)
async def test_user_content_is_never_served_as_a_page(server: Server, mime: str) -> None:
    got = await upload_and_get(server, PAGE, mime)
    assert got.status_code == 200 and got.content == PAGE
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("mime", "served"), [("audio/wav", "audio/wav"), ("image/png", "image/png")]
)
async def test_audio_and_images_keep_their_type(server: Server, mime: str, served: str) -> None:
    got = await upload_and_get(server, WAV, mime)
    assert got.headers["content-type"] == served
    assert got.headers["x-content-type-options"] == "nosniff"


async def test_a_multipart_upload_stores_its_file_part(server: Server) -> None:
    """`curl -F file=@speech.wav`: the WAV is stored, not the whole form."""
    stored = await call(
        server, "POST", "/v1/media", files={"file": ("speech.wav", WAV, "audio/wav")}
    )
    assert stored.status_code == 201, stored.text
    body = stored.json()
    assert body["sha256"] == hashlib.sha256(WAV).hexdigest()
    assert (body["size"], body["mime"]) == (len(WAV), "audio/wav")
    untyped = await call(server, "POST", "/v1/media", files={"file": ("x", WAV, "")})
    assert untyped.json()["mime"] == "audio/wav"  # sniffed from the bytes
    got = await call(server, "GET", f"/v1/media/{body['sha256']}")
    assert got.content == WAV


async def test_a_multipart_upload_without_a_file_part_is_400(server: Server) -> None:
    refused = await call(server, "POST", "/v1/media", files={"model": (None, "x")})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_multipart"
    assert "file" in refused.json()["error"]["message"]


async def test_image_urls_come_from_public_url_not_the_host_header(
    serve: ServerFactory, tmp_path: Path
) -> None:
    body = {"prompt": "a dot", "size": "256x256", "response_format": "url"}
    hostile = {"host": "evil.example"}
    configured = await serve(
        make_config(
            server='public_url = "https://voice.example.com/spear/"\n'
            'allowed_hosts = ["evil.example"]',  # past the open-mode Host check
            extra=media_config(tmp_path / "a"),
        )
    )
    default = await serve(
        make_config(server='allowed_hosts = ["evil.example"]', extra=media_config(tmp_path / "b"))
    )
    for srv, base in (
        (configured, "https://voice.example.com/spear/v1/media/"),
        (default, f"http://127.0.0.1:{default.port}/v1/media/"),
    ):
        answer = await call(srv, "POST", "/v1/images/generations", json=body, headers=hostile)
        assert answer.status_code == 200, answer.text
        (item,) = answer.json()["data"]
        assert item["url"].startswith(base)


async def test_an_undecodable_stored_file_fails_in_one_clean_line(server: Server) -> None:
    stored = await call(
        server,
        "POST",
        "/v1/media",
        content=b"not audio at all" * 8,
        headers={"content-type": "audio/wav"},
    )
    uri = stored.json()["uri"]
    answer = await call(
        server,
        "POST",
        "/v1/audio/transcriptions",
        files={"file_ref": (None, uri), "model": (None, "whisper-1")},
    )
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "\n" not in message and "<" not in message and " at 0x" not in message, message
