"""Browser-facing safety: Origin and Host checks, JSON content types, admin and /metrics access.

A page the user visits can make the browser open WebSockets and send "simple" POSTs
(text/plain, multipart) to 127.0.0.1 without any preflight, and with DNS rebinding read the
answers under its own name. Pages of other origins are refused (403 before the upgrade, or
a JSON 403), open mode serves only loopback Host names (421), JSON endpoints take only
application/json (415), and /admin/* always needs an admin key. Clients that send no Origin
(SDKs, curl) are served as before. WebSocket checks run on every driver.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from spear_rt.server.app import Server
from tests.conftest import HandshakeRefused, WsClient, make_config, run_on
from tests.server.test_resume import DRIVERS, IDS

CHAT = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
EVIL = "https://evil.example"


async def upgrade_status(port: int, *headers: tuple[str, str]) -> tuple[int, dict[str, Any]]:
    """The handshake's status (101 or the refusal's) and a refusal's JSON body."""
    try:
        client = await WsClient.connect(port, headers=headers)
    except HandshakeRefused as exc:
        return exc.response.status_code, json.loads(exc.response.body or b"{}")
    await client.close()
    return 101, {}


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_websocket_from_another_origin_is_refused_before_the_upgrade(
    backend: str, driver: str
) -> None:
    async def scenario(server: Server) -> dict[str, Any]:
        port = server.port or 0
        return {
            "evil": await upgrade_status(port, ("Origin", EVIL)),
            "null": await upgrade_status(port, ("Origin", "null")),
            "other port": await upgrade_status(port, ("Origin", "http://127.0.0.1:1")),
            "no origin": (await upgrade_status(port))[0],
            "same origin": (await upgrade_status(port, ("Origin", f"http://127.0.0.1:{port}")))[0],
            "listed": (await upgrade_status(port, ("Origin", "https://app.example")))[0],
        }

    result = run_on(backend, driver, scenario, 'allowed_origins = ["https://app.example"]')
    for name in ("evil", "null", "other port"):
        status, body = result[name]
        assert status == 403, name
        assert body["error"]["code"] == "origin_not_allowed"
        assert "allowed_origins" in body["error"]["message"]
    assert result["no origin"] == result["same origin"] == result["listed"] == 101


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_websocket_with_a_rebinding_host_is_refused_in_open_mode(backend: str, driver: str) -> None:
    async def scenario(server: Server) -> dict[str, Any]:
        port = server.port or 0
        evil = f"evil.example:{port}"
        return {
            "rebound": await upgrade_status(port, ("Host", evil), ("Origin", f"http://{evil}")),
            "localhost": (
                await upgrade_status(
                    port, ("Host", f"localhost:{port}"), ("Origin", f"http://localhost:{port}")
                )
            )[0],
        }

    result = run_on(backend, driver, scenario)
    status, body = result["rebound"]
    assert status == 421 and body["error"]["code"] == "misdirected_request"
    assert "allowed_hosts" in body["error"]["message"]
    assert result["localhost"] == 101


def test_allowed_origins_star_admits_any_page() -> None:
    async def scenario(server: Server) -> list[int]:
        port = server.port or 0
        return [(await upgrade_status(port, ("Origin", o)))[0] for o in (EVIL, "null")]

    assert run_on("trio", "auto", scenario, 'allowed_origins = ["*"]') == [101, 101]


async def call(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.request(method, f"http://127.0.0.1:{server.port}{path}", **kwargs)


async def test_http_from_another_origin_is_refused(server: Server) -> None:
    """Every request carrying a foreign Origin is a JSON 403; same-origin and none are served."""
    evil = await call(server, "POST", "/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
    assert evil.status_code == 403
    assert evil.json()["error"]["code"] == "origin_not_allowed"
    null = await call(server, "GET", "/v1/backends", headers={"Origin": "null"})
    assert null.status_code == 403
    own = f"http://127.0.0.1:{server.port}"
    same = await call(server, "POST", "/v1/chat/completions", json=CHAT, headers={"Origin": own})
    assert same.status_code == 200
    assert (await call(server, "POST", "/v1/chat/completions", json=CHAT)).status_code == 200


async def test_text_plain_posts_to_json_endpoints_are_415(server: Server) -> None:
    """A CORS "simple request" body (text/plain, no type, a form) is not taken as JSON."""
    body = json.dumps(CHAT).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = await call(server, "POST", "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415, content_type
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert "application/json" in r.json()["error"]["message"]
    ok = await call(
        server,
        "POST",
        "/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


async def test_rebinding_host_cannot_read_or_reload_in_open_mode(server: Server) -> None:
    """A page that rebinds its own name to 127.0.0.1 is same-origin with itself: the Host
    check is what refuses it."""
    host = f"rebind.example:{server.port}"
    headers = {"Host": host, "Origin": f"http://{host}"}
    for method, path in (("GET", "/v1/backends"), ("GET", "/metrics"), ("POST", "/admin/reload")):
        r = await call(server, method, path, headers=headers)
        assert r.status_code == 421, path
        assert r.json()["error"]["code"] == "misdirected_request"
    for name in ("localhost", "127.0.0.1", "[::1]", "app.localhost", "LocalHost."):
        r = await call(server, "GET", "/v1/backends", headers={"Host": f"{name}:{server.port}"})
        assert r.status_code == 200, name


async def test_allowed_hosts_and_client_keys_lift_the_host_check(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = await serve(make_config(server='allowed_hosts = ["voice.lan"]'))
    r = await call(listed, "GET", "/v1/backends", headers={"Host": "voice.lan:8787"})
    assert r.status_code == 200
    monkeypatch.setenv("SPEAR_TEST_ORIGIN_KEY", "ck-origin-test")
    keyed = await serve(make_config(server='client_keys_env = ["SPEAR_TEST_ORIGIN_KEY"]'))
    headers = {"Host": "voice.example.com", "Authorization": "Bearer ck-origin-test"}
    assert (await call(keyed, "GET", "/v1/backends", headers=headers)).status_code == 200


async def test_admin_needs_an_admin_key_even_on_loopback(server: Server) -> None:
    r = await call(server, "POST", "/admin/reload")
    assert r.status_code == 403
    assert "admin_keys_env" in r.json()["error"]["message"]


async def test_metrics_is_loopback_without_admin_keys_and_keyed_with_them(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_mode = await serve(make_config())
    assert (await call(open_mode, "GET", "/metrics")).status_code == 200
    monkeypatch.setenv("SPEAR_TEST_ADMIN_KEY", "ak-origin-test")
    keyed = await serve(make_config(server='admin_keys_env = ["SPEAR_TEST_ADMIN_KEY"]'))
    assert (await call(keyed, "GET", "/metrics")).status_code == 401
    right = {"Authorization": "Bearer ak-origin-test"}
    assert (await call(keyed, "GET", "/metrics", headers=right)).status_code == 200
    public = await serve(
        make_config(server='admin_keys_env = ["SPEAR_TEST_ADMIN_KEY"]\nmetrics_open = true')
    )
    assert (await call(public, "GET", "/metrics")).status_code == 200
