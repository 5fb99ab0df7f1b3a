"""A fake OpenAI-Realtime-compatible upstream: a real WebSocket server on 127.0.0.1.

anyio + websockets' Sans-I/O `ServerProtocol`, so it runs under trio (and asyncio). Start it
with `port = await nursery.start(fake.serve)`; `fake.base_url` is what an instance is
configured with (`http://127.0.0.1:PORT/v1`).

Protocol: `GET /v1/realtime?intent=transcription` (or `?model=M`). The dialect is beta when
the request has `OpenAI-Beta: realtime=v1` (`transcription_session.*`), GA otherwise
(`session.*` with `session.type = "transcription"`, `conversation.item.added/done`). The
fake sends `*.created`, answers `*.update` with `*.updated` (or an `error` for the other
dialect's update), keeps `input_audio_buffer.append` audio (pcm16 24 kHz), and on
`commit` sends `input_audio_buffer.committed`, `conversation.item.created` (GA: `added`),
one transcription delta per word, `completed` (GA: then `item.done`). A commit of an empty
buffer is an `error` naming the commit's `event_id`; `clear` answers `cleared`. No server
VAD: turns end only by commit. With `live_deltas`, deltas are sent as soon as a word's
audio is complete, under the item id the turn will get at commit.

Words: spear_rt's stub rule (`spear_rt_backends.stub`): each full 200 ms block of a turn's
audio is one `LEXICON` word picked by the CRC-32 of its samples; a trailing partial block
gives none. So the fake's transcript of some audio equals `StubTranscription`'s.

Faults, for the next connection (one `plan(...)` per connection, in order): `Refuse` the
handshake (any status, OpenAI error body, `Retry-After`), `Stall(after=None)` at the
handshake or `Stall(after=N)` after N client data frames (no reading, no answers until
`release()`), `Drop(after=N)` (TCP closed without a close frame; with `unanswered=True`
before frame N is answered), `Garbage(after=N)` (a frame that is not JSON, or binary),
`CloseWith(after=N, code)`, `Inject(after=N, event)` (any JSON event), and a `ping` payload
sent after `*.created`. "After N" counts the client's data frames on that connection, after
the fake has answered them. With `api_key` set, a missing or wrong `Authorization: Bearer`
is refused with 401.

Everything received is recorded per connection (`connections`): path, query, headers
(lower-case names, Authorization included), decoded client events, audio bytes, pongs.
No timer anywhere.
"""

from __future__ import annotations

import http
import logging
import zlib
from collections import deque
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.abc
import msgspec
import numpy as np
from numpy.typing import NDArray
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from spear_rt.protocol import client_events as ce
from spear_rt.protocol import server_events as se
from spear_rt.protocol.settings import (
    Dialect,
    SessionKind,
    SessionSettings,
    SettingsError,
    apply_update,
    render_session,
)
from spear_rt_backends.stub import LEXICON, STUB_RATE_HZ

# The fake's websockets logger stays quiet, so tests can check that nothing logs the key.
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)
BLOCK_BYTES = STUB_RATE_HZ * 200 // 1000 * 2  # 200 ms of pcm16 at 24 kHz
READ_SIZE = 65536


def stub_words(pcm: NDArray[np.int16] | bytes) -> list[str]:
    """The stub rule's words for a turn's audio (one per full 200 ms block)."""
    data = pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()
    return [
        LEXICON[zlib.crc32(data[i : i + BLOCK_BYTES]) % len(LEXICON)]
        for i in range(0, len(data) - BLOCK_BYTES + 1, BLOCK_BYTES)
    ]


# --- plans ---------------------------------------------------------------------------------


class Refuse(msgspec.Struct, frozen=True):
    """Answer the handshake with `status` and an OpenAI error body."""

    status: int
    message: str = "refused by the fake upstream"
    retry_after: str | None = None


class Drop(msgspec.Struct, frozen=True):
    """Close TCP (no close frame) after `after` client frames (unanswered: before answering)."""

    after: int = 0
    unanswered: bool = False


class Garbage(msgspec.Struct, frozen=True):
    """Send `data` (not JSON) after `after` client frames, as a binary frame if `binary`."""

    after: int = 0
    data: bytes = b"<html>502 Bad Gateway</html>"
    binary: bool = False


class CloseWith(msgspec.Struct, frozen=True):
    """Start a closing handshake with `code` after `after` client frames."""

    after: int = 0
    code: int = 1000
    reason: str = ""


class Inject(msgspec.Struct, frozen=True):
    """Send `event` (any JSON object) after `after` client frames."""

    after: int
    event: dict[str, Any]


class Stall:
    """Stop reading and answering at the handshake (`after=None`) or after N frames."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.reached = anyio.Event()
        self.released = anyio.Event()

    def release(self) -> None:
        self.released.set()


Action = Drop | Garbage | CloseWith | Inject | Stall


class Plan:
    """What one connection does besides the protocol."""

    def __init__(
        self,
        actions: tuple[Action, ...] = (),
        *,
        refuse: Refuse | None = None,
        live_deltas: bool = False,
        ping: bytes | None = None,
    ) -> None:
        self.handshake_stall = next(
            (a for a in actions if isinstance(a, Stall) and a.after is None), None
        )
        self.actions = deque(
            sorted(
                (a for a in actions if not (isinstance(a, Stall) and a.after is None)),
                key=lambda a: a.after or 0,
            )
        )
        self.refuse = refuse
        self.live_deltas = live_deltas
        self.ping = ping


class RecordedConnection:
    """One connection as the fake saw it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.path = ""
        self.query: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        self.dialect: Dialect | None = None
        self.events: list[ce.AnyClientEvent | ce.ProtocolError] = []
        self.frames = 0  # client data frames
        self.audio_bytes = 0
        self.pongs: list[bytes] = []
        self.close_code: int | None = None  # of the client's close frame
        self.ended = anyio.Event()
        self.socket: Any = None  # the fake's end of the TCP connection (to peek at)

    def types(self) -> list[str]:
        """The `type` of every client event, in order."""
        return [
            e.code if isinstance(e, ce.ProtocolError) else str(type(e).__struct_config__.tag)
            for e in self.events
        ]


# --- the per-connection protocol -------------------------------------------------------------


class _Session:
    """The fake's transcription session: client events in, encoded server events out."""

    def __init__(self, dialect: Dialect, record: RecordedConnection, live: bool) -> None:
        self.dialect = dialect
        self.record = record
        self.live = live
        self.out: list[bytes] = []
        self.settings = SessionSettings(kind=SessionKind.TRANSCRIPTION)
        self.session_id = f"sess_fake_{record.number}"
        self._events = 0
        self._items = 0
        self._previous: str | None = None
        self._audio = bytearray()
        self._words: list[str] = []
        self._said = 0  # words already sent as live deltas

    def _emit(self, event: se.ServerEvent) -> None:
        self._events += 1
        event.event_id = f"event_{self.record.number}_{self._events}"
        self.out.append(se.encode_server_event(event))

    def _session(self) -> dict[str, Any]:
        return render_session(self.settings, self.dialect, self.session_id)

    def start(self) -> None:
        if self.dialect is Dialect.BETA:
            self._emit(se.TranscriptionSessionCreated(session=self._session()))
        else:
            self._emit(se.SessionCreated(session=self._session()))

    def _error(
        self, message: str, code: str, event_id: str | None, param: str | None = None
    ) -> None:
        body = se.ErrorBody("invalid_request_error", message, code, param, event_id)
        self._emit(se.Error(error=body))

    def _item_id(self) -> str:
        return f"item_{self.record.number}_{self._items + 1:03d}"

    def handle(self, data: bytes) -> None:
        event = ce.decode_client_event(data)
        self.record.events.append(event)
        match event:
            case ce.ProtocolError(code=code, message=message, event_id=event_id, param=param):
                self._error(message, code, event_id, param)
            case ce.TranscriptionSessionUpdate() if self.dialect is Dialect.BETA:
                self._update(event.session, event.event_id)
            case ce.SessionUpdate() if self.dialect is Dialect.GA:
                if event.session.type != "transcription":
                    self._error("session.type must be 'transcription' here", "invalid_value",
                                event.event_id, "session.type")  # fmt: skip
                else:
                    self._update(event.session, event.event_id)
            case ce.SessionUpdate() | ce.TranscriptionSessionUpdate():
                self._error(f"{event.__struct_config__.tag} is not the {self.dialect} dialect's "
                            "update", "unknown_event_type", event.event_id, "type")  # fmt: skip
            case ce.InputAudioBufferAppend(audio=audio):
                self.record.audio_bytes += len(audio)
                self._append(audio)
            case ce.InputAudioBufferCommit(event_id=event_id):
                self._commit(event_id)
            case ce.InputAudioBufferClear():
                self._reset()
                self._emit(se.Cleared())
            case _:
                tag = event.__struct_config__.tag
                self._error(f"{tag} is not supported by the fake", "unsupported", event.event_id)

    def _update(self, session: ce.SessionWire, event_id: str | None) -> None:
        try:
            self.settings = apply_update(self.settings, session)
        except SettingsError as exc:
            self._error(str(exc), "invalid_value", event_id, exc.param)
            return
        if self.dialect is Dialect.BETA:
            self._emit(se.TranscriptionSessionUpdated(session=self._session()))
        else:
            self._emit(se.SessionUpdated(session=self._session()))

    def _append(self, audio: bytes) -> None:
        before = len(self._audio) // BLOCK_BYTES
        self._audio += audio
        after = len(self._audio) // BLOCK_BYTES
        if after > before:
            self._words.extend(
                stub_words(bytes(self._audio[before * BLOCK_BYTES : after * BLOCK_BYTES]))
            )
            if self.live:
                self._deltas(self._item_id())

    def _deltas(self, item_id: str) -> None:
        for word in self._words[self._said :]:
            delta = word if not self._said else " " + word
            self._emit(se.TranscriptionDelta(item_id=item_id, delta=delta))
            self._said += 1

    def _commit(self, event_id: str | None) -> None:
        if not self._audio:
            self._error("buffer too small: expected at least 100ms of audio, got 0.00ms",
                        "input_audio_buffer_commit_empty", event_id)  # fmt: skip
            return
        item_id = self._item_id()
        self._items += 1
        previous, self._previous = self._previous, item_id
        self._emit(se.Committed(item_id=item_id, previous_item_id=previous))
        item = se.input_item(item_id, None, "completed")
        if self.dialect is Dialect.BETA:
            self._emit(se.ItemCreated(item=item, previous_item_id=previous))
        else:
            self._emit(se.ItemAdded(item=item, previous_item_id=previous))
        self._deltas(item_id)
        transcript = " ".join(self._words)
        self._emit(se.TranscriptionCompleted(item_id=item_id, transcript=transcript))
        if self.dialect is Dialect.GA:
            item = se.input_item(item_id, transcript, "completed")
            self._emit(se.ItemDone(item=item, previous_item_id=previous))
        self._reset()

    def _reset(self) -> None:
        self._audio = bytearray()
        self._words = []
        self._said = 0


# --- the server ----------------------------------------------------------------------------


class _Dropped(Exception):
    """The plan ends this connection now."""


class FakeRealtime:
    """The fake upstream; start it with `port = await nursery.start(fake.serve)`."""

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.connections: list[RecordedConnection] = []
        self.port = 0
        self._plans: deque[Plan] = deque()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def plan(
        self,
        *actions: Action,
        refuse: Refuse | None = None,
        live_deltas: bool = False,
        ping: bytes | None = None,
    ) -> None:
        """What the next connection (without a plan yet) does."""
        self._plans.append(Plan(actions, refuse=refuse, live_deltas=live_deltas, ping=ping))

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1 (a free port) until cancelled; reports the port when ready."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        record = RecordedConnection(len(self.connections) + 1)
        record.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self.connections.append(record)
        plan = self._plans.popleft() if self._plans else Plan()
        proto = ServerProtocol(max_size=None, logger=_ws_log)
        try:
            async with stream:
                await self._run(stream, proto, record, plan)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, _Dropped):
            pass
        finally:
            record.ended.set()

    async def _run(
        self, stream: anyio.abc.SocketStream, proto: ServerProtocol, record: RecordedConnection,
        plan: Plan,
    ) -> None:  # fmt: skip
        request = await _read_request(stream, proto)
        if request is None:
            return
        parts = urlsplit(request.path)
        record.path = parts.path
        record.query = dict(parse_qsl(parts.query))
        record.headers = {name.lower(): value for name, value in request.headers.raw_items()}
        if plan.handshake_stall is not None:
            plan.handshake_stall.reached.set()
            await plan.handshake_stall.released.wait()
        response = self._check(request, record, plan) or proto.accept(request)
        proto.send_response(response)
        await _flush(stream, proto)
        if response.status_code != 101 or proto.state is not State.OPEN:
            return
        dialect = Dialect.BETA if record.headers.get("openai-beta") == "realtime=v1" else Dialect.GA
        record.dialect = dialect
        session = _Session(dialect, record, plan.live_deltas)
        session.start()
        if plan.ping is not None:
            proto.send_ping(plan.ping)
        await self._send(stream, proto, session, record, plan)
        while True:
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                proto.receive_eof()
                await _flush(stream, proto)
                return
            proto.receive_data(data)
            for frame in proto.events_received():
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode is Opcode.PONG:
                    record.pongs.append(bytes(frame.data))
                elif frame.opcode is Opcode.CLOSE:
                    close = proto.close_rcvd
                    record.close_code = close.code if close is not None else None
                elif frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
                    record.frames += 1
                    if frame.opcode is Opcode.TEXT:
                        session.handle(bytes(frame.data))
                    else:
                        session.out.append(_binary_error())
                    await self._send(stream, proto, session, record, plan)
            await _flush(stream, proto)

    def _check(self, request: Request, record: RecordedConnection, plan: Plan) -> Response | None:
        """The refusal for this handshake, or None to accept it."""
        if plan.refuse is not None:
            refuse = plan.refuse
            extra = {"Retry-After": refuse.retry_after} if refuse.retry_after else {}
            return _error_response(refuse.status, refuse.message, extra)
        if (
            self.api_key is not None
            and record.headers.get("authorization") != f"Bearer {self.api_key}"
        ):
            return _error_response(401, "Incorrect API key provided.")
        if record.path != "/v1/realtime":
            return _error_response(404, f"no route for {record.path}")
        if record.query.get("intent") != "transcription" and "model" not in record.query:
            return _error_response(400, "give ?model= or ?intent=transcription")
        return None

    async def _send(
        self, stream: anyio.abc.SocketStream, proto: ServerProtocol, session: _Session,
        record: RecordedConnection, plan: Plan,
    ) -> None:  # fmt: skip
        """Send what the session produced, then run the plan's actions that are due."""
        due = plan.actions[0] if plan.actions else None
        if isinstance(due, Drop) and due.unanswered and due.after <= record.frames:
            raise _Dropped  # the answers to the last frame are never sent
        if proto.state is State.OPEN:
            for data in session.out:
                proto.send_text(data)
        session.out.clear()
        await _flush(stream, proto)
        while plan.actions and (plan.actions[0].after or 0) <= record.frames:
            action = plan.actions.popleft()
            match action:
                case Drop():
                    raise _Dropped
                case Garbage(data=data, binary=binary):
                    proto.send_binary(data) if binary else proto.send_text(data)
                case CloseWith(code=code, reason=reason):
                    proto.send_close(code, reason)
                case Inject(event=event):
                    proto.send_text(msgspec.json.encode(event))
                case Stall() as stall:
                    await _flush(stream, proto)
                    stall.reached.set()
                    await stall.released.wait()
            await _flush(stream, proto)


def _binary_error() -> bytes:
    body = se.ErrorBody("invalid_request_error", "binary frames are not accepted", "binary")
    return se.encode_server_event(se.Error(error=body, event_id="event_binary"))


def _error_response(status: int, message: str, extra: dict[str, str] | None = None) -> Response:
    body = msgspec.json.encode(
        {"error": {"message": message, "type": "invalid_request_error", "code": str(status)}}
    )
    headers = Headers(
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
         ("Connection", "close"), *(extra or {}).items()]
    )  # fmt: skip
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


async def _read_request(stream: anyio.abc.SocketStream, proto: ServerProtocol) -> Request | None:
    while True:
        try:
            data = await stream.receive(READ_SIZE)
        except anyio.EndOfStream:
            return None
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Request):
                return event
        if proto.handshake_exc is not None:
            await _flush(stream, proto)
            return None


async def _flush(stream: anyio.abc.SocketStream, proto: ServerProtocol) -> None:
    chunks = proto.data_to_send()
    data = b"".join(chunks)
    if data:
        await stream.send(data)
    if chunks and chunks[-1] == b"":
        raise _Dropped  # websockets is done with the connection: close TCP
