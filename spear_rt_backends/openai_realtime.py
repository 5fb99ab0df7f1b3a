"""The `openai_realtime` backend kind: an OpenAI-Realtime-compatible WebSocket upstream.

URL: built the way the official `openai` client builds it from `base_url`: http -> ws,
https -> wss, `/realtime` appended to the path (any query of `base_url` kept), then
`intent=transcription` (preceded by `model=` when the option `query_model` is set, for
proxies that route on it). The key goes only into `Authorization: Bearer`; it is never
logged (websockets' header logging is kept off) and redacted from every message built here.

Dialect (option `dialect`, "ga" by default): "beta" sends `OpenAI-Beta: realtime=v1` and
`transcription_session.update`; "ga" sends `session.update` with `session.type =
"transcription"` and `audio.input.format {type: audio/pcm, rate: 24000}`. Both turn server
VAD off (`turn_detection: null`): spear_rt detects turns and commits itself. Events of
either dialect are understood whichever was asked.

Commands -> upstream: `BeginTurn` is local (it names the turn live deltas belong to);
`AppendAudio` -> `input_audio_buffer.append`; `Commit` -> `input_audio_buffer.commit`,
and the item id of the upstream's `committed` is mapped to ours; `Clear` ->
`input_audio_buffer.clear`. Upstream transcription delta/completed/failed come back under
OUR item id; a delta for an item id not seen yet belongs to the oldest commit still
waiting for its id, else to the open turn. An `error` event answering one of our commits
fails that item (`TranscriptFailed`); any other `error` ends the upstream.

Failures: `receive()` first returns every event that arrived, then raises
`BackendFailure`. retryable=True: the connection dropped, the upstream closed it (except
with a policy/protocol code), it stopped answering pings, a write failed, the opening
timed out, the handshake got 408/429/5xx, or an `error` of type `server_error` /
`session_expired`. retryable=False: handshake 401/403/other 4xx, non-JSON or binary
frames, protocol violations, other `error` events. `send` raises the same failure.

Reconnect (the session's job; this upstream is one connection and keeps no audio): open a
NEW `open_transcription` (it sends the session config itself), drain the old `receive()`
to its failure first, then replay, in order, for every turn whose `TranscriptCompleted` /
`TranscriptFailed` has not arrived: `BeginTurn(id)`, all of that turn's audio from its
start, and `Commit(id)` if it had been committed (the open turn: no commit). Deltas of a
replayed item start again from its beginning: skip the text already forwarded.

Options (all optional): dialect, query_model (false), connect_timeout_s (10: TCP, TLS,
handshake and `*.created`), close_timeout_s (2), ping_interval_s (20; 0 = no keepalive),
ping_timeout_s (20), max_send_buffer_bytes (262144), max_pending_events (256),
max_message_bytes (1 MiB), verify_tls (true).
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import msgspec
import numpy as np
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from spear_rt.audio import pcm16_to_bytes
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    TranscriptionSpec,
    TranscriptionUpstream,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport
from spear_rt.protocol import client_events as ce
from spear_rt.protocol import server_events as se
from spear_rt.protocol.settings import Dialect

RATE_HZ = 24000  # pcm16 24 kHz mono: the protocol's default input format
READ_SIZE = 65536
FRAME_OVERHEAD = 96  # bytes of JSON and framing around an event's payload (an estimate)
MAX_MESSAGE_CHARS = 500  # of an upstream error message passed on
_NON_RETRYABLE_CLOSE = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
_RETRYABLE_ERRORS = frozenset({"server_error", "session_expired"})

# websockets logs request headers (Authorization included) at DEBUG: its logger never is.
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)
_encoder = msgspec.json.Encoder()
UPDATE_EVENT_ID = "spear_session_update"  # errors naming it refuse our session config
BytesLike = bytes | bytearray | memoryview
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class RealtimeOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An instance's `options` (see the module docstring)."""

    dialect: Dialect = Dialect.GA
    query_model: bool = False
    connect_timeout_s: PositiveFloat = 10.0
    close_timeout_s: PositiveFloat = 2.0
    ping_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 20.0
    ping_timeout_s: PositiveFloat = 20.0
    max_send_buffer_bytes: PositiveInt = 256 * 1024
    max_pending_events: PositiveInt = 256
    max_message_bytes: PositiveInt = 1 << 20
    verify_tls: bool = True


def parse_options(instance: InstanceInfo) -> RealtimeOptions:
    """The instance's options; raises `BackendFailure` naming what is wrong."""
    try:
        return msgspec.convert(instance.options, RealtimeOptions)
    except msgspec.ValidationError as exc:
        raise BackendFailure(f"openai_realtime options: {exc}") from None


def realtime_url(base_url: str, query: dict[str, str]) -> str:
    """`base_url` as the official client turns it into its realtime URL, plus `query`."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise BackendFailure(f"openai_realtime: base_url must be http(s) or ws(s), got {scheme!r}")
    extra = urlencode(query)
    merged = f"{parts.query}&{extra}" if parts.query and extra else parts.query or extra
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/realtime", merged, ""))


def session_update(dialect: Dialect, spec: TranscriptionSpec, model: str | None) -> bytes:
    """The session configuration event in `dialect` (transcription, pcm16 24 kHz, no VAD)."""
    transcription = ce.TranscriptionWire(model=model, language=spec.language, prompt=spec.prompt)
    event: ce.ClientEvent
    if dialect is Dialect.BETA:
        session = ce.SessionWire(
            input_audio_format="pcm16", input_audio_transcription=transcription, turn_detection=None
        )
        event = ce.TranscriptionSessionUpdate(event_id=UPDATE_EVENT_ID, session=session)
    else:
        audio_in = ce.GaAudioInput(
            format=ce.GaAudioFormat("audio/pcm", RATE_HZ),
            transcription=transcription,
            turn_detection=None,
        )
        session = ce.SessionWire(type="transcription", audio=ce.GaAudio(input=audio_in))
        event = ce.SessionUpdate(event_id=UPDATE_EVENT_ID, session=session)
    wire: dict[str, Any] = msgspec.to_builtins(event)
    beta = dialect is Dialect.BETA
    parent = wire["session"] if beta else wire["session"]["audio"]["input"]
    key = "input_audio_transcription" if beta else "transcription"
    parent[key] = {k: v for k, v in parent[key].items() if v is not None}  # unset, not null
    return _encoder.encode(wire)


# --- sans-I/O translation ----------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    type: Any = None


_envelope = msgspec.json.Decoder(_Envelope)
_KNOWN = frozenset(cls.__struct_config__.tag for cls in se.AnyServerEvent.__args__)
_IGNORABLE = _KNOWN - {  # malformed copies of these are ignored; of the rest, fatal
    "session.created", "transcription_session.created", "input_audio_buffer.committed",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed", "error",
}  # fmt: skip


class Translator:
    """Our commands to upstream frames, upstream frames to our events; no I/O, no clock.

    Item ids: `_open` is the turn in progress; `_pending` the committed turns whose upstream
    item id is not known yet (oldest first); `_ids` maps upstream ids to ours until the
    item completes or fails; `_said` is the text of the deltas delivered per item.
    """

    def __init__(self, redact: Callable[[str], str] = str) -> None:
        self.created = False
        self._redact = redact
        self._count = 0
        self._open: str | None = None
        self._pending: deque[str] = deque()
        self._commits: dict[str, str] = {}  # event_id of our commit -> our item, until answered
        self._ids: dict[str, str] = {}
        self._said: dict[str, str] = {}

    def encode(self, command: UpstreamCommand) -> bytes | None:
        """The frame for `command` (None: nothing to send)."""
        match command:
            case AppendAudio(pcm=pcm):
                audio = pcm16_to_bytes(pcm)
                return _encoder.encode(ce.InputAudioBufferAppend(event_id=self._id(), audio=audio))
            case BeginTurn(item_id=item_id):
                self._open = item_id
                return None
            case Commit(item_id=item_id):
                event_id = self._id()
                self._open = None
                self._pending.append(item_id)
                self._commits[event_id] = item_id
                return _encoder.encode(ce.InputAudioBufferCommit(event_id=event_id))
            case Clear():
                if self._open is not None:
                    self._forget(self._open)
                    self._open = None
                return _encoder.encode(ce.InputAudioBufferClear(event_id=self._id()))
        raise TypeError(f"not an upstream command: {command!r}")

    def decode(self, data: BytesLike) -> list[UpstreamEvent]:
        """Our events for one upstream message; raises `BackendFailure` when it ends us."""
        try:
            event = se.server_event_decoder.decode(data)
        except msgspec.ValidationError as exc:
            return self._unexpected(data, exc)
        except msgspec.DecodeError:
            raise BackendFailure("the upstream sent an event that is not valid JSON") from None
        match event:
            case se.TranscriptionDelta(item_id=uid, delta=delta):
                ours = self._item_of(uid, live=True)
                if ours is None or not delta:
                    return []
                self._said[ours] = self._said.get(ours, "") + delta
                return [TranscriptDelta(ours, delta)]
            case se.TranscriptionCompleted(item_id=uid, transcript=text):
                ours = self._item_of(uid, live=False)
                if ours is None:
                    return []
                said = self._forget(ours)
                done: list[UpstreamEvent] = [TranscriptCompleted(ours, text)]
                if len(text) > len(said) and text.startswith(said):  # deltas must add up
                    done.insert(0, TranscriptDelta(ours, text[len(said) :]))
                return done
            case se.TranscriptionFailed(item_id=uid, error=error):
                ours = self._item_of(uid, live=False)
                if ours is None:
                    return []
                self._forget(ours)
                message = str(error.get("message") or "transcription failed")
                retry = error.get("type") in _RETRYABLE_ERRORS
                return [TranscriptFailed(ours, self._text(message), retryable=retry)]
            case se.Committed(item_id=uid):
                self._committed(uid)
            case se.SessionCreated() | se.TranscriptionSessionCreated():
                self.created = True
            case se.Error(error=body):
                return self._error(body)
        return []

    def _id(self) -> str:
        self._count += 1
        return f"spear_{self._count}"

    def _item_of(self, uid: str, *, live: bool) -> str | None:
        ours = self._ids.get(uid)
        if ours is None:
            if self._pending:
                ours = self._pending[0]
            elif live and self._open is not None:
                ours = self._open
            else:
                return None  # an item we never asked for (or already finished)
            self._ids[uid] = ours
        return ours

    def _committed(self, uid: str) -> None:
        ours = self._ids.get(uid)
        if ours is None:
            if not self._pending:
                return
            ours = self._ids[uid] = self._pending.popleft()
        elif ours in self._pending:
            self._pending.remove(ours)
        self._drop_commit(ours)

    def _forget(self, ours: str) -> str:
        """Drop every trace of item `ours`; the text of its delivered deltas."""
        for uid in [uid for uid, item in self._ids.items() if item == ours]:
            del self._ids[uid]
        if ours in self._pending:
            self._pending.remove(ours)
        self._drop_commit(ours)
        return self._said.pop(ours, "")

    def _drop_commit(self, ours: str) -> None:
        for event_id in [e for e, item in self._commits.items() if item == ours]:
            del self._commits[event_id]

    def _error(self, body: se.ErrorBody) -> list[UpstreamEvent]:
        message = self._text(body.message)
        item = self._commits.get(body.event_id or "")
        if item is not None:
            self._forget(item)
            return [TranscriptFailed(item, message)]
        what = "refused the session configuration" if body.event_id == UPDATE_EVENT_ID else "error"
        code = f", {body.code}" if body.code else ""
        retryable = body.type in _RETRYABLE_ERRORS or body.code in _RETRYABLE_ERRORS
        raise BackendFailure(f"upstream {what} ({body.type}{code}): {message}", retryable=retryable)

    def _unexpected(self, data: BytesLike, exc: msgspec.ValidationError) -> list[UpstreamEvent]:
        try:
            kind = _envelope.decode(data).type
        except (msgspec.ValidationError, msgspec.DecodeError):
            kind = None
        if not isinstance(kind, str):
            raise BackendFailure("the upstream sent an event without a `type`") from None
        if kind not in _KNOWN or kind in _IGNORABLE:
            return []  # an event we do not use (rate_limits.updated, a newer one...)
        raise BackendFailure(self._text(f"the upstream sent a malformed {kind}: {exc}")) from None

    def _text(self, message: str) -> str:
        return self._redact(message[:MAX_MESSAGE_CHARS])


# --- the connection ----------------------------------------------------------------------------


class _Assembler:
    """Complete text messages out of frames (binary data is a protocol violation here)."""

    def __init__(self) -> None:
        self._parts: list[BytesLike] = []

    def message(self, frame: Frame) -> BytesLike | None:
        if frame.opcode is Opcode.BINARY or (frame.opcode is Opcode.CONT and not self._parts):
            raise BackendFailure("the upstream sent binary data; realtime events are JSON text")
        if frame.opcode is Opcode.TEXT and frame.fin:
            return frame.data
        self._parts.append(frame.data)
        if not frame.fin:
            return None
        data, self._parts = b"".join(self._parts), []
        return data


class UpstreamStatistics(msgspec.Struct, frozen=True):
    """Buffer occupancy of one upstream connection."""

    send_buffer_bytes: int  # queued for the socket or being written
    max_send_buffer_bytes: int
    events_buffered: int  # received, not yet taken by `receive`
    max_pending_events: int


class RealtimeTranscription:
    """One session's upstream connection (see the module docstring for its contract).

    Send buffer: frames are queued on the protocol, bounded in bytes; `send` waits and
    `send_nowait` returns False while `max_send_buffer_bytes` are queued or being written
    (one frame is always accepted into an empty buffer). Events: at most
    `max_pending_events` wait for `receive`; past that the reader stops reading the socket,
    so TCP pushes back on the upstream. Nothing is dropped. One sender at a time.
    """

    input_rate_hz = RATE_HZ

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: ClientProtocol,
        translator: Translator,
        assembler: _Assembler,
        options: RealtimeOptions,
    ) -> None:
        self._stream = stream
        self._proto = protocol
        self._translator = translator
        self._assembler = assembler
        self._options = options
        self._tx, self._rx = anyio.create_memory_object_stream[UpstreamEvent](
            options.max_pending_events
        )
        self._queued = 0  # bytes handed to the protocol since the last write
        self._writing = 0  # bytes of the write in progress
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._pong: anyio.Event | None = None
        self._pings = 0
        self._delivering = False  # the reader waits for `receive`: pongs cannot be read
        self._failure: BackendFailure | None = None
        self._closed = False
        self._io_scope = anyio.CancelScope()
        self._io_done = anyio.Event()

    # --- TranscriptionUpstream ----------------------------------------------------------------

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Queue `command` without waiting; False (nothing done) when the buffer is full."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise anyio.ClosedResourceError
        if self._proto.state is not State.OPEN:  # the peer is closing: the reader will tell
            raise _closed_failure(self._proto)
        size = FRAME_OVERHEAD
        if isinstance(command, AppendAudio):
            pcm = command.pcm
            if pcm.dtype != np.int16 or pcm.ndim != 1:
                raise ValueError("AppendAudio.pcm must be a 1-D int16 array")
            if not pcm.size:
                return True
            size += (pcm.nbytes + 2) // 3 * 4
        elif isinstance(command, BeginTurn):
            size = 0
        used = self._queued + self._writing
        if used and used + size > self._options.max_send_buffer_bytes:
            return False
        frame = self._translator.encode(command)
        if frame is not None:
            self._proto.send_text(frame)
            self._queued += len(frame)
            self._wake.set()
        return True

    async def send(self, command: UpstreamCommand) -> None:
        """Queue `command`; waits while the send buffer is full."""
        while not self.send_nowait(command):
            self._space = anyio.Event()
            await self._space.wait()

    async def receive(self) -> UpstreamEvent:
        """The next event; after a failure, the events before it, then `BackendFailure`."""
        try:
            return await self._rx.receive()
        except anyio.EndOfStream:
            if self._failure is not None:
                raise self._failure from None
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    def statistics(self) -> UpstreamStatistics:
        """Current buffer occupancy."""
        options = self._options
        return UpstreamStatistics(
            send_buffer_bytes=self._queued + self._writing,
            max_send_buffer_bytes=options.max_send_buffer_bytes,
            events_buffered=self._rx.statistics().current_buffer_used,
            max_pending_events=options.max_pending_events,
        )

    # --- I/O tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Read, write and keep alive until the connection ends (or `aclose`)."""
        try:
            with self._io_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._writer)
                    if self._options.ping_interval_s > 0:
                        tg.start_soon(self._keepalive)
                    await self._reader()
                    tg.cancel_scope.cancel()
        finally:
            self._io_done.set()

    async def _reader(self) -> None:
        proto = self._proto
        try:
            while proto.state is not State.CLOSED:
                try:
                    data = await self._stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    proto.receive_eof()
                    break
                proto.receive_data(data)
                events, failure = self._frames(proto.events_received())
                await self._deliver(events)  # what came before a failure still counts
                if failure is not None:
                    raise failure
                if proto.parser_exc is not None:
                    exc = proto.parser_exc
                    raise BackendFailure(f"upstream protocol error: {type(exc).__name__}: {exc}")
        except BackendFailure as exc:
            self._fail(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail(BackendFailure("the upstream connection was lost", retryable=True))
        else:
            self._fail(_closed_failure(proto))

    def _frames(self, frames: list[Any]) -> tuple[list[UpstreamEvent], BackendFailure | None]:
        """Our events for the frames of one read, up to the failure among them if any."""
        events: list[UpstreamEvent] = []
        for frame in frames:
            if not isinstance(frame, Frame):
                continue
            opcode = frame.opcode
            if opcode in _DATA:
                try:
                    message = self._assembler.message(frame)
                    if message is not None:
                        events.extend(self._translator.decode(message))
                except BackendFailure as exc:
                    return events, exc
            else:  # websockets queued the answer to a ping or a close: send it
                self._wake.set()
                if opcode is Opcode.PONG and self._pong is not None:
                    self._pong.set()
        return events, None

    async def _deliver(self, events: list[UpstreamEvent]) -> None:
        self._delivering = True
        try:
            for event in events:
                await self._tx.send(event)
        except anyio.BrokenResourceError:
            pass  # closing: nobody reads events any more
        finally:
            self._delivering = False

    async def _writer(self) -> None:
        stream = self._stream
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                chunks = self._proto.data_to_send()
                self._writing, self._queued = self._queued, 0
                data = b"".join(chunks)
                if data:
                    await stream.send(data)
                self._writing = 0
                self._space.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._fail(BackendFailure("the upstream connection was lost", retryable=True))

    async def _keepalive(self) -> None:
        options = self._options
        while True:
            await anyio.sleep(options.ping_interval_s)
            self._pings += 1
            self._pong = anyio.Event()
            self._proto.send_ping(self._pings.to_bytes(4, "big"))
            self._wake.set()
            with anyio.move_on_after(options.ping_timeout_s):
                await self._pong.wait()
                continue
            if not self._delivering:  # a session that does not read is not a dead upstream
                self._fail(BackendFailure(
                    f"the upstream stopped answering (no pong within {options.ping_timeout_s:g}s)",
                    retryable=True,
                ))  # fmt: skip
                return

    def _fail(self, failure: BackendFailure) -> None:
        """The connection is over: keep the first failure, stop the I/O, wake everyone."""
        if self._failure is None and not self._closed:
            self._failure = failure
        self._io_scope.cancel()
        self._tx.close()
        self._space.set()

    async def aclose(self) -> None:
        """Closing handshake (bounded by close_timeout_s), then stop the I/O tasks."""
        self._closed = True
        self._rx.close()  # the reader now discards events, to see the peer's close
        self._space.set()
        if self._failure is None and self._proto.state is State.OPEN:
            self._proto.send_close(1000)
            self._wake.set()
            with anyio.move_on_after(self._options.close_timeout_s):
                await self._io_done.wait()
        self._io_scope.cancel()
        self._tx.close()


def _closed_failure(proto: ClientProtocol) -> BackendFailure:
    close = proto.close_rcvd
    if close is None:
        return BackendFailure("the upstream connection dropped (no close frame)", retryable=True)
    reason = f": {close.reason}" if close.reason else ""
    return BackendFailure(
        f"the upstream closed the connection ({close.code}{reason})",
        retryable=close.code not in _NON_RETRYABLE_CLOSE and not 4000 <= close.code < 5000,
    )


# --- opening -----------------------------------------------------------------------------------


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
        message += ": " + redact(detail[:MAX_MESSAGE_CHARS])
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
) -> tuple[anyio.abc.ByteStream, ClientProtocol]:
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
            if context is None:
                stream = await anyio.connect_tcp(uri.host, uri.port)
            else:
                stream = await anyio.connect_tcp(
                    uri.host, uri.port, ssl_context=context, tls_standard_compatible=False
                )
            try:
                stage = "in the WebSocket handshake"
                proto = ClientProtocol(uri, max_size=options.max_message_bytes, logger=_ws_log)
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


_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


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
    if not instance.base_url:
        raise BackendFailure("openai_realtime needs base_url")
    model = instance.model or spec.model
    query = {"model": model} if options.query_model and model else {}
    url = realtime_url(instance.base_url, {**query, "intent": "transcription"})
    secret = instance.api_key.reveal() if instance.api_key is not None else None

    def redact(text: str) -> str:
        return text.replace(secret, "***") if secret else text

    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    if options.dialect is Dialect.BETA:
        headers["OpenAI-Beta"] = "realtime=v1"
    translator, assembler = Translator(redact), _Assembler()
    update = session_update(options.dialect, spec, model)
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


# --- the kind ----------------------------------------------------------------------------------


class OpenAIRealtimeKind:
    """The `openai_realtime` backend kind (realtime transcription over WebSocket)."""

    name = "openai_realtime"
    extra = None  # websockets is a core dependency
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_LANGUAGE,
            }
        ),
        transports=frozenset({Transport.WEBSOCKET}),
        hosting=Hosting.REMOTE,
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """An instance needs a base_url (http(s) or ws(s)) and valid options."""
        if not instance.base_url:
            return "openai_realtime needs base_url (e.g. https://api.openai.com/v1)"
        try:
            parse_options(instance)
            realtime_url(instance.base_url, {})
        except BackendFailure as exc:
            return str(exc)
        return None

    def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Open one upstream connection for a realtime transcription session."""
        return open_realtime_transcription(instance, spec)

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot operations are not served over the realtime WebSocket."""
        raise BackendFailure("openai_realtime serves realtime sessions only")


KIND = OpenAIRealtimeKind()
