"""A fake speech-to-speech upstream (OpenAI Realtime conversations): a real WebSocket server.

`GET /v1/realtime?model=M`; beta with `OpenAI-Beta: realtime=v1`, GA otherwise. It keeps a
conversation per connection: `session.update` (recorded, answered `session.updated`),
`input_audio_buffer.append/commit/clear` (a commit adds a user audio item, transcribed at
once by the stub rule of `realtime_upstream.stub_words`), `conversation.item.create` (client
ids kept; `previous_item_id` honoured; a duplicate id is an `error`), `.delete`, `.truncate`,
`response.create` (one at a time) and `response.cancel`.

An answer is "reply to <the last user words>", cut to `answer_words` words (padded when
more than `ANSWER_WORDS` are asked): per word one audio transcript delta and one 100 ms audio
delta (pcm16 24 kHz, bytes derived from the word and its index, so an answer's audio is the
same whoever asks), then the done events. Between chunks the responder yields
(`chunk_interval_s`, 0 by default: a checkpoint), so a cancel or a drop lands mid-answer.
Every audio delta written to the socket is recorded (`sent_audio`, after the write: a reset
drops what was not written), per upstream response, so a test can compare what the client
heard with what was said.

Faults, for the next connection (one `plan(...)` each, in order): `Refuse(status)` the
handshake, `DropMidResponse(after_chunks=K)` (TCP closed after the K-th audio chunk of the
connection), `DropAfter(frames=N)` (closed after N client frames), `TranscribeLate()` (a
commit's transcription comes only as the connection's next response ends: an upstream slower
to transcribe than to answer), `StallMidResponse(after_chunks=K)` (after the K-th chunk it
neither writes nor reads again: pings go unanswered) and `GarbageMidResponse(after_chunks=K)`
(a text frame that is not JSON after the K-th chunk).
"""

from __future__ import annotations

import base64
import socket
import zlib
from collections import deque
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.abc
import msgspec
import numpy as np
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from tests.fakes.realtime_upstream import (
    READ_SIZE,
    Refuse,
    _Dropped,
    _error_response,
    _flush,
    _read_request,
    _ws_log,
    stub_words,
)

ANSWER_WORDS = 8
CHUNK_SAMPLES = 2400  # 100 ms at 24 kHz


class DropMidResponse(msgspec.Struct, frozen=True):
    """Close TCP after the connection's `after_chunks`-th audio delta."""

    after_chunks: int


class DropAfter(msgspec.Struct, frozen=True):
    """Close TCP after `frames` client frames."""

    frames: int


class StallMidResponse(msgspec.Struct, frozen=True):
    """After the connection's `after_chunks`-th audio chunk: silence both ways."""

    after_chunks: int


class GarbageMidResponse(msgspec.Struct, frozen=True):
    """After the connection's `after_chunks`-th audio chunk: a frame that is not JSON."""

    after_chunks: int


class TranscribeLate(msgspec.Struct, frozen=True):
    """Hold each commit's transcription until the connection's next response ends."""


class S2SPlan(msgspec.Struct):
    refuse: Refuse | None = None
    drop_mid_response: int | None = None
    drop_after_frames: int | None = None
    transcribe_late: bool = False
    stall_mid_response: int | None = None
    garbage_mid_response: int | None = None


Fault = (
    Refuse | DropMidResponse | DropAfter | TranscribeLate | StallMidResponse | GarbageMidResponse
)


def word_audio(word: str, index: int) -> bytes:
    """The 100 ms of audio the fake says for `word` at `index` of an answer."""
    rng = np.random.default_rng(zlib.crc32(f"{index}:{word}".encode()))
    return rng.integers(-3000, 3000, CHUNK_SAMPLES, dtype=np.int16).astype("<i2").tobytes()


class Connection:
    """One upstream connection: what it was told and what it holds."""

    def __init__(self, number: int, dialect: str, query: dict[str, str]) -> None:
        self.number = number
        self.dialect = dialect
        self.query = query
        self.headers: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []  # client events received
        self.sessions: list[dict[str, Any]] = []  # session.update bodies
        self.items: list[dict[str, Any]] = []  # the conversation, in order
        self.sent_audio: dict[str, bytearray] = {}  # upstream response id -> audio sent
        self.responses: list[str] = []  # ids, in order
        self.truncated: list[dict[str, Any]] = []
        self.ended = anyio.Event()
        self.session: _Session | None = None

    def reset(self) -> None:
        """Close this connection's TCP now (no close frame), whatever it is doing."""
        if self.session is not None:
            self.session.dropped.set()

    def types(self) -> list[str]:
        return [str(e.get("type")) for e in self.events]

    def item_ids(self) -> list[str]:
        return [str(i["id"]) for i in self.items]


class _Session:
    """The protocol of one connection (events in, encoded events out)."""

    def __init__(self, record: Connection, plan: S2SPlan) -> None:
        self.record = record
        self.plan = plan
        self.ga = record.dialect == "ga"
        self.out: list[bytes] = []
        self.out_audio: list[tuple[str, bytes] | None] = []
        self.wake = anyio.Event()
        self._count = 0
        self._audio = bytearray()
        self.request: dict[str, Any] | None = None  # the response.create waiting to run
        self.active: str | None = None
        self.cancelled = False
        self.chunks = 0
        self.requested = anyio.Event()  # a response.create arrived
        self.dropped = anyio.Event()  # the plan ends the connection (TCP closed, no close frame)
        self.writing = False
        self.sent = anyio.Event()  # the writer emptied `out`
        self.late: list[dict[str, Any]] = []  # transcriptions held (TranscribeLate)
        self.stalled = False  # StallMidResponse: nothing more is read or written

    async def drop(self) -> None:
        """End the connection once everything emitted so far went out."""
        while self.out or self.writing:
            self.sent = anyio.Event()
            await self.sent.wait()
        self.dropped.set()
        await anyio.sleep_forever()

    def emit(self, event: dict[str, Any], audio: tuple[str, bytes] | None = None) -> None:
        self._count += 1
        event = {"event_id": f"ev_{self.record.number}_{self._count}", **event}
        self.out.append(msgspec.json.encode(event))
        self.out_audio.append(audio)  # credited to `sent_audio` once it went out
        self.wake.set()

    def new_id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self.record.number}_{self._count}"

    def error(self, message: str, code: str, event_id: Any) -> None:
        body = {"type": "invalid_request_error", "code": code, "message": message,
                "param": None, "event_id": event_id}  # fmt: skip
        self.emit({"type": "error", "error": body})

    def start(self) -> None:
        session = {"id": f"sess_{self.record.number}", "object": "realtime.session",
                   "model": self.record.query.get("model")}  # fmt: skip
        if self.ga:
            session["type"] = "realtime"
        self.emit({"type": "session.created", "session": session})

    def handle(self, data: bytes) -> None:
        event = msgspec.json.decode(data)
        self.record.events.append(event)
        kind, event_id = event.get("type"), event.get("event_id")
        if kind == "session.update":
            self.record.sessions.append(event["session"])
            self.emit({"type": "session.updated", "session": event["session"]})
        elif kind == "input_audio_buffer.append":
            self._audio += base64.b64decode(event["audio"])
        elif kind == "input_audio_buffer.clear":
            self._audio = bytearray()
            self.emit({"type": "input_audio_buffer.cleared"})
        elif kind == "input_audio_buffer.commit":
            self._commit(event_id)
        elif kind == "conversation.item.create":
            self._create(event)
        elif kind == "conversation.item.delete":
            found = self._find(event.get("item_id"))
            if found is None:
                self.error("no such item", "item_not_found", event_id)
            else:
                self.record.items.remove(found)
                self.emit({"type": "conversation.item.deleted", "item_id": found["id"]})
        elif kind == "conversation.item.truncate":
            self.record.truncated.append(event)
            self.emit({"type": "conversation.item.truncated", "item_id": event["item_id"],
                       "content_index": event["content_index"],
                       "audio_end_ms": event["audio_end_ms"]})  # fmt: skip
        elif kind == "response.create":
            if self.active is not None or self.request is not None:
                self.error("a response is in progress", "conversation_already_has_active_response",
                           event_id)  # fmt: skip
            else:
                self.request = event.get("response") or {}
                self.requested.set()
        elif kind == "response.cancel":
            if self.active is None and self.request is None:
                self.error("no response to cancel", "response_cancel_not_active", event_id)
            self.request = None
            self.cancelled = True
        else:
            self.error(f"{kind} is not supported by the fake", "unsupported", event_id)

    def _find(self, item_id: Any) -> dict[str, Any] | None:
        return next((i for i in self.record.items if i["id"] == item_id), None)

    def _add(self, item: dict[str, Any], previous: str | None) -> None:
        items = self.record.items
        if previous is None:
            at = len(items)
        elif previous == "root":
            at = 0
        else:
            found = self._find(previous)
            at = items.index(found) + 1 if found is not None else len(items)
        items.insert(at, item)
        before = items[at - 1]["id"] if at else None
        kind = "conversation.item.added" if self.ga else "conversation.item.created"
        self.emit({"type": kind, "item": item, "previous_item_id": before})
        if self.ga:
            self.emit({"type": "conversation.item.done", "item": item, "previous_item_id": before})

    def _commit(self, event_id: Any) -> None:
        if not self._audio:
            self.error("buffer too small", "input_audio_buffer_commit_empty", event_id)
            return
        item_id = self.new_id("item")
        transcript = " ".join(stub_words(bytes(self._audio)))
        self._audio = bytearray()
        previous = self.record.items[-1]["id"] if self.record.items else None
        self.emit({"type": "input_audio_buffer.committed", "item_id": item_id,
                   "previous_item_id": previous})  # fmt: skip
        part = {"type": "input_audio", "transcript": transcript}
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [part]}  # fmt: skip
        self._add(item, None)
        done = {"type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id, "content_index": 0, "transcript": transcript}  # fmt: skip
        if self.plan.transcribe_late:
            self.late.append(done)
        else:
            self.emit(done)

    def _create(self, event: dict[str, Any]) -> None:
        item = dict(event["item"])
        item.setdefault("id", self.new_id("item"))
        if self._find(item["id"]) is not None:
            self.error(f"item {item['id']} exists", "item_exists", event.get("event_id"))
            return
        item.setdefault("object", "realtime.item")
        item.setdefault("status", "completed")
        self._add(item, event.get("previous_item_id"))

    def answer_words(self, length: int) -> list[str]:
        said = ""
        for item in reversed(self.record.items):
            if item.get("role") == "user":
                said = " ".join(p.get("text") or p.get("transcript") or "" for p in item["content"])
                break
        words = ["reply", "to", *said.split()][:length]
        if length <= ANSWER_WORDS:
            return words
        return words + [f"word{i}" for i in range(length - len(words))]  # a long answer


class FakeSpeechToSpeech:
    """The fake; start it with `port = await nursery.start(fake.serve)`."""

    def __init__(
        self,
        *,
        chunk_interval_s: float = 0.0,
        answer_words: int = ANSWER_WORDS,
        send_buffer_bytes: int | None = None,
    ) -> None:
        self.chunk_interval_s = chunk_interval_s
        self.answer_words = answer_words
        self.send_buffer_bytes = send_buffer_bytes  # SO_SNDBUF of its sockets (None: the OS's)
        self.connections: list[Connection] = []
        self.port = 0
        self._plans: deque[S2SPlan] = deque()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def plan(self, *faults: Fault) -> None:
        """What the next connection (without a plan yet) does."""
        plan = S2SPlan()
        for fault in faults:
            if isinstance(fault, Refuse):
                plan.refuse = fault
            elif isinstance(fault, DropMidResponse):
                plan.drop_mid_response = fault.after_chunks
            elif isinstance(fault, TranscribeLate):
                plan.transcribe_late = True
            elif isinstance(fault, StallMidResponse):
                plan.stall_mid_response = fault.after_chunks
            elif isinstance(fault, GarbageMidResponse):
                plan.garbage_mid_response = fault.after_chunks
            else:
                plan.drop_after_frames = fault.frames
        self._plans.append(plan)

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
        plan = self._plans.popleft() if self._plans else S2SPlan()
        if self.send_buffer_bytes is not None:
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        proto = ServerProtocol(max_size=None, logger=_ws_log)
        record: Connection | None = None
        try:
            async with stream:
                request = await _read_request(stream, proto)
                if request is None:
                    return
                parts = urlsplit(request.path)
                headers = {k.lower(): v for k, v in request.headers.raw_items()}
                dialect = "beta" if headers.get("openai-beta") == "realtime=v1" else "ga"
                record = Connection(
                    len(self.connections) + 1, dialect, dict(parse_qsl(parts.query))
                )
                record.headers = headers
                self.connections.append(record)
                if plan.refuse is not None:
                    proto.send_response(_error_response(plan.refuse.status, plan.refuse.message))
                    await _flush(stream, proto)
                    return
                proto.send_response(proto.accept(request))
                await _flush(stream, proto)
                session = record.session = _Session(record, plan)
                session.start()
                async with anyio.create_task_group() as tg:

                    async def guarded(work: Any) -> None:
                        try:
                            await work
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError,
                                anyio.EndOfStream, _Dropped):  # fmt: skip
                            pass
                        session.dropped.set()  # whichever ends first ends the connection

                    tg.start_soon(guarded, self._writer(stream, proto, session))
                    tg.start_soon(guarded, self._responder(session))
                    tg.start_soon(guarded, self._reader(stream, proto, session))
                    await session.dropped.wait()
                    tg.cancel_scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, _Dropped):
            pass
        finally:
            if record is not None:
                record.ended.set()

    async def _reader(
        self, stream: anyio.abc.SocketStream, proto: ServerProtocol, session: _Session
    ) -> None:
        frames = 0
        while True:
            if session.stalled:
                await anyio.sleep_forever()
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                return
            proto.receive_data(data)
            for frame in proto.events_received():
                if isinstance(frame, Frame) and frame.opcode is Opcode.TEXT:
                    frames += 1
                    session.handle(bytes(frame.data))
                    limit = session.plan.drop_after_frames
                    if limit is not None and frames >= limit:
                        await session.drop()
            if proto.state is not State.OPEN:
                session.wake.set()
                return

    async def _writer(
        self, stream: anyio.abc.SocketStream, proto: ServerProtocol, session: _Session
    ) -> None:
        while True:
            await session.wake.wait()
            session.wake = anyio.Event()
            if session.stalled:
                await anyio.sleep_forever()
            out, session.out = session.out, []
            audio, session.out_audio = session.out_audio, []
            session.writing = True
            if proto.state is not State.OPEN:
                return
            for data in out:
                proto.send_text(data)
            await _flush(stream, proto)
            for said in audio:  # written to the socket: the gateway gets it before any FIN
                if said is not None:
                    session.record.sent_audio[said[0]] += said[1]
            session.writing = False
            if not session.out:
                session.sent.set()

    async def _responder(self, session: _Session) -> None:
        while True:
            await session.requested.wait()
            session.requested = anyio.Event()
            if session.request is None:
                continue  # cancelled before it started
            request, session.request = session.request, None
            session.cancelled = False
            await self._respond(session, request)

    async def _respond(self, session: _Session, request: dict[str, Any]) -> None:
        record, ga = session.record, session.ga
        rid = session.new_id("resp")
        session.active = rid
        record.responses.append(rid)
        record.sent_audio[rid] = bytearray()
        base = {"id": rid, "object": "realtime.response", "status": "in_progress", "output": []}
        session.emit({"type": "response.created", "response": base})
        item_id = session.new_id("item")
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}  # fmt: skip
        ids = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        session.emit({"type": "response.output_item.added", "response_id": rid,
                      "output_index": 0, "item": item})  # fmt: skip
        in_conversation = request.get("conversation") != "none"
        if in_conversation:
            session._add(item, None)
        part_type = "output_audio" if ga else "audio"
        session.emit({"type": "response.content_part.added", **ids,
                      "part": {"type": part_type, "transcript": ""}})  # fmt: skip
        names = ("response.output_audio_transcript", "response.output_audio") if ga else (
            "response.audio_transcript", "response.audio")  # fmt: skip
        transcript = ""
        status = "completed"
        for index, word in enumerate(session.answer_words(self.answer_words)):
            await anyio.sleep(self.chunk_interval_s)
            if session.cancelled:
                status = "cancelled"
                break
            delta = word if not index else " " + word
            transcript += delta
            audio = word_audio(word, index)
            session.emit({"type": names[0] + ".delta", **ids, "delta": delta})
            session.emit({"type": names[1] + ".delta", **ids,
                          "delta": base64.b64encode(audio).decode()}, (rid, audio))  # fmt: skip
            session.chunks += 1
            if session.plan.drop_mid_response == session.chunks:
                await session.drop()
                return
            if session.plan.stall_mid_response == session.chunks:
                session.stalled = True
                await anyio.sleep_forever()
            if session.plan.garbage_mid_response == session.chunks:
                session.out.append(b"{not json")
                session.out_audio.append(None)
                session.wake.set()
        part = {"type": part_type, "transcript": transcript}
        item["content"] = [part]
        item["status"] = "completed" if status == "completed" else "incomplete"
        session.emit({"type": names[1] + ".done", **ids})
        session.emit({"type": names[0] + ".done", **ids, "transcript": transcript})
        session.emit({"type": "response.content_part.done", **ids, "part": part})
        session.emit({"type": "response.output_item.done", "response_id": rid,
                      "output_index": 0, "item": item})  # fmt: skip
        if ga and in_conversation:
            session.emit({"type": "conversation.item.done", "item": item})
        usage = {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20}
        done = {**base, "status": status, "output": [item], "usage": usage}
        if status == "cancelled":
            done["status_details"] = {"type": "cancelled", "reason": "client_cancelled"}
        for late in session.late:
            session.emit(late)
        session.late = []
        session.emit({"type": "response.done", "response": done})
        session.active = None
