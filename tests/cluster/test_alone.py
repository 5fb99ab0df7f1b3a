"""A node whose Redis cannot be reached serves as a node alone: sessions open on it, its own
limiter counts, and /metrics says Redis is down."""

from __future__ import annotations

import anyio
import httpx
import pytest

from spear_rt.errors import ConfigError
from spear_rt.server.app import Server
from tests.conftest import ServerFactory, WsClient, make_config
from tests.redis_rig import free_port
from tests.server.test_realtime import BETA, TRANSCRIPTION

KEY = "alone-key-0123456789"


async def test_without_its_redis_a_node_counts_alone(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALONE_KEY", KEY)
    config = make_config(
        server='per_key_rate_per_s = 0.01\nper_key_burst = 2\nclient_keys_env = ["ALONE_KEY"]',
        extra=f'[cluster]\nredis_url = "redis://127.0.0.1:{free_port()}/0"\n'
        "redis_timeout_s = 0.2\n",
    )
    server = await serve(config)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with anyio.fail_after(20):
        client = await WsClient.connect(
            server.port or 0, TRANSCRIPTION, headers=[*BETA, *auth.items()]
        )
        assert (await client.recv())["type"] == "transcription_session.created"
        await client.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            codes = []
            for _ in range(3):
                answer = await http.post(
                    "/v1/chat/completions", json=body, headers={**auth, "spear-backend": "stub"}
                )
                codes.append(answer.status_code)
            metrics = (await http.get("/metrics")).text
            health = (await http.get("/healthz")).json()
    assert codes == [200, 200, 429]  # the node's own bucket: burst 2
    assert "spear_cluster_redis_down 1" in metrics
    assert health["cluster"] == {"redis": "down"}


def test_a_redis_password_variable_that_is_not_set_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_REDIS_PASSWORD", raising=False)
    config = make_config(
        extra='[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n'
        'redis_password_env = "NO_SUCH_REDIS_PASSWORD"\n'
    )
    with pytest.raises(ConfigError) as info:
        Server(config)
    assert info.value.key == "cluster.redis_password_env"
    assert "NO_SUCH_REDIS_PASSWORD" in str(info.value)
