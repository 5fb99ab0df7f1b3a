"""Operator endpoints: /v1/route/explain, /metrics, /admin/reload (also under live sessions)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from spear_rt.config import load_config
from spear_rt.server.app import Server
from tests.conftest import STUB_BACKEND, WsClient, b64, make_config, noise_pcm
from tests.server.test_realtime import open_manual

COMPLETED = "conversation.item.input_audio_transcription.completed"
ADMIN = 'admin_keys_env = ["SPEAR_TEST_ADMIN"]\n'  # /admin/* always needs an admin key
ADMIN_AUTH = {"Authorization": "Bearer adm-123"}


def two_stubs(names: tuple[str, ...]) -> str:
    return "".join(f'[[backends]]\nname = "{n}"\nkind = "stub"\n' for n in names)


async def start_from_file(nursery: trio.Nursery, path: Path, text: str) -> Server:
    path.write_text(f'[server]\nlisten = "127.0.0.1:0"\n{text}')
    server = Server(load_config(path), config_path=str(path))
    await nursery.start(server.serve)
    return server


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def commit_on(client: WsClient) -> str:
    await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
    await client.send({"type": "input_audio_buffer.commit"})
    return str((await client.recv_until(COMPLETED))[-1]["transcript"])


async def test_explain_names_the_selected_instance_and_the_rejected_ones(serve) -> None:  # type: ignore[no-untyped-def]
    """An instance without the required feature is rejected with a reason; the other is chosen."""
    backends = (
        STUB_BACKEND
        + '[[backends]]\nname = "tools"\nkind = "stub"\nfeatures = ["supports_tools"]\n'
    )
    server = await serve(make_config(backends=backends))
    async with httpx.AsyncClient() as http:
        r = await http.post(
            url(server, "/v1/route/explain"),
            json={"operation": "chat_completions", "required_features": ["supports_tools"]},
        )
    body = r.json()
    assert r.status_code == 200
    assert body["selected"] == "tools" and body["policy"] == "ewma_latency"
    assert body["rejected_reasons"] == {"stub": "missing features: supports_tools"}
    assert body["candidates_checked"] == 2


async def test_explain_without_candidate_carries_the_canonical_error(server: Server) -> None:
    """No instance has the feature: the answer says MissingCapabilities and why."""
    async with httpx.AsyncClient() as http:
        r = await http.post(
            url(server, "/v1/route/explain"),
            json={"operation": "embeddings", "required_features": ["supports_tools"]},
        )
    body = r.json()
    assert body.get("selected") is None
    assert body["error"]["code"] == "MissingCapabilities"
    assert body["error"]["rejected_reasons"] == {"stub": "missing features: supports_tools"}


async def test_explain_changes_no_state(serve) -> None:  # type: ignore[no-untyped-def]
    """Explaining twice gives the same answer under round robin; routing then advances it."""
    server = await serve(make_config(backends=two_stubs(("a", "b"))))
    body = {"operation": "embeddings", "policy": "round_robin"}
    async with httpx.AsyncClient() as http:
        first = (await http.post(url(server, "/v1/route/explain"), json=body)).json()["selected"]
        second = (await http.post(url(server, "/v1/route/explain"), json=body)).json()["selected"]
    assert first == second


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b'{"operation": "chat"}', "Invalid enum value 'chat'"),
    ],
)
async def test_explain_bad_body_is_a_400_saying_why(
    server: Server, body: bytes, fragment: str
) -> None:
    """Empty, malformed or mistyped explain bodies: 400 with the reason."""
    async with httpx.AsyncClient() as http:
        r = await http.post(
            url(server, "/v1/route/explain"),
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]


async def test_metrics_exposes_sessions_and_instances(server: Server) -> None:
    """/metrics is Prometheus text and counts the live session and the available instance."""
    assert server.port is not None
    async with await open_manual(server.port), httpx.AsyncClient() as http:
        r = await http.get(url(server, "/metrics"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert "spear_sessions 1" in lines
    assert 'spear_instance_available{instance="stub"} 1' in lines
    assert "# TYPE spear_request_latency_seconds histogram" in lines


async def test_reload_keeps_live_sessions_on_their_instance(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live session on `a` survives a reload that removes `a`; new sessions see the new set."""
    monkeypatch.setenv("SPEAR_TEST_ADMIN", "adm-123")
    path = tmp_path / "spear.toml"
    server = await start_from_file(nursery, path, ADMIN + two_stubs(("a",)))
    assert server.port is not None
    with trio.fail_after(10):
        async with await open_manual(server.port) as live, httpx.AsyncClient() as http:
            path.write_text(f'[server]\nlisten = "127.0.0.1:0"\n{two_stubs(("b",))}')
            r = await http.post(url(server, "/admin/reload"), headers=ADMIN_AUTH)
            assert r.status_code == 200 and r.json()["backends"] == ["b"]
            assert len((await commit_on(live)).split()) == 1  # still served, by `a`
            names = [
                b["name"] for b in (await http.get(url(server, "/v1/backends"))).json()["data"]
            ]
            assert names == ["b"]
            async with await WsClient.connect(
                server.port, "/v1/realtime?intent=transcription&backend=b"
            ) as new:
                created = await new.recv()
                assert created["spear"]["backend"] == "b"


async def test_bad_reload_is_refused_and_the_old_config_stays(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload of an invalid file answers 400 with the key and reason; routing is unchanged."""
    monkeypatch.setenv("SPEAR_TEST_ADMIN", "adm-123")
    path = tmp_path / "spear.toml"
    server = await start_from_file(nursery, path, ADMIN + two_stubs(("a",)))
    path.write_text('[[backends]]\nname = "a"\nkind = "nope"\n')
    async with httpx.AsyncClient() as http:
        r = await http.post(url(server, "/admin/reload"), headers=ADMIN_AUTH)
        body = r.json()
        assert r.status_code == 400 and body["reloaded"] is False
        assert body["error"]["key"] == "backends[0].kind" and "nope" in body["error"]["reason"]
        assert [
            b["name"] for b in (await http.get(url(server, "/v1/backends"))).json()["data"]
        ] == ["a"]


async def test_reload_needs_the_admin_key_when_one_is_configured(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With admin keys configured: no key 401, wrong key 401, the right key 200."""
    monkeypatch.setenv("SPEAR_TEST_ADMIN", "adm-123")
    path = tmp_path / "spear.toml"
    server = await start_from_file(
        nursery, path, 'admin_keys_env = ["SPEAR_TEST_ADMIN"]\n' + two_stubs(("a",))
    )
    async with httpx.AsyncClient() as http:
        assert (await http.post(url(server, "/admin/reload"))).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await http.post(url(server, "/admin/reload"), headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer adm-123"}
        assert (await http.post(url(server, "/admin/reload"), headers=right)).status_code == 200
