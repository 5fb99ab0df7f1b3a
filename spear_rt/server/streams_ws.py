"""``GET /api/v1/executions/<id>/streams/ws``: an outside client's socket to a running guest.

The WebSocket of upstream SPEAR's user streams (spear-guests.md §8): each binary message is
one SSF frame for the execution's `UserStreams` (text messages are ignored; pings are
answered); frames the guest writes go out one per message. One socket per execution at a
time (a second is closed 1008). A malformed frame, or one before the guest opened its
streams, closes the socket 1008 with the reason. The execution id is an unguessable token;
client keys, when configured, are required as on every endpoint.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11

from spear_rt.hostcalls.link import loop_waker
from spear_rt.hostcalls.userstream import (
    MAX_FRAME_BYTES,
    ClientFrameRefused,
    Executions,
    UserStreams,
)
from spear_rt.server.http import HttpConnection, error_response
from spear_rt.server.realtime import client_key_id
from spear_rt.server.ws import BudgetedServerProtocol, FrameBudget, WebSocketConnection, accept

STREAMS_PREFIX = "/api/v1/executions/"
SUBPROTOCOL = "spear.stream.v1"
_PATH = re.compile(r"^/api/v1/executions/([A-Za-z0-9_\-]{1,80})/streams/ws$")


def streams_url(host: str, port: int, execution_id: str) -> str:
    """The ws:// URL a client connects to."""
    return f"ws://{host}:{port}{STREAMS_PREFIX}{execution_id}/streams/ws"


def _select(protocol: object, offered: list[str]) -> str | None:
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


async def serve_user_streams(
    stream: anyio.abc.ByteStream,
    http: HttpConnection,
    request: h11.Request,
    executions: Executions,
    client_keys: list[str],
    frame_budget: FrameBudget,
) -> None:
    """Accept the socket and relay frames until either side ends."""
    path = urlsplit(request.target.decode("latin-1")).path
    found = _PATH.match(path)
    streams = executions.get(found.group(1)) if found else None
    if streams is None:
        await http.send(error_response(404, f"no running execution at {path}", "not_found"))
        return
    authorized, _key = client_key_id(client_keys, request)
    if not authorized:
        await http.send(error_response(401, "missing or invalid client key", "unauthorized"))
        return
    protocol = BudgetedServerProtocol(
        frame_budget, select_subprotocol=_select, max_size=MAX_FRAME_BYTES + 4096
    )
    try:
        conn = await accept(stream, http, request, protocol)
        if conn is None:
            return
        if not streams.socket_opened():
            await conn.close(1008, "this execution already has a client")
            return
        try:
            await _relay(conn, streams)
        finally:
            streams.socket_closed()
    finally:
        protocol.release_budget()


async def _relay(conn: WebSocketConnection, streams: UserStreams) -> None:
    call_soon = loop_waker()

    def wake_writer() -> None:  # from the guest's thread
        call_soon(conn.wake)

    async with anyio.create_task_group() as tg:

        async def write() -> None:
            while True:
                frames = streams.take_outbound(wake_writer)
                if frames is None:
                    await conn.close(1001, "the guest ended")
                    tg.cancel_scope.cancel()
                    return
                for frame in frames:
                    conn.protocol.send_binary(frame)
                await conn.flush()
                if not frames:
                    await conn.wait_wake()

        tg.start_soon(write)
        while (messages := await conn.receive()) is not None:
            for message in messages:
                if message.text:
                    continue
                try:
                    streams.client_frame(bytes(message.data))
                except ClientFrameRefused as exc:
                    await conn.close(1008, str(exc))
                    tg.cancel_scope.cancel()
                    return
        tg.cancel_scope.cancel()
