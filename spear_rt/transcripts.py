"""A one-shot transcript with timings, rendered in OpenAI's `response_format`s.

Local backends (pocketsphinx, the stub) build one `Transcript` (segments of words with start
and end times in seconds) and answer with `render`:

* ``json``: ``{"text": ...}``;  ``text``: the plain text (text/plain);
* ``verbose_json``: task, language, duration, text, ``segments`` (unless only word
  granularity was asked) and ``words`` (when ``timestamp_granularities`` has ``word``);
* ``srt``: SubRip cues, one per segment (text/plain, as OpenAI sends it);
* ``vtt``: WebVTT cues, one per segment (text/vtt).
"""

from __future__ import annotations

from typing import Any

import msgspec

from spear_rt.backend import OneShotResponse
from spear_rt.errors import CanonicalFailure, echo
from spear_rt.ir import ErrorCode, Usage

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TIMED_FORMATS = frozenset({"srt", "verbose_json", "vtt"})  # need segment timings

_json = msgspec.json.Encoder()


class Word(msgspec.Struct, frozen=True):
    """One recognized word and where it lies in the audio (seconds)."""

    word: str
    start: float
    end: float


class Segment(msgspec.Struct, frozen=True):
    """A stretch of speech (seconds) and its words."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


class Transcript(msgspec.Struct, frozen=True):
    """The whole transcription of one file."""

    text: str
    duration: float
    segments: tuple[Segment, ...] = ()
    language: str = "english"


def _invalid(message: str) -> CanonicalFailure:
    return CanonicalFailure.of(ErrorCode.INVALID_REQUEST, message)


def response_format(payload: dict[str, Any]) -> str:
    """The request's `response_format` (default json), or InvalidRequest naming the choices."""
    value = payload.get("response_format") or "json"
    if value not in RESPONSE_FORMATS:
        raise _invalid(
            f"`response_format` must be one of {', '.join(RESPONSE_FORMATS)}, got {echo(value)}"
        )
    return str(value)


def granularities(payload: dict[str, Any]) -> set[str]:
    """`timestamp_granularities[]`: 'word' and/or 'segment' (default segment)."""
    value = payload.get("timestamp_granularities[]", payload.get("timestamp_granularities"))
    if value is None:
        return {"segment"}
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(v in ("word", "segment") for v in values):
        raise _invalid("`timestamp_granularities` must list 'word' and/or 'segment'")
    return set(values)


def _clock(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues `HH:MM:SS,mmm --> HH:MM:SS,mmm`, one per non-empty segment."""
    cues = [s for s in transcript.segments if s.text]
    return "".join(
        f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
        for n, s in enumerate(cues, 1)
    )


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: the `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = [s for s in transcript.segments if s.text]
    return "WEBVTT\n\n" + "".join(
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in cues
    )


def to_verbose_json(transcript: Transcript, wanted: set[str]) -> dict[str, Any]:
    """OpenAI's `verbose_json` transcription object."""
    answer: dict[str, Any] = {
        "task": "transcribe",
        "language": transcript.language,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
    }
    if "segment" in wanted:
        answer["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.0,
            }
            for i, s in enumerate(transcript.segments)
        ]
    if "word" in wanted:
        answer["words"] = [
            {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in transcript.segments
            for w in s.words
        ]
    return answer


def render(transcript: Transcript, payload: dict[str, Any]) -> OneShotResponse:
    """The answer in the request's `response_format` (usage: the audio's duration)."""
    fmt = response_format(payload)
    usage = Usage(audio_seconds=transcript.duration)
    if fmt == "json":
        return OneShotResponse(body=_json.encode({"text": transcript.text}), usage=usage)
    if fmt == "verbose_json":
        body = _json.encode(to_verbose_json(transcript, granularities(payload)))
        return OneShotResponse(body=body, usage=usage)
    if fmt == "srt":
        return OneShotResponse(
            "text/plain; charset=utf-8", to_srt(transcript).encode(), usage=usage
        )
    if fmt == "vtt":
        return OneShotResponse("text/vtt; charset=utf-8", to_vtt(transcript).encode(), usage=usage)
    return OneShotResponse(
        "text/plain; charset=utf-8", (transcript.text + "\n").encode(), usage=usage
    )


__all__ = [
    "RESPONSE_FORMATS",
    "TIMED_FORMATS",
    "Segment",
    "Transcript",
    "Word",
    "granularities",
    "render",
    "response_format",
    "to_srt",
    "to_verbose_json",
    "to_vtt",
]
