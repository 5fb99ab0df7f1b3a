#!/usr/bin/env python3
"""A fake voice upstream with fixed, known latencies: streaming chat and per-sentence speech.

A real HTTP/1.1 server (anyio + h11, keep-alive) on 127.0.0.1, for bench/conversation_load.py:

  POST /v1/chat/completions  (stream: true) SSE ``chat.completion.chunk`` events: the head and a
                             role chunk at once, content token i (1-based) at exactly
                             ``--first-token-ms`` + (i - 1) × ``--token-ms`` after the request was
                             read (an absolute schedule: no drift), then the finish chunk, a usage
                             chunk (``stream_options.include_usage``) and ``data: [DONE]``.
                             Non-streaming requests get the whole text at the last token's time.
  POST /v1/audio/speech      a WAV (pcm16 mono 24 kHz, a quiet 220 Hz tone of
                             ``--audio-ms-per-word`` per word of ``input``), sent
                             ``--tts-ms`` after the request was read (unless the client
                             closed the connection meanwhile: recorded as ``aborted``).
  GET  /stats                every chat and speech request so far, with the times
                             (``time.monotonic()``, CLOCK_MONOTONIC: comparable across processes
                             on this host) at which the fake read it and wrote each part of its
                             answer, and whether the client aborted it; ``POST /reset`` clears.
  GET  /healthz              ``ok``.

The answer is deterministic. The user message's tag (the first ``[word]`` in the last user
message, e.g. ``[c7t2]``) names the request; the reply is sentences of exactly
``TOKENS_PER_SENTENCE`` tokens, ``"Reply " "<tag> " "part " "<i> " "is " "here. "``, so the
first sentence is complete (spear_rt's SentenceCutter: ``.`` then whitespace) with token 6, at
first-token + 5 × token ms, and each speech request names its tag and part. A user message
containing ``long`` gets ``LONG_SENTENCES`` sentences (for cancel / barge-in turns), else
``--sentences``. The fake watches each streaming connection while it answers: a client that
closes it (spear_rt cancelling a response) stops the stream at once and is recorded as
``aborted`` with the time the fake saw the EOF.

Not part of spear_rt: a bench helper. Run ``python bench/fake_voice_upstream.py --port 9400``;
it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import struct
import sys
import time
from typing import Any

import anyio
import anyio.abc
import h11
import msgspec

TOKENS_PER_SENTENCE = 6
LONG_SENTENCES = 12
RATE_HZ = 24000
READ_SIZE = 65536
CREATED = 1700000000
_TAG = re.compile(r"\[(\w+)\]")
_SPEECH = re.compile(r"Reply (\w+) part (\d+)")
_json = msgspec.json.Encoder()

now = time.monotonic


def reply_tokens(tag: str, sentences: int) -> list[str]:
    """The deterministic reply: `sentences` × TOKENS_PER_SENTENCE tokens."""
    out: list[str] = []
    for i in range(1, sentences + 1):
        out += ["Reply ", f"{tag} ", "part ", f"{i} ", "is ", "here. "]
    return out


def tone_pcm(seconds: float) -> bytes:
    """A quiet 220 Hz tone as pcm16 little-endian bytes at RATE_HZ (built once, sliced)."""
    n = int(seconds * RATE_HZ)
    period = RATE_HZ // 220 * 2  # whole periods of ~218 Hz, so slices loop cleanly
    one = struct.pack(
        f"<{period}h", *(int(3000 * math.sin(2 * math.pi * k / period)) for k in range(period))
    )
    return (one * (n // period + 1))[: n * 2]


def wav(pcm: bytes) -> bytes:
    """A RIFF/WAVE file of mono pcm16 at RATE_HZ."""
    head = io.BytesIO()
    head.write(b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE")
    head.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, RATE_HZ, RATE_HZ * 2, 2, 16))
    head.write(b"data" + struct.pack("<I", len(pcm)))
    return head.getvalue() + pcm


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
        "model": "fake-chat",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }  # fmt: skip
    return b"data: " + _json.encode(event) + b"\n\n"


def usage_chunk(prompt: int, completion: int) -> bytes:
    event = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
        "model": "fake-chat", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }  # fmt: skip
    return b"data: " + _json.encode(event) + b"\n\n"


class Fake:
    """The server and its records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.first_token_s = args.first_token_ms / 1000
        self.token_s = args.token_ms / 1000
        self.tts_s = args.tts_ms / 1000
        self.sentences = args.sentences
        self.ms_per_word = args.audio_ms_per_word
        self.tone = tone_pcm(60.0)
        self.chat: list[dict[str, Any]] = []
        self.speech: list[dict[str, Any]] = []
        self.connections = 0

    def stats(self) -> bytes:
        return _json.encode(
            {
                "config": {
                    "first_token_ms": self.first_token_s * 1000,
                    "token_ms": self.token_s * 1000,
                    "tts_ms": self.tts_s * 1000,
                    "tokens_per_sentence": TOKENS_PER_SENTENCE,
                    "sentences": self.sentences,
                    "long_sentences": LONG_SENTENCES,
                    "audio_ms_per_word": self.ms_per_word,
                },
                "connections": self.connections,
                "chat": self.chat,
                "speech": self.speech,
            }
        )

    async def connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while True:
                    got = await read_request(stream, conn)
                    if got is None:
                        return
                    t_read, request, body = got
                    if not await self.answer(stream, conn, t_read, request, body):
                        return
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.ProtocolError):
                return
            except Exception as exc:  # one connection's failure never stops the fake
                print(f"fake: connection failed: {exc!r}", file=sys.stderr, flush=True)

    async def answer(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        t_read: float,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        path = request.target.decode().split("?")[0]
        method = request.method.decode()
        if method == "GET" and path == "/healthz":
            await send_whole(stream, conn, 200, b"ok", "text/plain")
        elif method == "GET" and path == "/stats":
            await send_whole(stream, conn, 200, self.stats(), "application/json")
        elif method == "POST" and path == "/reset":
            self.chat.clear()
            self.speech.clear()
            await send_whole(stream, conn, 200, b"{}", "application/json")
        elif method == "POST" and path == "/v1/chat/completions":
            return await self.chat_completion(stream, conn, t_read, msgspec.json.decode(body))
        elif method == "POST" and path == "/v1/audio/speech":
            return await self.speak(stream, conn, t_read, msgspec.json.decode(body))
        else:
            await send_whole(stream, conn, 404, b'{"error":{"message":"no such path"}}')
        return True

    async def chat_completion(
        self, stream: anyio.abc.SocketStream, conn: h11.Connection, t_read: float, body: Any
    ) -> bool:
        text = ""
        for message in body.get("messages", []):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                text = message["content"]
        match = _TAG.search(text)
        tag = match.group(1) if match else "untagged"
        tokens = reply_tokens(tag, LONG_SENTENCES if "long" in text else self.sentences)
        record: dict[str, Any] = {
            "tag": tag, "read": t_read, "tokens": len(tokens), "token_at": [],
            "first_sentence_tokens": TOKENS_PER_SENTENCE, "done": None, "aborted": None,
        }  # fmt: skip
        self.chat.append(record)
        due = [t_read + self.first_token_s + i * self.token_s for i in range(len(tokens))]
        if not body.get("stream"):
            await anyio.sleep(max(0.0, due[-1] - now()))
            answer = {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED,
                "model": "fake-chat",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(tokens)}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens),
                          "total_tokens": 10 + len(tokens)},
            }  # fmt: skip
            await send_whole(stream, conn, 200, _json.encode(answer))
            record["done"] = now()
            return True
        head = h11.Response(
            status_code=200,
            headers=[("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")],
        )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        completed = False

        async def produce() -> None:
            nonlocal completed
            try:
                await stream.send(conn.send(head) + conn.send(h11.Data(data=chunk(
                    {"role": "assistant", "content": ""}))))  # fmt: skip
                for i, token in enumerate(tokens):
                    await anyio.sleep(max(0.0, due[i] - now()))
                    await stream.send(conn.send(h11.Data(data=chunk({"content": token}))))
                    record["token_at"].append(now())
                tail = chunk({}, "stop")
                if include_usage:
                    tail += usage_chunk(10, len(tokens))
                tail += b"data: [DONE]\n\n"
                await stream.send(conn.send(h11.Data(data=tail)) + conn.send(h11.EndOfMessage()))
                record["done"] = now()
                completed = True
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                if record["aborted"] is None:  # the write failed before the watcher saw EOF
                    record["aborted"] = now()
            tg.cancel_scope.cancel()

        async def watch() -> None:
            # the client sends nothing while its stream is answered: bytes here are EOF/reset
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            if data:  # a pipelined next request: h11 keeps it for the next cycle
                conn.receive_data(data)
                return
            record["aborted"] = now()
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            tg.start_soon(watch)
        return completed

    async def speak(
        self, stream: anyio.abc.SocketStream, conn: h11.Connection, t_read: float, body: Any
    ) -> bool:
        text = str(body.get("input", ""))
        match = _SPEECH.search(text)
        words = max(1, len(text.split()))
        record: dict[str, Any] = {
            "tag": match.group(1) if match else "untagged",
            "part": int(match.group(2)) if match else 0,
            "read": t_read, "sent": None, "aborted": None, "format": body.get("response_format"),
            "audio_ms": words * self.ms_per_word,
        }  # fmt: skip
        self.speech.append(record)
        audio = wav(self.tone[: int(words * self.ms_per_word * RATE_HZ / 1000) * 2])

        async def watch() -> None:  # as for chat: EOF while we "synthesize" is an abort
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            if data:
                conn.receive_data(data)
                return
            record["aborted"] = now()
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(max(0.0, t_read + self.tts_s - now()))
            tg.cancel_scope.cancel()
        if record["aborted"] is not None:
            return False
        await send_whole(stream, conn, 200, audio, "audio/wav")
        record["sent"] = now()
        return True


async def read_request(
    stream: anyio.abc.SocketStream, conn: h11.Connection
) -> tuple[float, h11.Request, bytes] | None:
    """The next request and its body (None at a clean EOF); the time it was fully read."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            if not data and request is None:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return now(), request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def send_whole(
    stream: anyio.abc.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: str = "application/json",
) -> None:
    head = h11.Response(
        status_code=status,
        headers=[("Content-Type", content_type), ("Content-Length", str(len(body)))],
    )
    await stream.send(
        conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    )


async def main(args: argparse.Namespace) -> None:
    fake = Fake(args)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=args.port)
    async with listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"READY {port}", flush=True)
        await listener.serve(fake.connection)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--first-token-ms", type=float, default=200.0)
    ap.add_argument("--token-ms", type=float, default=20.0)
    ap.add_argument("--tts-ms", type=float, default=50.0)
    ap.add_argument("--sentences", type=int, default=3, help="sentences of a normal reply")
    ap.add_argument("--audio-ms-per-word", type=float, default=250.0)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    return ap.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    try:
        anyio.run(
            main, ARGS, backend="asyncio", backend_options={"use_uvloop": ARGS.loop == "uvloop"}
        )
    except KeyboardInterrupt:
        sys.exit(0)
