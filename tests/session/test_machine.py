"""SessionMachine driven directly (sans-I/O): exact event sequences, turns, timers, drain."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from spear_rt.audio import frames, ulaw_encode
from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    UpstreamCommand,
    UpstreamEvent,
)
from spear_rt.protocol.client_events import decode_client_event
from spear_rt.protocol.settings import Dialect, SessionKind, SessionSettings
from spear_rt.session.machine import CloseAction, SessionMachine, State, Timeouts
from spear_rt.session.outbound import OutboundQueue
from tests.audio.manifest import fixture_items
from tests.conftest import load_fixture_24k, noise_pcm

SESSION_ID = "sess_0123456789abcdef"
DEFAULT_TIMEOUTS = Timeouts()
BLOCK = 4800  # the stub's 200 ms block at 24 kHz


class FakeUpstream:
    """Stub-like upstream: one word per `BLOCK` samples of turn audio, completed at commit."""

    def __init__(self) -> None:
        self.item_id = ""
        self.words: list[str] = []
        self.pending = 0
        self.samples_total = 0
        self.commands: list[UpstreamCommand] = []

    def apply(self, command: UpstreamCommand) -> list[UpstreamEvent]:
        self.commands.append(command)
        out: list[UpstreamEvent] = []
        match command:
            case BeginTurn(item_id=item_id):
                self.item_id, self.words, self.pending = item_id, [], 0
            case AppendAudio(pcm=pcm):
                self.samples_total += pcm.size
                self.pending += pcm.size
                while self.pending >= BLOCK:
                    self.pending -= BLOCK
                    word = f"w{len(self.words) + 1}"
                    out.append(
                        TranscriptDelta(self.item_id, word if not self.words else " " + word)
                    )
                    self.words.append(word)
            case Commit(item_id=item_id):
                out.append(TranscriptCompleted(item_id, " ".join(self.words)))
                self.item_id, self.words, self.pending = "", [], 0
            case Clear():
                self.item_id, self.words, self.pending = "", [], 0
        return out


class Harness:
    """A machine plus a fake upstream; `events()` returns what the client would receive."""

    def __init__(
        self,
        *,
        dialect: Dialect = Dialect.GA,
        kind: SessionKind = SessionKind.TRANSCRIPTION,
        vad: bool = False,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        upstream_rate_hz: int = 24000,
        auto_upstream: bool = True,
    ) -> None:
        counter = itertools.count(1)
        settings = SessionSettings(kind=kind)
        if not vad:
            settings = SessionSettings(kind=kind, turn_detection=None)
        self.machine = SessionMachine(
            session_id=SESSION_ID,
            upstream_rate_hz=upstream_rate_hz,
            settings=settings,
            dialect=dialect,
            outbound=OutboundQueue(1 << 20),
            timeouts=timeouts,
            resume_token="tok",
            ids=lambda prefix: f"{prefix}_{next(counter)}",
        )
        self.upstream = FakeUpstream()
        self.auto_upstream = auto_upstream
        self.held: list[UpstreamEvent] = []
        self.now = 0.0

    def start(self) -> list[dict[str, Any]]:
        self.machine.start(self.now)
        return self.events()

    def send(self, event: dict[str, Any] | str) -> list[dict[str, Any]]:
        raw = event if isinstance(event, str) else json.dumps(event)
        self.machine.client_event(decode_client_event(raw), self.now)
        self.pump()
        return self.events()

    def append(
        self, pcm: NDArray[np.int16] | bytes, event_id: str | None = None
    ) -> list[dict[str, Any]]:
        data = pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()
        event: dict[str, Any] = {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(data).decode(),
        }
        if event_id is not None:
            event["event_id"] = event_id
        return self.send(event)

    def stream(self, pcm: NDArray[np.int16], rate_hz: int = 24000) -> list[dict[str, Any]]:
        """Append `pcm` in 20 ms frames, as a client would; all events in order."""
        out = []
        for frame in frames(pcm, rate_hz):
            out += self.append(frame)
        return out

    def pump(self) -> None:
        """Hand the machine's upstream commands to the fake and feed its events back."""
        commands, self.machine.upstream = self.machine.upstream, []
        for command in commands:
            produced = self.upstream.apply(command)
            if self.auto_upstream:
                for event in produced:
                    self.machine.upstream_event(event)
            else:
                self.held += produced

    def release(self) -> list[dict[str, Any]]:
        """Deliver the upstream events held back (auto_upstream=False)."""
        held, self.held = self.held, []
        for event in held:
            self.machine.upstream_event(event)
        self.pump()
        return self.events()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(data) for data in self.machine.outbound.take_all()]


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def speech(seconds: float) -> NDArray[np.int16]:
    return noise_pcm(int(24000 * seconds))


COMMITTED = "input_audio_buffer.committed"
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


# --- session.created / session.update ---------------------------------------------------------


def test_ga_transcription_session_created_has_type_format_and_resume_token() -> None:
    """GA: session.created names session.type=transcription, the GA format and the resume token."""
    events = Harness(dialect=Dialect.GA).start()
    assert types(events) == ["session.created"]
    created = events[0]
    assert created["seq"] == 1 and created["event_id"]
    assert created["session"]["type"] == "transcription"
    assert created["session"]["id"] == SESSION_ID
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert created["session"]["audio"]["input"]["turn_detection"] is None
    assert created["spear"]["resume_token"] == "tok"


def test_beta_transcription_session_created_uses_transcription_session_names() -> None:
    """Beta transcription: transcription_session.created with beta field names and the token."""
    events = Harness(dialect=Dialect.BETA).start()
    assert types(events) == ["transcription_session.created"]
    session = events[0]["session"]
    assert session["object"] == "realtime.transcription_session"
    assert session["input_audio_format"] == "pcm16"
    assert "audio" not in session and "type" not in session
    assert events[0]["spear"]["resume_token"] == "tok"


def test_beta_realtime_session_created_is_session_created() -> None:
    """Beta conversation sessions get plain session.created (realtime.session object)."""
    events = Harness(dialect=Dialect.BETA, kind=SessionKind.REALTIME).start()
    assert types(events) == ["session.created"]
    assert events[0]["session"]["object"] == "realtime.session"


def test_ga_session_update_sets_pcm_format_and_manual_turns() -> None:
    """GA session.update with type=transcription, audio/pcm 24 kHz and null turn detection."""
    h = Harness(dialect=Dialect.GA, vad=True)
    h.start()
    update = {
        "type": "session.update",
        "event_id": "u1",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}
            },
        },
    }
    events = h.send(update)
    assert types(events) == ["session.updated"]
    assert events[0]["seq"] == 2
    audio_in = events[0]["session"]["audio"]["input"]
    assert audio_in["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio_in["turn_detection"] is None
    assert h.machine.settings.turn_detection is None


def test_ga_session_update_to_pcmu_switches_to_8khz_g711() -> None:
    """GA audio/pcmu is G.711 mu-law at 8 kHz, rendered back as {type: audio/pcmu}."""
    h = Harness(dialect=Dialect.GA)
    h.start()
    events = h.send(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcmu"}}},
            },
        }
    )
    assert events[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert h.machine.settings.input_format.rate_hz == 8000


def test_beta_transcription_session_update_answers_in_beta() -> None:
    """Beta transcription_session.update: g711_ulaw and null turn detection, answered in beta."""
    h = Harness(dialect=Dialect.BETA, vad=True)
    h.start()
    events = h.send(
        {
            "type": "transcription_session.update",
            "session": {"input_audio_format": "g711_ulaw", "turn_detection": None},
        }
    )
    assert types(events) == ["transcription_session.updated"]
    assert events[0]["session"]["input_audio_format"] == "g711_ulaw"
    assert events[0]["session"]["turn_detection"] is None


def test_session_update_cannot_change_session_type() -> None:
    """A transcription session refuses session.type=realtime with an error naming the param."""
    h = Harness()
    h.start()
    events = h.send({"type": "session.update", "event_id": "u9", "session": {"type": "realtime"}})
    assert types(events) == ["error"]
    assert events[0]["error"]["param"] == "session.type"
    assert events[0]["error"]["event_id"] == "u9"
    assert h.machine.settings.kind is SessionKind.TRANSCRIPTION


@pytest.mark.parametrize(
    ("turn_detection", "param"),
    [
        ({"type": "magic_vad"}, "session.turn_detection.type"),
        ({"spear": {"detector": "webrtc"}}, "session.turn_detection.spear.detector"),
        ({"type": "semantic_vad", "eagerness": "eager"}, "session.turn_detection.eagerness"),
    ],
)
def test_session_update_with_unsupported_turn_detection_is_an_error(
    turn_detection: dict[str, Any], param: str
) -> None:
    """An unknown turn detection type, detector or eagerness is refused naming the field;
    settings stay as they were and the session carries on."""
    h = Harness(vad=True)
    h.start()
    before = h.machine.settings
    events = h.send({"type": "session.update", "session": {"turn_detection": turn_detection}})
    assert types(events) == ["error"]
    assert events[0]["error"]["type"] == "invalid_request_error"
    assert events[0]["error"]["param"] == param
    assert h.machine.settings == before
    assert "input_audio_buffer.speech_started" in types(
        h.stream(load_fixture_24k("speech_go_forward.wav"))
    )


# --- manual commit ----------------------------------------------------------------------------


def test_beta_manual_commit_flow_exact_sequence() -> None:
    """Beta: committed, item.created, the turn's deltas (held until the commit announced the
    item), completed with usage; seq 1, 2, 3, ..."""
    h = Harness(dialect=Dialect.BETA)
    h.start()
    early = h.append(speech(0.6))  # three stub blocks: three deltas, held for the commit
    events = h.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert early == []
    assert types(events) == [COMMITTED, "conversation.item.created", *[DELTA] * 3, COMPLETED]
    assert [e["seq"] for e in events] == [2, 3, 4, 5, 6, 7]
    assert len({e["event_id"] for e in events}) == len(events)
    item_id = events[0]["item_id"]
    deltas = [e for e in events if e["type"] == DELTA]
    assert all(e["item_id"] == item_id for e in deltas)
    assert "".join(e["delta"] for e in deltas) == events[-1]["transcript"] == "w1 w2 w3"
    assert events[-1]["usage"] == {"type": "duration", "seconds": 0.6}
    assert events[1]["item"]["id"] == item_id and events[1]["item"]["role"] == "user"
    assert h.upstream.commands[0] == BeginTurn(item_id)
    assert h.upstream.commands[-1] == Commit(item_id)


def test_early_deltas_are_an_opt_in() -> None:
    """session.spear.early_deltas: live deltas of a manual turn go out before its commit."""
    h = Harness(dialect=Dialect.BETA)
    h.start()
    update = h.send(
        {"type": "transcription_session.update", "session": {"spear": {"early_deltas": True}}}
    )
    assert types(update) == ["transcription_session.updated"]
    early = h.append(speech(0.4))
    events = h.send({"type": "input_audio_buffer.commit"})
    assert types(early) == [DELTA, DELTA]
    assert types(events) == [COMMITTED, "conversation.item.created", COMPLETED]
    assert {e["item_id"] for e in early} == {events[0]["item_id"]}


def test_no_event_names_an_item_before_it_is_announced() -> None:
    """Default: every item id an event names was announced earlier (speech_started or
    committed), over manual turns, a cleared turn and VAD turns."""
    for vad in (False, True):
        h = Harness(dialect=Dialect.GA, vad=vad)
        h.start()
        events = h.append(speech(0.4))
        events += h.send({"type": "input_audio_buffer.clear"})
        events += h.append(speech(0.4))
        events += h.send({"type": "input_audio_buffer.commit"})
        events += h.stream(load_fixture_24k("speech_go_forward.wav"))
        announced: set[str] = set()
        for event in events:
            if event["type"] in (COMMITTED, "input_audio_buffer.speech_started"):
                announced.add(event["item_id"])
            named = event.get("item_id") or event.get("item", {}).get("id")
            assert named is None or named in announced, (vad, event)


def test_held_deltas_are_bounded() -> None:
    """An unannounced turn's held deltas stop at MAX_HELD_CHARS; the rest are counted."""
    from spear_rt.session.items import MAX_HELD_CHARS

    h = Harness(dialect=Dialect.BETA, auto_upstream=False)
    h.start()
    h.append(speech(0.2))
    item_id = h.machine._turns.turn_id
    assert item_id is not None
    chunk = "x" * 1000
    for _ in range(MAX_HELD_CHARS // 1000 + 10):
        h.machine.upstream_event(TranscriptDelta(item_id, chunk))
    assert h.events() == []
    events = h.send({"type": "input_audio_buffer.commit"})
    held = [e for e in events if e["type"] == DELTA]
    assert sum(len(e["delta"]) for e in held) <= MAX_HELD_CHARS
    assert h.machine.metrics()["dropped_events"] == 10


def test_ga_manual_commit_flow_uses_item_added_and_item_done() -> None:
    """GA: committed, conversation.item.added, delta, completed, conversation.item.done with
    the text and the real previous item id."""
    h = Harness(dialect=Dialect.GA)
    h.start()
    h.append(speech(0.2))
    first = h.send({"type": "input_audio_buffer.commit"})
    assert types(first) == [
        COMMITTED,
        "conversation.item.added",
        DELTA,
        COMPLETED,
        "conversation.item.done",
    ]
    assert first[-1]["item"]["content"][0]["transcript"] == "w1"
    assert first[-1]["previous_item_id"] is None
    assert [e["seq"] for e in first] == [2, 3, 4, 5, 6]
    h.append(speech(0.2))
    second = h.send({"type": "input_audio_buffer.commit"})
    assert second[-1]["type"] == "conversation.item.done"
    assert second[-1]["previous_item_id"] == first[0]["item_id"] != second[0]["item_id"]


def test_second_commit_links_previous_item_id() -> None:
    """Each committed item names the one before it."""
    h = Harness(dialect=Dialect.BETA)
    h.start()
    h.append(speech(0.1))
    first = h.send({"type": "input_audio_buffer.commit"})
    h.append(speech(0.1))
    second = h.send({"type": "input_audio_buffer.commit"})
    assert first[0]["previous_item_id"] is None
    assert second[0]["previous_item_id"] == first[0]["item_id"] != second[0]["item_id"]


def test_commit_with_empty_buffer_is_commit_empty_error() -> None:
    """Committing nothing: error input_audio_buffer_commit_empty with the event id, no item."""
    h = Harness()
    h.start()
    events = h.send({"type": "input_audio_buffer.commit", "event_id": "c0"})
    assert types(events) == ["error"]
    assert events[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    assert events[0]["error"]["event_id"] == "c0"
    assert h.upstream.commands == []


def test_clear_drops_the_turn_and_a_later_commit_is_empty() -> None:
    """clear: cleared event, Clear upstream; the dropped audio cannot be committed."""
    h = Harness()
    h.start()
    h.append(speech(0.1))
    events = h.send({"type": "input_audio_buffer.clear"})
    assert types(events) == ["input_audio_buffer.cleared"]
    assert isinstance(h.upstream.commands[-1], Clear)
    assert types(h.send({"type": "input_audio_buffer.commit"})) == ["error"]


def test_odd_length_pcm16_is_invalid_audio_and_the_session_goes_on() -> None:
    """An odd byte count of pcm16 is an invalid_audio error; the next append and commit work."""
    h = Harness()
    h.start()
    events = h.append(b"\x00", event_id="a1")
    assert types(events) == ["error"]
    assert events[0]["error"]["code"] == "invalid_audio"
    assert events[0]["error"]["event_id"] == "a1"
    assert events[0]["error"]["param"] == "audio"
    h.append(speech(0.2))
    assert COMPLETED in types(h.send({"type": "input_audio_buffer.commit"}))


def test_conversation_events_are_unsupported_on_a_transcription_session() -> None:
    """response.create on a transcription-only session: an error, the session lives on."""
    h = Harness()
    h.start()
    events = h.send({"type": "response.create", "event_id": "r1"})
    assert types(events) == ["error"]
    assert events[0]["error"]["code"] == "unsupported_event"
    assert h.machine.state is State.ACTIVE


def test_decode_errors_become_error_events_with_event_id() -> None:
    """A ProtocolError from decoding is answered with its code, event id and param."""
    h = Harness()
    h.start()
    events = h.send('{"type": "nope", "event_id": "x1"}')
    assert events[0]["error"] == {
        "type": "invalid_request_error",
        "code": "unknown_event_type",
        "message": events[0]["error"]["message"],
        "param": "type",
        "event_id": "x1",
    }


def test_metrics_request_reports_counters() -> None:
    """spear.metrics.request is answered with the session's counters."""
    h = Harness()
    h.start()
    h.append(speech(0.1))
    (event,) = h.send({"type": "spear.metrics.request"})
    assert event["type"] == "spear.metrics"
    assert event["metrics"]["input_audio_bytes"] == 4800
    assert event["metrics"]["dropped_events"] == 0


def test_failed_transcription_is_reported_and_the_item_is_finished() -> None:
    """TranscriptFailed becomes ...transcription.failed for that item."""
    h = Harness(auto_upstream=False)
    h.start()
    h.append(speech(0.1))
    item_id = h.send({"type": "input_audio_buffer.commit"})[0]["item_id"]
    h.machine.upstream_event(TranscriptFailed(item_id, "engine fell over"))
    (event,) = h.events()
    assert event["type"] == "conversation.item.input_audio_transcription.failed"
    assert event["item_id"] == item_id
    assert event["error"]["message"] == "engine fell over"
    assert h.machine.metrics()["pending_items"] == 0


# --- server VAD -------------------------------------------------------------------------------


def test_vad_turn_on_a_fixture_starts_stops_and_commits_itself() -> None:
    """Server VAD on go_forward: started/stopped with one item id, then committed and completed."""
    item = next(i for i in fixture_items("speech") if i["file"] == "speech_go_forward.wav")
    h = Harness(dialect=Dialect.BETA, vad=True)
    h.start()
    events = h.stream(load_fixture_24k(item["file"]))
    kinds = [t for t in types(events) if t != DELTA]
    assert kinds == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        COMMITTED,
        "conversation.item.created",
        COMPLETED,
    ]
    started, stopped, committed = [e for e in events if e["type"] != DELTA][:3]
    item_id = started["item_id"]
    assert stopped["item_id"] == committed["item_id"] == item_id
    start_ms, end_ms = item["segments_ms"][0]
    assert abs(started["audio_start_ms"] - (start_ms - 300)) <= 150  # prefix padding 300 ms
    assert abs(stopped["audio_end_ms"] - end_ms) <= 200
    deltas = [e for e in events if e["type"] == DELTA]
    assert deltas and all(e["item_id"] == item_id for e in deltas)
    assert "".join(e["delta"] for e in deltas) == events[-1]["transcript"]
    assert [e["seq"] for e in events] == list(range(2, 2 + len(events)))
    # the turn went upstream from audio_start_ms to the end of the silence that closed it
    expected = (stopped["audio_end_ms"] + 500 - started["audio_start_ms"]) * 24
    assert abs(h.upstream.samples_total - expected) <= 24 * 30


def test_vad_two_utterances_become_two_items() -> None:
    """two_utterances: two speech_started / committed pairs with distinct, linked item ids."""
    h = Harness(dialect=Dialect.BETA, vad=True)
    h.start()
    events = h.stream(load_fixture_24k("speech_two_utterances.wav"))
    assert types(events).count("input_audio_buffer.speech_started") == 2
    committed = [e for e in events if e["type"] == COMMITTED]
    completed = [e for e in events if e["type"] == COMPLETED]
    assert len(committed) == len(completed) == 2
    assert committed[0]["item_id"] != committed[1]["item_id"]
    assert committed[1]["previous_item_id"] == committed[0]["item_id"]
    assert [c["item_id"] for c in completed] == [c["item_id"] for c in committed]


def test_manual_commit_during_vad_speech_leaves_no_dangling_item() -> None:
    """A commit mid-speech ends that turn; speech that goes on is a new turn, never a stray stop."""
    h = Harness(dialect=Dialect.BETA, vad=True)
    h.start()
    pcm = load_fixture_24k("speech_go_forward.wav")
    events = h.stream(pcm[:24000])
    events += h.send({"type": "input_audio_buffer.commit"})
    events += h.stream(pcm[24000:])
    started = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    committed = [e["item_id"] for e in events if e["type"] == COMMITTED]
    completed = [e["item_id"] for e in events if e["type"] == COMPLETED]
    assert set(stopped) <= set(committed)  # every stop names an item that exists
    assert set(started) <= set(committed)
    assert completed == committed
    assert "error" not in types(events)


@pytest.mark.parametrize(
    "turn_detection",
    [{"type": "server_vad", "spear": {"detector": "silero"}}, {"type": "semantic_vad"}],
)
def test_silero_vad_turns_two_utterances_into_two_items(turn_detection: dict[str, Any]) -> None:
    """The silero detector (chosen by name or as semantic_vad) drives turns like the energy one:
    started/stopped/committed per utterance, each turn's audio from audio_start_ms upstream."""
    h = Harness(dialect=Dialect.BETA, vad=True)
    h.start()
    updated = h.send(
        {"type": "transcription_session.update", "session": {"turn_detection": turn_detection}}
    )
    assert updated[0]["session"]["turn_detection"]["type"] == turn_detection["type"]
    events = h.stream(load_fixture_24k("speech_two_utterances.wav"))
    kinds = [t for t in types(events) if t != DELTA]
    one_turn = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        COMMITTED,
        "conversation.item.created",
        COMPLETED,
    ]
    assert kinds == one_turn * 2
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    for (start_ms, end_ms), begin, end in zip(
        [(500, 2426), (3625, 5138)], started, stopped, strict=True
    ):
        assert abs(begin["audio_start_ms"] - (start_ms - 300)) <= 150
        assert abs(end["audio_end_ms"] - end_ms) <= 200
        assert begin["item_id"] == end["item_id"]


@pytest.mark.parametrize("name", ["silence.wav", "noise.wav"])
def test_vad_on_non_speech_makes_no_turn(name: str) -> None:
    """Silence (and steady noise) never opens a turn: no events, nothing sent upstream."""
    h = Harness(vad=True)
    h.start()
    assert h.stream(load_fixture_24k(name)) == []
    assert h.upstream.commands == []


# --- audio rates ------------------------------------------------------------------------------


def test_pcm16_at_24khz_goes_to_a_24khz_upstream_unchanged() -> None:
    """Same rate: the upstream receives exactly the samples the client sent."""
    h = Harness(upstream_rate_hz=24000)
    h.start()
    pcm = speech(0.5)
    h.stream(pcm)
    h.send({"type": "input_audio_buffer.commit"})
    sent = np.concatenate([c.pcm for c in h.upstream.commands if isinstance(c, AppendAudio)])
    assert np.array_equal(sent, pcm)


def test_g711_at_8khz_is_resampled_to_three_times_the_samples() -> None:
    """8 kHz mu-law to a 24 kHz upstream: about 3x the samples arrive (resampled, not padded)."""
    h = Harness(upstream_rate_hz=24000)
    h.start()
    h.send(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcmu"}}},
            },
        }
    )
    t = np.arange(8000) / 8000
    tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    for frame in frames(tone, 8000):
        h.append(ulaw_encode(frame))
    h.send({"type": "input_audio_buffer.commit"})
    total = h.upstream.samples_total
    assert abs(total - 3 * 8000) <= 24  # within a millisecond of 3x
    assert h.machine.input_audio_bytes == 8000


def test_pcm16_24khz_to_a_16khz_upstream_is_two_thirds() -> None:
    """24 kHz in, 16 kHz upstream: 2/3 of the samples once the turn is flushed at commit."""
    h = Harness(upstream_rate_hz=16000)
    h.start()
    h.stream(speech(1.0))
    h.send({"type": "input_audio_buffer.commit"})
    assert abs(h.upstream.samples_total - 16000) <= 16


# --- timers -----------------------------------------------------------------------------------


def test_idle_timeout_closes_1000_at_the_deadline() -> None:
    """No client event for idle_timeout: close 1000 exactly at the deadline, not before."""
    h = Harness(timeouts=Timeouts(idle_timeout_s=30, max_session_seconds=3600))
    h.now = 100.0
    h.start()
    assert h.machine.next_deadline() == 130.0
    h.machine.tick(129.999)
    assert h.machine.close is None
    h.now = 120.0
    h.send({"type": "spear.metrics.request"})  # activity pushes the deadline
    assert h.machine.next_deadline() == 150.0
    h.machine.tick(150.0)
    assert h.machine.close == CloseAction(1000, "idle timeout")
    assert h.machine.state is State.CLOSED


def test_max_session_seconds_closes_even_an_active_session() -> None:
    """max_session_seconds wins over activity: an error event, then close 1000."""
    h = Harness(timeouts=Timeouts(idle_timeout_s=30, max_session_seconds=60))
    h.start()
    for t in range(10, 60, 10):
        h.now = float(t)
        h.send({"type": "spear.metrics.request"})
        h.machine.tick(h.now)
    h.events()
    assert h.machine.close is None
    assert h.machine.next_deadline() == 60.0
    h.machine.tick(60.0)
    (event,) = h.events()
    assert event["error"]["code"] == "session_expired"
    assert h.machine.close == CloseAction(1000, "max_session_seconds reached")


# --- drain ------------------------------------------------------------------------------------


def test_drain_lets_the_client_finish_its_manual_turn_and_answers_it() -> None:
    """DRAINING: an open manual turn takes more audio and the client's commit, is answered,
    a new turn is refused, then close 1001."""
    h = Harness(dialect=Dialect.BETA)
    h.start()
    h.append(speech(0.2))
    h.machine.drain(h.now)
    assert types(h.events()) == ["spear.server.draining"]
    assert h.machine.state is State.DRAINING
    assert h.append(speech(0.2), event_id="more") == []  # still the open turn
    events = h.send({"type": "input_audio_buffer.commit", "event_id": "c"})
    assert types(events) == [COMMITTED, "conversation.item.created", DELTA, DELTA, COMPLETED]
    assert events[-1]["transcript"] == "w1 w2"
    assert h.machine.close == CloseAction(1001, "server draining")
    assert h.machine.state is State.CLOSED


def test_drain_refuses_audio_for_a_new_turn() -> None:
    """Once the open turn is committed, appends during the drain are session_draining."""
    h = Harness(dialect=Dialect.BETA, auto_upstream=False)
    h.start()
    h.append(speech(0.2))
    h.machine.drain(h.now)
    h.send({"type": "input_audio_buffer.commit"})
    h.events()
    refused = h.append(speech(0.1), event_id="late")
    assert types(refused) == ["error"]
    assert refused[0]["error"]["code"] == "session_draining"
    assert refused[0]["error"]["event_id"] == "late"
    events = h.release()
    assert types(events) == [DELTA, COMPLETED]
    assert h.machine.close == CloseAction(1001, "server draining")


def test_drain_commits_a_manual_turn_the_client_leaves_open_halfway_to_the_deadline() -> None:
    """A client that never commits: the server commits its turn at half the drain deadline,
    answers it, and closes 1001."""
    h = Harness(dialect=Dialect.BETA)
    h.start()
    h.append(speech(0.2))
    h.machine.drain(0.0, deadline_s=10.0)
    h.events()
    assert h.machine.next_deadline() == 5.0
    h.machine.tick(4.9)
    assert h.events() == [] and h.machine.close is None
    h.machine.tick(5.0)
    h.pump()
    assert types(h.events()) == [COMMITTED, "conversation.item.created", DELTA, COMPLETED]
    assert h.machine.close == CloseAction(1001, "server draining")


def test_drain_commits_an_open_vad_turn_at_once() -> None:
    """Server VAD: the turn open at drain is committed by the server at once."""
    h = Harness(dialect=Dialect.BETA, vad=True, auto_upstream=False)
    h.start()
    pcm = load_fixture_24k("speech_go_forward.wav")
    h.stream(pcm[: len(pcm) // 2])
    assert h.machine._turns.turn_id is not None
    h.machine.drain(h.now)
    assert types(h.events()) == ["spear.server.draining", COMMITTED, "conversation.item.created"]


def test_drain_with_nothing_pending_closes_at_once() -> None:
    """An idle session closes 1001 as soon as the drain starts."""
    h = Harness()
    h.start()
    h.machine.drain(0.0)
    assert h.machine.close == CloseAction(1001, "server draining")


def test_drain_deadline_closes_even_with_a_transcript_missing() -> None:
    """If the upstream never completes, the drain deadline closes the session."""
    h = Harness(auto_upstream=False)
    h.start()
    h.append(speech(0.1))
    h.send({"type": "input_audio_buffer.commit"})
    h.machine.drain(0.0, deadline_s=5.0)
    assert h.machine.next_deadline() == 5.0
    h.machine.tick(4.9)
    assert h.machine.close is None
    h.machine.tick(5.0)
    assert h.machine.close == CloseAction(1001, "server draining: deadline reached")


# --- failure and terminal states --------------------------------------------------------------


def test_upstream_failed_is_fatal_error_then_close_1011() -> None:
    """upstream_failed: ERROR state, last_error kept, a server_error event, close 1011."""
    h = Harness()
    h.start()
    h.machine.upstream_failed("socket reset")
    (event,) = h.events()
    assert event["type"] == "error"
    assert event["error"]["type"] == "server_error"
    assert event["error"]["code"] == "upstream_error"
    assert h.machine.state is State.ERROR
    assert h.machine.last_error == "socket reset"
    assert h.machine.close == CloseAction(1011, "upstream failed")


def test_closed_session_ignores_every_later_input() -> None:
    """After close, client events, upstream events and ticks produce nothing."""
    h = Harness()
    h.start()
    h.machine.upstream_failed("gone")
    h.events()
    h.send({"type": "input_audio_buffer.commit"})
    h.machine.upstream_event(TranscriptDelta("item_1", "late"))
    h.machine.tick(10_000.0)
    h.machine.upstream_failed("again")
    assert h.events() == []
    assert h.machine.close == CloseAction(1011, "upstream failed")


def test_client_gone_closes_the_session() -> None:
    """client_gone makes the session CLOSED."""
    h = Harness()
    h.start()
    h.machine.client_gone()
    assert h.machine.state is State.CLOSED
    assert h.send({"type": "input_audio_buffer.commit"}) == []


def test_drain_announces_itself_with_its_deadline() -> None:
    """The first drain event is spear.server.draining carrying the deadline in ms."""
    h = Harness()
    h.start()
    h.machine.drain(h.now, 7.5)
    events = h.events()
    assert events[0]["type"] == "spear.server.draining" and events[0]["deadline_ms"] == 7500


def test_a_warning_comes_before_max_session_seconds() -> None:
    """expiry_warning_s before the end: one spear.session.expiring, then the close at the end."""
    h = Harness(
        timeouts=Timeouts(idle_timeout_s=10_000, max_session_seconds=300, expiry_warning_s=60)
    )
    h.start()
    assert h.machine.next_deadline() == 240
    h.machine.tick(240.0)
    warning = h.events()
    assert [e["type"] for e in warning] == ["spear.session.expiring"]
    assert warning[0]["seconds_left"] == 60
    assert h.machine.close is None and h.machine.next_deadline() == 300
    h.machine.tick(250.0)
    assert h.events() == []  # warned once
    h.machine.tick(300.0)
    assert h.machine.close is not None and h.machine.close.code == 1000
