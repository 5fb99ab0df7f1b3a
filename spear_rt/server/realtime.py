"""The realtime edge: a WebSocket upgrade on `/v1/realtime` becomes a session, or a resume.

websockets' Sans-I/O `ServerProtocol` answers the handshake on the connection h11 read the
request from. The client key comes from `Authorization: Bearer` or the subprotocol
`openai-insecure-api-key.<key>`; the query picks intent, model and backend; `session_id` +
`last_seq` + the resume token (header `Spear-Resume-Token` or subprotocol
`spear-resume.<token>`) resume a detached session instead of opening one.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import anyio.abc
import h11
from websockets.server import ServerProtocol

from spear_rt.backend import TranscriptionUpstream
from spear_rt.cluster.forward import CONNECT_TIMEOUT_S, FORWARDED_HEADER, open_owner, splice
from spear_rt.cluster.node import Cluster
from spear_rt.config import Config
from spear_rt.errors import echo
from spear_rt.ir import CanonicalError, ErrorCode
from spear_rt.protocol.settings import Dialect, SessionKind
from spear_rt.server.aio import CallbackRunner, ProtocolStream
from spear_rt.server.http import HttpConnection, error_response, match_key, request_header
from spear_rt.server.ws import BudgetedServerProtocol, FrameBudget, accept
from spear_rt.session.admission import (
    ConnectRequest,
    ResponderFactory,
    ResumeRequest,
    Runner,
    RunnerFactory,
    reject,
)
from spear_rt.session.machine import SessionMachine
from spear_rt.session.manager import SessionManager
from spear_rt.session.runner import SessionRunner

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
RESUME_SUBPROTOCOL = "spear-resume."
RESUME_HEADER = b"spear-resume-token"


def _offered_subprotocols(request: h11.Request) -> list[str]:
    offered: list[str] = []
    for key, value in request.headers:
        if key == b"sec-websocket-protocol":
            offered += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
    return offered


def _select_realtime(protocol: ServerProtocol, offered: object) -> str | None:
    # Echo `realtime` when offered (browsers require an echo of something they offered);
    # key-carrying subprotocols are never echoed back.
    return "realtime" if isinstance(offered, (list, tuple)) and "realtime" in offered else None


def client_key_id(client_keys: list[str], request: h11.Request) -> tuple[bool, str | None]:
    """(authorized, key id) from the bearer header or the key subprotocol."""
    if not client_keys:
        return True, None
    offered = None
    auth = request_header(request, b"authorization")
    if auth is not None and auth.lower().startswith("bearer "):
        offered = auth[7:].strip()
    for proto in _offered_subprotocols(request):
        if proto.startswith(KEY_SUBPROTOCOL):
            offered = proto[len(KEY_SUBPROTOCOL) :]
    key_id = match_key(client_keys, offered)
    return key_id is not None, key_id


async def upgrade_to_session(
    stream: anyio.abc.ByteStream,
    http: HttpConnection,
    request: h11.Request,
    config: Config,
    client_keys: list[str],
    sessions: SessionManager,
    frame_budget: FrameBudget,
    cluster: Cluster | None = None,
) -> None:
    """Accept the WebSocket on `/v1/realtime` and run (or resume) its session until it ends;
    a resume of a session another worker or node holds is forwarded there."""
    url = urlsplit(request.target.decode("latin-1"))
    if url.path != REALTIME_PATH:
        await http.send(error_response(404, f"no WebSocket endpoint at {url.path}", "not_found"))
        return
    params = {k: v[-1] for k, v in parse_qs(url.query).items()}  # the last of a repeated name
    if cluster is not None and await _forwarded(
        stream, http, request, params, client_keys, sessions, cluster
    ):
        return
    protocol = BudgetedServerProtocol(
        frame_budget,
        select_subprotocol=_select_realtime,
        max_size=config.server.max_frame_bytes,
    )
    try:
        await _accept_and_run(
            stream, http, request, params, protocol, config, client_keys, sessions
        )
    finally:
        protocol.release_budget()


async def _accept_and_run(
    stream: anyio.abc.ByteStream,
    http: HttpConnection,
    request: h11.Request,
    params: dict[str, str],
    protocol: BudgetedServerProtocol,
    config: Config,
    client_keys: list[str],
    sessions: SessionManager,
) -> None:
    conn = await accept(stream, http, request, protocol)
    if conn is None:
        return
    authorized, key_id = client_key_id(client_keys, request)
    if not authorized:
        await reject(
            conn, CanonicalError(ErrorCode.UNAUTHORIZED, "missing or invalid client key"), 1008
        )
        return
    connect = _connect_request(params, request, key_id)
    if isinstance(connect, CanonicalError):
        await reject(conn, connect, 1008)
        return
    resume = _resume_request(params, request, key_id)
    if isinstance(resume, CanonicalError):
        await reject(conn, resume, 1008)
        return
    grace = config.realtime.resume_grace_seconds
    make_runner: RunnerFactory | None = None
    if isinstance(stream, ProtocolStream):  # the asyncio driver: run the session from callbacks
        connection = stream.protocol

        def make_runner(
            machine: SessionMachine,
            upstream: TranscriptionUpstream,
            responder: ResponderFactory | None,
        ) -> Runner:
            return CallbackRunner(
                machine, connection, protocol, upstream, resume_grace_s=grace, responder=responder
            )

        async def attach(runner: Runner, last_seq: int) -> None:
            assert isinstance(runner, CallbackRunner)
            await runner.attach(connection, protocol, last_seq)

    else:

        async def attach(runner: Runner, last_seq: int) -> None:
            assert isinstance(runner, SessionRunner)
            await runner.attach(conn, last_seq)

    try:
        if resume is not None:
            await sessions.resume(conn, resume, attach)
        else:
            await sessions.serve(conn, connect, make_runner)
    except Exception:
        log.exception("realtime session crashed")
        await conn.close(1011, "internal error")


async def _forwarded(
    stream: anyio.abc.ByteStream,
    http: HttpConnection,
    request: h11.Request,
    params: dict[str, str],
    client_keys: list[str],
    sessions: SessionManager,
    cluster: Cluster,
) -> bool:
    """Forward a resume to the worker or node holding its session (True: done here)."""
    session_id = params.get("session_id")
    if session_id is None or session_id in sessions.sessions:
        return False
    if not client_key_id(client_keys, request)[0]:
        return False  # refused here, by the usual path
    hop = request_header(request, FORWARDED_HEADER)
    target = await cluster.target(session_id, hop.encode("latin-1") if hop else None)
    if target is None:
        return False
    address, next_hop = target
    owner = await open_owner(address, CONNECT_TIMEOUT_S, cluster.tls)
    if owner is None:
        return False  # the owner is gone: refused here as unknown (4004)
    headers = [(k, v) for k, v in request.headers if k != FORWARDED_HEADER]
    headers.append((FORWARDED_HEADER, next_hop))
    cluster.forwarded += 1
    await splice(stream, http.upgrade_head(request, headers), owner)
    return True


def _resume_request(
    params: dict[str, str], request: h11.Request, key_id: str | None
) -> ResumeRequest | CanonicalError | None:
    """The resume a reconnect asks for (`?session_id=&last_seq=` + token), if any."""
    session_id = params.get("session_id")
    if session_id is None:
        return None
    token = request_header(request, RESUME_HEADER)
    for proto in _offered_subprotocols(request):
        if proto.startswith(RESUME_SUBPROTOCOL):
            token = proto[len(RESUME_SUBPROTOCOL) :]
    if not token:
        return CanonicalError(
            ErrorCode.INVALID_REQUEST,
            "resuming needs the session's resume token: header Spear-Resume-Token or "
            "subprotocol spear-resume.<token>",
        )
    last_seq = params.get("last_seq", "")
    if not last_seq.isdigit():
        return CanonicalError(
            ErrorCode.INVALID_REQUEST,
            f"last_seq must be the seq of the last event received (an integer >= 0), "
            f"got {echo(last_seq)}",
        )
    return ResumeRequest(session_id, token, int(last_seq), key_id)


def _connect_request(
    params: dict[str, str], request: h11.Request, key_id: str | None
) -> ConnectRequest | CanonicalError:
    intent = params.get("intent")
    if intent not in (None, "transcription", "conversation"):
        return CanonicalError(
            ErrorCode.INVALID_REQUEST,
            f"unknown intent {echo(intent)}; use 'transcription' or omit it",
        )
    beta = (request_header(request, b"openai-beta") or "").startswith("realtime") or any(
        p.startswith("openai-beta.realtime") for p in _offered_subprotocols(request)
    )
    return ConnectRequest(
        kind=SessionKind.TRANSCRIPTION if intent == "transcription" else SessionKind.REALTIME,
        dialect=Dialect.BETA if beta else Dialect.GA,
        model=params.get("model"),
        backend=params.get("backend"),
        client_key_id=key_id,
    )
