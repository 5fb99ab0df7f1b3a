"""Conversations relayed to a speech-to-speech upstream (`openai_realtime` declaring
`supports_audio_output`): a real loopback fake (`tests/fakes/s2s_upstream.py`) holds the
conversation upstream; every event the client gets validates against the SDK's models.

What must hold: the client hears exactly what the upstream said (audio compared byte for
byte), in both dialects and across them; an upstream dropped mid-answer is reopened with the
conversation restored (settings, items in order, our ids), the cut response ends
`incomplete` and is created again, and the client sees one `spear.upstream.reconnected`; a
client that drops mid-answer and resumes hears every audio chunk exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import numpy as np
import pytest

from spear_rt.server.app import Server
from spear_rt.session.machine import State
from spear_rt.session.reconnect import ReconnectingUpstream
from tests.conftest import (
    WsClient,
    b64,
    load_fixture_24k,
    make_config,
    noise_pcm,
    running_server,
    serve_in_thread,
)
from tests.fakes.s2s_upstream import (
    ANSWER_WORDS,
    DropAfter,
    DropMidResponse,
    FakeSpeechToSpeech,
    TranscribeLate,
)
from tests.selfsigned import make_cert
from tests.server.conversation_rig import Talk
from tests.server.test_resume import drop, until

pytestmark = pytest.mark.anyio
TIMEOUT_S = 30
SMALL = 64 * 1024  # socket buffer bytes
FEATURES = (
    '["supports_stream", "supports_bidi_stream", "supports_audio_input", "supports_audio_output"]'
)


def backends(
    fake: FakeSpeechToSpeech, dialect: str = "ga", ping: str = "ping_interval_s = 0"
) -> str:
    return f"""
[[backends]]
name = "s2s"
kind = "openai_realtime"
base_url = "{fake.base_url}"
features = {FEATURES}
options = {{ {ping}, dialect = "{dialect}" }}
"""


@asynccontextmanager
async def gateway(
    upstream_dialect: str = "ga",
    extra: str = "",
    realtime: str = "",
    server: str = "",
    ping: str = "ping_interval_s = 0",
    **fake_options: Any,
) -> AsyncIterator[tuple[Server, FakeSpeechToSpeech]]:
    fake = FakeSpeechToSpeech(**fake_options)
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        config = make_config(
            server=server,
            realtime=realtime,
            extra=extra,
            backends=backends(fake, upstream_dialect, ping),
        )
        async with running_server(config) as server:
            yield server, fake
        tg.cancel_scope.cancel()


def manual(dialect: str) -> dict[str, Any]:
    return (
        {"audio": {"input": {"turn_detection": None}}}
        if dialect == "ga"
        else {"turn_detection": None}
    )


def audio_of(events: list[dict[str, Any]], response_id: str) -> bytes:
    kinds = ("response.output_audio.delta", "response.audio.delta")
    return b"".join(
        base64.b64decode(e["delta"])
        for e in events
        if e["type"] in kinds and e.get("response_id") == response_id
    )


async def speak_and_commit(talk: Talk, seconds: float = 1.0) -> dict[str, Any]:
    pcm = noise_pcm(int(24000 * seconds))
    await talk.send({"type": "input_audio_buffer.append", "audio": b64(pcm)})
    await talk.send({"type": "input_audio_buffer.commit"})
    events = await talk.until("conversation.item.input_audio_transcription.completed")
    return events[-1]


@pytest.mark.parametrize(
    ("client", "upstream"), [("ga", "ga"), ("beta", "ga"), ("ga", "beta"), ("beta", "beta")]
)
async def test_the_client_hears_exactly_what_the_upstream_said(client: str, upstream: str) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with gateway(upstream) as (server, fake):
            talk = await Talk.open(
                server.port or 0, client, instructions="Be brief.", **manual(client)
            )
            created = talk.events[0]
            assert created["spear"]["backend"] == "s2s"
            completed = await speak_and_commit(talk)
            await talk.send({"type": "response.create"})
            events = await talk.until("response.done")
            done = events[-1]["response"]
            assert done["status"] == "completed", done
            said = fake.connections[0]
            upstream_rid = said.responses[0]
            assert audio_of(talk.events, done["id"]) == bytes(said.sent_audio[upstream_rid])
            assert len(audio_of(talk.events, done["id"])) > 0
            transcript = done["output"][0]["content"][0]["transcript"]
            assert transcript == "reply to " + completed["transcript"]
            assert said.sessions[-1].get("instructions") == "Be brief."
            assert said.headers.get("openai-beta") == (
                "realtime=v1" if upstream == "beta" else None
            )
            # the upstream holds the user's turn and the answer, under the client's ids
            assert said.item_ids()[-1] == done["output"][0]["id"]
            await talk.close()


async def test_an_upstream_dropped_mid_answer_is_restored_and_the_answer_created_again() -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with gateway() as (server, fake):
            fake.plan(DropMidResponse(after_chunks=3))
            talk = await Talk.open(server.port or 0, "ga", instructions="Be brief.", **manual("ga"))
            await talk.user_text("what is the weather")
            user_item = talk.events[-1]["item"]["id"]
            await talk.send({"type": "response.create"})
            first = (await talk.until("response.done"))[-1]["response"]
            assert first["status"] == "incomplete"
            assert first["status_details"]["error"]["code"] == "upstream_disconnected"
            second = (await talk.until("response.done"))[-1]["response"]
            assert second["status"] == "completed", second
            kinds = [e["type"] for e in talk.events]
            assert kinds.count("spear.upstream.reconnected") == 1
            assert kinds.count("response.created") == kinds.count("response.done") == 2
            one, two = fake.connections
            # every audio chunk the upstreams sent reached the client once, in order
            assert audio_of(talk.events, first["id"]) == bytes(one.sent_audio[one.responses[0]])
            assert audio_of(talk.events, second["id"]) == bytes(two.sent_audio[two.responses[0]])
            # the new upstream got the settings again and the items in order, with our ids
            assert two.sessions[-1].get("instructions") == "Be brief."
            cut = first["output"][0]["id"]
            assert two.item_ids() == [user_item, cut, second["output"][0]["id"]]
            restored = two.items[1]["content"][0]
            assert restored == {"type": "output_text", "text": "reply to what"}
            await talk.close()


async def test_a_turn_not_yet_transcribed_is_restored_in_its_place() -> None:
    """The upstream drops mid-answer before it transcribed the spoken turn being answered
    (relayed, the answer does not wait for the transcript): the new upstream hears that turn
    again (audio and commit) where it was, before the cut answer, and the answer is created
    after both. Without the in-place replay the turn was replayed after the restored items,
    so the cut answer came before the question."""
    with anyio.fail_after(TIMEOUT_S):
        async with gateway() as (server, fake):
            fake.plan(TranscribeLate(), DropMidResponse(after_chunks=3))
            talk = await Talk.open(server.port or 0, "ga", **manual("ga"))
            await talk.user_text("good morning")
            typed = talk.events[-1]["item"]["id"]
            await talk.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(24000))})
            await talk.send({"type": "input_audio_buffer.commit"})
            spoken = (await talk.until("input_audio_buffer.committed"))[-1]["item_id"]
            await talk.send({"type": "response.create"})
            first = (await talk.until("response.done"))[-1]["response"]
            assert first["status"] == "incomplete"
            second = (await talk.until("response.done"))[-1]["response"]
            assert second["status"] == "completed", second
            one, two = fake.connections
            assert not any(
                e["type"] == "conversation.item.input_audio_transcription.completed"
                for e in one.events  # the first upstream never transcribed it
            )
            transcribed = [
                e
                for e in talk.events
                if e["type"] == "conversation.item.input_audio_transcription.completed"
            ]
            assert [e["item_id"] for e in transcribed] == [spoken]
            kinds = [e["type"] for e in talk.events]
            assert kinds.index("response.created") < kinds.index(transcribed[0]["type"])
            cut, answer = first["output"][0]["id"], second["output"][0]["id"]
            roles = [(i["role"], i["content"][0]["type"]) for i in two.items]
            assert roles == [
                ("user", "input_text"),
                ("user", "input_audio"),
                ("assistant", "output_text"),
                ("assistant", "output_audio"),
            ]
            ids = two.item_ids()
            assert (ids[0], ids[2], ids[3]) == (typed, cut, answer)
            assert two.items[1]["content"][0]["transcript"] == transcribed[0]["transcript"]
            await talk.close()


async def test_a_response_asked_for_while_the_upstream_is_away_is_answered_once() -> None:
    """The upstream drops right after the client's item (frame 4: the opening update, the
    session's settings, the client's session.update, the item); the response.create comes
    during the reconnect. Found by bench/s2s_faults.py: the create waiting out the
    reconnect was sent after the recreated one, and the upstream refused the second."""
    with anyio.fail_after(TIMEOUT_S):
        async with gateway() as (server, fake):
            fake.plan(DropAfter(frames=4))
            talk = await Talk.open(server.port or 0, "ga", **manual("ga"))
            upstream = server.sessions.sessions[talk.events[0]["session"]["id"]].upstream
            assert isinstance(upstream, ReconnectingUpstream)
            await talk.user_text("are you there")
            await until(lambda: not upstream.statistics().connected)  # backing off: >= 80 ms
            await talk.send({"type": "response.create"})
            while True:
                done = (await talk.until("response.done"))[-1]["response"]
                if done["status"] != "incomplete":
                    break
            assert done["status"] == "completed", done
            kinds = [e["type"] for e in talk.events]
            assert kinds.count("response.created") == kinds.count("response.done")
            assert "error" not in kinds
            last = fake.connections[-1]
            assert audio_of(talk.events, done["id"]) == bytes(last.sent_audio[last.responses[-1]])
            assert "conversation_already_has_active_response" not in str(last.events)
            await talk.close()


async def test_a_client_dropped_mid_answer_resumes_and_hears_every_chunk_once() -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with gateway(chunk_interval_s=0.02) as (server, fake):
            port = server.port or 0
            talk = await Talk.open(port, "ga", **manual("ga"))
            created = talk.events[0]
            session_id, token = created["session"]["id"], created["spear"]["resume_token"]
            await talk.user_text("tell me a story please now")
            await talk.send({"type": "response.create"})
            await talk.until("response.output_audio.delta")
            await talk.until("response.output_audio.delta")
            await drop(talk.ws, reset=False)
            path = f"/v1/realtime?model=gpt-realtime&session_id={session_id}"
            path += f"&last_seq={talk.events[-1]['seq']}"
            ws = await WsClient.connect(port, path, headers=[("Spear-Resume-Token", token)])
            resumed = Talk(ws, "ga")
            resumed.checker = talk.checker  # the same session: items announced before count
            assert (await resumed.recv())["type"] == "spear.session.resumed"
            done = (await resumed.until("response.done"))[-1]["response"]
            assert done["status"] == "completed"
            heard = audio_of(talk.events + resumed.events, done["id"])
            said = fake.connections[0]
            assert heard == bytes(said.sent_audio[said.responses[0]])
            seqs = [
                e["seq"]
                for e in talk.events + resumed.events
                if e["type"] != "spear.session.resumed"
            ]
            assert seqs == sorted(set(seqs))  # nothing twice, in order
            await resumed.close()


async def test_truncate_and_delete_reach_the_upstream_under_its_ids() -> None:
    """A beta client truncates the answer and deletes its own turn (which the upstream
    knows by another id); the next response is created after the delete."""
    with anyio.fail_after(TIMEOUT_S):
        async with gateway() as (server, fake):
            talk = await Talk.open(server.port or 0, "beta", **manual("beta"))
            await speak_and_commit(talk)
            await talk.send({"type": "response.create"})
            done = (await talk.until("response.done"))[-1]["response"]
            answer = done["output"][0]["id"]
            await talk.send({"type": "conversation.item.truncate", "item_id": answer,
                             "content_index": 0, "audio_end_ms": 150})  # fmt: skip
            await talk.until("conversation.item.truncated")
            user = fake.connections[0].items[0]["id"]
            ours = next(
                e["item_id"] for e in talk.events if e["type"] == "input_audio_buffer.committed"
            )
            await talk.send({"type": "conversation.item.delete", "item_id": ours})
            await talk.until("conversation.item.deleted")
            await talk.send({"type": "response.create"})  # after the delete: ordered upstream
            await talk.until("response.done")
            said = fake.connections[0]
            assert said.truncated[0]["item_id"] == answer
            assert said.truncated[0]["audio_end_ms"] == 150
            assert user not in said.item_ids()
            assert "error" not in [e["type"] for e in talk.events]
            await talk.close()


async def test_a_client_that_stops_reading_slows_the_upstream_and_loses_no_audio() -> None:
    """While the client reads nothing, the relay stops reading the upstream: its queue of
    upstream events fills and stays full (the socket is not read: TCP pushes back on the
    upstream) and the server holds no more than its outbound bound; then every chunk of the
    answer (5000 chunks, ~32 MB of events) arrives."""
    with anyio.fail_after(TIMEOUT_S * 2):
        async with gateway(answer_words=5000, send_buffer_bytes=SMALL) as (server, fake):
            stream = await anyio.connect_tcp("127.0.0.1", server.port or 0)
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
            talk = await Talk.open(server.port or 0, "ga", over=stream, **manual("ga"))
            session_id = talk.events[0]["session"]["id"]
            await talk.user_text("go")
            await talk.send({"type": "response.create"})
            runner = server.sessions.sessions[session_id]
            machine, upstream = runner.machine, runner.upstream
            assert isinstance(upstream, ReconnectingUpstream)

            def held() -> bool:
                stats = upstream.statistics()
                return stats.events_buffered == stats.max_pending_events

            await until(held)
            # Held means held for good, however long the client waits. (A pause can only
            # make a missing backpressure show; it cannot fail a relay that has it.)
            await anyio.sleep(0.5)
            assert held()
            assert machine.outbound.nbytes < machine.outbound.max_bytes + 64 * 1024
            said = fake.connections[0]  # (the kernel's buffers may hold the rest of the answer)
            done = (await talk.until("response.done"))[-1]["response"]
            assert done["status"] == "completed"
            heard = audio_of(talk.events, done["id"])
            assert heard == bytes(said.sent_audio[said.responses[0]])
            assert len(heard) == 5000 * 4800
            await talk.close()


async def test_a_resume_that_needs_evicted_answer_audio_is_refused_4004_never_with_a_gap() -> None:
    """Half a second of answer audio kept: a client that read two chunks of a 5 s answer
    and resumes after the server sent the rest cannot be served whole, and is told why."""
    small = "replay_buffer_bytes = 16384"
    keep = "[conversation]\nreplay_audio_seconds = 0.5"
    with anyio.fail_after(TIMEOUT_S):
        async with gateway(realtime=small, extra=keep, answer_words=50) as (server, _fake):
            port = server.port or 0
            talk = await Talk.open(port, "ga", **manual("ga"))
            created = talk.events[0]
            session_id, token = created["session"]["id"], created["spear"]["resume_token"]
            await talk.user_text("go")
            await talk.send({"type": "response.create"})
            await talk.until("response.output_audio.delta")
            last_seq = talk.events[-1]["seq"]
            machine = server.sessions.sessions[session_id].machine
            assert machine.replay is not None
            await until(lambda: machine.replay.evicted_through > last_seq)  # type: ignore[union-attr]
            await drop(talk.ws, reset=False)
            await until(lambda: machine.state is State.DETACHED)
            path = f"/v1/realtime?model=gpt-realtime&session_id={session_id}&last_seq={last_seq}"
            ws = await WsClient.connect(port, path, headers=[("Spear-Resume-Token", token)])
            error = await ws.recv()
            assert error["type"] == "error" and error["error"]["code"] == "resume_failed"
            assert "no longer held" in error["error"]["message"]
            code, _reason = await ws.wait_closed()
            assert code == 4004


# --- the official Python SDK, unchanged ---------------------------------------------------------


@asynccontextmanager
async def _rig(server_toml: str = "") -> AsyncIterator[tuple[int, FakeSpeechToSpeech]]:
    async with gateway(server=server_toml) as (server, fake):
        yield server.port or 0, fake


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_the_python_sdk_converses_through_a_speech_to_speech_upstream(dialect: str) -> None:
    openai = pytest.importorskip("openai")
    vad = {"type": "server_vad", "silence_duration_ms": 500}
    question = np.concatenate(
        [load_fixture_24k("speech_go_forward.wav"), np.zeros(24000, np.int16)]
    )
    ga = dialect == "ga"
    session: dict[str, Any] = (
        {"type": "realtime", "audio": {"input": {"turn_detection": vad}}}
        if ga
        else {"turn_detection": vad, "modalities": ["audio", "text"]}
    )
    audio_delta = "response.output_audio.delta" if ga else "response.audio.delta"

    async def main(port: int) -> list[Any]:
        client = openai.AsyncOpenAI(
            api_key="sk-anything", base_url=f"http://127.0.0.1:{port}/v1",
            websocket_base_url=None if ga else f"ws://127.0.0.1:{port}/v1", max_retries=0,
        )  # fmt: skip
        realtime = client.realtime if ga else client.beta.realtime
        async with asyncio.timeout(TIMEOUT_S):
            async with realtime.connect(model="gpt-realtime") as conn:
                assert (await conn.recv()).type == "session.created"
                await conn.session.update(session=session)
                for start in range(0, len(question), 2400):
                    await conn.input_audio_buffer.append(audio=b64(question[start : start + 2400]))
                events = []
                async for event in conn:  # the SDK parses each into its typed model
                    events.append(event)
                    assert event.type != "error", event
                    if event.type == "response.done":
                        return events
        raise AssertionError("the connection ended before response.done")

    with serve_in_thread(_rig, TIMEOUT_S) as (port, fake):
        events = asyncio.run(main(port))
    done = events[-1].response
    assert done.status == "completed"
    heard = b"".join(base64.b64decode(e.delta) for e in events if e.type == audio_delta)
    said = fake.connections[0]
    assert heard == bytes(said.sent_audio[said.responses[0]]) and heard
    upstream_input = said.sessions[-1]["audio"]["input"]  # a GA upstream, whatever the client
    assert "turn_detection" in upstream_input and upstream_input["turn_detection"] is None


def test_the_node_sdk_converses_through_a_speech_to_speech_upstream_over_tls(
    tmp_path: Path, node_sdk: Path
) -> None:
    cert, key = make_cert(tmp_path)
    question = np.concatenate(
        [load_fixture_24k("speech_go_forward.wav"), np.zeros(24000, np.int16)]
    )
    asked, answer = tmp_path / "question.pcm", tmp_path / "answer.pcm"
    asked.write_bytes(question.astype("<i2").tobytes())
    tls = f'tls_cert = "{cert}"\ntls_key = "{key}"'
    with serve_in_thread(lambda: _rig(tls), TIMEOUT_S) as (port, fake):
        done = subprocess.run(
            ["node", str(node_sdk / "realtime_converse.mjs"), f"https://127.0.0.1:{port}/v1",
             str(asked), str(answer)],
            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert)},
            capture_output=True, text=True, timeout=TIMEOUT_S * 2,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    said = fake.connections[0]
    assert result["status"] == "completed"
    assert result["heard"].strip()
    expected = ["reply", "to", *result["heard"].split()][:ANSWER_WORDS]  # the fake's rule
    assert result["answer"] == " ".join(expected)
    assert answer.read_bytes() == bytes(said.sent_audio[said.responses[0]])
