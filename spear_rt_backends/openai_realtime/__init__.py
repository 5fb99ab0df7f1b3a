"""The `openai_realtime` backend kind: an OpenAI-Realtime-compatible WebSocket upstream.

URL: built the way the official `openai` client builds it from `base_url`: http -> ws,
https -> wss, `/realtime` appended to the path (any query of `base_url` kept), then
`intent=transcription` (preceded by `model=` when the option `query_model` is set, for
proxies that route on it). The key goes only into `Authorization: Bearer`; it is never
logged (websockets' header logging is kept off) and redacted from every message built here.

Dialect (option `dialect`, "ga" by default): "beta" sends `OpenAI-Beta: realtime=v1` and
`transcription_session.update`; "ga" sends `session.update` with `session.type =
"transcription"` and `audio.input.format {type: audio/pcm, rate: 24000}`. Both turn server
VAD off (`turn_detection: null`): spear_rt detects turns and commits itself. Events of
either dialect are understood whichever was asked.

Commands -> upstream: `BeginTurn` is local (it names the turn live deltas belong to);
`AppendAudio` -> `input_audio_buffer.append`; `Commit` -> `input_audio_buffer.commit`,
and the item id of the upstream's `committed` is mapped to ours; `Clear` ->
`input_audio_buffer.clear`. Upstream transcription delta/completed/failed come back under
OUR item id; a delta for an item id not seen yet belongs to the oldest commit still
waiting for its id, else to the open turn. An `error` event answering one of our commits
fails that item (`TranscriptFailed`); any other `error` ends the upstream.

Failures: `receive()` first returns every event that arrived, then raises
`BackendFailure`. retryable=True: the connection dropped, the upstream closed it (except
with a policy/protocol code), it stopped answering pings, a write failed, the opening
timed out, the handshake got 408/429/5xx, or an `error` of type `server_error` /
`session_expired`. retryable=False: handshake 401/403/other 4xx, non-JSON or binary
frames, protocol violations, other `error` events. `send` raises the same failure.

Reconnect (the session's job; this upstream is one connection and keeps no audio): open a
NEW `open_transcription` (it sends the session config itself), drain the old `receive()`
to its failure first, then replay, in order, for every turn whose `TranscriptCompleted` /
`TranscriptFailed` has not arrived: `BeginTurn(id)`, all of that turn's audio from its
start, and `Commit(id)` if it had been committed (the open turn: no commit). Deltas of a
replayed item start again from its beginning: skip the text already forwarded.

Options (all optional): dialect, query_model (false), connect_timeout_s (10: TCP, TLS,
handshake and `*.created`), close_timeout_s (2), ping_interval_s (20; 0 = no keepalive),
ping_timeout_s (20), max_send_buffer_bytes (262144), max_pending_events (256),
max_message_bytes (1 MiB), verify_tls (true), transcription_model ("whisper-1").

Speech-to-speech: an instance that declares the feature `supports_audio_output` holds whole
conversations (`open_conversation`: `?model=M`, session type realtime, see
`conversation.py`); the session relays its conversation through it and restores it after a
reconnect.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from spear_rt.backend import (
    InstanceDefaults,
    InstanceInfo,
    OneShotRequest,
    OneShotResponse,
    TranscriptionSpec,
    TranscriptionUpstream,
)
from spear_rt.errors import BackendFailure
from spear_rt.ir import Feature, Hosting, Operation, Transport

from .connection import FRAME_OVERHEAD, READ_SIZE, RealtimeTranscription, UpstreamStatistics
from .opening import open_realtime_conversation, open_realtime_transcription
from .options import PositiveFloat, PositiveInt, RealtimeOptions, parse_options, realtime_url
from .translate import (
    MAX_MESSAGE_CHARS,
    RATE_HZ,
    UPDATE_EVENT_ID,
    BytesLike,
    Translator,
    session_update,
)

__all__ = [
    "FRAME_OVERHEAD",
    "KIND",
    "MAX_MESSAGE_CHARS",
    "RATE_HZ",
    "READ_SIZE",
    "UPDATE_EVENT_ID",
    "BytesLike",
    "OpenAIRealtimeKind",
    "PositiveFloat",
    "PositiveInt",
    "RealtimeOptions",
    "RealtimeTranscription",
    "Translator",
    "UpstreamStatistics",
    "open_realtime_conversation",
    "open_realtime_transcription",
    "parse_options",
    "realtime_url",
    "session_update",
]


class OpenAIRealtimeKind:
    """The `openai_realtime` backend kind (realtime transcription over WebSocket)."""

    name = "openai_realtime"
    extra = None  # websockets is a core dependency
    defaults = InstanceDefaults(
        ops=frozenset({Operation.SPEECH_TO_TEXT, Operation.REALTIME_VOICE}),
        features=frozenset(
            {
                Feature.SUPPORTS_STREAM,
                Feature.SUPPORTS_BIDI_STREAM,
                Feature.SUPPORTS_AUDIO_INPUT,
                Feature.SUPPORTS_LANGUAGE,
            }
        ),
        transports=frozenset({Transport.WEBSOCKET}),
        hosting=Hosting.REMOTE,
    )

    def unavailable_reason(self, instance: InstanceInfo) -> str | None:
        """An instance needs a base_url (http(s) or ws(s)) and valid options."""
        if not instance.base_url:
            return "openai_realtime needs base_url (e.g. https://api.openai.com/v1)"
        try:
            parse_options(instance)
            realtime_url(instance.base_url, {})
        except BackendFailure as exc:
            return str(exc)
        return None

    def open_transcription(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Open one upstream connection for a realtime transcription session."""
        return open_realtime_transcription(instance, spec)

    def open_conversation(
        self, instance: InstanceInfo, spec: TranscriptionSpec
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """Open one speech-to-speech connection (instances declaring supports_audio_output)."""
        return open_realtime_conversation(instance, spec)

    async def call(self, instance: InstanceInfo, request: OneShotRequest) -> OneShotResponse:
        """One-shot operations are not served over the realtime WebSocket."""
        raise BackendFailure("openai_realtime serves realtime sessions only")


KIND = OpenAIRealtimeKind()
