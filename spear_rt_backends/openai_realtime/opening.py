"""Opening the upstream: connect, WebSocket handshake, `*.created`, session config, I/O tasks."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import msgspec
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

from spear_rt.backend import InstanceInfo, TranscriptionSpec, UpdateConversation
from spear_rt.errors import BackendFailure
from spear_rt.protocol.settings import Dialect
from spear_rt.redact import redactor_for, register_secret
from spear_rt.wsframes import FastClientProtocol

from . import aio_link
from .connection import READ_SIZE, RealtimeTranscription, _closed_failure
from .conversation import ConversationTranslator
from .options import RealtimeOptions, parse_options, realtime_url
from .translate import _DATA, MAX_MESSAGE_CHARS, Translator, _Assembler, session_update

# websockets logs request headers (Authorization included) at DEBUG: its logger never is.
# (Named after the package, as when this was one module.)
_ws_log = logging.getLogger(__name__.rpartition(".")[0] + ".websocket")
_ws_log.setLevel(logging.INFO)


class _ErrorDetail(msgspec.Struct):
    message: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | str | None = None


_error_body = msgspec.json.Decoder(_ErrorBody)


def _refused(response: Response, redact: Callable[[str], str]) -> BackendFailure:
    """The failure for a handshake answered with something other than 101."""
    status = response.status_code
    try:
        error = _error_body.decode(response.body).error
        detail = error if isinstance(error, str) else error.message if error else None
    except msgspec.DecodeError:
        detail = None
    message = f"the upstream refused the WebSocket (HTTP {status})"
    if detail:
        message += ": " + redact(detail)[:MAX_MESSAGE_CHARS]  # redact first, then cut
    retry_after = None
    with suppress(KeyError, ValueError):
        retry_after = max(float(response.headers["Retry-After"]), 0.0)
    retryable = status in (408, 429) or status >= 500
    return BackendFailure(message, retryable=retryable, status=status, retry_after_s=retry_after)


async def _open(
    url: str,
    headers: dict[str, str],
    update: bytes,
    options: RealtimeOptions,
    translator: Translator,
    assembler: _Assembler,
    redact: Callable[[str], str],
) -> tuple[anyio.abc.ByteStream, FastClientProtocol]:
    """Connect, upgrade, wait for `*.created`, send the session config (no task started)."""
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise BackendFailure(f"openai_realtime: invalid URL: {exc}") from None
    context: ssl.SSLContext | None = None
    if uri.secure:
        context = ssl.create_default_context()
        if not options.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    stage = "connecting"
    try:
        with anyio.fail_after(options.connect_timeout_s):
            stream: anyio.abc.ByteStream
            if aio_link.on_asyncio():  # callbacks once open (aio_link.py says why)
                stream = await aio_link.connect(uri.host, uri.port, context)
            elif context is None:
                stream = await anyio.connect_tcp(uri.host, uri.port)
            else:
                stream = await anyio.connect_tcp(
                    uri.host, uri.port, ssl_context=context, tls_standard_compatible=False
                )
            try:
                stage = "in the WebSocket handshake"
                proto = FastClientProtocol(uri, max_size=options.max_message_bytes, logger=_ws_log)
                request = proto.connect()
                for name, value in headers.items():
                    request.headers[name] = value
                proto.send_request(request)
                await stream.send(b"".join(proto.data_to_send()))
                frames = await _response(stream, proto, redact)
                stage = "waiting for session.created"
                while True:
                    for frame in frames:
                        if isinstance(frame, Frame) and frame.opcode in _DATA:
                            data = assembler.message(frame)
                            if data is not None:
                                translator.decode(data)  # no turn yet: no event to keep
                    if translator.created:
                        break
                    if proto.parser_exc is not None:
                        raise BackendFailure(f"upstream protocol error: {proto.parser_exc}")
                    if proto.close_rcvd is not None:
                        raise _closed_failure(proto)
                    frames = await _read(stream, proto)
                proto.send_text(update)
                await stream.send(b"".join(proto.data_to_send()))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
    except TimeoutError:
        message = f"timed out {stage} ({options.connect_timeout_s:g}s)"
        raise BackendFailure(message, retryable=True) from None
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        message = f"the upstream closed the connection {stage}"
        raise BackendFailure(message, retryable=True) from None
    except OSError as exc:
        message = f"cannot connect to the upstream: {type(exc).__name__}: {exc}"
        raise BackendFailure(redact(message), retryable=True) from None
    return stream, proto


async def _read(stream: anyio.abc.ByteStream, proto: ClientProtocol) -> list[Any]:
    """The events of one read; raises EndOfStream when the connection ended with none."""
    try:
        data = await stream.receive(READ_SIZE)
    except anyio.EndOfStream:
        proto.receive_eof()
        events = proto.events_received()
        if not events:
            raise
        return events
    proto.receive_data(data)
    return proto.events_received()


async def _response(
    stream: anyio.abc.ByteStream, proto: ClientProtocol, redact: Callable[[str], str]
) -> list[Any]:
    """Read the handshake response; the frames that came with it."""
    events: list[Any] = []
    while not events:
        events = await _read(stream, proto)
        if not events and proto.handshake_exc is not None:
            exc = proto.handshake_exc
            raise BackendFailure(f"invalid WebSocket handshake response: {exc}")
    response = events[0]
    if not isinstance(response, Response) or response.status_code != 101:
        raise _refused(response, redact)
    if proto.handshake_exc is not None:
        raise BackendFailure(f"invalid WebSocket handshake: {proto.handshake_exc}")
    return events[1:]


@asynccontextmanager
async def open_realtime_transcription(
    instance: InstanceInfo, spec: TranscriptionSpec
) -> AsyncIterator[RealtimeTranscription]:
    """One upstream connection for one session, closed (with a handshake) on exit.

    The body's own exception leaves unwrapped (not in an ExceptionGroup).
    """
    options = parse_options(instance)
    model = instance.model or spec.model
    query = {"model": model} if options.query_model and model else {}
    secret, redact = _secret(instance)
    translator = Translator(redact)
    update = session_update(options.dialect, spec, model)
    async with _connection(
        instance, {**query, "intent": "transcription"}, options, translator, update, secret
    ) as upstream:
        yield upstream


@asynccontextmanager
async def open_realtime_conversation(
    instance: InstanceInfo, spec: TranscriptionSpec
) -> AsyncIterator[RealtimeTranscription]:
    """One speech-to-speech upstream connection (a whole conversation) for one session."""
    options = parse_options(instance)
    model = instance.model or spec.model
    secret, redact = _secret(instance)
    translator = ConversationTranslator(options.dialect, options.transcription_model, redact)
    update = translator.encode(UpdateConversation({}))
    assert update is not None
    query = {"model": model} if model else {}
    async with _connection(instance, query, options, translator, update, secret) as upstream:
        yield upstream


def _secret(instance: InstanceInfo) -> tuple[str | None, Callable[[str], str]]:
    """The instance's key (registered for redaction) and the redactor of messages."""
    secret = instance.api_key.reveal() if instance.api_key is not None else None
    register_secret(secret)  # for log lines, too
    return secret, redactor_for(secret).text  # case-insensitive


@asynccontextmanager
async def _connection(
    instance: InstanceInfo,
    query: dict[str, str],
    options: RealtimeOptions,
    translator: Translator,
    update: bytes,
    secret: str | None,
) -> AsyncIterator[RealtimeTranscription]:
    if not instance.base_url:
        raise BackendFailure("openai_realtime needs base_url")
    url = realtime_url(instance.base_url, query)
    redact = translator._redact
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    if options.dialect is Dialect.BETA:
        headers["OpenAI-Beta"] = "realtime=v1"
    assembler = _Assembler()
    stream, proto = await _open(url, headers, update, options, translator, assembler, redact)
    upstream = RealtimeTranscription(stream, proto, translator, assembler, options)
    raised: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream.run)
            try:
                yield upstream
            except BaseException as exc:  # re-raised below, outside the task group
                raised = exc
            finally:
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
    if raised is not None:
        raise raised
