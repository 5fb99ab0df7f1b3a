"""Realtime sessions over a real WebSocket on 127.0.0.1: flows, bad input, routing, caps, auth."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from spear_rt.audio import frames
from spear_rt.backend import (
    Commit,
    InstanceDefaults,
    InstanceInfo,
    TranscriptionSpec,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.errors import BackendFailure
from spear_rt.ir import Operation, Transport
from spear_rt.registry import BackendRegistry
from spear_rt.server.app import Server
from tests.conftest import (
    HandshakeRefused,
    ServerFactory,
    WsClient,
    b64,
    load_fixture_24k,
    make_config,
    noise_pcm,
    running_server,
)

BETA = [("OpenAI-Beta", "realtime=v1")]
TRANSCRIPTION = "/v1/realtime?intent=transcription"
COMMITTED = "input_audio_buffer.committed"
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
# Manual commit with spear's early deltas (live deltas before the commit): many tests use the
# first delta as the sign that the server has applied an append. The default (deltas held
# until the commit announces the item) is tested in tests/server/test_sdk_events.py.
EARLY = {"spear": {"early_deltas": True}}
MANUAL_BETA = {
    "type": "transcription_session.update",
    "session": {"turn_detection": None, **EARLY},
}
MANUAL_GA = {
    "type": "session.update",
    "session": {
        **EARLY,
        "type": "transcription",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}
        },
    },
}


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


async def open_manual(port: int, *, beta: bool = True) -> WsClient:
    """A transcription session switched to manual commit, with created/updated consumed."""
    client = await WsClient.connect(port, TRANSCRIPTION, headers=BETA if beta else ())
    await client.recv()
    await client.send(MANUAL_BETA if beta else MANUAL_GA)
    assert (await client.recv())["type"].endswith("session.updated")
    return client


async def commit_works(client: WsClient) -> None:
    """Prove the session is alive: a second of audio, a commit, a completed transcript."""
    await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(24000))})
    await client.send({"type": "input_audio_buffer.commit"})
    events = await client.recv_until(COMPLETED)
    assert events[-1]["transcript"].count(" ") == 4  # five 200 ms stub words


# --- whole sessions ---------------------------------------------------------------------------


async def test_beta_manual_session_end_to_end(server: Server) -> None:
    """Beta: created, updated, committed, item.created, deltas, completed; seq 1..n, no gaps."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION, headers=BETA) as client:
            events = [await client.recv()]
            await client.send(MANUAL_BETA)
            pcm = noise_pcm(24000)
            for frame in frames(pcm, 24000):
                await client.send({"type": "input_audio_buffer.append", "audio": b64(frame)})
            await client.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
            events += await client.recv_until(COMPLETED)
    assert types(events)[:2] == ["transcription_session.created", "transcription_session.updated"]
    assert events[0]["spear"]["resume_token"] and events[0]["session"]["id"].startswith("sess_")
    rest = [t for t in types(events[2:]) if t != DELTA]
    assert rest == [COMMITTED, "conversation.item.created", COMPLETED]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    item_id = events[-1]["item_id"]
    deltas = [e for e in events if e["type"] == DELTA]
    assert len(deltas) == 5 and all(e["item_id"] == item_id for e in deltas)
    assert "".join(e["delta"] for e in deltas) == events[-1]["transcript"]


async def test_ga_manual_session_end_to_end(server: Server) -> None:
    """GA: session.update type=transcription, then item.added ... completed, item.done."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION) as client:
            created = await client.recv()
            await client.send(MANUAL_GA)
            updated = await client.recv()
            await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))})
            await client.send({"type": "input_audio_buffer.commit"})
            events = await client.recv_until("conversation.item.done")
    assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    assert [t for t in types(events) if t != DELTA] == [
        COMMITTED,
        "conversation.item.added",
        COMPLETED,
        "conversation.item.done",
    ]


async def test_server_vad_session_on_a_fixture(server: Server) -> None:
    """Default server VAD on go_forward: speech_started/stopped, one item, its transcript."""
    assert server.port is not None
    pcm = load_fixture_24k("speech_go_forward.wav")
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION, headers=BETA) as client:
            await client.recv()
            for frame in frames(pcm, 24000):
                await client.send({"type": "input_audio_buffer.append", "audio": b64(frame)})
            events = await client.recv_until(COMPLETED)
    kinds = [t for t in types(events) if t != DELTA]
    assert kinds == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        COMMITTED,
        "conversation.item.created",
        COMPLETED,
    ]
    assert len({e["item_id"] for e in events if "item_id" in e}) == 1


@pytest.mark.parametrize("abrupt", [False, True])
async def test_sessions_are_counted_and_removed_when_the_client_leaves(
    serve: ServerFactory, abrupt: bool
) -> None:
    """Session count and lease: 1 while connected, 0 once the client has gone (close frame or,
    with resume off, just a dropped TCP connection mid-turn)."""
    server = await serve(make_config(realtime="resume_grace_seconds = 0"))
    assert server.port is not None
    with trio.fail_after(10):
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        assert len(server.sessions.sessions) == 1
        assert server.registry.instances["stub"].runtime.inflight == 1
        if abrupt:
            await client.stream.aclose()
        else:
            await client.close()
        await trio.testing.wait_all_tasks_blocked()
    assert server.sessions.sessions == {}
    assert server.registry.instances["stub"].runtime.inflight == 0


async def test_ping_is_answered_with_pong(server: Server) -> None:
    """A client ping gets a pong with the same payload; the session is unaffected."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await open_manual(server.port) as client:
            client.protocol.send_ping(b"are you there")
            await client._flush()
            while not client.pongs:
                await client._pump()
            await commit_works(client)
    assert client.pongs == [b"are you there"]


async def test_fragmented_text_message_is_reassembled(server: Server) -> None:
    """A client event split over continuation frames is one event."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await open_manual(server.port) as client:
            data = json.dumps(
                {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))}
            ).encode()
            client.protocol.send_text(data[:10], fin=False)
            client.protocol.send_continuation(data[10:50], fin=False)
            client.protocol.send_continuation(data[50:], fin=True)
            await client.send({"type": "input_audio_buffer.commit"})
            events = await client.recv_until(COMPLETED)
    assert events[-1]["transcript"].count(" ") == 0 and events[-1]["transcript"]


async def test_drain_finishes_the_open_turn_then_closes_1001(server: Server) -> None:
    """Server drain: the client's open manual turn takes its last audio and the client's
    commit (no session_draining), is transcribed, then close 1001."""
    assert server.port is not None
    with trio.fail_after(10):
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        assert (await client.recv())["type"] == DELTA  # the turn is open on the server
        server.sessions.drain(5.0)
        assert (await client.recv())["type"] == "spear.server.draining"
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        await client.send({"type": "input_audio_buffer.commit"})
        events = await client.recv_all()
        code, _ = await client.wait_closed()
    assert [t for t in types(events) if t != DELTA] == [
        COMMITTED,
        "conversation.item.created",
        COMPLETED,
    ]
    assert "error" not in types(events)
    assert events[-1]["transcript"].count(" ") == 1  # both appends
    assert code == 1001


async def test_idle_session_closes_1000_at_idle_timeout(
    serve: ServerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """No client event for idle_timeout_s: close 1000 'idle timeout' at that virtual time."""
    server = await serve(
        make_config(server="handshake_timeout_s = 1000.0", realtime="idle_timeout_s = 5.0")
    )
    assert server.port is not None
    with trio.fail_after(100):
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        await client.recv()
        start = trio.current_time()
        code, reason = await client.wait_closed()
    assert (code, reason) == (1000, "idle timeout")
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


# --- bad input: an error event, and the session lives on --------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "event_id"),
    [
        ("{not json", "invalid_json", None),
        ('{"type": "no.such.event", "event_id": "e1"}', "unknown_event_type", "e1"),
        ('{"event_id": "e2"}', "missing_type", "e2"),
        (
            '{"type": "input_audio_buffer.append", "event_id": "e3", "audio": 12}',
            "invalid_value",
            "e3",
        ),
        (
            '{"type": "input_audio_buffer.append", "event_id": "e4", "audio": "@@@@"}',
            "invalid_value",
            "e4",
        ),
        (
            '{"type": "input_audio_buffer.append", "event_id": "e5", "audio": "AAAA="}',
            "invalid_value",
            "e5",
        ),
        (
            '{"type": "input_audio_buffer.append", "event_id": "e6", "audio": "AA=="}',
            "invalid_audio",
            "e6",
        ),
        (
            '{"type": "session.update", "event_id": "e7", "session": {"turn_detection": 3}}',
            "invalid_value",
            "e7",
        ),
        (
            '{"type": "input_audio_buffer.commit", "event_id": "e8"}',
            "input_audio_buffer_commit_empty",
            "e8",
        ),
        ("[]", "invalid_event", None),
    ],
)
async def test_bad_client_event_gets_an_error_and_the_session_lives_on(
    server: Server, frame: str, code: str, event_id: str | None
) -> None:
    """Malformed JSON, unknown/missing type, mistyped field, bad base64, odd pcm16: error, then a
    commit still works."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await open_manual(server.port) as client:
            await client.send_text(frame)
            error = await client.recv()
            await commit_works(client)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == code
    assert error["error"].get("event_id") == event_id


async def test_binary_frame_is_an_error_and_the_session_lives_on(server: Server) -> None:
    """A binary frame where JSON text is expected: invalid_request_error, session continues."""
    assert server.port is not None
    with trio.fail_after(10):
        async with await open_manual(server.port) as client:
            await client.send_bytes(b"\x00\x01" * 100)
            error = await client.recv()
            await commit_works(client)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "binary_frame_not_supported"


async def test_frame_over_max_frame_bytes_closes_1009(serve: ServerFactory) -> None:
    """A frame bigger than server.max_frame_bytes: close 1009, no session left behind."""
    server = await serve(make_config(server="max_frame_bytes = 2048"))
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        await client.recv()
        await client.send(
            {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(480))}
        )  # fits
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(2400))})
        code, _ = await client.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    assert code == 1009
    assert server.sessions.sessions == {}


# --- routing at connect -----------------------------------------------------------------------


async def test_unknown_backend_is_an_error_naming_the_configured_ones(serve: ServerFactory) -> None:
    """?backend=nope: an error event listing the configured backends, then close 1011."""
    server = await serve(
        make_config(
            backends='[[backends]]\nname = "alpha"\nkind = "stub"\n'
            '[[backends]]\nname = "beta"\nkind = "stub"\n'
        )
    )
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, TRANSCRIPTION + "&backend=nope")
        events = await client.recv_all()
        code, _ = await client.wait_closed()
    (error,) = events
    assert error["type"] == "error"
    assert error["error"]["code"] == "InvalidRequest"
    assert '"nope"' in error["error"]["message"] and "alpha, beta" in error["error"]["message"]
    assert code == 1011


async def test_pinned_backend_serves_the_session(serve: ServerFactory) -> None:
    """?backend=beta routes the session to beta."""
    server = await serve(
        make_config(
            backends='[[backends]]\nname = "alpha"\nkind = "stub"\n'
            '[[backends]]\nname = "beta"\nkind = "stub"\n'
        )
    )
    assert server.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION + "&backend=beta") as client:
            created = await client.recv()
    assert created["spear"]["backend"] == "beta"


async def test_no_instance_for_the_operation_is_an_error_then_1011(serve: ServerFactory) -> None:
    """No instance serves speech_to_text: error saying so, close 1011."""
    server = await serve(
        make_config(backends='[[backends]]\nname = "emb"\nkind = "stub"\nops = ["embeddings"]\n')
    )
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert error["error"]["code"] == "NoCandidateBackend"
    assert "speech_to_text" in error["error"]["message"]
    assert code == 1011


async def test_no_capable_instance_reports_rejected_reasons_then_1011(serve: ServerFactory) -> None:
    """The only STT instance lacks the websocket transport: the reason in the error, close 1011."""
    server = await serve(
        make_config(
            backends='[[backends]]\nname = "httponly"\nkind = "stub"\ntransports = ["http"]\n'
        )
    )
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert error["error"]["code"] == "MissingCapabilities"
    assert error["spear"]["rejected_reasons"] == {"httponly": "missing transports: websocket"}
    assert code == 1011


async def test_over_max_sessions_closes_1013_with_a_retry_hint(serve: ServerFactory) -> None:
    """A connection past server.max_sessions: error event, close 1013 'retry after ...'."""
    server = await serve(make_config(server="max_sessions = 1"))
    assert server.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION) as first:
            await first.recv()
            second = await WsClient.connect(server.port, TRANSCRIPTION)
            (error,) = await second.recv_all()
            code, reason = await second.wait_closed()
    assert error["error"]["code"] == "RateLimited"
    assert code == 1013
    assert reason.startswith("retry after ")


async def test_max_sessions_counts_sessions_still_opening_their_upstream(
    serve: ServerFactory,
) -> None:
    """max_sessions = 1 while the first session waits for its upstream: the second is refused
    at once with 1013, not admitted past the cap."""
    kind = ScriptedKind("gated")
    server = await scripted_server(serve, "gated", server="max_sessions = 1", kind=kind)
    assert server.port is not None
    with trio.fail_after(10):
        first = await WsClient.connect(server.port, TRANSCRIPTION)
        while kind.opening == 0:  # the first session is inside open_transcription
            await trio.testing.wait_all_tasks_blocked()
        second = await WsClient.connect(server.port, TRANSCRIPTION)
        (error,) = await second.recv_all()
        code, _ = await second.wait_closed()
        kind.gate.set()
        assert (await first.recv())["type"] == "session.created"
        await first.close()
    assert error["error"]["code"] == "RateLimited"
    assert code == 1013
    assert kind.opening == 1


async def test_instance_at_max_concurrency_closes_1013(serve: ServerFactory) -> None:
    """The only instance at its max_concurrency: close 1013 with a retry hint."""
    server = await serve(
        make_config(
            backends='[[backends]]\nname = "one"\nkind = "stub"\n'
            "[backends.limits]\nmax_concurrency = 1\n"
        )
    )
    assert server.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(server.port, TRANSCRIPTION) as first:
            await first.recv()
            second = await WsClient.connect(server.port, TRANSCRIPTION)
            (error,) = await second.recv_all()
            code, reason = await second.wait_closed()
    assert error["spear"]["rejected_reasons"]["one"].startswith("at capacity")
    assert code == 1013 and reason.startswith("retry after ")


# --- upstream failures ------------------------------------------------------------------------


class FailingUpstream:
    """An upstream at 16 kHz that breaks for good once a turn is committed."""

    input_rate_hz = 16000

    def __init__(self) -> None:
        self.broken = anyio.Event()

    async def send(self, command: UpstreamCommand) -> None:
        if isinstance(command, Commit):
            self.broken.set()

    async def receive(self) -> UpstreamEvent:
        await self.broken.wait()
        raise BackendFailure("engine crashed")


class MuteUpstream:
    """An upstream that takes everything and never answers."""

    input_rate_hz = 24000

    async def send(self, command: UpstreamCommand) -> None:
        pass

    async def receive(self) -> UpstreamEvent:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class ScriptedKind:
    """A backend kind whose open refuses, hangs, or yields a `FailingUpstream`."""

    name = "scripted"
    extra = None
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT}), transports=frozenset({Transport.WEBSOCKET})
    )

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.opening = 0
        self.gate = anyio.Event()  # mode "gated": opens wait for this

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        return None

    @asynccontextmanager
    async def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AsyncIterator[FailingUpstream | MuteUpstream]:
        if self.mode == "refuse":
            raise BackendFailure("engine refused the session")
        if self.mode == "hang":
            await anyio.sleep_forever()
        if self.mode == "gated":
            self.opening += 1
            await self.gate.wait()
            self.mode = "fail"
        yield MuteUpstream() if self.mode == "mute" else FailingUpstream()


async def scripted_server(
    serve: ServerFactory,
    mode: str,
    realtime: str = "",
    server: str = "",
    kind: ScriptedKind | None = None,
) -> Server:
    config = make_config(
        server=server,
        realtime=realtime,
        backends='[[backends]]\nname = "engine"\nkind = "scripted"\n',
    )
    kind = kind or ScriptedKind(mode)
    registry = BackendRegistry.build(config, loader=lambda name: kind, environ={})  # type: ignore[arg-type, return-value]
    return await serve(config, registry)


async def test_upstream_failing_mid_session_is_an_error_then_1011(serve: ServerFactory) -> None:
    """The upstream breaks after a commit: committed, then a server_error event, close 1011."""
    server = await scripted_server(serve, "fail")
    assert server.port is not None
    with trio.fail_after(10):
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        await client.send({"type": "input_audio_buffer.commit"})
        events = await client.recv_all()
        code, reason = await client.wait_closed()
        await trio.testing.wait_all_tasks_blocked()
    assert types(events) == [COMMITTED, "conversation.item.created", "error"]
    assert events[-1]["error"]["type"] == "server_error"
    assert "engine crashed" in events[-1]["error"]["message"]
    assert (code, reason) == (1011, "upstream failed")
    assert server.sessions.sessions == {}
    assert server.registry.instances["engine"].runtime.inflight == 0


async def test_upstream_refusing_to_open_is_backend_error_then_1011(serve: ServerFactory) -> None:
    """The backend refuses the session at open: BackendError naming the instance, close 1011."""
    server = await scripted_server(serve, "refuse")
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert error["error"]["code"] == "BackendError"
    assert "engine" in error["error"]["message"] and "refused" in error["error"]["message"]
    assert code == 1011


async def test_upstream_connect_timeout_closes_1011_at_the_timeout(
    serve: ServerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """An upstream that never opens: error at exactly upstream_connect_timeout_s, close 1011."""
    server = await scripted_server(serve, "hang", realtime="upstream_connect_timeout_s = 4.0")
    assert server.port is not None
    with trio.fail_after(100):
        start = trio.current_time()
        client = await WsClient.connect(server.port, TRANSCRIPTION)
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert trio.current_time() - start == pytest.approx(4.0, abs=0.01)
    assert "timed out" in error["error"]["message"]
    assert code == 1011
    assert server.registry.instances["engine"].runtime.inflight == 0


async def test_drain_deadline_closes_1001_when_a_transcript_never_comes(
    serve: ServerFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """Drain with an upstream that never completes: close 1001 exactly at the drain deadline."""
    server = await scripted_server(serve, "mute", realtime="idle_timeout_s = 600.0")
    assert server.port is not None
    with trio.fail_after(1000):
        client = await open_manual(server.port)
        await client.send({"type": "input_audio_buffer.append", "audio": b64(noise_pcm(4800))})
        await client.send({"type": "spear.metrics.request"})
        await client.recv()  # the append has been applied
        start = trio.current_time()
        server.sessions.drain(5.0)
        events = await client.recv_all()
        code, reason = await client.wait_closed()
    assert types(events) == ["spear.server.draining", COMMITTED, "conversation.item.created"]
    assert (code, reason) == (1001, "server draining: deadline reached")
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


async def test_unknown_intent_is_an_error_then_1008(server: Server) -> None:
    """?intent=bogus: invalid_request_error naming the accepted intents, close 1008."""
    assert server.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(server.port, "/v1/realtime?intent=bogus")
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert error["error"]["type"] == "invalid_request_error"
    assert '"bogus"' in error["error"]["message"]
    assert code == 1008


# --- client keys ------------------------------------------------------------------------------

KEY = "ck-test-4b9d0e"


@pytest.fixture
async def keyed(serve: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("SPEAR_TEST_CLIENT_KEY", KEY)
    return await serve(
        make_config(server='client_keys_env = ["SPEAR_TEST_CLIENT_KEY"]\nmax_sessions_per_key = 1')
    )


async def test_bearer_key_is_accepted(keyed: Server) -> None:
    """Authorization: Bearer <key> opens a session."""
    assert keyed.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(
            keyed.port, TRANSCRIPTION, headers=[("Authorization", f"Bearer {KEY}")]
        ) as client:
            created = await client.recv()
    assert created["type"] == "session.created"


async def test_key_subprotocol_is_accepted_and_realtime_echoed(keyed: Server) -> None:
    """Browsers: subprotocols realtime + openai-insecure-api-key.<key>; only realtime comes back."""
    assert keyed.port is not None
    with trio.fail_after(10):
        async with await WsClient.connect(
            keyed.port, TRANSCRIPTION, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]
        ) as client:
            created = await client.recv()
    assert client.subprotocol == "realtime"
    assert created["type"] == "session.created"


@pytest.mark.parametrize(
    ("headers", "subprotocols"),
    [
        ([("Authorization", "Bearer wrong")], None),
        ([], ["realtime", "openai-insecure-api-key.wrong"]),
        ([], None),
    ],
)
async def test_wrong_or_missing_key_closes_1008(
    keyed: Server, headers: list[tuple[str, str]], subprotocols: list[str] | None
) -> None:
    """A wrong key (header or subprotocol) or none: error event, close 1008, no session."""
    assert keyed.port is not None
    with trio.fail_after(10):
        client = await WsClient.connect(
            keyed.port, TRANSCRIPTION, headers=headers, subprotocols=subprotocols
        )
        (error,) = await client.recv_all()
        code, _ = await client.wait_closed()
    assert error["error"]["code"] == "Unauthorized"
    assert code == 1008
    assert KEY not in json.dumps(error)


async def test_per_key_session_cap_closes_1013(keyed: Server) -> None:
    """max_sessions_per_key = 1: the key's second session is refused with 1013."""
    assert keyed.port is not None
    auth = [("Authorization", f"Bearer {KEY}")]
    with trio.fail_after(10):
        async with await WsClient.connect(keyed.port, TRANSCRIPTION, headers=auth) as first:
            await first.recv()
            second = await WsClient.connect(keyed.port, TRANSCRIPTION, headers=auth)
            (error,) = await second.recv_all()
            code, _ = await second.wait_closed()
    assert "this key" in error["error"]["message"]
    assert code == 1013


async def test_upgrade_on_another_path_is_404(server: Server) -> None:
    """A WebSocket upgrade anywhere but /v1/realtime: HTTP 404, no WebSocket."""
    assert server.port is not None
    with trio.fail_after(10), pytest.raises(HandshakeRefused) as info:
        await WsClient.connect(server.port, "/v1/elsewhere")
    assert info.value.response.status_code == 404


# --- asyncio ----------------------------------------------------------------------------------


def test_whole_session_on_asyncio() -> None:
    """Smoke: the same server and session flow run on asyncio (anyio backend)."""

    async def main() -> list[dict[str, Any]]:
        async with running_server(make_config()) as server:
            assert server.port is not None
            with anyio.fail_after(10):
                client = await open_manual(server.port)
                await client.send(
                    {"type": "input_audio_buffer.append", "audio": b64(noise_pcm(9600))}
                )
                await client.send({"type": "input_audio_buffer.commit"})
                events = await client.recv_until(COMPLETED)
                await client.close()
                return events

    events = anyio.run(main, backend="asyncio")
    assert events[-1]["transcript"].count(" ") == 1


async def test_client_close_frame_is_answered_with_a_close_frame(server: Server) -> None:
    """A client that closes with 1000 gets the server's closing frame back (not a dropped TCP)."""
    assert server.port is not None
    with trio.fail_after(5):
        client = await open_manual(server.port)
        client.protocol.send_close(1000, "bye")
        await client._flush()
        code, _reason = await client.wait_closed()
        await client.stream.aclose()
    assert code == 1000
