"""apply_update / render_session: both dialects fold into one settings form and render back."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import pytest

from spear_rt.audio import AudioFormat, InputFormat, VadConfig, silero
from spear_rt.protocol.client_events import SessionWire
from spear_rt.protocol.settings import (
    Dialect,
    SessionKind,
    SessionSettings,
    SettingsError,
    TranscriptionSettings,
    apply_update,
    render_session,
)

DEFAULT = SessionSettings()


def wire(session: dict[str, Any]) -> SessionWire:
    return msgspec.convert(session, SessionWire)


def update(session: dict[str, Any], current: SessionSettings = DEFAULT) -> SessionSettings:
    return apply_update(current, wire(session))


def test_empty_update_changes_nothing() -> None:
    """Fields not mentioned keep their value."""
    assert update({}) == DEFAULT


def test_beta_format_names() -> None:
    """Beta strings: pcm16 is 24 kHz, G.711 is 8 kHz."""
    assert update({"input_audio_format": "pcm16"}).input_format == InputFormat(
        AudioFormat.PCM16, 24000
    )
    assert update({"input_audio_format": "g711_ulaw"}).input_format == InputFormat(
        AudioFormat.G711_ULAW, 8000
    )
    assert update({"input_audio_format": "g711_alaw"}).input_format == InputFormat(
        AudioFormat.G711_ALAW, 8000
    )


def test_ga_format_objects() -> None:
    """GA objects: audio/pcm with a rate, audio/pcmu and audio/pcma at 8 kHz."""

    def fmt(obj: dict[str, Any]) -> InputFormat:
        return update({"audio": {"input": {"format": obj}}}).input_format

    assert fmt({"type": "audio/pcm", "rate": 24000}) == InputFormat(AudioFormat.PCM16, 24000)
    assert fmt({"type": "audio/pcm", "rate": 16000}) == InputFormat(AudioFormat.PCM16, 16000)
    assert fmt({"type": "audio/pcm"}) == InputFormat(AudioFormat.PCM16, 24000)
    assert fmt({"type": "audio/pcmu"}) == InputFormat(AudioFormat.G711_ULAW, 8000)
    assert fmt({"type": "audio/pcma"}) == InputFormat(AudioFormat.G711_ALAW, 8000)


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"input_audio_format": "mp3"}, "session.input_audio_format"),
        ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
        (
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 1}}}},
            "session.audio.input.format",
        ),
        (
            {"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 24000}}}},
            "session.audio.input.format",
        ),
        ({"turn_detection": {"type": "magic_vad"}}, "session.turn_detection.type"),
        (
            {"turn_detection": {"spear": {"detector": "webrtc"}}},
            "session.turn_detection.spear.detector",
        ),
        (
            {"audio": {"input": {"turn_detection": {"spear": {"detector": "vad"}}}}},
            "session.audio.input.turn_detection.spear.detector",
        ),
        (
            {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}},
            "session.turn_detection.eagerness",
        ),
        (
            {"turn_detection": {"type": "semantic_vad", "silence_duration_ms": 200}},
            "session.turn_detection.silence_duration_ms",
        ),
        (
            {"turn_detection": {"type": "semantic_vad", "spear": {"detector": "energy"}}},
            "session.turn_detection.spear.detector",
        ),
        ({"turn_detection": {"threshold": 1.5}}, "session.turn_detection.threshold"),
        ({"turn_detection": {"prefix_padding_ms": -1}}, "session.turn_detection.prefix_padding_ms"),
        (
            {"turn_detection": {"silence_duration_ms": 60_000}},
            "session.turn_detection.silence_duration_ms",
        ),
        (
            {"audio": {"input": {"turn_detection": {"threshold": -0.1}}}},
            "session.audio.input.turn_detection.threshold",
        ),
        ({"type": "conversation"}, "session.type"),
        ({"type": "realtime"}, "session.type"),
    ],
)
def test_bad_values_raise_settings_error_naming_the_param(
    session: dict[str, Any], param: str
) -> None:
    """Every refused value says which field it was."""
    with pytest.raises(SettingsError) as info:
        update(session)
    assert info.value.param == param


def test_null_turn_detection_means_manual_commit_and_an_object_restores_vad() -> None:
    """turn_detection: null clears VAD; a later object re-enables it with defaults filled in."""
    manual = update({"turn_detection": None})
    assert manual.turn_detection is None
    vad = update({"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}, manual)
    assert vad.turn_detection == VadConfig(silence_duration_ms=300)


def test_partial_vad_update_keeps_the_other_vad_fields() -> None:
    """Only the named VAD fields change."""
    tuned = update({"turn_detection": {"threshold": 0.8, "prefix_padding_ms": 100}})
    again = update({"audio": {"input": {"turn_detection": {"silence_duration_ms": 900}}}}, tuned)
    assert again.turn_detection == VadConfig(
        threshold=0.8, prefix_padding_ms=100, silence_duration_ms=900
    )


def test_transcription_settings_merge_and_null_resets() -> None:
    """Transcription fields merge; an explicit null resets them."""
    first = update({"input_audio_transcription": {"model": "m1", "language": "en"}})
    second = update({"audio": {"input": {"transcription": {"prompt": "p"}}}}, first)
    assert second.transcription == TranscriptionSettings(model="m1", language="en", prompt="p")
    assert (
        update({"input_audio_transcription": None}, second).transcription == TranscriptionSettings()
    )


def test_session_type_equal_to_the_current_kind_is_accepted() -> None:
    """GA clients repeat session.type on every update; the same type is fine."""
    assert update({"type": "transcription"}) == DEFAULT
    realtime = SessionSettings(kind=SessionKind.REALTIME)
    assert update({"type": "realtime"}, realtime) == realtime


def test_render_ga() -> None:
    """GA rendering: type, audio.input.{format, transcription, turn_detection}."""
    settings = update(
        {"audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}}
    )
    session = render_session(settings, Dialect.GA, "sess_1")
    assert session["type"] == "transcription"
    assert session["id"] == "sess_1"
    assert session["audio"]["input"] == {
        "format": {"type": "audio/pcmu"},
        "transcription": {"model": None, "language": None, "prompt": None},
        "turn_detection": None,
    }


def test_render_beta() -> None:
    """Beta rendering: input_audio_format string and the VAD object with every field."""
    session = render_session(DEFAULT, Dialect.BETA, "sess_1")
    assert session["input_audio_format"] == "pcm16"
    assert session["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
    }
    assert "model" not in session  # transcription sessions have no conversation model


def test_render_beta_pcm_at_a_rate_beta_cannot_name_falls_back_to_the_ga_object() -> None:
    """pcm16 at 16 kHz has no beta name: the GA object is shown rather than a lie."""
    settings = update({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}})
    session = render_session(settings, Dialect.BETA, "s")
    assert session["input_audio_format"] == {"type": "audio/pcm", "rate": 16000}


def test_render_round_trips_through_apply_update() -> None:
    """What render_session shows, fed back as an update, gives the same settings."""
    settings = update(
        {
            "input_audio_format": "g711_alaw",
            "turn_detection": {"threshold": 0.3},
            "input_audio_transcription": {"language": "de"},
        }
    )
    for dialect in Dialect:
        shown = render_session(settings, dialect, "s")
        shown.pop("object"), shown.pop("id")
        assert update(shown) == settings


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"instructions": "be nice"}, "session.instructions"),
        ({"voice": "alloy"}, "session.voice"),
        ({"tools": []}, "session.tools"),
        ({"output_modalities": ["audio"]}, "session.output_modalities"),
        ({"audio": {"output": {"voice": "alloy"}}}, "session.audio.output"),
    ],
)
def test_transcription_sessions_refuse_conversation_fields(
    session: dict[str, Any], param: str
) -> None:
    """A transcription session answers nothing: conversation fields are unknown_parameter."""
    with pytest.raises(SettingsError) as refused:
        update(session)
    assert (refused.value.param, refused.value.code) == (param, "unknown_parameter")


def test_conversation_fields_apply_in_both_dialects() -> None:
    """Beta and GA names of the same conversation settings fold into one form."""
    realtime = SessionSettings(kind=SessionKind.REALTIME)
    beta = update(
        {
            "instructions": "Be brief.",
            "voice": "echo",
            "modalities": ["text"],
            "output_audio_format": "g711_ulaw",
            "max_response_output_tokens": 99,
            "turn_detection": {"type": "server_vad", "create_response": False},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        },
        realtime,
    )
    ga = update(
        {
            "instructions": "Be brief.",
            "output_modalities": ["text"],
            "audio": {
                "output": {"voice": "echo", "format": {"type": "audio/pcmu"}},
                "input": {"turn_detection": {"type": "server_vad", "create_response": False}},
            },
            "max_output_tokens": 99,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        },
        realtime,
    )
    assert beta.conversation == ga.conversation
    conv = ga.conversation
    assert (conv.instructions, conv.voice, conv.output_modalities) == (
        "Be brief.",
        "echo",
        ("text",),
    )
    assert conv.output_format.format is AudioFormat.G711_ULAW
    assert (conv.max_output_tokens, conv.create_response, conv.interrupt_response) == (
        99,
        False,
        True,
    )
    assert conv.tools[0]["name"] == "f"


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"output_modalities": ["video"]}, "session.output_modalities"),
        (
            {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            "session.audio.output.format",
        ),
        ({"tools": [{"type": "mcp", "name": "x"}]}, "session.tools[0].type"),
        ({"temperature": 3.0}, "session.temperature"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"tool_choice": "sometimes"}, "session.tool_choice"),
    ],
)
def test_conversation_settings_refuse_what_cannot_be_honoured(
    session: dict[str, Any], param: str
) -> None:
    """Bad conversation settings: invalid_value naming the field."""
    with pytest.raises(SettingsError) as refused:
        update(session, SessionSettings(kind=SessionKind.REALTIME))
    assert (refused.value.param, refused.value.code) == (param, "invalid_value")


# --- turn detection: which detector ---------------------------------------------------------


def test_server_vad_takes_the_silero_detector_from_its_spear_object() -> None:
    """spear.detector picks the detector; the rest of server_vad keeps OpenAI's meaning."""
    settings = update(
        {
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.6,
                "spear": {"detector": "silero"},
            }
        }
    )
    assert settings.turn_detection == VadConfig(threshold=0.6, detector="silero")
    again = update({"turn_detection": {"silence_duration_ms": 700}}, settings)
    assert again.turn_detection == VadConfig(
        threshold=0.6, silence_duration_ms=700, detector="silero"
    )
    back = update({"turn_detection": {"spear": {"detector": "energy"}}}, again)
    assert back.turn_detection is not None and back.turn_detection.detector == "energy"


@pytest.mark.parametrize(
    ("eagerness", "silence_ms"),
    [(None, 500), ("auto", 500), ("medium", 500), ("low", 1000), ("high", 250)],
)
def test_semantic_vad_is_silero_with_a_silence_that_follows_eagerness(
    eagerness: str | None, silence_ms: int
) -> None:
    td: dict[str, Any] = {"type": "semantic_vad"}
    if eagerness is not None:
        td["eagerness"] = eagerness
    for session in ({"turn_detection": td}, {"audio": {"input": {"turn_detection": td}}}):
        turn = update(session).turn_detection
        assert turn == VadConfig(
            silence_duration_ms=silence_ms, detector="silero", eagerness=eagerness or "auto"
        )


def test_a_change_of_turn_detection_type_starts_from_that_types_defaults() -> None:
    tuned = update({"turn_detection": {"threshold": 0.8, "silence_duration_ms": 900}})
    semantic = update({"turn_detection": {"type": "semantic_vad", "eagerness": "low"}}, tuned)
    assert semantic.turn_detection == VadConfig(
        silence_duration_ms=1000, detector="silero", eagerness="low"
    )
    assert update({"turn_detection": {"type": "semantic_vad"}}, semantic) == semantic
    plain = update({"turn_detection": {"type": "server_vad"}}, semantic)
    assert plain.turn_detection == VadConfig()


@pytest.mark.parametrize("dialect", list(Dialect))
def test_render_shows_the_detector_choice(dialect: Dialect) -> None:
    """semantic_vad is shown as such (OpenAI's shape); server_vad names a non-default
    detector in its spear object; the energy default looks as it always did."""

    def shown(session: dict[str, Any]) -> dict[str, Any]:
        rendered = render_session(update(session), dialect, "s")
        if dialect is Dialect.GA:
            return rendered["audio"]["input"]["turn_detection"]  # type: ignore[no-any-return]
        return rendered["turn_detection"]  # type: ignore[no-any-return]

    assert shown({"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}) == {
        "type": "semantic_vad",
        "eagerness": "high",
    }
    silero_vad = shown({"turn_detection": {"spear": {"detector": "silero"}}})
    assert silero_vad["type"] == "server_vad" and silero_vad["spear"] == {"detector": "silero"}
    assert "spear" not in shown({"turn_detection": {"threshold": 0.4}})


@pytest.mark.parametrize(
    "td",
    [
        {"type": "semantic_vad", "eagerness": "low"},
        {"type": "server_vad", "silence_duration_ms": 800, "spear": {"detector": "silero"}},
    ],
)
def test_render_of_a_detector_choice_round_trips(td: dict[str, Any]) -> None:
    settings = update({"turn_detection": td})
    for dialect in Dialect:
        shown = render_session(settings, dialect, "s")
        shown.pop("object"), shown.pop("id")
        assert update(shown) == settings


@pytest.mark.parametrize(
    ("td", "param"),
    [
        (
            {"type": "server_vad", "spear": {"detector": "silero"}},
            "session.turn_detection.spear.detector",
        ),
        ({"type": "semantic_vad"}, "session.turn_detection.type"),
    ],
)
def test_silero_unavailable_is_refused_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, td: dict[str, Any], param: str
) -> None:
    """Without onnxruntime, choosing silero is an invalid_value naming the field and the extra."""
    monkeypatch.setattr(silero, "_session", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(SettingsError) as refused:
        update({"turn_detection": td})
    assert (refused.value.param, refused.value.code) == (param, "invalid_value")
    assert "pip install 'spear-rt[whisper]'" in str(refused.value)
    assert update({"turn_detection": {"type": "server_vad"}}).turn_detection == VadConfig()
