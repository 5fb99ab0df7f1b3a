"""The server: one port for HTTP/1.1 endpoints and WebSocket realtime sessions.

Each TCP connection is one task in the server's task group. h11 reads requests (keep-alive);
an ``Upgrade: websocket`` on ``/v1/realtime`` is handed to the realtime edge
(`server/realtime.py`) on the same stream and becomes a session. A handler that crashes is
logged; its WebSocket closes with 1011 and its HTTP request gets a 500 without internals.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import sniffio

from spear_rt import web
from spear_rt.cluster.metrics_share import ENV as SHARE_ENV
from spear_rt.cluster.metrics_share import MetricsShare
from spear_rt.cluster.node import Cluster
from spear_rt.config import Config, listen_address, load_config
from spear_rt.errors import SpearError
from spear_rt.hostcalls.userstream import Executions
from spear_rt.metrics import MetricsRegistry
from spear_rt.redact import register_secret
from spear_rt.registry import BackendRegistry
from spear_rt.router import Router
from spear_rt.server.admin import AdminApi
from spear_rt.server.aio import serve_asyncio
from spear_rt.server.browser import BrowserGuard, page_routes, require_json
from spear_rt.server.discovery import DiscoveryApi
from spear_rt.server.gauges import register_gauges
from spear_rt.server.http import (
    BodyBudget,
    ClientGone,
    HttpConnection,
    HttpError,
    HttpRequest,
    Response,
    error_response,
    keys_from_env,
    match_key,
    protocol_error_response,
    request_header,
)
from spear_rt.server.oneshot import (
    JSON_ENDPOINTS,
    MEDIA_PREFIX,
    OneShotApi,
    StreamingAnswer,
    write_answer,
)
from spear_rt.server.realtime import REALTIME_PATH, upgrade_to_session
from spear_rt.server.streams_ws import STREAMS_PREFIX, serve_user_streams
from spear_rt.server.tls import accept_tls, server_ssl_context
from spear_rt.server.ws import FrameBudget
from spear_rt.session.manager import SessionManager
from spear_rt.session.responder import ConversationMetrics

log = logging.getLogger(__name__)

DRAINING_RESPONSE = error_response(
    503,
    "the server is draining (shutting down): retry on a new connection",
    "server_draining",
    [("Retry-After", "5"), ("Connection", "close")],
)
CLOSE = [("Connection", "close")]
JSON_BODY_PATHS = frozenset({*JSON_ENDPOINTS, "/v1/route/explain"})  # POST only: 415 otherwise
# admin has its own keys; the voice page's files are public (the page asks for a key itself)
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/admin/reload", *web.ASSETS})

Handler = Callable[[HttpRequest], Awaitable[Response]]


class ListenError(SpearError):
    """The listening socket could not be opened (port in use, no permission...)."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        super().__init__(f"cannot listen on {host}:{port}: {reason}")


class Server:
    """spear_rt's server: registry, router, session manager and the listener."""

    def __init__(
        self,
        config: Config,
        registry: BackendRegistry | None = None,
        *,
        config_path: str | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # one of `serve --workers N`: its listener shares the port (SO_REUSEPORT) and its
        # metrics are summed with the others' (cluster/metrics_share.py)
        self.worker = worker
        shared = os.environ.get(SHARE_ENV) if worker is not None else None
        self.metrics_share = MetricsShare(shared, worker) if shared and worker is not None else None
        self.metrics = MetricsRegistry()
        self.registry = registry or BackendRegistry.build(config)
        _register_secrets(self.registry)
        self.router = Router(self.registry, metrics=self.metrics)
        self.sessions = SessionManager(config, lambda: self.router)
        # workers of one node and nodes sharing Redis (cluster/node.py); None: alone
        self.cluster = Cluster.from_config(config, worker)
        if self.cluster is not None:
            self.sessions.shared = self.cluster
            self.router.shared = self.cluster.redis
            self.router.on_ejection = self.cluster.on_ejection
        register_gauges(self)
        self._client_keys = keys_from_env(config.server.client_keys_env)
        self.body_budget = BodyBudget(config.server.max_http_body_bytes_in_flight)
        self.frame_budget = FrameBudget(config.server.max_frame_bytes_in_flight)
        self.ssl_context = server_ssl_context(config.server)  # None: plain http/ws
        self.browser = self._browser_guard(config)
        self.port: int | None = None
        self._accepting = anyio.CancelScope()
        # Drain (SIGTERM / first SIGINT): the listener closes, requests in flight are answered,
        # requests arriving on kept-alive connections get 503 (see `drain`).
        self.draining = False
        self._listener_closed = anyio.Event()
        self._http_active = 0  # requests being read or answered
        self._http_idle = anyio.Event()
        admin = AdminApi(self, self.reload)
        self.oneshot = OneShotApi(self)
        self.executions = Executions()  # guests whose user streams this port serves
        self.sessions.executor = self.oneshot.executor
        self.sessions.conversation_metrics = ConversationMetrics(self.metrics)
        self._routes: dict[tuple[bytes, str], Handler] = {
            **DiscoveryApi(self).routes(),
            **admin.routes(),  # type: ignore[dict-item]
            **self.oneshot.routes(),
            **page_routes(),  # the browser voice page at GET /
        }

    def apply_config(self, config: Config) -> dict[str, object]:
        """Swap in a new config's registry atomically; live sessions keep their instance.

        Everything that can fail (kinds, policies) is checked before anything is swapped.
        Listener, client keys and caps are read at start: changing them needs a restart.
        """
        Router.check_policies(config)
        registry = BackendRegistry.build(config, previous=self.registry)
        _register_secrets(registry)
        self.router.reload(registry)
        self.registry = registry
        self.sessions.reconfigure(config)
        self.browser = self._browser_guard(config)
        self.config = config
        return {"config": config.source, "backends": sorted(registry.instances)}

    def _browser_guard(self, config: Config) -> BrowserGuard:
        tls = self.ssl_context is not None
        return BrowserGuard(config.server, tls=tls, open_mode=not self._client_keys)

    def reload(self) -> dict[str, object]:
        """Reload the config file (SIGHUP); raises ConfigError and keeps the old one if bad."""
        return self.apply_config(load_config(self.config_path))

    # --- listener -----------------------------------------------------------------------------

    async def _close_kinds(self) -> None:
        """Let loaded backend kinds release pooled resources (their optional `aclose`)."""
        with anyio.CancelScope(shield=True):
            for kind in {id(i.kind): i.kind for i in self.registry.instances.values()}.values():
                aclose = getattr(kind, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; reports the bound port through `task_status`."""
        try:
            await self._listen(task_status)
        finally:
            await self._close_kinds()
            if self.cluster is not None:
                with anyio.CancelScope(shield=True):
                    await self.cluster.aclose()

    async def _listen(self, task_status: anyio.abc.TaskStatus[int]) -> None:
        host, port = listen_address(self.config)
        if sniffio.current_async_library() == "asyncio" and self.config.server.driver == "auto":
            async with anyio.create_task_group() as connections:
                self._start_background(connections)

                def started(bound: int) -> None:
                    self.port = bound
                    if self.cluster is not None:
                        self.cluster.bound(host, bound)
                    task_status.started(bound)

                try:
                    await serve_asyncio(
                        host,
                        port,
                        connections,
                        self._handle_connection,
                        started,
                        self._accepting,
                        ssl_context=self.ssl_context,
                        ssl_handshake_timeout=self.config.server.handshake_timeout_s,
                        reuse_port=self.worker is not None,
                    )
                except OSError as exc:
                    raise ListenError(host, port, exc) from None
                self._listener_closed.set()  # serve_asyncio closed it when accepting stopped
            return
        try:
            multi = await anyio.create_tcp_listener(
                local_host=host, local_port=port, reuse_port=self.worker is not None
            )
        except OSError as exc:
            raise ListenError(host, port, exc) from None
        self.port = multi.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        if self.cluster is not None:
            self.cluster.bound(host, self.port)
        async with anyio.create_task_group() as connections:
            self._start_background(connections)
            task_status.started(self.port)
            # Accepting has its own scope so that a drain can stop it while sessions finish;
            # the listening sockets close with it (the kernel would keep accepting otherwise).
            try:
                with self._accepting:
                    async with anyio.create_task_group() as acceptors:
                        for listener in multi.listeners:
                            assert isinstance(listener, anyio.abc.SocketListener)
                            acceptors.start_soon(self._accept_loop, listener, connections)
            finally:
                with anyio.CancelScope(shield=True):
                    await multi.aclose()
                self._listener_closed.set()

    def _start_background(self, tg: anyio.abc.TaskGroup) -> None:
        """The server's own loops: mirrors, shared metrics, the cluster's state."""
        tg.start_soon(self.oneshot.executor.mirror_worker)
        tg.start_soon(self._publish_metrics)
        cluster = self.cluster
        if cluster is not None:
            tg.start_soon(cluster.run, lambda: self.router)
            if cluster.workers is not None:
                tg.start_soon(self._serve_worker_socket, cluster.workers.socket_path(), tg)

    async def _serve_worker_socket(self, path: str, tg: anyio.abc.TaskGroup) -> None:
        """Take resumes the other workers forward to this one (a socket in the run dir), on
        the driver the port has: a session made by the callback driver resumes on it."""
        if sniffio.current_async_library() == "asyncio" and self.config.server.driver == "auto":
            await serve_asyncio(
                "",
                0,
                tg,
                self._handle_connection,
                lambda _port: None,
                anyio.CancelScope(),
                unix_path=path,
            )
            return
        listener = await anyio.create_unix_listener(path)
        async with listener:
            while True:
                stream = await listener.accept()
                tg.start_soon(self._handle_connection, stream)

    async def _publish_metrics(self) -> None:
        """A worker of several: its metrics for the others' /metrics, once a second."""
        share = self.metrics_share
        if share is None:
            return
        while True:
            await anyio.to_thread.run_sync(share.publish, self.metrics.render())
            await anyio.sleep(1.0)

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        while True:
            stream = await listener.accept()
            tg.start_soon(self._handle_accepted, stream)

    async def _handle_accepted(self, stream: anyio.abc.ByteStream) -> None:
        if self.ssl_context is not None:
            timeout = self.config.server.handshake_timeout_s
            tls = await accept_tls(stream, self.ssl_context, timeout)
            if tls is None:
                return
            stream = tls
        await self._handle_connection(stream)

    def stop_accepting(self) -> None:
        """Close the listener; live connections carry on."""
        self._accepting.cancel()

    async def drain(self, deadline_s: float) -> None:
        """Start draining: returns once the listener is closed (new connections are refused).

        From now on a request arriving on a kept-alive connection gets 503 and the connection
        closes; requests in flight are answered (then their connection closes); live
        sessions are asked to finish their turns and close 1001 (`SessionManager.drain`).
        """
        self.draining = True
        self.stop_accepting()
        await self._listener_closed.wait()
        self.sessions.drain(deadline_s)

    async def wait_drained(self) -> None:
        """Return once no session is live and no HTTP request is in flight."""
        await self.sessions.wait_empty()
        while self._http_active:
            self._http_idle = anyio.Event()
            await self._http_idle.wait()

    async def _handle_connection(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            try:
                await self._serve_http(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                log.info("client connection lost while answering it")
            except Exception:
                log.exception("connection handler crashed")

    async def _serve_http(self, stream: anyio.abc.ByteStream) -> None:
        loopback = _is_loopback(stream)  # once per connection, not per request
        http = HttpConnection(stream, self.body_budget)
        timeout = self.config.server.handshake_timeout_s
        while True:
            event = None
            with anyio.move_on_after(timeout):
                try:
                    event = await http.next_event()
                except h11.RemoteProtocolError as exc:
                    if http.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await http.send(protocol_error_response(exc))
                        await http.linger()
                    return
            if not isinstance(event, h11.Request):
                return  # closed, idle or too slow: drop the connection
            if not (self._client_keys or loopback):
                await http.send(
                    error_response(403, "no client keys are configured: loopback only", "forbidden")
                )
                return
            if self.draining:
                await http.send(DRAINING_RESPONSE)
                await http.linger()
                return
            if (request_header(event, b"upgrade") or "").lower() == "websocket":
                try:
                    self.browser.check(event.headers)  # before the upgrade: a plain 403/421
                except HttpError as exc:
                    await http.send(error_response(exc.status, exc.message, exc.code, CLOSE))
                    await http.linger()
                    return
                if event.target.startswith(STREAMS_PREFIX.encode()):
                    await serve_user_streams(
                        stream, http, event, self.executions, self._client_keys, self.frame_budget
                    )
                    return
                await upgrade_to_session(
                    stream,
                    http,
                    event,
                    self.config,
                    self._client_keys,
                    self.sessions,
                    self.frame_budget,
                    self.cluster,
                )
                return
            self._http_active += 1
            try:
                await self._answer(http, event, loopback)
            finally:
                self._http_active -= 1
                if not self._http_active:
                    self._http_idle.set()
            if http.h11.our_state is h11.MUST_CLOSE or self.draining:
                await http.linger()
                return
            try:
                http.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _answer(self, http: HttpConnection, request: h11.Request, loopback: bool) -> None:
        url = urlsplit(request.target.decode("latin-1"))
        path = url.path
        answer: Response | StreamingAnswer
        try:
            # Read the body first, whatever the answer: an unread body would end keep-alive.
            with anyio.fail_after(self.config.server.body_timeout_s):
                body = await http.read_body(self.config.server.max_http_body_bytes)
            self.browser.check(request.headers)
            handler = self._route(request.method, path)
            if path in JSON_BODY_PATHS:
                require_json(request_header(request, b"content-type"))
            req = HttpRequest(
                request.method.decode(), path, url.query, list(request.headers), body, loopback
            )
            if path not in OPEN_PATHS:
                req.client_key_id = self._authorize_client(req)
            answer = await handler(req)
        except HttpError as exc:
            answer = error_response(exc.status, exc.message, exc.code, exc.headers)
        except TimeoutError:
            answer = error_response(
                408,
                "the request body did not arrive in time",
                "request_timeout",
                [("Connection", "close")],
            )
        except ClientGone:
            log.info("client closed the connection mid-request on %s", path)
            http.release_body()
            return
        except Exception:
            log.exception("HTTP handler crashed on %s", path)
            answer = error_response(500, "internal error", "internal_error")
        except BaseException:  # cancelled: the body's bytes go back to the budget
            http.release_body()
            raise
        try:
            await write_answer(http, answer)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            log.info("client closed the connection before its answer on %s", path)
        finally:
            http.release_body()

    def _route(self, method: bytes, path: str) -> Handler:
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler
        if path.startswith(MEDIA_PREFIX):  # the one route with a path parameter
            if method == b"GET":
                return self.oneshot.get_media
            raise HttpError(
                405,
                f"{method.decode()} is not allowed on {path}",
                "method_not_allowed",
                [("Allow", "GET")],
            )
        methods = sorted(m.decode() for m, p in self._routes if p == path)
        if methods:
            raise HttpError(
                405,
                f"{method.decode()} is not allowed on {path}",
                "method_not_allowed",
                [("Allow", ", ".join(methods))],
            )
        if path == REALTIME_PATH:
            raise HttpError(
                426,
                f"{REALTIME_PATH} is a WebSocket endpoint: send Upgrade: websocket",
                "upgrade_required",
                [("Upgrade", "websocket")],
            )
        raise HttpError(404, f"no such endpoint: {path}", "not_found")

    def _authorize_client(self, request: HttpRequest) -> str | None:
        """The client key's id for API endpoints (401 without a valid key when keys are set)."""
        if not self._client_keys:
            return None
        key_id = match_key(self._client_keys, request.bearer())
        if key_id is None:
            raise HttpError(
                401,
                "missing or invalid client key (Authorization: Bearer <key>)",
                "invalid_api_key",
            )
        return key_id


def _register_secrets(registry: BackendRegistry) -> None:
    """Upstream keys are masked in every log line (`spear_rt.redact.LogRedactor`)."""
    for instance in registry.instances.values():
        if instance.info.api_key is not None:
            register_secret(instance.info.api_key.reveal())


def _is_loopback(stream: anyio.abc.ByteStream) -> bool:
    try:
        host = stream.extra(anyio.abc.SocketAttribute.remote_address)[0]
        return ipaddress.ip_address(host).is_loopback
    except (anyio.TypedAttributeLookupError, ValueError, TypeError, IndexError):
        return True  # not a TCP socket (in-memory test stream)
