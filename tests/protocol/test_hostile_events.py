"""decode_client_event on hostile input: deep nesting, huge event ids and types, unknown fields.

Each is a ProtocolError (answered with an `error` event), never an exception, and what it
echoes back is bounded.
"""

from __future__ import annotations

import json

import pytest

from spear_rt.protocol import client_events as ce
from spear_rt.protocol.client_events import MAX_EVENT_ID_CHARS, ProtocolError, decode_client_event

DEEP = 1200


@pytest.mark.parametrize(
    "frame",
    [
        "[" * DEEP + "]" * DEEP,
        '{"type": "input_audio_buffer.commit", "x": ' + "[" * DEEP + "]" * DEEP + "}",
        '{"type": "conversation.item.create", "item": {"a": ' + "[" * DEEP + "]" * DEEP + "}}",
        '{"type": "session.update", "session": {"audio": '
        + '{"a":' * DEEP
        + "1"
        + "}" * DEEP
        + "}}",
        '{"event_id": "e1", "type": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "[" * 100_000,
    ],
    ids=["array", "unknown-field", "dict-field", "session", "type", "unclosed"],
)
def test_deep_nesting_is_a_protocol_error(frame: str) -> None:
    """>= 1200 nested levels (msgspec raises RecursionError): a clear invalid_json error."""
    error = decode_client_event(frame)
    assert isinstance(error, ProtocolError)
    assert error.code in ("invalid_json", "invalid_event")
    assert "nest" in error.message or error.code == "invalid_event"


def test_a_huge_event_id_is_capped_when_echoed() -> None:
    """An event_id longer than MAX_EVENT_ID_CHARS is cut to that many characters."""
    huge = "x" * 1_000_000
    error = decode_client_event(json.dumps({"type": "no.such", "event_id": huge}))
    assert isinstance(error, ProtocolError)
    assert error.event_id == huge[:MAX_EVENT_ID_CHARS]
    event = decode_client_event(json.dumps({"type": "input_audio_buffer.commit", "event_id": huge}))
    assert isinstance(event, ce.InputAudioBufferCommit)
    assert event.event_id == huge[:MAX_EVENT_ID_CHARS]


def test_a_huge_unknown_type_is_not_echoed_whole() -> None:
    """The message naming an unknown type stays short, and a non-string type is no repr."""
    error = decode_client_event(json.dumps({"type": "t" * 100_000}))
    assert isinstance(error, ProtocolError) and error.code == "unknown_event_type"
    assert len(error.message) < 1000
    error = decode_client_event(json.dumps({"type": {"a": [1, 2]}}))
    assert isinstance(error, ProtocolError) and error.code == "unknown_event_type"
    assert "{" not in error.message and "[1" not in error.message


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"bogus_field": 1}, "session.bogus_field"),
        ({"audio": {"input": {"new_option": True}}}, "session.audio.input.new_option"),
        ({"audio": {"input": {"transcription": {"x": 1}}}}, "session.audio.input.transcription.x"),
        ({"turn_detection": {"type": "server_vad", "zzz": 1}}, "session.turn_detection.zzz"),
    ],
)
@pytest.mark.parametrize("kind", ["session.update", "transcription_session.update"])
def test_unknown_session_fields_are_refused_naming_the_field(
    kind: str, session: dict[str, object], param: str
) -> None:
    """A session field the server does not implement: unknown_parameter, param = its path."""
    error = decode_client_event(json.dumps({"type": kind, "event_id": "e9", "session": session}))
    assert isinstance(error, ProtocolError), error
    assert (error.code, error.param, error.event_id) == ("unknown_parameter", param, "e9")
    assert param in error.message


@pytest.mark.parametrize(
    "session",
    [
        {"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]},
        {"input_audio_noise_reduction": None, "modalities": ["text"], "include": []},
        {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "noise_reduction": None,
                    "transcription": {"model": "m", "language": "en", "prompt": ""},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.5,
                        "prefix_padding_ms": 300,
                        "silence_duration_ms": 500,
                        "create_response": True,
                        "interrupt_response": True,
                        "idle_timeout_ms": None,
                    },
                }
            },
        },
    ],
)
def test_fields_sdks_send_still_decode(session: dict[str, object]) -> None:
    """Documented fields of the transcription session objects decode (and are applied or
    accepted as harmless)."""
    event = decode_client_event(json.dumps({"type": "session.update", "session": session}))
    assert isinstance(event, ce.SessionUpdate), event
