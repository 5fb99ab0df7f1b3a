"""The upstream key never reaches a client or a log: redacted before any cut, in any case,
in error and success bodies, in streamed chunks (a key split across two included), in logs.

End to end against the fake OpenAI upstream (tests/fakes/openai_upstream.py), which echoes
what it is sent: the test makes it echo the key.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from spear_rt.redact import LogRedactor, Redactor, register_secret
from spear_rt.server.app import Server
from spear_rt_backends.openai_http import MAX_ERROR_MESSAGE, aclose_clients
from tests.conftest import ServerFactory, make_config
from tests.fakes.openai_upstream import FakeOpenAI

KEY = "sk-FAKESECRET-redact-0123456789abcdef"
KEY_ENV = "SPEAR_TEST_REDACT_KEY"
BOUND_S = 10


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def leaks(text: str) -> bool:
    """Any 8 consecutive characters of the key, in any case."""
    lowered, key = text.lower(), KEY.lower()
    return any(key[i : i + 8] in lowered for i in range(len(key) - 7))


@pytest.fixture(autouse=True)
async def _close_upstream_pools() -> AsyncIterator[None]:
    yield
    await aclose_clients()


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOpenAI:
    upstream = FakeOpenAI()
    await nursery.start(upstream.serve)
    return upstream


@pytest.fixture
async def server(serve: ServerFactory, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv(KEY_ENV, KEY)
    backends = (
        f'[[credentials]]\nname = "up"\napi_key_env = "{KEY_ENV}"\n'
        f'[[backends]]\nname = "up"\nkind = "openai_http"\nbase_url = "{fake.base_url}"\n'
        'credential_ref = "up"\n'
    )
    return await serve(make_config(backends=backends))


async def post(server: Server, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        with trio.fail_after(BOUND_S):
            return await client.post("/v1/chat/completions", json=body)


async def test_a_key_echoed_next_to_the_cut_is_not_left_in_part(
    server: Server, fake: FakeOpenAI
) -> None:
    """The message is cut at MAX_ERROR_MESSAGE right after the key's second-to-last char."""
    fake.fail(400, message="x" * (MAX_ERROR_MESSAGE - len(KEY) + 1) + KEY)
    response = await post(server, chat("hi"))
    assert response.status_code == 400
    assert not leaks(response.text), response.text[-60:]


async def test_an_upper_cased_echo_in_an_error_is_redacted(
    server: Server, fake: FakeOpenAI
) -> None:
    fake.fail(401, message=f"invalid key {KEY.upper()} (and {KEY.swapcase()})")
    response = await post(server, chat("hi"))
    assert response.status_code == 401
    assert not leaks(response.text) and "***" in response.json()["error"]["message"]


async def test_a_success_body_echoing_the_key_is_redacted(server: Server) -> None:
    response = await post(server, chat(f"my key is {KEY.upper()}"))
    assert response.status_code == 200
    content = response.json()["choices"][0]["message"]["content"]
    assert not leaks(response.text) and content == "echo: my key is ***"


async def test_a_streamed_key_split_across_two_chunks_is_redacted(
    server: Server, fake: FakeOpenAI
) -> None:
    """The upstream sends the key's first half, waits, then the rest: no part of it is relayed,
    and what came before it is relayed without waiting for the rest."""
    head = b'data: {"choices":[{"index":0,"delta":{"content":"before '
    key = KEY.encode()
    events = [head + key[:12], key[12:] + b' after"}}]}\n\n', b"data: [DONE]\n\n"]
    slow = fake.slow_stream(events)
    received = b""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        with trio.fail_after(BOUND_S):
            request = client.build_request(
                "POST", "/v1/chat/completions", json=chat("x", stream=True)
            )
            response = await client.send(request, stream=True)
            assert response.status_code == 200
            chunks = response.aiter_raw()
            slow.release()
            while b"before " not in received:
                received += await chunks.__anext__()
            slow.release(2)
            async for chunk in chunks:
                received += chunk
            await response.aclose()
    text = received.decode()
    assert "before *** after" in text and text.endswith("data: [DONE]\n\n")
    assert not leaks(text)


async def test_stream_redactor_catches_a_key_cut_anywhere() -> None:
    redactor = Redactor([KEY])
    body = b"data: one " + KEY.upper().encode() + b" two\n\n"
    for cut in range(len(body) + 1):
        stream = redactor.stream()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.end()
        assert out == b"data: one *** two\n\n", cut
    stream = redactor.stream()
    assert stream.feed(b"data: no key here\n\n") == b"data: no key here\n\n"  # nothing held
    assert stream.feed(b"data: sk-FAK") == b"data: "  # could be the key: held
    assert stream.feed(b"EPLANT\n\n") == b"sk-FAKEPLANT\n\n"  # was not


async def test_short_placeholder_keys_are_not_looked_for_in_bodies() -> None:
    redactor = Redactor(["ollama"])
    assert redactor.body(b"Ollama runs models") == b"Ollama runs models"
    assert redactor.text("bad key ollama") == "bad key ***"


async def test_log_records_are_redacted_message_and_traceback() -> None:
    register_secret(KEY)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(LogRedactor())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("upstream said %s", KEY.upper())
        try:
            raise ValueError(f"echo {KEY}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "upstream said ***" in text and "ValueError: echo ***" in text
    assert not leaks(text)


async def test_the_server_registers_upstream_keys_for_its_logs(server: Server) -> None:
    from spear_rt import redact

    assert KEY in redact._registered
    assert json.dumps(redact._log_redactor.text(KEY)) == '"***"'


async def test_a_large_body_is_redacted_in_slices_across_their_seams() -> None:
    from spear_rt.redact import SLICE_BYTES, redact_body

    redactor = Redactor([KEY])
    at = SLICE_BYTES - 5  # the key straddles the first seam
    data = b"a" * at + KEY.encode() + b"b" * SLICE_BYTES
    out = await redact_body(redactor, data)
    assert out == b"a" * at + b"***" + b"b" * SLICE_BYTES


async def test_realtime_upstream_messages_are_redacted_before_the_cut() -> None:
    from spear_rt_backends.openai_realtime.translate import MAX_MESSAGE_CHARS, Translator

    translator = Translator(Redactor([KEY]).text)
    message = translator._text("x" * (MAX_MESSAGE_CHARS - len(KEY) + 1) + KEY.upper())
    assert not leaks(message) and message.endswith("***")
