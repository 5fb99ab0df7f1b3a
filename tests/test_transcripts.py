"""Transcript rendering: SubRip and WebVTT clocks and cues, verbose_json shape, bad formats."""

from __future__ import annotations

import msgspec
import pytest
from openai.types.audio import TranscriptionVerbose

from spear_rt.errors import CanonicalFailure
from spear_rt.transcripts import Segment, Transcript, Word, render, to_srt, to_vtt

WORDS = (Word("hello", 0.5, 0.9), Word("there", 0.9, 1.25))
TRANSCRIPT = Transcript(
    "hello there again",
    3725.5,
    (Segment(0.5, 1.25, "hello there", WORDS), Segment(3723.0, 3725.001, "again")),
)


def test_srt_numbers_cues_with_comma_milliseconds_past_an_hour() -> None:
    assert to_srt(TRANSCRIPT) == (
        "1\n00:00:00,500 --> 00:00:01,250\nhello there\n\n"
        "2\n01:02:03,000 --> 01:02:05,001\nagain\n\n"
    )


def test_vtt_has_its_header_and_dot_milliseconds() -> None:
    assert to_vtt(TRANSCRIPT) == (
        "WEBVTT\n\n"
        "00:00:00.500 --> 00:00:01.250\nhello there\n\n"
        "01:02:03.000 --> 01:02:05.001\nagain\n\n"
    )


def test_empty_segments_make_no_cue() -> None:
    silent = Transcript("", 2.0, (Segment(0.0, 2.0, ""),))
    assert to_srt(silent) == "" and to_vtt(silent) == "WEBVTT\n\n"


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("json", "application/json"),
        ("text", "text/plain"),
        ("srt", "text/plain"),
        ("vtt", "text/vtt"),
        ("verbose_json", "application/json"),
    ],
)
def test_render_picks_the_content_type_of_each_format(fmt: str, content_type: str) -> None:
    answer = render(TRANSCRIPT, {"response_format": fmt})
    assert answer.content_type.startswith(content_type)
    assert answer.usage is not None and answer.usage.audio_seconds == 3725.5


def test_verbose_json_validates_as_the_sdk_model_with_words_when_asked() -> None:
    payload = {"response_format": "verbose_json", "timestamp_granularities[]": ["word"]}
    body = render(TRANSCRIPT, payload).body
    parsed = TranscriptionVerbose.model_validate_json(body)
    assert parsed.words is not None and [w.word for w in parsed.words] == ["hello", "there"]
    assert "segments" not in msgspec.json.decode(body)
    default = TranscriptionVerbose.model_validate_json(
        render(TRANSCRIPT, {"response_format": "verbose_json"}).body
    )
    assert default.segments is not None and len(default.segments) == 2 and default.words is None


def test_an_unknown_format_names_the_choices() -> None:
    with pytest.raises(CanonicalFailure, match="json, text, srt, verbose_json, vtt"):
        render(TRANSCRIPT, {"response_format": "xml"})
