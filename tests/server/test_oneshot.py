"""One-shot endpoints on a real socket: spear headers, fallback and timeouts over real upstreams,
bad input, a client hanging up mid-stream, and per-key limits.

Upstreams are the fake OpenAI server (tests/fakes/openai_upstream) on 127.0.0.1. Every wait is
bounded by `trio.fail_after`; ordering comes from the fake's events, not from sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import h11
import httpx
import pytest
import trio

from spear_rt.server.app import Server
from spear_rt_backends.openai_http import aclose_clients
from tests.conftest import FIXTURES, ServerFactory, make_config
from tests.fakes.openai_upstream import FakeOpenAI, chat_answer

BOUND_S = 10  # no test comes near this; it only turns a hang into a failure
KEY = "sk-upstream-secret-77aa88bb99cc"
KEY_ENV = "SPEAR_TEST_ONESHOT_KEY"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
SPEAR_HEADERS = ("x-spear-instance", "x-spear-attempts", "x-spear-overhead-ms")


@pytest.fixture(autouse=True)
async def _close_upstream_pools() -> AsyncIterator[None]:
    yield
    await aclose_clients()


@pytest.fixture
async def primary(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def secondary(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI()
    await nursery.start(fake.serve)
    return fake


def upstream(name: str, fake: FakeOpenAI, priority: int = 0) -> str:
    return f"""
[[backends]]
name = "{name}"
kind = "openai_http"
base_url = "{fake.base_url}"
credential_ref = "upstream"
priority = {priority}
"""


CREDENTIALS = f'[[credentials]]\nname = "upstream"\napi_key_env = "{KEY_ENV}"\n'


@pytest.fixture
async def fallback(
    serve: ServerFactory,
    primary: FakeOpenAI,
    secondary: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> Server:
    """`primary` (priority 10) falls back to `secondary` (priority 0) for chat and embeddings."""
    monkeypatch.setenv(KEY_ENV, KEY)
    extra = (
        '[policy.by_operation]\nchat_completions = "priority_fallback"\n'
        'embeddings = "priority_fallback"\n' + CREDENTIALS
    )
    backends = upstream("primary", primary, 10) + upstream("secondary", secondary, 0)
    return await serve(make_config(extra=extra, backends=backends))


async def post(
    server: Server,
    path: str,
    body: Any = None,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    files: Any = None,
    data: Any = None,
) -> httpx.Response:
    if content is not None and "content-type" not in {k.lower() for k in headers or {}}:
        headers = {**(headers or {}), "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        with trio.fail_after(BOUND_S):
            return await client.post(
                path, json=body, content=content, headers=headers, files=files, data=data
            )


def error_of(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    """Check an OpenAI-style error answer; its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["message"]
    message: str = error["message"]
    return message


# --- headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT_BODY),
        ("/v1/chat/completions", {**CHAT_BODY, "stream": True}),
        ("/v1/embeddings", {"model": "m", "input": "hello"}),
        (
            "/v1/audio/speech",
            {"model": "m", "input": "hello", "voice": "alloy", "response_format": "wav"},
        ),
        (
            "/v1/images/generations",
            {"prompt": "dot", "size": "256x256", "response_format": "b64_json"},
        ),
    ],
)
async def test_every_answer_names_instance_attempts_and_overhead(
    server: Server, path: str, body: dict[str, Any]
) -> None:
    """Each endpoint's answer carries x-spear-instance, x-spear-attempts, x-spear-overhead-ms."""
    response = await post(server, path, body)
    assert response.status_code == 200, response.text
    assert response.headers["x-spear-instance"] == "stub"
    assert response.headers["x-spear-attempts"] == "1"
    assert 0.0 <= float(response.headers["x-spear-overhead-ms"]) < 1000


async def test_transcription_answer_has_the_spear_headers(server: Server) -> None:
    """The multipart endpoint too."""
    wav = (FIXTURES / "speech_turn_left.wav").read_bytes()
    response = await post(
        server,
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", wav, "audio/wav")},
        data={"model": "whisper-1"},
    )
    assert response.status_code == 200, response.text
    assert all(name in response.headers for name in SPEAR_HEADERS)
    assert response.json()["text"]


# --- fallback and timeouts ---------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_an_upstream_error_falls_back_to_the_next_priority(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI, status: int
) -> None:
    """priority_fallback: the primary's 5xx/429 is retried on the secondary, which answers."""
    primary.fail(status, retry_after="3")
    response = await post(fallback, "/v1/chat/completions", CHAT_BODY)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi there"
    assert response.headers["x-spear-instance"] == "secondary"
    assert response.headers["x-spear-attempts"] == "2"
    assert len(primary.requests) == len(secondary.requests) == 1
    assert all(
        r.headers["authorization"] == f"Bearer {KEY}" for r in primary.requests + secondary.requests
    )


async def test_a_timeout_falls_back_and_cancels_the_abandoned_request(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """spear-timeout-ms: a stalled primary is abandoned (it sees the hang-up), the secondary
    answers; the time spent waiting on the primary is not counted as spear_rt's overhead."""
    stall = primary.stall()
    response = await post(
        fallback, "/v1/chat/completions", CHAT_BODY, headers={"spear-timeout-ms": "300"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-spear-instance"] == "secondary"
    assert response.headers["x-spear-attempts"] == "2"
    assert float(response.headers["x-spear-overhead-ms"]) < 100
    with trio.fail_after(BOUND_S):
        await stall.disconnected.wait()


async def test_a_stream_falls_back_before_its_first_byte(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """A streamed request whose primary answers 502 is streamed by the secondary."""
    primary.fail(502)
    response = await post(fallback, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
    assert response.status_code == 200
    assert response.headers["x-spear-instance"] == "secondary"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")


async def test_all_upstreams_failing_is_a_502(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """Every instance answers 5xx: BackendError 502, saying how many attempts were made."""
    primary.fail(503)
    secondary.fail(500)
    response = await post(fallback, "/v1/embeddings", {"model": "m", "input": "x"})
    message = error_of(response, 502, "BackendError")
    assert "after 2 attempts" in message
    assert "Retry-After" not in response.headers


async def test_all_upstreams_rate_limited_is_a_429_with_retry_after(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """Every instance answers 429: RateLimited 429 with the last upstream's Retry-After."""
    primary.fail(429, retry_after="7")
    secondary.fail(429, retry_after="3")
    response = await post(fallback, "/v1/chat/completions", CHAT_BODY)
    error_of(response, 429, "RateLimited")
    assert response.headers["retry-after"] == "3"


async def test_a_429_without_retry_after_still_says_when_to_retry(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """An upstream 429 without Retry-After: the client still gets one (at least 1 s)."""
    primary.fail(429)
    secondary.fail(429)
    response = await post(fallback, "/v1/chat/completions", CHAT_BODY)
    error_of(response, 429, "RateLimited")
    assert int(response.headers["retry-after"]) >= 1


async def test_all_upstreams_timing_out_is_a_504(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """Every instance stalls past spear-timeout-ms: Timeout 504; both upstreams see the hang-up."""
    stalls = [primary.stall(), secondary.stall()]
    response = await post(
        fallback, "/v1/chat/completions", CHAT_BODY, headers={"spear-timeout-ms": "200"}
    )
    error_of(response, 504, "Timeout")
    with trio.fail_after(BOUND_S):
        for stall in stalls:
            await stall.disconnected.wait()


async def test_an_upstream_400_is_passed_on_without_fallback(
    fallback: Server, primary: FakeOpenAI, secondary: FakeOpenAI
) -> None:
    """A client error upstream is not retried elsewhere; its message (key redacted) comes back."""
    primary.fail(400, message=f"bad request, and your key {KEY} is showing")
    response = await post(fallback, "/v1/chat/completions", CHAT_BODY)
    message = error_of(response, 400, "backend_error")
    assert KEY not in response.text and "***" in message
    assert secondary.requests == []


async def test_an_upstream_answering_garbage_is_a_502(
    fallback: Server, primary: FakeOpenAI
) -> None:
    """A 200 whose body is not JSON: BackendError 502 (the garbage is not relayed)."""
    primary.garbage()
    response = await post(fallback, "/v1/embeddings", {"model": "m", "input": "x"})
    error_of(response, 502, "backend_error")
    assert "<html>" not in response.text


# --- bad input ---------------------------------------------------------------------------


async def test_malformed_json_is_400(server: Server) -> None:
    response = await post(server, "/v1/chat/completions", content=b'{"model": "m", "messages": [')
    assert "not valid JSON" in error_of(response, 400, "invalid_json")


async def test_empty_body_and_non_object_are_400(server: Server) -> None:
    error_of(await post(server, "/v1/embeddings", content=b""), 400, "invalid_json")
    error_of(await post(server, "/v1/embeddings", content=b"[1, 2]"), 400, "invalid_json")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": "x"}, "messages"),
        ("/v1/chat/completions", {"model": 5, "messages": []}, "model"),
        ("/v1/chat/completions", {**CHAT_BODY, "stream": "yes"}, "stream"),
        ("/v1/embeddings", {"model": "m", "input": {"a": 1}}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": "8"}, "dimensions"),
        ("/v1/audio/speech", {"model": "m", "input": 3}, "input"),
        ("/v1/images/generations", {"prompt": "p", "n": "two"}, "n"),
    ],
)
async def test_wrong_types_are_400_naming_the_field(
    server: Server, path: str, body: dict[str, Any], param: str
) -> None:
    """A field of the wrong type: 400 invalid_value with `param` naming it."""
    message = error_of(await post(server, path, body), 400, "invalid_value", param)
    assert "Expected" in message


async def test_empty_messages_and_empty_input_are_400(server: Server) -> None:
    error_of(
        await post(server, "/v1/chat/completions", {"model": "m", "messages": []}),
        400,
        "invalid_value",
        "messages",
    )
    error_of(
        await post(server, "/v1/embeddings", {"model": "m", "input": []}),
        400,
        "invalid_value",
        "input",
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/audio/speech", {"input": "x"}),
    ],
)
async def test_missing_model_is_400(server: Server, path: str, body: dict[str, Any]) -> None:
    message = error_of(await post(server, path, body), 400, "missing_required_parameter", "model")
    assert "model" in message


async def test_transcription_without_model_is_400(server: Server) -> None:
    wav = (FIXTURES / "speech_turn_left.wav").read_bytes()
    response = await post(
        server, "/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")}
    )
    error_of(response, 400, "missing_required_parameter", "model")


async def test_oversized_body_is_413(serve: ServerFactory) -> None:
    """Past max_http_body_bytes: 413 with the limit in the message."""
    server = await serve(make_config(server="max_http_body_bytes = 1024"))
    body = {"model": "m", "input": "x" * 2000}
    message = error_of(await post(server, "/v1/embeddings", body), 413, "body_too_large")
    assert "1024" in message
    # a body under the limit on the same server is fine
    assert (await post(server, "/v1/embeddings", {"model": "m", "input": "x"})).status_code == 200


async def test_garbage_audio_upload_is_400(server: Server) -> None:
    """Bytes that no audio decoder reads, sent as a WAV: 400 unsupported_audio."""
    response = await post(
        server,
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", b"RIFF not really a wav file" * 10, "audio/wav")},
        data={"model": "whisper-1"},
    )
    assert "a.wav" in error_of(response, 400, "unsupported_audio", "file")


async def test_upload_without_file_is_400(server: Server) -> None:
    response = await post(
        server,
        "/v1/audio/transcriptions",
        files={"other": ("x", b"1")},
        data={"model": "whisper-1"},
    )
    error_of(response, 400, "missing_required_parameter", "file")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"model": "whisper-1"}'),
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=xyz", b"no boundary in here"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n',
        ),  # truncated
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nnot a header\r\n\r\nx\r\n--xyz--\r\n"),
    ],
)
async def test_bad_multipart_is_400(server: Server, content_type: str, body: bytes) -> None:
    response = await post(
        server, "/v1/audio/transcriptions", content=body, headers={"content-type": content_type}
    )
    error_of(response, 400, "invalid_multipart")


async def test_unknown_path_is_404_and_wrong_method_405(server: Server) -> None:
    assert "/v1/nothing" in error_of(await post(server, "/v1/nothing", {}), 404, "not_found")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        response = await client.get("/v1/chat/completions")
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


async def test_unknown_backend_header_is_400_naming_the_configured_ones(server: Server) -> None:
    response = await post(
        server, "/v1/chat/completions", CHAT_BODY, headers={"spear-backend": "nope"}
    )
    message = error_of(response, 400, "InvalidRequest")
    assert '"nope"' in message and "stub" in message


async def test_bad_timeout_header_is_400(server: Server) -> None:
    response = await post(
        server, "/v1/chat/completions", CHAT_BODY, headers={"spear-timeout-ms": "soon"}
    )
    error_of(response, 400, "invalid_value", "spear-timeout-ms")


async def test_a_feature_no_instance_has_is_404_missing_capabilities(server: Server) -> None:
    """`tools` with only the stub: MissingCapabilities 404, with the reason per instance."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    response = await post(server, "/v1/chat/completions", {**CHAT_BODY, "tools": [tool]})
    error_of(response, 404, "MissingCapabilities")
    spear = response.json()["error"]["spear"]
    assert "supports_tools" in spear["rejected_reasons"]["stub"]
    assert spear["required"]["features"] == ["supports_tools"]


# --- a client hanging up mid-stream ------------------------------------------------------


async def test_a_client_hanging_up_mid_stream_cancels_the_upstream(
    serve: ServerFactory, primary: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read one SSE event with a raw client, close the socket: the upstream sees the hang-up
    before the rest of the stream was released."""
    monkeypatch.setenv(KEY_ENV, KEY)
    server = await serve(make_config(extra=CREDENTIALS, backends=upstream("up", primary)))
    slow = primary.slow_stream()
    body = json.dumps({**CHAT_BODY, "stream": True}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(BOUND_S):
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        await stream.send(head + body)
        slow.release(1)
        received = b""
        while b"data: " not in received:
            received += await stream.receive()
        assert received.startswith(b"HTTP/1.1 200 ")
        assert b"x-spear-instance: up" in received.lower()
        await stream.aclose()
        await slow.disconnected.wait()
    assert slow.sent == 1
    assert primary.disconnects == 1


# --- client keys and per-key limits ------------------------------------------------------


@pytest.fixture
async def keyed(serve: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("SPEAR_TEST_CLIENT_A", "ck-aaaa")
    monkeypatch.setenv("SPEAR_TEST_CLIENT_B", "ck-bbbb")
    config = make_config(
        server='client_keys_env = ["SPEAR_TEST_CLIENT_A", "SPEAR_TEST_CLIENT_B"]\n'
        "per_key_rate_per_s = 0.5\nper_key_burst = 1"
    )
    return await serve(config)


async def test_without_a_valid_client_key_is_401(keyed: Server) -> None:
    error_of(
        await post(keyed, "/v1/embeddings", {"model": "m", "input": "x"}), 401, "invalid_api_key"
    )
    response = await post(
        keyed,
        "/v1/embeddings",
        {"model": "m", "input": "x"},
        headers={"Authorization": "Bearer ck-wrong"},
    )
    error_of(response, 401, "invalid_api_key")


async def test_a_key_over_its_rate_is_429_with_retry_after(keyed: Server) -> None:
    """per_key_rate_per_s: the second request at once is 429 with Retry-After; another key
    has its own bucket."""
    a = {"Authorization": "Bearer ck-aaaa"}
    assert (
        await post(keyed, "/v1/embeddings", {"model": "m", "input": "x"}, headers=a)
    ).status_code == 200
    response = await post(keyed, "/v1/embeddings", {"model": "m", "input": "x"}, headers=a)
    error_of(response, 429, "RateLimited")
    assert 1 <= int(response.headers["retry-after"]) <= 2
    b = {"Authorization": "Bearer ck-bbbb"}
    assert (
        await post(keyed, "/v1/embeddings", {"model": "m", "input": "x"}, headers=b)
    ).status_code == 200


# --- upstream connections (openai_http's h11 pool) ---------------------------------------


class HangingUpUpstream:
    """Answers each request with one chat completion, then closes the connection: with
    `Connection: close` when `announce`, else silently (a server's keep-alive timeout)."""

    def __init__(self, *, announce: bool) -> None:
        self.announce = announce
        self.connections = 0
        self.hung_up = 0
        self.port = 0
        self._changed = anyio.Event()

    async def wait_hung_up(self, n: int) -> None:
        """Until the upstream has closed `n` connections."""
        while self.hung_up < n:
            await self._changed.wait()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._answer)

    async def _answer(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
            body = json.dumps(chat_answer(CHAT_BODY)).encode()
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            if self.announce:
                headers.append(("Connection", "close"))
            await stream.send(
                conn.send(h11.Response(status_code=200, headers=headers))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
        self.hung_up += 1
        self._changed.set()
        self._changed = anyio.Event()


@pytest.mark.parametrize("announce", [True, False])
async def test_an_upstream_that_hangs_up_after_each_answer_costs_no_request(
    serve: ServerFactory, nursery: trio.Nursery, announce: bool
) -> None:
    """An upstream closing its connection after answering (announced or not): the next
    request goes out on a new connection instead of failing on the closed one."""
    up = HangingUpUpstream(announce=announce)
    await nursery.start(up.serve)
    backend = f'[[backends]]\nname = "up"\nkind = "openai_http"\nbase_url = "http://127.0.0.1:{up.port}/v1"\n'
    server = await serve(make_config(backends=backend))
    for n in (1, 2, 3):
        response = await post(server, "/v1/chat/completions", CHAT_BODY)
        assert response.status_code == 200, response.text
        assert response.headers["x-spear-attempts"] == "1"
        with trio.fail_after(BOUND_S):
            await up.wait_hung_up(n)
    assert up.connections == 3


async def test_upstream_connections_are_reused_across_requests(
    fallback: Server, primary: FakeOpenAI
) -> None:
    """Keep-alive to the upstream: sequential client requests share one upstream connection."""
    for _ in range(5):
        assert (await post(fallback, "/v1/chat/completions", CHAT_BODY)).status_code == 200
    assert (await post(fallback, "/v1/embeddings", {"model": "m", "input": "x"})).status_code == 200
    assert primary.connections == 1
    assert [r.connection for r in primary.requests] == [1] * 6
