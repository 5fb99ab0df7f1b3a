"""The voice page's files over HTTP: what a browser gets, and what it is not allowed to do."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import make_config, running_server

pytestmark = pytest.mark.trio


async def test_the_page_and_its_files_are_served_with_a_strict_policy() -> None:
    async with running_server(make_config()) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        page = await http.get(f"{base}/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        # the ids automation relies on, and no inline script or third-party address
        for needed in ('id="connect"', 'id="mode"', 'id="transcript"', 'id="answer"',
                       'id="status"', 'aria-live="polite"'):  # fmt: skip
            assert needed in page.text, needed
        assert not re.search(r"<script>|https?://|\son\w+=", page.text)
        for path, kind in (("/web/app.js", "text/javascript"), ("/web/worklet.js",
                           "text/javascript"), ("/web/style.css", "text/css")):  # fmt: skip
            asset = await http.get(f"{base}{path}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert "content-security-policy" in asset.headers
        assert "window.spearStats" in (await http.get(f"{base}/web/app.js")).text
        missing = await http.get(f"{base}/web/nope.js")
        assert missing.status_code == 404


async def test_a_page_of_another_site_cannot_open_a_session() -> None:
    async with running_server(make_config()) as server, httpx.AsyncClient() as http:
        headers = {"Origin": "https://evil.example", "Connection": "Upgrade",
                   "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
        refused = await http.get(f"http://127.0.0.1:{server.port}/v1/realtime", headers=headers)
        assert refused.status_code == 403


async def test_with_client_keys_the_page_is_public_and_the_api_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page asks for the key itself: its files need none (they were 401 before)."""
    monkeypatch.setenv("SPEAR_TEST_PAGE_KEY", "page-key-0123456789")
    config = make_config(server='client_keys_env = ["SPEAR_TEST_PAGE_KEY"]')
    async with running_server(config) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        assert (await http.get(f"{base}/")).status_code == 200
        assert (await http.get(f"{base}/web/app.js")).status_code == 200
        assert (await http.get(f"{base}/v1/backends")).status_code == 401
