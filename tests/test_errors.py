"""Client values quoted back in error messages are JSON and bounded, never a Python repr."""

from __future__ import annotations

import json

import anyio
import httpx

from spear_rt.errors import ECHO_CHARS, echo
from tests.conftest import make_config, running_server


def test_echo_is_json_and_cut_to_its_limit_with_the_length_said() -> None:
    """Short values are their JSON; long ones are cut and say how long they were."""
    assert echo("abc") == '"abc"'
    assert echo({"a": [None, True]}) == '{"a":[null,true]}'
    assert echo(b"\xff") == '"/w=="'  # bytes as msgspec encodes them: base64, still JSON
    long = echo("x" * 100_000)
    assert long.startswith('"' + "x" * (ECHO_CHARS - 1)) and "(100002 characters)" in long
    assert len(long) < ECHO_CHARS + 40


async def test_an_error_never_grows_with_the_value_it_quotes() -> None:
    """A 100 kB `response_format` and a nested `size` get short messages with no repr."""
    async with running_server(make_config()) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            with anyio.fail_after(20):
                huge = await client.post(
                    "/v1/images/generations",
                    json={"model": "stub", "prompt": "a cat", "response_format": "A" * 100_000},
                )
                nested = await client.post(
                    "/v1/images/generations",
                    json={"model": "stub", "prompt": "a cat", "size": {"a": [None, True]}},
                )
    assert huge.status_code == 400 and len(huge.content) < 1000, huge.content[:200]
    assert "(100002 characters)" in huge.json()["error"]["message"]
    message = nested.json()["error"]["message"]
    assert nested.status_code == 400 and '{"a":[null,true]}' in message, message
    assert "None" not in message and "{'" not in message
    assert json.loads(huge.content)["error"]["type"] == "invalid_request_error"
