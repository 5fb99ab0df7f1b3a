"""Running guests: a worker thread per guest call, next to the guest's own session host.

`guest_host` builds what one guest needs — its fd table, epoll set, `SessionHost` (in the
caller's event loop, routing through the given `SessionManager`) and the `WasmGuest` — and
yields a `GuestRun` whose calls run in a worker thread (``anyio.to_thread`` with a limiter of
`MAX_GUEST_THREADS` shared by the event loop's guests). Leaving the block, or cancelling it,
shuts the fd table down (every blocked ``spear_epoll_wait`` returns), interrupts the guest
(epoch) if it is still running, cancels every session and frees the store. Structured: the
session host and the stopper are tasks of the block's own task group.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import msgspec
from anyio.lowlevel import RunVar

from spear_rt.hostcalls.cchat import (
    ChatSession,
    ChatStream,
    SseText,
    error_body,
)
from spear_rt.hostcalls.chatcalls import StartStream, StreamFeed
from spear_rt.hostcalls.epoll import Clock, EpollSet
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.link import SessionHost
from spear_rt.hostcalls.oneshotfd import CHAT_PATH, Send, Sent
from spear_rt.hostcalls.params import DEFAULT_POLICY, HostPolicy
from spear_rt.hostcalls.upstream import LogSink
from spear_rt.hostcalls.userstream import Executions, UserStreams
from spear_rt.hostcalls.wasm import DEFAULT_LIMITS, GuestLimits, WasmGuest
from spear_rt.server.http import HttpRequest, Response
from spear_rt.session.manager import SessionManager

log = logging.getLogger(__name__)

MAX_GUEST_THREADS = 64
OneShotHandler = Callable[[HttpRequest], Coroutine[Any, Any, Response]]
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("spear_wasm_limiter")


def _guest_limiter() -> anyio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(MAX_GUEST_THREADS)
        _limiter.set(limiter)
        return limiter


@asynccontextmanager
async def guest_host(
    module: bytes | str | Path,
    manager: SessionManager,
    *,
    audio: bytes | None = None,
    limits: GuestLimits = DEFAULT_LIMITS,
    policy: HostPolicy = DEFAULT_POLICY,
    clock: Clock | None = None,
    client_key_id: str | None = None,
    oneshot: OneShotHandler | None = None,
    log_sink: LogSink | None = None,
    stdout: str | None = None,
    executions: Executions | None = None,
) -> AsyncIterator[GuestRun]:
    """A guest with its fd table and session host; leaving the block stops all of it.

    `oneshot` is the server's one-shot handler (`OneShotApi.handle`): a guest's ``cchat_*``
    requests go through it exactly like ``POST /v1/chat/completions``. With `executions`
    (the server's), the guest's user streams are served at its execution's path while it runs.
    """
    table = FdTable(policy=policy)
    host = SessionHost(manager, table, client_key_id=client_key_id)
    streams = UserStreams(table) if executions is not None else None
    send = routed_send(oneshot, client_key_id) if oneshot is not None else None
    start_stream = routed_stream(oneshot, client_key_id, host) if oneshot is not None else None
    epolls = EpollSet(table, clock)
    guest = WasmGuest(
        module,
        table,
        epolls,
        limits=limits,
        audio=audio,
        send=send,
        start_stream=start_stream,
        log_sink=log_sink,
        stdout=stdout,
        streams=streams,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(host.run)
            tg.start_soon(_stop_when_cancelled, guest)
            if executions is not None and streams is not None:
                executions.add(streams)
            try:
                yield GuestRun(guest, streams)
            finally:
                if executions is not None and streams is not None:
                    executions.remove(streams)
                    streams.end()
                tg.cancel_scope.cancel()
                guest.close()
    except BaseExceptionGroup as group:
        # One real error (a GuestError, say) reaches the caller as itself, even when the
        # block was being cancelled at the time.
        cancelled = anyio.get_cancelled_exc_class()
        errors = [e for e in leaves(group) if not isinstance(e, cancelled)]
        if len(errors) == 1:
            raise errors[0] from None
        raise


def routed_send(handle: OneShotHandler, client_key_id: str | None) -> Send:
    """A `Send` through the server's one-shot path, as an HTTP request would go (called in
    the guest's worker thread; the request runs in the event loop)."""

    def send(
        path: str, content_type: str, body: bytes, backend: str | None, timeout_ms: int | None
    ) -> Sent:
        headers = _routing_headers(content_type, backend, timeout_ms)
        request = HttpRequest("POST", path, "", headers, body, client_key_id=client_key_id)
        try:
            response: Any = anyio.from_thread.run(handle, request)
        except Exception:
            log.exception("a guest's request failed in the host")
            failed = error_body("internal_error", "the host failed the request")
            return Sent(500, failed, "application/json")
        if not isinstance(response, Response):  # a stream nobody asked for: not ours to read
            anyio.from_thread.run(response.response.stream.aclose)
            failed = error_body("unexpected_stream", "the backend answered with a stream")
            return Sent(502, failed, "application/json")
        instance = next((v for k, v in response.headers if k == "x-spear-instance"), None)
        return Sent(response.status, response.body, response.content_type, instance)

    return send


def routed_stream(
    handle: OneShotHandler, client_key_id: str | None, host: SessionHost
) -> StartStream:
    """A `StartStream`: a streaming chat request as a task of the guest's session host, its
    text fed to the stream fd as it arrives (cancelled when the guest closes the fd)."""

    def start(
        body: dict[str, Any], session: ChatSession, stream: ChatStream, feed: StreamFeed
    ) -> None:
        async def run() -> None:
            headers = _routing_headers("application/json", session.backend, session.timeout_ms)
            request = HttpRequest("POST", CHAT_PATH, "", headers, msgspec.json.encode(body),
                                  client_key_id=client_key_id)  # fmt: skip
            with anyio.CancelScope() as scope:
                stream.cancel = lambda: host.call_soon(scope.cancel)
                await _stream_into(handle, request, stream, feed)

        host.spawn(run)

    return start


async def _stream_into(
    handle: OneShotHandler, request: HttpRequest, stream: ChatStream, feed: StreamFeed
) -> None:
    sse = SseText()
    try:
        answer: Any = await handle(request)
        if isinstance(answer, Response):  # refused or failed before streaming
            feed.end(stream, {}, answer.body if answer.status != 200 else None)
            return
        chunks = answer.response.stream
        try:
            async for chunk in chunks:
                if not feed.text(stream, sse.feed(chunk)):
                    break  # closed, or not read: stop the upstream request
        finally:
            await chunks.aclose()
        feed.end(stream, sse.usage)
    except Exception:
        log.exception("a guest's streaming chat request failed in the host")
        feed.end(stream, {}, error_body("internal_error", "the host failed the request"))


def _routing_headers(
    content_type: str, backend: str | None, timeout_ms: int | None
) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type.encode())]
    if backend is not None:
        headers.append((b"spear-backend", backend.encode()))
    if timeout_ms is not None:
        headers.append((b"spear-timeout-ms", str(timeout_ms).encode()))
    return headers


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a (nested) exception group, flattened."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


class GuestRun:
    """Async handle on a guest whose calls run in a worker thread."""

    def __init__(self, guest: WasmGuest, streams: UserStreams | None = None) -> None:
        self.guest = guest
        self.streams = streams  # its user streams, when the server serves them
        self.table = guest.table
        self.epolls = guest.epolls

    async def call(self, export: str, *args: int) -> Any:
        """Call an export in the guest's worker thread."""
        limiter = _guest_limiter()
        return await anyio.to_thread.run_sync(self.guest.call, export, *args, limiter=limiter)

    async def start(self) -> None:
        """Run the guest's ``_start`` to completion."""
        await self.call("_start")


async def _stop_when_cancelled(guest: WasmGuest) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        guest.table.shutdown()
        guest.interrupt()


async def run_guest(
    module: bytes | str | Path,
    manager: SessionManager,
    *,
    audio: bytes | None = None,
    limits: GuestLimits = DEFAULT_LIMITS,
    on_read: Callable[[int, bytes], None] | None = None,
    oneshot: OneShotHandler | None = None,
    log_sink: LogSink | None = None,
    stdout: str | None = None,
    executions: Executions | None = None,
    on_start: Callable[[GuestRun], None] | None = None,
) -> int:
    """Run a guest's ``_start`` against `manager`'s sessions; returns the fuel it used.

    `on_start` sees the run before the guest starts (run-wasm prints its streams URL)."""
    async with guest_host(
        module,
        manager,
        audio=audio,
        limits=limits,
        oneshot=oneshot,
        log_sink=log_sink,
        stdout=stdout,
        executions=executions,
    ) as run:
        run.table.on_read = on_read
        if on_start is not None:
            on_start(run)
        await run.start()
        return run.guest.fuel_used
