"""A fake OpenAI-compatible upstream: a real HTTP/1.1 server on 127.0.0.1 (anyio + h11).

It speaks the wire format of the endpoints spear_rt forwards to, with keep-alive:

  POST /v1/chat/completions      "echo: <last user message>"; `stream: true` answers SSE
                                 (role chunk, one chunk per word, finish chunk, a usage chunk
                                 when `stream_options.include_usage`, then `data: [DONE]`)
  POST /v1/embeddings            `dimensions` (default 8) floats per input, derived from the
                                 input's SHA-256; base64 float32 when `encoding_format: base64`
  POST /v1/audio/transcriptions  multipart; {"text": "heard <n> bytes of <filename>"}
  POST /v1/audio/speech          b"FAKE-AUDIO <format>:<input>", content type of the format;
                                 `wav`: a real 24 kHz WAV, 20 ms of tone per input character
  POST /v1/images/generations    `n` 1x1 PNGs as b64_json
  GET  /v1/models                one model, "fake-model"

Every request is recorded (`requests`: method, path, headers, body, decoded JSON or form,
connection number). Behaviours for the next requests are queued, one per request, in order:
`fail` (a status with an OpenAI error body, optionally `Retry-After`), `garbage` (200 with a
body that is not JSON), `stall` (no answer until released, noticing a client that hangs up)
and `slow_stream` (SSE events sent one by one as the test releases them). Answers are
deterministic and no timer is used anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections import deque
from typing import Any

import anyio
import anyio.abc
import h11
import msgspec
import numpy as np

CREATED = 1700000000
MODEL = "fake-model"
READ_SIZE = 65536
SPEECH_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}


SPEECH_RATE_HZ = 24000
SPEECH_MS_PER_CHAR = 20


def speech_samples(text: str) -> int:
    """How many samples the fake's WAV speech of `text` has."""
    return len(text) * SPEECH_RATE_HZ * SPEECH_MS_PER_CHAR // 1000


def speech_wav(text: str) -> bytes:
    """A mono 16-bit 24 kHz WAV of a 440 Hz tone, as long as `text` asks."""
    n = speech_samples(text)
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(n) / SPEECH_RATE_HZ)).astype("<i2")
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 2 * n, b"WAVE", b"fmt ", 16, 1, 1,
        SPEECH_RATE_HZ, 2 * SPEECH_RATE_HZ, 2, 16, b"data", 2 * n,
    )  # fmt: skip
    return header + tone.tobytes()


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\x20\x80\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = _png_1x1()


class Upload(msgspec.Struct, frozen=True):
    """A file part of a multipart request."""

    filename: str
    content_type: str
    data: bytes


class Recorded(msgspec.Struct):
    """One request as the fake received it (header names lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # 1 for the first TCP connection accepted, 2 for the next...
    json: Any = None
    form: dict[str, str] = msgspec.field(default_factory=dict)
    files: dict[str, Upload] = msgspec.field(default_factory=dict)


# --- behaviours (one per request, in order) ------------------------------------------------


class Fail(msgspec.Struct, frozen=True):
    """Answer `status` with an OpenAI error body (and `Retry-After` when given)."""

    status: int
    message: str
    retry_after: str | None = None


class Garbage(msgspec.Struct, frozen=True):
    """Answer 200 with a JSON content type and a body that is not JSON."""


class Stall:
    """Hold the answer until `release()`; `disconnected` is set if the client hangs up first."""

    def __init__(self) -> None:
        self.released = anyio.Event()
        self.disconnected = anyio.Event()
        self.reached = anyio.Event()  # the request arrived and is being held

    def release(self) -> None:
        self.released.set()


class SlowStream:
    """Send a streamed answer's SSE events one per `release()`; `sent` counts those let out.

    `events`, when given, are sent instead of the echo's events (raw bytes, one write each).
    """

    def __init__(self, events: list[bytes] | None = None, *, cut: bool = False) -> None:
        self.events = events
        self.cut = cut  # after the last event, drop the connection mid-body (an upstream crash)
        self.allowed = 0
        self.sent = 0
        self.disconnected = anyio.Event()
        self._changed = anyio.Event()

    def release(self, n: int = 1) -> None:
        self.allowed += n
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_allowed(self) -> None:
        while self.sent >= self.allowed:
            await self._changed.wait()


Behaviour = Fail | Garbage | Stall | SlowStream


class FakeOpenAI:
    """The fake upstream; start it with `port = await nursery.start(fake.serve)`."""

    def __init__(self, *, embedding_dim: int = 8) -> None:
        self.embedding_dim = embedding_dim
        self.requests: list[Recorded] = []
        self.connections = 0
        self.disconnects = 0  # clients that hung up while an answer was held back
        self.port = 0
        self._script: deque[Behaviour] = deque()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- controls ------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: str | None = None,
        message: str | None = None,
    ) -> None:
        """Fail the next `times` requests with `status`."""
        text = message or f"fake upstream failure {status}"
        self._script.extend(Fail(status, text, retry_after) for _ in range(times))

    def garbage(self) -> None:
        """Answer the next request with a body that is not JSON."""
        self._script.append(Garbage())

    def stall(self) -> Stall:
        """Hold the next request's answer until released."""
        stall = Stall()
        self._script.append(stall)
        return stall

    def slow_stream(self, events: list[bytes] | None = None, *, cut: bool = False) -> SlowStream:
        """Send the next streamed answer (or `events`) one event per release; `cut`: then
        drop the connection before the body ends."""
        slow = SlowStream(events, cut=cut)
        self._script.append(slow)
        return slow

    # --- server --------------------------------------------------------------------------

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
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while True:
                    received = await _read_request(stream, conn)
                    if received is None:
                        return
                    recorded = _record(*received, number)
                    self.requests.append(recorded)
                    behaviour = self._script.popleft() if self._script else None
                    if not await self._answer(stream, conn, recorded, behaviour):
                        return
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.ProtocolError):
                return

    async def _answer(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        req: Recorded,
        behaviour: Behaviour | None,
    ) -> bool:
        """Answer one request; False when the connection is over."""
        match behaviour:
            case Fail(status=status, message=message, retry_after=retry_after):
                extra = [("Retry-After", retry_after)] if retry_after is not None else []
                error = {
                    "error": {
                        "message": message,
                        "type": "fake_error",
                        "param": None,
                        "code": str(status),
                    }
                }
                await _send(stream, conn, status, msgspec.json.encode(error), extra=extra)
                return True
            case Garbage():
                await _send(stream, conn, 200, b"<html>this is not json</html>")
                return True
            case Stall() as stall:
                stall.reached.set()
                if await _hold(stream, conn, stall.released.wait):
                    stall.disconnected.set()
                    self.disconnects += 1
                    return False
        if (
            req.path == "/v1/chat/completions"
            and isinstance(req.json, dict)
            and req.json.get("stream")
        ):
            slow = behaviour if isinstance(behaviour, SlowStream) else None
            return await self._stream_chat(stream, conn, req.json, slow)
        status, body, content_type = self._route(req)
        await _send(stream, conn, status, body, content_type)
        return True

    def _route(self, req: Recorded) -> tuple[int, bytes, str]:
        body = req.json if isinstance(req.json, dict) else {}
        match (req.method, req.path):
            case ("POST", "/v1/chat/completions"):
                return 200, _json(chat_answer(body)), "application/json"
            case ("POST", "/v1/embeddings"):
                return 200, _json(self.embeddings_answer(body)), "application/json"
            case ("POST", "/v1/audio/transcriptions"):
                upload = req.files.get("file")
                if upload is None:
                    return 400, _json(_error("missing file")), "application/json"
                text = f"heard {len(upload.data)} bytes of {upload.filename}"
                if req.form.get("response_format") == "text":
                    return 200, text.encode(), "text/plain"
                return 200, _json({"text": text}), "application/json"
            case ("POST", "/v1/audio/speech"):
                fmt = str(body.get("response_format", "mp3"))
                if fmt == "wav":  # a real WAV: a tone, SPEECH_MS_PER_CHAR per input character
                    return 200, speech_wav(str(body.get("input", ""))), "audio/wav"
                audio = f"FAKE-AUDIO {fmt}:{body.get('input', '')}".encode()
                return 200, audio, SPEECH_TYPES.get(fmt, "application/octet-stream")
            case ("POST", "/v1/images/generations"):
                n = int(body.get("n") or 1)
                image = base64.b64encode(PNG).decode()
                data = [{"b64_json": image, "revised_prompt": body.get("prompt")} for _ in range(n)]
                return 200, _json({"created": CREATED, "data": data}), "application/json"
            case ("GET", "/v1/models"):
                models = {
                    "object": "list",
                    "data": [
                        {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "fake"}
                    ],
                }
                return 200, _json(models), "application/json"
        return 404, _json(_error(f"no route for {req.method} {req.path}")), "application/json"

    def embeddings_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Deterministic vectors: `dimensions` floats in [-1, 1) from each input's SHA-256."""
        inputs = body.get("input", "")
        items = (
            inputs
            if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
            else [inputs]
        )
        dim = int(body.get("dimensions") or self.embedding_dim)
        data = []
        for index, item in enumerate(items):
            vector = embedding_of(str(item), dim)
            value: Any = vector
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(str(item).split()) for item in items)
        return {
            "object": "list",
            "model": body.get("model", MODEL),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _stream_chat(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        body: dict[str, Any],
        slow: SlowStream | None,
    ) -> bool:
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        await stream.send(conn.send(h11.Response(status_code=200, headers=headers)))
        events = slow.events if slow is not None and slow.events is not None else sse_events(body)
        if slow is None:
            for event in events:
                await stream.send(conn.send(h11.Data(data=event)))
            await stream.send(conn.send(h11.EndOfMessage()))
            return True

        async def send_slowly() -> None:
            for event in events:
                await slow.wait_allowed()
                slow.sent += 1
                await stream.send(conn.send(h11.Data(data=event)))
            if not slow.cut:
                await stream.send(conn.send(h11.EndOfMessage()))

        if await _hold(stream, conn, send_slowly):
            slow.disconnected.set()
            self.disconnects += 1
            return False
        return not slow.cut  # a cut stream: the connection closes without ending the body


# --- answers -----------------------------------------------------------------------------


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message (string content, or its text parts joined)."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return str(content or "")
    return ""


def _chat_usage(body: dict[str, Any], content: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
    completion = len(content.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_answer(body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed completion echoing the last user message."""
    content = "echo: " + last_user_text(body)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CREATED,
        "model": body.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": _chat_usage(body, content),
    }


def sse_events(body: dict[str, Any]) -> list[bytes]:
    """The SSE events of a streamed completion, each `data: ...\\n\\n`."""
    content = "echo: " + last_user_text(body)
    model = body.get("model", MODEL)
    words = content.split(" ")
    chunks = _answer_chunks([w if i == 0 else " " + w for i, w in enumerate(words)], model)
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "choices": [],
                "usage": _chat_usage(body, content),
            }
        )
    return [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + _json(chunk) + b"\n\n"


def _chunk(delta: dict[str, Any], finish: str | None = None, model: str = MODEL) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _answer_chunks(pieces: list[str], model: str) -> list[dict[str, Any]]:
    """Role chunk, one chunk per content piece, then the stop chunk."""
    chunks = [_chunk({"role": "assistant", "content": ""}, model=model)]
    chunks += [_chunk({"content": piece}, model=model) for piece in pieces]
    chunks.append(_chunk({}, "stop", model))
    return chunks


def text_events(pieces: list[str]) -> list[bytes]:
    """A streamed answer made of exactly these content deltas (role chunk first, then stop)."""
    return [_sse(c) for c in _answer_chunks(pieces, MODEL)] + [b"data: [DONE]\n\n"]


def tool_call_events(call_id: str, name: str, argument_pieces: list[str]) -> list[bytes]:
    """A streamed answer that calls one tool, its arguments in these pieces (finish tool_calls)."""
    first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name}}
    first["function"]["arguments"] = ""
    chunks = [_chunk({"role": "assistant", "content": None, "tool_calls": [first]})]
    chunks += [
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for piece in argument_pieces
    ]
    chunks.append(_chunk({}, "tool_calls"))
    return [_sse(c) for c in chunks] + [b"data: [DONE]\n\n"]


def embedding_of(text: str, dim: int) -> list[float]:
    """A deterministic vector for `text` (exact in float32)."""
    digest = b""
    counter = 0
    while len(digest) < dim:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [(b - 128) / 128 for b in digest[:dim]]


def _error(message: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


# --- HTTP plumbing -----------------------------------------------------------------------


async def _next_event(stream: anyio.abc.SocketStream, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        try:
            data = await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data = b""
        conn.receive_data(data)
    return event


async def _read_request(
    stream: anyio.abc.SocketStream, conn: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """The next complete request and its body, or None when the client closed."""
    request = await _next_event(stream, conn)
    if not isinstance(request, h11.Request):
        return None
    body = bytearray()
    while not isinstance(event := await _next_event(stream, conn), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.ConnectionClosed):
            return None
    return request, bytes(body)


def _record(request: h11.Request, body: bytes, connection: int) -> Recorded:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    path = request.target.decode("latin-1").split("?", 1)[0]
    recorded = Recorded(request.method.decode(), path, headers, body, connection)
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            recorded.json = msgspec.json.decode(body)
        except msgspec.DecodeError:
            recorded.json = None
    elif content_type.startswith("multipart/form-data"):
        recorded.form, recorded.files = _parse_form(body, content_type)
    return recorded


def _parse_form(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, Upload]]:
    """A minimal multipart/form-data parser (the fake's own, independent of spear_rt's)."""
    boundary = content_type.split("boundary=", 1)[1].split(";", 1)[0].strip().strip('"')
    form: dict[str, str] = {}
    files: dict[str, Upload] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part[2:].partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        params: dict[str, str] = {}
        part_type = "application/octet-stream"
        for line in head.decode("utf-8").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-disposition":
                for item in value.split(";")[1:]:
                    key, _, val = item.strip().partition("=")
                    params[key] = val.strip('"')
            elif name.lower() == "content-type":
                part_type = value.strip()
        if "filename" in params:
            files[params["name"]] = Upload(params["filename"], part_type, data)
        else:
            form[params["name"]] = data.decode("utf-8")
    return form, files


async def _send(
    stream: anyio.abc.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    *,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *(extra or [])]
    await stream.send(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


async def _hold(stream: anyio.abc.SocketStream, conn: h11.Connection, work: Any) -> bool:
    """Run `work()` while watching the socket; True if the client hung up before it finished.

    The client sends nothing while it waits for an answer (httpx does not pipeline), so a
    read that ends is a hang-up; bytes that do arrive are kept for h11.
    """
    gone = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal gone
        while True:
            try:
                data = await stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                gone = True
                scope.cancel()
                return
            conn.receive_data(data)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            await work()
            tg.cancel_scope.cancel()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        gone = True
    return gone
