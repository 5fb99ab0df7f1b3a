"""Every server event validates against the official SDK's pydantic models, in both dialects.

Real sessions on the in-process server (trio task runner and the asyncio callback driver):
server VAD and manual commit with the default (no early deltas), clear, session updates,
errors of every kind, and a resume. Each event received is validated with
`TypeAdapter(openai.types.realtime.RealtimeServerEvent)` (GA) or
`openai.types.beta.realtime.RealtimeServerEvent` (beta); only spear's own `spear.*` events
are skipped. No event names an item that no earlier event announced.
"""

from __future__ import annotations

import typing
from typing import Any

import anyio
import pytest

from spear_rt.server.app import Server
from tests.conftest import WsClient, b64, load_fixture_24k, noise_pcm
from tests.server.test_realtime import BETA, COMMITTED, COMPLETED, TRANSCRIPTION
from tests.server.test_resume import DRIVERS, IDS, reconnect, run_on

ga_types = pytest.importorskip("openai.types.realtime")
beta_types = pytest.importorskip("openai.types.beta.realtime")
pydantic = pytest.importorskip("pydantic")

GA_EVENTS = pydantic.TypeAdapter(ga_types.RealtimeServerEvent)
BETA_EVENTS = pydantic.TypeAdapter(beta_types.RealtimeServerEvent)


def models_by_type(union: Any) -> dict[str, Any]:
    """The union's member models by their `type` literal (for errors that name one model)."""
    args = typing.get_args(union)
    if args and typing.get_origin(union) is typing.Annotated:
        args = typing.get_args(args[0])
    out = {}
    for model in args:
        for literal in typing.get_args(model.model_fields["type"].annotation):
            out[literal] = model
    return out


MODELS = {
    id(GA_EVENTS): models_by_type(ga_types.RealtimeServerEvent),
    id(BETA_EVENTS): models_by_type(beta_types.RealtimeServerEvent),
}
# The beta SDK has no model for transcription_session.created (3.57): it is checked as the
# transcription_session.updated it mirrors (same session object).
# Events that bring an item into being (a conversation's own and a response's output items).
ANNOUNCING = {
    "conversation.item.added",
    "conversation.item.created",
    "response.output_item.added",
}
STAND_INS = {"transcription_session.created": "transcription_session.updated"}

MANUAL = {
    "ga": {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}
            },
        },
    },
    "beta": {"type": "transcription_session.update", "session": {"turn_detection": None}},
}
BAD_FRAMES = [
    "{not json",
    '{"type": "no.such.event", "event_id": "e1"}',
    '{"event_id": "e2"}',
    '{"type": "input_audio_buffer.append", "audio": 5}',
    '{"type": "input_audio_buffer.commit", "event_id": "empty"}',
    '{"type": "session.update", "session": {"instructions": "hi", "type": "transcription"}}',
    '{"type": "transcription_session.update", "session": {"voice": "alloy"}}',
    '{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
    '{"type": "server_vad", "spear": {"detector": "webrtc"}}}}}}',
    '{"type": "response.create"}',
    "[" * 1500 + "]" * 1500,
]


class Checker:
    """Validates events as they arrive and tracks which item ids were announced."""

    def __init__(self, dialect: str) -> None:
        self.adapter = GA_EVENTS if dialect == "ga" else BETA_EVENTS
        self.announced: set[str] = set()
        self.types: list[str] = []
        self.checked = 0

    def check(self, event: dict[str, Any]) -> dict[str, Any]:
        kind = event["type"]
        self.types.append(kind)
        if kind in (COMMITTED, "input_audio_buffer.speech_started"):
            self.announced.add(event["item_id"])
        if kind in ANNOUNCING:
            self.announced.add(event["item"]["id"])
        named = event.get("item_id") or (event.get("item") or {}).get("id")
        assert named is None or named in self.announced, f"unannounced item: {event}"
        if kind.startswith("spear."):
            return event
        original = event
        if kind in STAND_INS and self.adapter is BETA_EVENTS:
            event = {**event, "type": STAND_INS[kind]}
        model = MODELS[id(self.adapter)].get(event["type"])
        assert model is not None, f"the SDK has no model for {event['type']}"
        model.model_validate(event)  # raises pydantic.ValidationError naming the field
        self.adapter.validate_python(event)  # ...and the union parses it
        self.checked += 1
        return original

    async def recv(self, client: WsClient) -> dict[str, Any]:
        return self.check(await client.recv())

    async def recv_until(self, client: WsClient, kind: str) -> list[dict[str, Any]]:
        events = []
        while True:
            events.append(await self.recv(client))
            if events[-1]["type"] == kind:
                return events


async def connect(port: int, dialect: str, path: str = TRANSCRIPTION) -> WsClient:
    return await WsClient.connect(port, path, headers=BETA if dialect == "beta" else ())


async def full_session(server: Server, dialect: str) -> Checker:
    """Server VAD, manual commit, clear, bad input, then a resume; all events checked."""
    assert server.port is not None
    checker = Checker(dialect)
    client = await connect(server.port, dialect)
    created = await checker.recv(client)
    pcm = load_fixture_24k("speech_go_forward.wav")
    for start in range(0, len(pcm), 480):  # server VAD (the default)
        await client.send(
            {"type": "input_audio_buffer.append", "audio": b64(pcm[start : start + 480])}
        )
    await client.send(
        {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(24000 * 2, 0) // 1000)}
    )
    await checker.recv_until(client, COMPLETED)
    await client.send(MANUAL[dialect])
    await checker.recv(client)
    for turn in range(2):
        await client.send(
            {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600, turn))}
        )
        await client.send({"type": "input_audio_buffer.commit"})
        await checker.recv_until(client, COMPLETED)
        if dialect == "ga":
            assert (await checker.recv(client))["type"] == "conversation.item.done"
    await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))})
    await client.send({"type": "input_audio_buffer.clear"})
    await checker.recv_until(client, "input_audio_buffer.cleared")
    for frame in BAD_FRAMES:
        await client.send_text(frame)
        assert (await checker.recv(client))["type"] == "error"
    await client.send_bytes(b"\x00")
    assert (await checker.recv(client))["type"] == "error"
    # resume: drop the socket, reconnect, get the rest of a turn
    await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600, 7))})
    await client.send({"type": "spear.metrics.request"})
    metrics = await checker.recv(client)
    await client.stream.aclose()
    token = created["spear"]["resume_token"]
    session_id = created["session"]["id"]
    again = await reconnect(server.port, session_id, token, metrics["seq"])
    assert (await checker.recv(again))["type"] == "spear.session.resumed"
    await again.send({"type": "input_audio_buffer.commit"})
    await checker.recv_until(again, COMPLETED)
    await again.close()
    return checker


@pytest.mark.parametrize("dialect", ["ga", "beta"])
@pytest.mark.parametrize(("backend", "driver"), DRIVERS[:2], ids=IDS[:2])
def test_every_event_of_a_session_validates_against_the_sdk(
    backend: str, driver: str, dialect: str
) -> None:
    checker = run_on(
        backend,
        driver,
        lambda server: full_session(server, dialect),
        realtime="resume_grace_seconds = 30.0",
    )
    assert checker.checked > 20
    expected = {
        COMMITTED,
        COMPLETED,
        "error",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.cleared",
        "conversation.item.input_audio_transcription.delta",
    }
    assert expected <= set(checker.types)
    if dialect == "ga":
        assert {"session.created", "session.updated", "conversation.item.added"} <= set(
            checker.types
        )
        assert "conversation.item.done" in checker.types
    else:
        assert {"transcription_session.created", "transcription_session.updated"} <= set(
            checker.types
        )


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_a_realtime_session_and_a_drain_validate_too(dialect: str) -> None:
    """A non-transcription session (session.created of type realtime) and the drain path."""

    async def scenario(server: Server) -> Checker:
        assert server.port is not None
        checker = Checker(dialect)
        client = await connect(server.port, dialect, "/v1/realtime")
        await checker.recv(client)
        update = {"type": "session.update", "session": {"turn_detection": None}}
        if dialect == "ga":
            update = {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
            }
        await client.send(update)
        await checker.recv(client)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))})
        await client.send({"type": "spear.metrics.request"})
        await checker.recv_until(client, "spear.metrics")
        server.sessions.drain(5.0)
        await checker.recv_until(client, "spear.server.draining")
        await client.send({"type": "input_audio_buffer.commit"})
        for event in await client.recv_all():
            checker.check(event)
        assert "error" not in checker.types
        assert COMPLETED in checker.types
        with anyio.fail_after(5):
            await client.wait_closed()
        assert client.close_code == 1001
        return checker

    run_on("trio", "auto", scenario)


# A session that picks the silero detector: by name (server_vad + spear.detector) or as
# OpenAI's semantic_vad; a conversation (create_response off: the stub answers nothing) and a
# transcription session, in both dialects.
SILERO = {
    "ga-realtime-semantic": (
        "ga",
        "/v1/realtime",
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "semantic_vad",
                            "eagerness": "medium",
                            "create_response": False,
                        }
                    }
                },
            },
        },
    ),
    "beta-realtime-server-vad": (
        "beta",
        "/v1/realtime",
        {
            "type": "session.update",
            "session": {
                "turn_detection": {
                    "type": "server_vad",
                    "create_response": False,
                    "spear": {"detector": "silero"},
                }
            },
        },
    ),
    "ga-transcription-server-vad": (
        "ga",
        TRANSCRIPTION,
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"spear": {"detector": "silero"}}}},
            },
        },
    ),
    "beta-transcription-semantic": (
        "beta",
        TRANSCRIPTION,
        {
            "type": "transcription_session.update",
            "session": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}},
        },
    ),
}


@pytest.mark.parametrize("case", list(SILERO))
def test_a_silero_vad_session_makes_two_turns_and_validates(case: str) -> None:
    """A bad detector is an error naming the field (the session lives on); then the silero
    detector on two utterances: speech_started, speech_stopped and a committed item per turn,
    the choice shown in session.updated, every event valid for the SDK."""
    dialect, path, update = SILERO[case]

    async def scenario(server: Server) -> Checker:
        assert server.port is not None
        checker = Checker(dialect)
        client = await connect(server.port, dialect, path)
        await checker.recv(client)
        session = update["session"]
        target = session["audio"]["input"] if "audio" in session else session
        bad = {**target["turn_detection"], "spear": {"detector": "webrtc"}}
        await client.send(
            {**update, "session": {**session, **_with_turn(session, bad)}, "event_id": "bad"}
        )
        error = await checker.recv(client)
        assert error["type"] == "error" and error["error"]["event_id"] == "bad"
        assert error["error"]["param"].endswith("turn_detection.spear.detector")
        await client.send(update)
        updated = await checker.recv(client)
        shown = updated["session"]
        shown = shown["audio"]["input"] if "audio" in shown else shown
        td = target["turn_detection"]
        assert shown["turn_detection"]["type"] == td.get("type", "server_vad")
        if shown["turn_detection"]["type"] == "server_vad":
            assert shown["turn_detection"]["spear"] == {"detector": "silero"}
        pcm = load_fixture_24k("speech_two_utterances.wav")
        for start in range(0, len(pcm), 480):
            await client.send(
                {"type": "input_audio_buffer.append", "audio": b64(pcm[start : start + 480])}
            )
        await checker.recv_until(client, COMPLETED)
        await checker.recv_until(client, COMPLETED)
        await client.close()
        return checker

    checker = run_on("trio", "auto", scenario)
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"):
        assert checker.types.count(kind) == 2
    assert checker.types.count(COMMITTED) == 2
    assert checker.types.count("error") == 1


def _with_turn(session: dict[str, Any], turn_detection: dict[str, Any]) -> dict[str, Any]:
    """`session`'s fields with its turn_detection (beta, or GA audio.input) replaced."""
    if "audio" in session:
        return {"audio": {"input": {**session["audio"]["input"], "turn_detection": turn_detection}}}
    return {"turn_detection": turn_detection}
