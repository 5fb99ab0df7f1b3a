"""The server's HTTP side on a real socket: endpoints, errors, keep-alive, bad input, slow peers."""

from __future__ import annotations

import json
from typing import Any

import anyio
import h11
import httpx
import pytest
import trio

from spear_rt.server.app import Server
from tests.conftest import ServerFactory, http_request, make_config

SECRET = "sk-test-secret-value-4f1c9e"


async def get(server: Server, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        return await client.request(method, path)


class RawHttp:
    """An h11 client on one TCP connection (to see keep-alive and exact status lines)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        await self.stream.send(data)
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive())
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, body


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    return error


async def test_healthz_reports_ok_and_counts(server: Server) -> None:
    """/healthz: status ok, no sessions, the stub available."""
    response = await get(server, "/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "sessions": 0,
        "backends_available": 1,
        "backends_configured": 1,
    }


async def test_backends_shows_the_credential_name_but_never_its_value(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/backends lists instances with credential_ref by name; the env var's value is absent."""
    monkeypatch.setenv("SPEAR_TEST_SECRET_KEY", SECRET)
    server = await serve(
        make_config(
            extra='[[credentials]]\nname = "vault"\napi_key_env = "SPEAR_TEST_SECRET_KEY"\n',
            backends='[[backends]]\nname = "remote"\nkind = "stub"\n'
            'credential_ref = "vault"\nbase_url = "http://127.0.0.1:9"\n'
            '[[backends]]\nname = "local"\nkind = "stub"\n',
        )
    )
    response = await get(server, "/v1/backends")
    assert response.status_code == 200
    assert SECRET not in response.text
    data = {b["name"]: b for b in response.json()["data"]}
    assert set(data) == {"remote", "local"}
    assert data["remote"]["credential_ref"] == "vault"
    assert data["remote"]["available"] is True
    assert data["local"]["kind"] == "stub"
    assert "speech_to_text" in data["local"]["ops"]
    assert response.json()["config"] == "test"
    health = await get(server, "/healthz")
    assert SECRET not in health.text


async def test_capabilities_maps_operations_to_features_and_transports(server: Server) -> None:
    """/v1/capabilities: per operation, the live instances, features and transports."""
    response = await get(server, "/v1/capabilities")
    assert response.status_code == 200
    stt = response.json()["operations"]["speech_to_text"]
    assert stt["instances"] == ["stub"]
    assert "websocket" in stt["transports"]
    assert "supports_stream" in stt["features"]


async def test_unknown_path_is_404_json_error(server: Server) -> None:
    """An unknown path: 404 with an OpenAI-style JSON error."""
    response = await get(server, "/v1/nothing-here")
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found" and "/v1/nothing-here" in error["message"]


async def test_wrong_method_is_405_with_allow(server: Server) -> None:
    """POST on a GET endpoint: 405 and Allow: GET."""
    response = await get(server, "/healthz", method="POST")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert error_of(response)["code"] == "method_not_allowed"


async def test_realtime_without_upgrade_is_426(server: Server) -> None:
    """GET /v1/realtime as plain HTTP: 426 Upgrade Required naming websocket."""
    response = await get(server, "/v1/realtime?intent=transcription")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert error_of(response)["code"] == "upgrade_required"


async def test_keep_alive_serves_two_requests_on_one_connection(server: Server) -> None:
    """Two requests, one TCP connection: both answered, the connection stays usable."""
    assert server.port is not None
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        client = RawHttp(stream)
        first, body1 = await client.request("GET", "/healthz")
        second, body2 = await client.request("GET", "/v1/nothing")
        third, _ = await client.request("GET", "/v1/capabilities")
    assert (first.status_code, second.status_code, third.status_code) == (200, 404, 200)
    assert json.loads(body1)["status"] == "ok"
    assert json.loads(body2)["error"]["code"] == "not_found"


async def test_error_answers_keep_the_connection_alive_even_with_a_request_body(
    server: Server,
) -> None:
    """A 405 to a POST with a body, then a HEAD: both answered, the connection still serves."""
    assert server.port is not None
    async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
        client = RawHttp(stream)
        refused, _ = await client.request("POST", "/healthz", b'{"some": "body"}')
        head, head_body = await client.request("HEAD", "/v1/capabilities")
        ok, body = await client.request("GET", "/healthz")
    assert refused.status_code == 405
    assert head.status_code == 405 and head_body == b""
    assert ok.status_code == 200 and json.loads(body)["status"] == "ok"


async def test_upgrade_without_a_websocket_key_is_400(server: Server) -> None:
    """A broken WebSocket handshake gets websockets' 400, no session."""
    assert server.port is not None
    raw = (
        b"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    with trio.fail_after(5):
        reply = await http_request(server.port, raw)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert server.sessions.total_sessions == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    ],
)
async def test_malformed_http_is_400_then_close(server: Server, raw: bytes) -> None:
    """A request h11 cannot accept: a 400 JSON answer, then the server closes."""
    assert server.port is not None
    with trio.fail_after(5):
        reply = await http_request(server.port, raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "bad_request"


async def test_endless_request_head_is_431(server: Server) -> None:
    """A request head growing past the limit: 431, then close (never buffered forever)."""
    assert server.port is not None
    raw = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000
    )  # over the 16 KiB limit, within one read
    with trio.fail_after(5):
        reply = await http_request(server.port, raw)
    assert reply.startswith(b"HTTP/1.1 431 ")


async def test_idle_connection_is_closed_after_the_handshake_timeout(
    serve: ServerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that connects and sends nothing is dropped at handshake_timeout_s, not before."""
    server = await serve(make_config(server="handshake_timeout_s = 7.0"))
    assert server.port is not None
    start = trio.current_time()
    with trio.fail_after(60):
        reply = await http_request(server.port, b"")
    assert reply == b""
    assert trio.current_time() - start == pytest.approx(7.0, abs=0.01)


async def test_slow_request_head_is_dropped_at_the_timeout(
    serve: ServerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that sends half a request head and stalls is dropped at handshake_timeout_s."""
    server = await serve(make_config(server="handshake_timeout_s = 3.0"))
    assert server.port is not None
    start = trio.current_time()
    with trio.fail_after(60):
        reply = await http_request(server.port, b"GET /healthz HTTP/1.1\r\nHo")
    assert reply == b""
    assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
