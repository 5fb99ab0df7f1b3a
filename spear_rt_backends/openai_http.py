"""The `openai_http` backend kind: any OpenAI-compatible HTTP server (OpenAI, vLLM, Ollama...).

Each operation is one POST to `base_url` + its path (`base_url` ends in `/v1` by convention).
JSON bodies are forwarded untouched when the edge kept the client's bytes (`raw_body`), else
encoded once from `payload`; a transcription is re-sent as multipart from `request.audio`
and the form fields in `payload`. A streamed answer is relayed chunk by chunk as the
upstream sends it; closing the relay (`aclose`, which the edge does when its client goes
away) closes the upstream response and so its connection: the upstream sees the request
cancelled.

Connections: one pooled `httpx.AsyncClient` per instance (and event loop), HTTP/1.1 with
keep-alive, created on first use and closed by `aclose_clients()` (the server calls it at
shutdown). A plain `http://` upstream is served by our own h11 pool (`_h11_transport`: O(1)
work per request, where httpcore's pool scans every connection); `https://`, and any
instance with `trust_env`, use httpx's own transport. Instance options, all optional:

  max_connections (100), max_keepalive_connections (= max_connections),
  keepalive_expiry_s (30), connect_timeout_s (5), read_timeout_s (300: the longest wait
  for the next bytes), write_timeout_s (30), pool_timeout_s (10), verify_tls (true),
  trust_env (false: no proxy or netrc settings from the environment).

`request.timeout_s`, when set, bounds the whole call (until the answer's head for a stream)
and caps the read timeout.

Errors, at this boundary: an upstream 429 is a retryable `BackendFailure` with the seconds
of its `Retry-After` (or `retry-after-ms`); 408 and 5xx are retryable; other 4xx are not, and
carry the upstream's OpenAI error message; failures to connect or of the connection are
retryable; timeouts are `TimeoutError`; a body that should be JSON and is not is a
non-retryable failure. The API key is sent only as `Authorization: Bearer` and is redacted
(`spear_rt.redact`: before any cut, in any letter case) from every message built here and
from every body relayed: error and success bodies, and streamed chunks as they pass.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from typing import Any

import anyio
import httpx
import msgspec
from anyio.lowlevel import RunVar

from spear_rt.backend import (
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    TranscriptionSpec,
    TranscriptionUpstream,
)
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport, Usage
from spear_rt.redact import Redactor, StreamRedactor, redact_body, redactor_for, register_secret
from spear_rt_backends._h11_transport import H11Transport

PATHS = {
    Operation.CHAT_COMPLETIONS: "/chat/completions",
    Operation.EMBEDDINGS: "/embeddings",
    Operation.SPEECH_TO_TEXT: "/audio/transcriptions",
    Operation.TEXT_TO_SPEECH: "/audio/speech",
    Operation.IMAGE_GENERATION: "/images/generations",
}
MAX_ERROR_MESSAGE = 2000  # characters of an upstream error message we pass on

_encoder = msgspec.json.Encoder()


# --- what we read of the upstream's answers ------------------------------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    seconds: float | None = None  # transcriptions billed by duration


class _Answer(msgspec.Struct):
    """Only `usage` is decoded (the rest is validated as JSON and skipped)."""

    usage: _Usage | None = None


class _ImagesAnswer(msgspec.Struct):
    data: list[msgspec.Raw] = msgspec.field(default_factory=list)
    usage: _Usage | None = None


class _ErrorDetail(msgspec.Struct):
    message: str | None = None


class _ErrorBody(msgspec.Struct):
    """OpenAI's `{"error": {"message"}}`, vLLM's `{"message"}`, FastAPI's `{"detail"}`."""

    error: _ErrorDetail | str | None = None
    message: str | None = None
    detail: Any = None


_answer = msgspec.json.Decoder(_Answer)
_images_answer = msgspec.json.Decoder(_ImagesAnswer)
_error_body = msgspec.json.Decoder(_ErrorBody)


# --- the kind ------------------------------------------------------------------------------


class _Pooled(msgspec.Struct, kw_only=True):
    client: httpx.AsyncClient
    lean: H11Transport | None  # plain http://: JSON skips httpx's client layer
    prefix: str  # base_url without its trailing slash
    urls: dict[str, httpx.URL] = msgspec.field(default_factory=dict)  # parsed once per path


class OpenAIHttpKind:
    """The `openai_http` backend kind (one-shot operations over HTTP)."""

    name = "openai_http"
    extra = None  # httpx is a core dependency
    defaults = InstanceDefaults(
        ops=frozenset(PATHS),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_TOOLS,
                Feature.SUPPORTS_JSON_SCHEMA,
                Feature.SUPPORTS_DIMENSIONS,
                Feature.SUPPORTS_LANGUAGE,
                Feature.SUPPORTS_VOICES,
                Feature.SUPPORTS_IMAGE_INPUT,
            }
        ),
        transports=frozenset({Transport.HTTP}),
        hosting=Hosting.REMOTE,
    )

    def __init__(self) -> None:
        # Clients belong to the event loop that made them: one dict per running loop.
        self._clients: RunVar[dict[tuple[Any, ...], _Pooled]] = RunVar("openai_http_clients")

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """An instance needs a base_url (its key is optional: local servers take none)."""
        if not instance.base_url:
            return "openai_http needs base_url (e.g. https://api.openai.com/v1)"
        return None

    def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Realtime transcription is not served over plain HTTP."""
        raise BackendFailure("openai_http does not serve realtime transcription")

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """Send one request upstream and return its answer (or a relay of its stream)."""
        path = PATHS.get(request.operation)
        if path is None:
            raise BackendFailure(f"openai_http does not serve {request.operation}")
        pooled = self._pooled(instance)
        secret = instance.api_key.reveal() if instance.api_key is not None else None
        register_secret(secret)  # for log lines, too
        redactor = redactor_for(secret)

        with _translated(redactor), _deadline(request.timeout_s):
            response = await _send(pooled, path, request, secret)
            relayed = False
            try:
                if response.status_code >= 300:
                    raise _failure(
                        response.status_code, await response.aread(), response.headers, redactor
                    )
                content_type = response.headers.get("content-type", "application/octet-stream")
                if request.stream:
                    relayed = True
                    return OneShotResponse(
                        content_type=content_type,
                        stream=_Relay(response, redactor),
                        status=response.status_code,
                    )
                body = await redact_body(redactor, await response.aread())
            finally:
                if not relayed:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
        usage = _usage_of(request, body, content_type, response.status_code)
        return OneShotResponse(
            content_type=content_type, body=body, usage=usage, status=response.status_code
        )

    def _pooled(self, instance: InstanceInfo) -> _Pooled:
        """This instance's client in the running event loop, created on first use."""
        try:
            clients = self._clients.get()
        except LookupError:
            clients = {}
            self._clients.set(clients)
        key = (instance.name, instance.base_url, *sorted(instance.options.items()))
        pooled = clients.get(key)
        if pooled is None:
            prefix = (instance.base_url or "").rstrip("/")
            client, lean = _new_client(instance)
            pooled = clients[key] = _Pooled(client=client, lean=lean, prefix=prefix)
        return pooled

    async def aclose(self) -> None:
        """Close every client of the running event loop."""
        clients = self._clients.get({})
        self._clients.set({})
        with anyio.CancelScope(shield=True):
            for pooled in clients.values():
                await pooled.client.aclose()


KIND = OpenAIHttpKind()


async def aclose_clients() -> None:
    """Close the pooled connections of every instance (the server calls this at shutdown)."""
    await KIND.aclose()


# --- streaming -----------------------------------------------------------------------------


class _Relay:
    """The upstream's streamed body, chunk by chunk as it arrives.

    The next chunk is read only when the consumer asks for it (backpressure reaches the
    upstream through TCP). `aclose` closes the upstream response, and with it the
    connection when the body was not complete: that is how the upstream learns the request
    was cancelled. It is also closed once the body ends or a read fails.
    """

    def __init__(self, response: httpx.Response, redactor: Redactor) -> None:
        self._response = response
        self._chunks = response.aiter_bytes()
        self._redactor = redactor
        self._stream: StreamRedactor | None = redactor.stream()  # None once the body ended

    def __aiter__(self) -> _Relay:
        return self

    async def __anext__(self) -> bytes:
        try:
            while self._stream is not None:
                try:
                    with _translated(self._redactor):
                        chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    tail, self._stream = self._stream.end(), None
                    if tail:
                        return tail
                    break
                out = self._stream.feed(chunk)
                if out:  # else all of it could be the start of a key: read on
                    return out
            raise StopAsyncIteration
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._response.aclose()
            # httpx reads through a chain of async generators that nothing closes; resumed
            # on the closed connection they all end now (instead of in the GC's finalizer).
            with suppress(Exception):
                while True:
                    await self._chunks.__anext__()


# --- helpers -------------------------------------------------------------------------------


async def _send(
    pooled: _Pooled, path: str, request: OneShotRequest, secret: str | None
) -> httpx.Response:
    """The upstream's answer, body unread. JSON to a plain-HTTP upstream goes straight to our
    h11 pool (no httpx Request, URL merge or cookie jar per request); the rest through httpx."""
    lean = pooled.lean
    if lean is None or request.operation is Operation.SPEECH_TO_TEXT:
        return await pooled.client.send(_build(pooled, path, request, secret), stream=True)
    url = pooled.urls.get(path)
    if url is None:
        url = pooled.urls[path] = httpx.URL(pooled.prefix + path)
    body = request.raw_body if request.raw_body is not None else _encoder.encode(request.payload)
    headers = [
        (b"Host", url.netloc),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % len(body)),
    ]
    if secret:
        headers.append((b"Authorization", b"Bearer " + secret.encode()))
    timeouts = _timeout(pooled.client, request).as_dict()
    return await lean.send(b"POST", url, headers, body, timeouts)


def _build(
    pooled: _Pooled, path: str, request: OneShotRequest, secret: str | None
) -> httpx.Request:
    """The upstream request: JSON as the client sent it (or encoded once), or multipart."""
    client = pooled.client
    headers = {"Authorization": "Bearer " + secret} if secret else {}
    timeout = _timeout(client, request)
    if request.operation is not Operation.SPEECH_TO_TEXT:
        headers["Content-Type"] = "application/json"
        body = request.raw_body
        if body is None:
            body = _encoder.encode(request.payload)
        return client.build_request(
            "POST", pooled.prefix + path, headers=headers, content=body, timeout=timeout
        )
    if request.audio is None:
        raise BackendFailure("speech_to_text needs an audio file", status=400)
    audio = request.audio
    files = {"file": (audio.filename, audio.data, audio.content_type)}
    data = _form_fields(request.payload)
    return client.build_request(
        "POST", pooled.prefix + path, headers=headers, files=files, data=data, timeout=timeout
    )


def _new_client(instance: InstanceInfo) -> tuple[httpx.AsyncClient, H11Transport | None]:
    """The instance's client and, for a plain-HTTP upstream, the h11 pool it sends through."""
    options = instance.options

    def number(name: str, default: float) -> float:
        return float(options.get(name, default))

    max_connections = int(number("max_connections", 100))
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=int(number("max_keepalive_connections", max_connections)),
        keepalive_expiry=number("keepalive_expiry_s", 30.0),
    )
    timeout = httpx.Timeout(
        connect=number("connect_timeout_s", 5.0),
        read=number("read_timeout_s", 300.0),
        write=number("write_timeout_s", 30.0),
        pool=number("pool_timeout_s", 10.0),
    )
    trust_env = bool(options.get("trust_env", False))
    plain = (instance.base_url or "").startswith("http://") and not trust_env
    lean = H11Transport(limits) if plain else None
    client = httpx.AsyncClient(
        limits=limits,
        timeout=timeout,
        http1=True,
        http2=False,
        follow_redirects=False,
        verify=bool(options.get("verify_tls", True)),
        trust_env=trust_env,
        transport=lean,
    )
    return client, lean


def _timeout(client: httpx.AsyncClient, request: OneShotRequest) -> httpx.Timeout:
    """The client's timeouts, with reads capped by the request's own timeout."""
    base = client.timeout
    if request.timeout_s is None:
        return base
    read = request.timeout_s if base.read is None else min(base.read, request.timeout_s)
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


@contextmanager
def _deadline(timeout_s: float | None) -> Iterator[None]:
    if timeout_s is None:
        yield
    else:
        with anyio.fail_after(timeout_s):
            yield


@contextmanager
def _translated(redactor: Redactor) -> Iterator[None]:
    """httpx errors -> TimeoutError / BackendFailure (no httpx object, so no header, kept)."""
    try:
        yield
    except httpx.PoolTimeout:
        raise BackendFailure(
            "no upstream connection came free (max_connections reached)", retryable=True
        ) from None
    except httpx.TimeoutException as exc:
        raise TimeoutError(f"upstream timed out ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        message = redactor.text(f"upstream connection failed: {type(exc).__name__}: {exc}")
        raise BackendFailure(message, retryable=True) from None
    except httpx.HTTPError as exc:
        raise BackendFailure(redactor.text(f"upstream request failed: {exc}")) from None


def _failure(
    status: int, body: bytes, headers: httpx.Headers, redactor: Redactor
) -> BackendFailure:
    """The BackendFailure for an upstream error answer (redacted whole, then cut)."""
    message = _error_message(body)
    message = redactor.text(message)[:MAX_ERROR_MESSAGE] if message else None
    message = message or f"upstream answered HTTP {status}"
    if status == 429 or status == 408 or status >= 500:
        return BackendFailure(
            message, retryable=True, status=status, retry_after_s=_retry_after(headers)
        )
    return BackendFailure(message, status=status)


def _error_message(body: bytes) -> str | None:
    try:
        error = _error_body.decode(body)
    except msgspec.DecodeError:
        return None
    match error.error:
        case _ErrorDetail(message=str(message)) if message:
            return message
        case str(message) if message:
            return message
    if error.message:
        return error.message
    if isinstance(error.detail, str) and error.detail:
        return error.detail
    return None


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, `Retry-After` seconds or an HTTP date."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(float(ms) / 1000, 0.0)
        if (value := headers.get("retry-after")) is None:
            return None
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(headers["retry-after"])
    except (KeyError, TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)  # an HTTP date is wall-clock time


def _form_fields(payload: dict[str, Any]) -> dict[str, str | list[str]]:
    """Multipart form fields from a transcription's payload (booleans as JSON spells them)."""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else _encoder.encode(value).decode()

    fields: dict[str, str | list[str]] = {}
    for name, value in payload.items():
        if name == "file" or value is None:
            continue
        fields[name] = [text(v) for v in value] if isinstance(value, list) else text(value)
    return fields


def _usage_of(request: OneShotRequest, body: bytes, content_type: str, status: int) -> Usage | None:
    """What the answer says was used (or what the request shows, for audio)."""
    operation = request.operation
    if operation is Operation.TEXT_TO_SPEECH:
        return Usage(characters=len(str(request.payload.get("input", ""))))
    audio_seconds = 0.0
    if operation is Operation.SPEECH_TO_TEXT:
        audio = request.audio
        if audio is not None and audio.pcm is not None and audio.rate_hz:
            audio_seconds = audio.pcm.size / audio.rate_hz
    if not content_type.startswith("application/json"):
        return Usage(audio_seconds=audio_seconds) if audio_seconds else None
    images = 0
    try:
        if operation is Operation.IMAGE_GENERATION:
            answer = _images_answer.decode(body)
            images, usage = len(answer.data), answer.usage
        else:
            usage = _answer.decode(body).usage
    except msgspec.ValidationError:
        usage = None  # valid JSON in a shape we do not know: no usage, not an error
    except msgspec.DecodeError:
        raise BackendFailure("the upstream answered invalid JSON", status=status) from None
    if usage is None:
        return (
            Usage(audio_seconds=audio_seconds, images=images) if audio_seconds or images else None
        )
    return Usage(
        input_tokens=usage.prompt_tokens or usage.input_tokens or 0,
        output_tokens=usage.completion_tokens or usage.output_tokens or 0,
        audio_seconds=usage.seconds or audio_seconds,
        images=images,
    )
