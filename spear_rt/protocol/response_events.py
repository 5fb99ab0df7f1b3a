"""Server -> client events of conversations: responses, their parts and item operations.

Where the dialects name an event differently there is one class per name (GA first, beta
`...Beta`) over a shared shape; `ResponseNames` picks them for a dialect. Payload objects
(`response`, `item`, `part`) are plain dicts built by `session/conversation_items.py`, so the
wire shape is in one place.
"""

from __future__ import annotations

from typing import Any

import msgspec

from spear_rt.protocol.server_events import ItemAdded, ItemCreated, ServerEvent


class ResponseCreated(ServerEvent, tag="response.created"):
    """A response started (status in_progress)."""

    response: dict[str, Any]


class ResponseDone(ServerEvent, tag="response.done"):
    """A response ended: completed, cancelled, incomplete or failed (exactly once)."""

    response: dict[str, Any]


class OutputItemAdded(ServerEvent, tag="response.output_item.added"):
    """An output item of a response opened."""

    response_id: str
    output_index: int
    item: dict[str, Any]


class OutputItemDone(ServerEvent, tag="response.output_item.done"):
    """An output item of a response is final."""

    response_id: str
    output_index: int
    item: dict[str, Any]


class ContentPartAdded(ServerEvent, tag="response.content_part.added"):
    """A content part of an output item opened."""

    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: dict[str, Any]


class ContentPartDone(ServerEvent, tag="response.content_part.done"):
    """A content part is final."""

    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: dict[str, Any]


class _PartDelta(ServerEvent, kw_only=True):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class TextDelta(_PartDelta, tag="response.output_text.delta"):
    """GA: output text."""


class TextDeltaBeta(_PartDelta, tag="response.text.delta"):
    """Beta: output text."""


class AudioTranscriptDelta(_PartDelta, tag="response.output_audio_transcript.delta"):
    """GA: the transcript of output audio (the assistant's words, as they come)."""


class AudioTranscriptDeltaBeta(_PartDelta, tag="response.audio_transcript.delta"):
    """Beta: the transcript of output audio."""


class AudioDelta(_PartDelta, tag="response.output_audio.delta"):
    """GA: base64 output audio in the session's output format."""


class AudioDeltaBeta(_PartDelta, tag="response.audio.delta"):
    """Beta: base64 output audio."""


class _PartEnd(ServerEvent, kw_only=True):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class TextDone(_PartEnd, tag="response.output_text.done"):
    """GA: the whole output text."""

    text: str


class TextDoneBeta(_PartEnd, tag="response.text.done"):
    """Beta: the whole output text."""

    text: str


class AudioTranscriptDone(_PartEnd, tag="response.output_audio_transcript.done"):
    """GA: the whole transcript of the output audio."""

    transcript: str


class AudioTranscriptDoneBeta(_PartEnd, tag="response.audio_transcript.done"):
    """Beta: the whole transcript of the output audio."""

    transcript: str


class AudioDone(_PartEnd, tag="response.output_audio.done"):
    """GA: the output audio is complete."""


class AudioDoneBeta(_PartEnd, tag="response.audio.done"):
    """Beta: the output audio is complete."""


class FunctionCallArgumentsDelta(ServerEvent, tag="response.function_call_arguments.delta"):
    """Arguments of a function call, as the model writes them."""

    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class FunctionCallArgumentsDone(ServerEvent, tag="response.function_call_arguments.done"):
    """The whole arguments of a function call."""

    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class ItemRetrieved(ServerEvent, tag="conversation.item.retrieved"):
    """Answer to conversation.item.retrieve."""

    item: dict[str, Any]


class ItemDeleted(ServerEvent, tag="conversation.item.deleted"):
    """Answer to conversation.item.delete."""

    item_id: str


class ItemTruncated(ServerEvent, tag="conversation.item.truncated"):
    """Answer to conversation.item.truncate: audio and transcript cut to `audio_end_ms`."""

    item_id: str
    content_index: int
    audio_end_ms: int


class ResponseNames(msgspec.Struct, frozen=True):
    """The event classes one dialect uses where the dialects differ."""

    text_delta: type[_PartDelta]
    text_done: type[TextDone] | type[TextDoneBeta]
    transcript_delta: type[_PartDelta]
    transcript_done: type[AudioTranscriptDone] | type[AudioTranscriptDoneBeta]
    audio_delta: type[_PartDelta]
    audio_done: type[_PartEnd]
    item_added: type[ItemAdded] | type[ItemCreated]
    ga: bool


GA_NAMES = ResponseNames(
    TextDelta, TextDone, AudioTranscriptDelta, AudioTranscriptDone, AudioDelta, AudioDone,
    ItemAdded, ga=True,
)  # fmt: skip
BETA_NAMES = ResponseNames(
    TextDeltaBeta, TextDoneBeta, AudioTranscriptDeltaBeta, AudioTranscriptDoneBeta,
    AudioDeltaBeta, AudioDoneBeta, ItemCreated, ga=False,
)  # fmt: skip

DELTA_EVENTS = (
    TextDelta,
    TextDeltaBeta,
    AudioTranscriptDelta,
    AudioTranscriptDeltaBeta,
    AudioDelta,
    AudioDeltaBeta,
    FunctionCallArgumentsDelta,
)
