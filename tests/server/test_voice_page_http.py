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
