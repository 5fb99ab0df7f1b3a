"""decode_client_event: every event type decodes; each bad input is a named ProtocolError."""

from __future__ import annotations

import json

import pytest

from spear_rt.protocol import client_events as ce
from spear_rt.protocol.client_events import ProtocolError, decode_client_event


@pytest.mark.parametrize(
    ("raw", "cls"),
    [
        ({"type": "session.update", "session": {}}, ce.SessionUpdate),
        ({"type": "transcription_session.update", "session": {}}, ce.TranscriptionSessionUpdate),
        ({"type": "input_audio_buffer.append", "audio": "AAA="}, ce.InputAudioBufferAppend),
        ({"type": "input_audio_buffer.commit"}, ce.InputAudioBufferCommit),
        ({"type": "input_audio_buffer.clear"}, ce.InputAudioBufferClear),
        (
            {"type": "conversation.item.create", "item": {"type": "message"}},
            ce.ConversationItemCreate,
        ),
        ({"type": "response.create"}, ce.ResponseCreate),
        ({"type": "response.cancel"}, ce.ResponseCancel),
        ({"type": "spear.metrics.request"}, ce.SpearMetricsRequest),
    ],
)
def test_each_known_event_type_decodes(raw: dict[str, object], cls: type) -> None:
    """Every supported type decodes to its Struct, with its event_id."""
    event = decode_client_event(json.dumps({**raw, "event_id": "e1"}))
    assert isinstance(event, cls)
    assert event.event_id == "e1"


def test_append_audio_is_base64_decoded_to_bytes() -> None:
    """input_audio_buffer.append carries bytes once decoded."""
    event = decode_client_event(b'{"type": "input_audio_buffer.append", "audio": "AAH/fw=="}')
    assert isinstance(event, ce.InputAudioBufferAppend)
    assert event.audio == b"\x00\x01\xff\x7f"


def test_unknown_event_fields_are_ignored() -> None:
    """Unknown fields of the event itself, and documented session options we do not apply
    (include, noise_reduction: null), do not break decoding (unknown *session* fields are
    refused: tests/protocol/test_hostile_events.py)."""
    event = decode_client_event(
        json.dumps(
            {
                "type": "session.update",
                "whatever": 1,
                "session": {
                    "type": "transcription",
                    "include": ["item.input_audio_transcription.logprobs"],
                    "audio": {"input": {"noise_reduction": None}},
                },
            }
        )
    )
    assert isinstance(event, ce.SessionUpdate)
    assert event.session.type == "transcription"


def test_ga_session_update_fields_decode() -> None:
    """GA audio.input.format / turn_detection: null decode into the wire Structs."""
    event = decode_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": None,
                        }
                    },
                },
            }
        )
    )
    assert isinstance(event, ce.SessionUpdate)
    audio_in = event.session.audio.input  # type: ignore[union-attr]
    assert audio_in.format == ce.GaAudioFormat(type="audio/pcm", rate=24000)  # type: ignore[union-attr]
    assert audio_in.turn_detection is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "code", "event_id", "param"),
    [
        (b"{not json", "invalid_json", None, None),
        (b"\xff\xfe\x00", "invalid_json", None, None),
        (b"", "invalid_json", None, None),
        (b"[1, 2]", "invalid_event", None, None),
        (b'"input_audio_buffer.commit"', "invalid_event", None, None),
        (b'{"event_id": "e1"}', "missing_type", "e1", "type"),
        (b'{"type": "no.such.event", "event_id": "e2"}', "unknown_event_type", "e2", "type"),
        (b'{"type": 5, "event_id": "e3"}', "unknown_event_type", "e3", "type"),
        (
            b'{"type": "input_audio_buffer.append", "event_id": "e4", "audio": 5}',
            "invalid_value",
            "e4",
            "audio",
        ),
        (
            b'{"type": "input_audio_buffer.append", "event_id": "e5", "audio": "!!!!"}',
            "invalid_value",
            "e5",
            "audio",
        ),
        (
            b'{"type": "input_audio_buffer.append", "event_id": "e6", "audio": "AAA"}',
            "invalid_value",
            "e6",
            "audio",
        ),
        (
            b'{"type": "session.update", "event_id": "e7", "session": 5}',
            "invalid_value",
            "e7",
            "session",
        ),
        (
            b'{"type": "session.update", "event_id": "e8", "session": {"turn_detection": "x"}}',
            "invalid_value",
            "e8",
            "session.turn_detection",
        ),
        (
            b'{"type": "session.update", "event_id": "e9", '
            b'"session": {"audio": {"input": {"format": {}}}}}',
            "invalid_value",
            "e9",
            "session.audio.input.format",
        ),
        (
            b'{"type": "input_audio_buffer.commit", "event_id": 7}',
            "invalid_value",
            None,
            "event_id",
        ),
    ],
)
def test_bad_input_is_a_protocol_error(
    raw: bytes, code: str, event_id: str | None, param: str | None
) -> None:
    """Malformed JSON, unknown/missing type, mistyped fields, bad base64: code, event_id, param."""
    error = decode_client_event(raw)
    assert isinstance(error, ProtocolError)
    assert (error.code, error.event_id, error.param) == (code, event_id, param)
    assert error.message


def test_unknown_type_error_lists_the_supported_types() -> None:
    """The message for an unknown type names what is supported."""
    error = decode_client_event(b'{"type": "response.nope"}')
    assert isinstance(error, ProtocolError)
    for name in ce.KNOWN_TYPES:
        assert name in error.message


def test_text_and_bytes_input_decode_alike() -> None:
    """A str frame and its UTF-8 bytes give the same event."""
    text = '{"type": "input_audio_buffer.commit", "event_id": "é"}'
    assert decode_client_event(text) == decode_client_event(text.encode())
