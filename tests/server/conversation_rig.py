"""A voice-conversation rig: our server on 127.0.0.1 composing answers from real parts.

Chat comes from the fake OpenAI upstream (`tests/fakes/openai_upstream.py`, through the
`openai_http` kind: echoes the last user message, or a scripted stream), speech from espeak-ng,
user speech is recognized by pocketsphinx. Every event a client receives is validated against
the official SDK's models of its dialect (`Checker`).
"""

from __future__ import annotations

import base64
import io
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import numpy as np
import soundfile  # type: ignore[import-untyped]
from numpy.typing import NDArray

from spear_rt.server.app import Server
from tests.conftest import WsClient, b64, make_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.server.test_realtime import BETA
from tests.server.test_sdk_events import Checker

BOUND_S = 90  # pocketsphinx and espeak on 2 busy cores; only a hang comes near this
RATE_HZ = 24000
CHUNK = 2400  # 100 ms of 24 kHz input per append


GA_NAMES = {
    "item_added": "conversation.item.added",
    "audio_delta": "response.output_audio.delta",
    "transcript_delta": "response.output_audio_transcript.delta",
    "text_delta": "response.output_text.delta",
    "text_done": "response.output_text.done",
}
BETA_NAMES = {
    "item_added": "conversation.item.created",
    "audio_delta": "response.audio.delta",
    "transcript_delta": "response.audio_transcript.delta",
    "text_delta": "response.text.delta",
    "text_done": "response.text.done",
}


def rig_toml(fake: FakeOpenAI, speech: str = "espeak") -> tuple[str, str]:
    """The [conversation] section and the backends of the rig (speech: espeak, or the fake's
    tones)."""
    conversation = f'[conversation]\nchat_backend = "fake"\nspeech_backend = "{speech}"\n'
    backends = f"""
[[backends]]
name = "fake"
kind = "openai_http"
base_url = "{fake.base_url}"

[[backends]]
name = "espeak"
kind = "espeak"

[[backends]]
name = "sphinx"
kind = "pocketsphinx"
"""
    return conversation, backends


Scenario = Callable[[Server, FakeOpenAI], Awaitable[Any]]


def run_rig(
    backend: str, driver: str, scenario: Scenario, *, realtime: str = "", speech: str = "espeak"
) -> Any:
    """Run `scenario(server, fake)` on a fresh rig, `driver` on the `backend` loop."""

    async def main() -> Any:
        fake = FakeOpenAI()
        async with anyio.create_task_group() as tg:
            await tg.start(fake.serve)
            conversation, backends = rig_toml(fake, speech)
            config = make_config(
                server=f'driver = "{driver}"',
                realtime=realtime,
                backends=backends,
                extra=conversation,
            )
            server = Server(config)
            await tg.start(server.serve)
            with anyio.fail_after(BOUND_S):
                result = await scenario(server, fake)
            tg.cancel_scope.cancel()
        return result

    return anyio.run(main, backend=backend)


class Talk:
    """One conversation session: a socket plus the checker every event goes through."""

    def __init__(self, ws: WsClient, dialect: str) -> None:
        self.ws = ws
        self.dialect = dialect
        self.checker = Checker(dialect)
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls,
        port: int,
        dialect: str = "ga",
        *,
        over: anyio.abc.SocketStream | None = None,
        **session: Any,
    ) -> Talk:
        """Connect (on `over`, if given), then apply `session` (GA or beta fields, as given)."""
        headers = BETA if dialect == "beta" else ()
        path = "/v1/realtime?model=gpt-realtime"
        if over is None:
            over = await anyio.connect_tcp("127.0.0.1", port)
        ws = await WsClient.over(over, port, path, headers=headers)
        talk = cls(ws, dialect)
        assert (await talk.recv())["type"] == "session.created"
        if dialect == "ga":
            session = {"type": "realtime", **session}
        await talk.send({"type": "session.update", "session": session})
        updated = await talk.recv()
        assert updated["type"] == "session.updated", updated
        return talk

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(event)

    async def recv(self) -> dict[str, Any]:
        event = self.checker.check(await self.ws.recv())
        self.events.append(event)
        return event

    async def until(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """Events up to and including the first of `kind` whose fields equal `match`."""
        seen = []
        while True:
            event = await self.recv()
            seen.append(event)
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return seen

    async def say(self, pcm: NDArray[np.int16], silence_s: float = 1.0) -> None:
        """Stream speech (24 kHz) and trailing silence, 100 ms per append."""
        audio = np.concatenate([pcm, np.zeros(int(RATE_HZ * silence_s), np.int16)])
        for start in range(0, len(audio), CHUNK):
            await self.send(
                {"type": "input_audio_buffer.append", "audio": b64(audio[start : start + CHUNK])}
            )

    async def user_text(self, text: str) -> None:
        """Add a user text message to the conversation."""
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        await self.send({"type": "conversation.item.create", "item": item})
        await self.until(self.names("item_added"))

    def names(self, what: str) -> str:
        """The event type of `what` in this session's dialect."""
        return (GA_NAMES if self.dialect == "ga" else BETA_NAMES)[what]

    async def close(self) -> None:
        await self.ws.close()


def response_events(events: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """The events of one response."""
    return [
        e
        for e in events
        if e.get("response_id") == response_id or (e.get("response") or {}).get("id") == response_id
    ]


def answer_pcm(events: list[dict[str, Any]], delta_type: str) -> NDArray[np.int16]:
    """The output audio of the audio deltas among `events`, as 24 kHz samples."""
    data = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == delta_type)
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


async def transcribe_back(port: int, pcm: NDArray[np.int16], cert: Path | None = None) -> str:
    """What the server's local recognizer hears in `pcm` (one-shot, pocketsphinx); over TLS
    trusting `cert` when given."""
    wav = io.BytesIO()
    soundfile.write(wav, pcm, RATE_HZ, format="WAV", subtype="PCM_16")
    verify: ssl.SSLContext | bool = True
    scheme = "http"
    if cert is not None:
        scheme, verify = "https", ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(
        base_url=f"{scheme}://127.0.0.1:{port}", verify=verify, timeout=60
    ) as client:
        reply = await client.post(
            "/v1/audio/transcriptions",
            data={"model": "whisper-1", "response_format": "json"},
            files={"file": ("answer.wav", wav.getvalue(), "audio/wav")},
            headers={"spear-backend": "sphinx"},
        )
    reply.raise_for_status()
    return str(reply.json()["text"])


def words(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return re.findall(r"[a-z']+", text.lower())


def heard_fraction(said: str, heard: str) -> float:
    """The fraction of the words of `said` that occur in `heard`."""
    said_words = words(said)
    heard_words = set(words(heard))
    return sum(w in heard_words for w in said_words) / max(1, len(said_words))
