"""Spoken conversations through the official SDKs, unchanged: Python's GA
`client.realtime.connect` and beta `client.beta.realtime.connect` over ws://, and the Node SDK
(`OpenAIRealtimeWS`, wss:// only) over TLS.

The rig of `conversation_rig` runs in a background thread (the fake chat upstream scripted
before the first request, espeak, pocketsphinx); the SDKs parse every event into their typed
models; the spoken answer is transcribed back by the server's local recognizer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import numpy as np
import pytest

from spear_rt.server.app import Server
from tests.conftest import b64, load_fixture_24k, make_config, serve_in_thread
from tests.fakes.openai_upstream import FakeOpenAI, text_events
from tests.selfsigned import make_cert
from tests.server.conversation_rig import heard_fraction, rig_toml, transcribe_back

openai = pytest.importorskip("openai")

TIMEOUT_S = 90
ANSWER = ["The weather ", "is nice today. ", "Let us ", "go outside."]
SAID = "".join(ANSWER)
VAD = {"type": "server_vad", "silence_duration_ms": 500}
QUESTION = np.concatenate([load_fixture_24k("speech_go_forward.wav"), np.zeros(24000, np.int16)])


@asynccontextmanager
async def _rig(server_toml: str) -> AsyncIterator[tuple[int, FakeOpenAI]]:
    fake = FakeOpenAI()
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        fake.slow_stream(text_events(ANSWER)).release(len(ANSWER) + 3)
        conversation, backends = rig_toml(fake)
        config = make_config(server=server_toml, backends=backends, extra=conversation)
        port = await tg.start(Server(config).serve)
        yield port, fake
        tg.cancel_scope.cancel()


def serving(server_toml: str = "") -> contextlib.AbstractContextManager[tuple[int, FakeOpenAI]]:
    """The rig in a thread; yields the server's port and the fake (read it after the run)."""
    return serve_in_thread(lambda: _rig(server_toml), TIMEOUT_S)


async def converse(conn: Any, session: dict[str, Any], audio_delta: str) -> dict[str, Any]:
    """Speak the question under server VAD; collect the typed events up to response.done."""
    assert (await conn.recv()).type == "session.created"
    await conn.session.update(session=session)
    assert (await conn.recv()).type == "session.updated"
    for start in range(0, len(QUESTION), 2400):
        await conn.input_audio_buffer.append(audio=b64(QUESTION[start : start + 2400]))
    events = []
    async for event in conn:
        events.append(event)
        assert event.type != "error", event
        if event.type == "response.done":
            break
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == audio_delta)
    return {"events": events, "pcm": np.frombuffer(audio, dtype="<i2").astype(np.int16)}


def check_conversation(result: dict[str, Any], port: int, transcript_delta: str) -> None:
    events = result["events"]
    heard = next(
        e.transcript
        for e in events
        if e.type == "conversation.item.input_audio_transcription.completed"
    )
    assert heard.strip()
    done = events[-1].response
    assert done.status == "completed"
    answer = "".join(e.delta for e in events if e.type == transcript_delta)
    assert answer == SAID
    heard_back = anyio.run(transcribe_back, port, result["pcm"])
    assert heard_fraction(SAID, heard_back) >= 0.5, heard_back


def sdk(port: int, *, beta: bool = False) -> Any:
    return openai.AsyncOpenAI(
        api_key="sk-anything",
        base_url=f"http://127.0.0.1:{port}/v1",
        websocket_base_url=f"ws://127.0.0.1:{port}/v1" if beta else None,
        max_retries=0,
    )


def test_ga_python_sdk_holds_a_spoken_conversation() -> None:
    audio = {"input": {"turn_detection": VAD}, "output": {"voice": "nova"}}
    session = {"type": "realtime", "audio": audio}

    async def main(port: int) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            async with sdk(port).realtime.connect(model="gpt-realtime") as conn:
                return await converse(conn, session, "response.output_audio.delta")

    with serving() as (port, fake):
        result = asyncio.run(main(port))
        check_conversation(result, port, "response.output_audio_transcript.delta")
    assert fake.requests[0].json["messages"][-1]["role"] == "user"


def test_beta_python_sdk_holds_a_spoken_conversation() -> None:
    session = {"turn_detection": VAD, "voice": "nova", "modalities": ["audio", "text"]}

    async def main(port: int) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            async with sdk(port, beta=True).beta.realtime.connect(model="gpt-realtime") as conn:
                return await converse(conn, session, "response.audio.delta")

    with serving() as (port, _fake):
        result = asyncio.run(main(port))
        check_conversation(result, port, "response.audio_transcript.delta")


def test_node_sdk_holds_a_spoken_conversation_over_tls(tmp_path: Path, node_sdk: Path) -> None:
    cert, key = make_cert(tmp_path)
    question, answer = tmp_path / "question.pcm", tmp_path / "answer.pcm"
    question.write_bytes(QUESTION.astype("<i2").tobytes())
    with serving(f'tls_cert = "{cert}"\ntls_key = "{key}"') as (port, _fake):
        done = subprocess.run(
            ["node", str(node_sdk / "realtime_converse.mjs"), f"https://127.0.0.1:{port}/v1",
             str(question), str(answer)],
            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert)},
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        pcm = np.frombuffer(answer.read_bytes(), dtype="<i2").astype(np.int16)
        heard_back = anyio.run(transcribe_back, port, pcm, cert)
    assert result["url"] == f"wss://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
    assert result["heard"].strip() and result["status"] == "completed"
    assert result["answer"] == SAID
    assert "response.output_audio.delta" in result["types"]
    assert heard_fraction(SAID, heard_back) >= 0.5, heard_back
