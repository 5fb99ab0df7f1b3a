"""Two nodes serving wss:// with the same certificate (one process, one redis-server): a
resume landing on the other node is forwarded over TLS, trusting only that certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import anyio
import pytest

from tests.conftest import ServerFactory, WsClient, make_config
from tests.selfsigned import make_cert
from tests.server.test_realtime import BETA, TRANSCRIPTION


async def wss(port: int, path: str, context: ssl.SSLContext, *headers: tuple[str, str]) -> WsClient:
    stream = await anyio.connect_tcp("127.0.0.1", port, ssl_context=context)
    return await WsClient.over(stream, port, path, headers=[*BETA, *headers])  # type: ignore[arg-type]


async def test_a_resume_is_forwarded_over_tls(
    serve: ServerFactory, redis_url: str, tmp_path: Path
) -> None:
    cert, key = make_cert(tmp_path)
    tls = f'tls_cert = "{cert}"\ntls_key = "{key}"'
    cluster = f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "tls{id(tmp_path)}:"\n'
    a = await serve(make_config(server=tls, extra=cluster))
    b = await serve(make_config(server=tls, extra=cluster))
    client_ssl = ssl.create_default_context(cafile=str(cert))
    assert a.port is not None and b.port is not None
    with anyio.fail_after(20):
        first = await wss(a.port, TRANSCRIPTION, client_ssl)
        created = await first.recv()
        session_id, token = created["session"]["id"], created["spear"]["resume_token"]
        await first.stream.transport_stream.aclose()  # type: ignore[attr-defined]  # lost
        path = f"{TRANSCRIPTION}&session_id={session_id}&last_seq={created['seq']}"
        second = await wss(b.port, path, client_ssl, ("Spear-Resume-Token", token))
        hello = await second.recv()
        assert hello["type"] == "spear.session.resumed", hello
        assert b.cluster is not None and b.cluster.forwarded == 1
        await second.send({"type": "input_audio_buffer.clear"})  # the session goes on
        assert (await second.recv())["type"] == "input_audio_buffer.cleared"
        await second.stream.transport_stream.aclose()  # type: ignore[attr-defined]


def test_a_client_context_is_made_only_for_nodes_that_serve_tls() -> None:
    """Only nodes serving TLS get a client context (and it pins the shared certificate)."""
    from spear_rt.cluster.forward import node_tls

    assert node_tls(None) is None
    with pytest.raises(FileNotFoundError):
        node_tls("/nonexistent/cert.pem")
