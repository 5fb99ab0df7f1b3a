"""The load generator's side of bench/conversation_load.py: one voice conversation per socket.

A hand-written WebSocket client on an asyncio Protocol (the load generator shares core 1 with
the fake upstream, so it must stay cheap): server frames are read without a JSON parse unless
the event matters; audio deltas are only timed and counted. Every timestamp is
`time.monotonic()` (CLOCK_MONOTONIC), the fake upstream's clock too, taken when the bytes were
read from the socket (`data_received`) or just before they were written.

One conversation (`Conversation.run`), GA dialect, ``/v1/realtime?model=gpt-realtime``:

1. ``session.update`` (``type: realtime``, instructions, manual turns), await ``session.updated``;
2. `turns` spoken answers: ``conversation.item.create`` (a user ``input_text`` message tagged
   ``[c<i>t<k>]``, the fake's request name) + ``response.create``, await ``response.done``;
   with `playback`, wait until the answer's audio would have finished playing (real time from
   its first delta); then think;
3. a cancel turn: a long answer, ``response.cancel`` `cancel_after` s after its first audio
   delta, await ``response.done`` (cancelled), then count its events that still arrive;
4. a barge-in turn: ``session.update`` to ``server_vad`` (``interrupt_response: true``,
   ``create_response: false``), a long answer, and `cancel_after` s after its first audio
   delta, loud fixture speech as 20 ms ``input_audio_buffer.append`` at real-time pace until
   ``input_audio_buffer.speech_started``; await ``response.done`` (cancelled), count stragglers.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import random
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

now = time.monotonic
RATE_HZ = 24000
FRAME_SAMPLES = RATE_HZ // 50  # 20 ms of pcm16
_TYPE = re.compile(rb'"type":\s*"([^"]+)"')
BYTES_PER_S = RATE_HZ * 2  # pcm16 output audio
BYTES_PER_B64 = 3 / 4  # an audio delta event's length is ~its base64 audio (+ ~150 bytes)
TIMEOUT_S = 30.0  # any single wait of a conversation
SETTLE_S = 0.4  # after a cancelled response.done: how long stragglers are counted


def mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One complete masked client frame (RFC 6455)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


def json_frame(obj: dict[str, Any]) -> bytes:
    return client_frame(json.dumps(obj, separators=(",", ":")).encode())


def speech_frames(pattern: str) -> tuple[list[bytes], int]:
    """Masked append frames (20 ms each) of the fixture speech at 24 kHz, from its onset, and
    the index of the append whose audio makes server VAD (default `server_vad` settings, a
    fresh detector, as after the session.update) emit speech_started: the detector is
    deterministic and indifferent to chunking, so this is the append the server reacts to."""
    import numpy as np

    from spear_rt.audio import load_audio, pcm16_to_bytes, resample
    from spear_rt.audio.vad import SpeechStarted, VadConfig, VoiceActivityDetector

    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no fixture matches {pattern!r}")
    pcm, rate = load_audio(files[0])
    pcm = resample(pcm, rate, RATE_HZ)
    level = np.abs(pcm.astype(np.int32))
    loud = np.flatnonzero(level > 0.1 * level.max())
    start = max(0, int(loud[0]) - FRAME_SAMPLES) if loud.size else 0  # skip leading silence
    pcm = pcm[start:]
    out, trigger = [], -1
    vad = VoiceActivityDetector(VadConfig(), RATE_HZ)
    for i in range(0, len(pcm) - FRAME_SAMPLES, FRAME_SAMPLES):
        piece = pcm[i : i + FRAME_SAMPLES]
        if trigger < 0 and any(isinstance(e, SpeechStarted) for e in vad.process(piece)):
            trigger = len(out)
        audio = base64.b64encode(pcm16_to_bytes(piece))
        out.append(client_frame(b'{"type":"input_audio_buffer.append","audio":"' + audio + b'"}'))
    if trigger < 0:
        raise SystemExit(f"{files[0]}: server VAD finds no speech in it")
    return out, trigger


@dataclass
class Track:
    """One response as the client saw it."""

    tag: str
    kind: str  # "turn" | "cancel" | "vad"
    sent: float  # response.create written
    rid: str | None = None
    ids: list[bytes] = field(default_factory=list)  # response id, item ids (for stragglers)
    created: float | None = None
    first_text: float | None = None
    first_audio: float | None = None
    audio_deltas: int = 0
    audio_b64_bytes: int = 0
    done: float | None = None
    status: str | None = None
    reason: str | None = None
    spear: dict[str, Any] | None = None
    cancel_sent: float | None = None
    speech_started: float | None = None
    first_append: float | None = None
    trigger_append: float | None = None  # the append server VAD fires on, written
    last_append_before_started: float | None = None
    after_done: int = 0  # frames naming this response after its response.done
    after_done_response_events: int = 0  # response.* events of any response after it
    after_types: list[str] = field(default_factory=list)


class Conversation(asyncio.Protocol):
    """One conversation session (module docstring)."""

    def __init__(self, gen: Any, index: int, port: int) -> None:
        self.gen = gen
        self.index = index
        self.port = port
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.hs = False
        self.frag = bytearray()
        self.frag_op = 0
        self.tracks: list[Track] = []
        self.cur: Track | None = None
        self.counting: Track | None = None
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.errors: list[str] = []
        self.closed: str | None = None
        self.failed: str | None = None
        self.frames_in = 0
        self.bytes_in = 0

    # --- socket ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.t.write(
            (
                f"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closed or f"eof ({exc})" if exc else self.closed or "eof"
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"closed: {self.closed}"))

    def data_received(self, data: bytes) -> None:
        t = now()
        buf = self.buf
        buf += data
        if not self.hs:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._wake("handshake", exc=ConnectionError(bytes(buf[:80]).decode("latin-1")))
                self.t.close()
                return
            del buf[: i + 4]
            self.hs = True
            self._wake("handshake", t)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, h = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, h = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, h = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if size - pos < h + n:
                break
            payload = bytes(buf[pos + h : pos + h + n])
            pos += h + n
            self._frame(b0, payload, t)
        del buf[:pos]

    def _frame(self, b0: int, payload: bytes, t: float) -> None:
        op, fin = b0 & 0x0F, b0 & 0x80
        if op == 0:
            self.frag += payload
            if not fin:
                return
            op, payload = self.frag_op, bytes(self.frag)
            self.frag.clear()
        elif not fin:
            self.frag_op, self.frag[:] = op, payload
            return
        if op == 1:
            self.frames_in += 1
            self.bytes_in += len(payload)
            self._event(payload, t)
        elif op == 8:
            code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
            self.closed = f"close {code} {payload[2:].decode(errors='replace')}"
            self.send(client_frame(payload[:2], 8))
            self.t.close()
        elif op == 9:
            self.send(client_frame(payload, 10))

    def send(self, frame: bytes) -> float:
        t = now()
        if self.t is not None and not self.t.is_closing():
            self.t.write(frame)
        return t

    # --- events ------------------------------------------------------------------------------

    def _wake(self, name: str, t: float = 0.0, exc: Exception | None = None) -> None:
        fut = self.waiters.pop(name, None)
        if fut is not None and not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(t)

    def expect(self, name: str) -> asyncio.Future[float]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[name] = fut
        return fut

    def _event(self, payload: bytes, t: float) -> None:
        m = _TYPE.search(payload, 0, 120)
        typ = m.group(1).decode() if m else "?"
        counting = self.counting
        if counting is not None:
            # after a cancelled response.done: its own events (by response id, or an item event
            # whose item is its output), and any response.* event at all, are stragglers
            if typ.startswith("response."):
                if counting.ids[0] in payload:
                    counting.after_done += 1
                else:
                    counting.after_done_response_events += 1
                counting.after_types.append(typ)
            elif typ.startswith("conversation.item.") and any(i in payload for i in counting.ids):
                item = json.loads(payload).get("item") or {}
                if str(item.get("id", "")).encode() in counting.ids:
                    counting.after_done += 1
                    counting.after_types.append(typ)
        r = self.cur
        if typ == "response.output_audio.delta":
            if r is not None:
                r.audio_deltas += 1
                r.audio_b64_bytes += len(payload)
                if r.first_audio is None:
                    r.first_audio = t
                    self._wake("first_audio", t)
            return
        if typ == "response.output_audio_transcript.delta":
            if r is not None and r.first_text is None:
                r.first_text = t
            return
        if typ in ("conversation.item.added", "session.created", "response.output_item.added"):
            if typ == "response.output_item.added" and r is not None:
                item = json.loads(payload).get("item") or {}
                if item.get("id"):
                    r.ids.append(item["id"].encode())
            self._wake(typ, t)
            return
        if typ == "response.created" and r is not None:
            r.created = t
            r.rid = json.loads(payload)["response"]["id"]
            r.ids.append(r.rid.encode())
        elif typ == "response.done" and r is not None:
            response = json.loads(payload)["response"]
            r.done, r.status = t, response.get("status")
            r.reason = ((response.get("status_details") or {}).get("reason")) or None
            r.spear = response.get("spear") or (response.get("metadata") or {}).get("spear")
            if r.status == "cancelled":
                self.counting = r
        elif typ == "input_audio_buffer.speech_started" and r is not None:
            if r.speech_started is None:
                r.speech_started = t
        elif typ == "error":
            err = json.loads(payload).get("error") or {}
            self.errors.append(f"{err.get('code')}: {str(err.get('message'))[:160]}")
        self._wake(typ, t)

    async def wait(self, fut: asyncio.Future[float], what: str) -> float:
        try:
            return await asyncio.wait_for(fut, TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(
                f"conversation {self.index}: no {what} in {TIMEOUT_S:.0f} s"
            ) from None

    # --- the script --------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        hs = self.expect("handshake")
        created = self.expect("session.created")
        await loop.create_connection(lambda: self, "127.0.0.1", self.port)
        await self.wait(hs, "101")
        await self.wait(created, "session.created")
        await self.update({"audio": {"input": {"turn_detection": None}}})

    async def update(self, session: dict[str, Any]) -> None:
        done = self.expect("session.updated")
        body = {"type": "realtime", "instructions": "Answer briefly.", **session}
        self.send(json_frame({"type": "session.update", "session": body}))
        await self.wait(done, "session.updated")

    async def respond(self, tag: str, kind: str, text: str) -> Track:
        """Add a tagged user message and ask for a response; the response's track."""
        added = self.expect("conversation.item.added")
        item = {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"[{tag}] {text}"}]}  # fmt: skip
        self.send(json_frame({"type": "conversation.item.create", "item": item}))
        await self.wait(added, "conversation.item.added")
        self.counting = None
        track = Track(tag=tag, kind=kind, sent=0.0)
        self.cur = track
        self.tracks.append(track)
        track.sent = self.send(self.gen.response_create)
        return track

    async def run(
        self, turns: int, think_s: float, cancel_after_s: float, barge: bool, playback: bool
    ) -> None:
        gen, i = self.gen, self.index
        for k in range(1, turns + 1):
            done = self.expect("response.done")
            track = await self.respond(f"c{i}t{k}", "turn", f"Tell me about turn {k}.")
            await self.wait(done, "response.done")
            if playback and track.first_audio is not None:  # the user listens to the answer
                heard = track.first_audio + track.audio_b64_bytes * BYTES_PER_B64 / BYTES_PER_S
                await asyncio.sleep(max(0.0, heard - now()))
            await asyncio.sleep(think_s * random.uniform(0.5, 1.5))
        if not barge:
            return
        # cancel turn
        first, done = self.expect("first_audio"), self.expect("response.done")
        track = await self.respond(f"c{i}x", "cancel", "A long answer, please.")
        await self.wait(first, "first audio delta")
        await asyncio.sleep(cancel_after_s)
        track.cancel_sent = self.send(gen.response_cancel)
        await self.wait(done, "response.done")
        await asyncio.sleep(SETTLE_S)
        # barge-in turn (server VAD)
        vad = {"type": "server_vad", "interrupt_response": True, "create_response": False}
        await self.update({"audio": {"input": {"turn_detection": vad}}})
        first, done = self.expect("first_audio"), self.expect("response.done")
        track = await self.respond(f"c{i}v", "vad", "A long answer, please.")
        await self.wait(first, "first audio delta")
        await asyncio.sleep(cancel_after_s)
        started = self.expect("input_audio_buffer.speech_started")
        for n, frame in enumerate(gen.speech):
            if started.done() or done.done():
                break
            t = self.send(frame)
            track.first_append = track.first_append or t
            track.last_append_before_started = t
            if n == gen.speech_trigger:
                track.trigger_append = t
            await asyncio.wait({started, done}, timeout=max(0.0, 0.02 - (now() - t)))
        if not started.done():
            started.cancel()
        await self.wait(done, "response.done")
        await asyncio.sleep(SETTLE_S)
        self.send(client_frame(b'{"type":"input_audio_buffer.clear"}'))

    def close(self) -> None:
        if self.t is not None and not self.t.is_closing():
            self.send(client_frame(struct.pack("!H", 1000), 8))
            self.t.close()
