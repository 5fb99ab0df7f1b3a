"""Canonical IR: operations, capabilities, limits, envelopes and errors (msgspec Structs).

Everything that crosses a layer boundary is expressed in these types; the edge decodes into
them once and backends translate out of them. See ../shared/spec/routing.md.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec


class Operation(enum.StrEnum):
    """What a request asks a backend to do."""

    CHAT_COMPLETIONS = "chat_completions"
    EMBEDDINGS = "embeddings"
    IMAGE_GENERATION = "image_generation"
    SPEECH_TO_TEXT = "speech_to_text"
    TEXT_TO_SPEECH = "text_to_speech"
    REALTIME_VOICE = "realtime_voice"


class Transport(enum.StrEnum):
    """How a backend instance is reached."""

    HTTP = "http"
    WEBSOCKET = "websocket"
    GRPC = "grpc"
    IN_PROCESS = "in_process"  # a local engine running inside the server


class Feature(enum.StrEnum):
    """Optional capabilities an instance may declare and a request may require."""

    SUPPORTS_STREAM = "supports_stream"
    SUPPORTS_TOOLS = "supports_tools"
    SUPPORTS_JSON_SCHEMA = "supports_json_schema"
    SUPPORTS_BATCH = "supports_batch"
    SUPPORTS_DIMENSIONS = "supports_dimensions"
    SUPPORTS_IMAGE_INPUT = "supports_image_input"
    SUPPORTS_MASK = "supports_mask"
    SUPPORTS_TIMESTAMPS = "supports_timestamps"
    SUPPORTS_LANGUAGE = "supports_language"
    SUPPORTS_DIARIZATION = "supports_diarization"
    SUPPORTS_VOICES = "supports_voices"
    SUPPORTS_SSML = "supports_ssml"
    SUPPORTS_BIDI_STREAM = "supports_bidi_stream"
    SUPPORTS_AUDIO_INPUT = "supports_audio_input"
    SUPPORTS_AUDIO_OUTPUT = "supports_audio_output"


class Hosting(enum.StrEnum):
    """Where an instance runs."""

    LOCAL = "local"
    REMOTE = "remote"


class Limits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    """Per-instance limits; `None` means unlimited."""

    max_concurrency: int | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    max_audio_seconds: float | None = None
    max_session_seconds: float | None = None
    max_frame_bytes: int | None = None
    max_chars: int | None = None
    max_input_tokens: int | None = None


class ErrorCode(enum.StrEnum):
    """Canonical error codes shared by every API surface."""

    BACKEND_NOT_ENABLED = "BackendNotEnabled"
    NO_CANDIDATE_BACKEND = "NoCandidateBackend"
    MISSING_CAPABILITIES = "MissingCapabilities"
    RATE_LIMITED = "RateLimited"
    BUDGET_EXCEEDED = "BudgetExceeded"
    TIMEOUT = "Timeout"
    BACKEND_ERROR = "BackendError"
    INVALID_REQUEST = "InvalidRequest"
    UNAUTHORIZED = "Unauthorized"


class CanonicalError(msgspec.Struct, omit_defaults=True):
    """A typed error with what the caller needs to react; never carries secrets."""

    code: ErrorCode
    message: str
    retryable: bool = False
    operation: Operation | None = None
    required: dict[str, Any] | None = None
    candidates_checked: int | None = None
    rejected_reasons: dict[str, str] | None = None
    retry_after_s: float | None = None


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    """What one request consumed (reported by the backend, or estimated from the request)."""

    input_tokens: int = 0
    output_tokens: int = 0
    audio_seconds: float = 0.0
    images: int = 0
    session_minutes: float = 0.0
    characters: int = 0


class RequestRequirements(msgspec.Struct, omit_defaults=True):
    """What the caller needs from a backend instance."""

    required_features: frozenset[Feature] = frozenset()
    required_transports: frozenset[Transport] = frozenset()
    preferred_backends: tuple[str, ...] = ()


class RoutingHints(msgspec.Struct, omit_defaults=True):
    """Caller-side routing wishes; they only ever narrow the host's config."""

    backend: str | None = None
    model: str | None = None
    allowlist: tuple[str, ...] | None = None
    denylist: tuple[str, ...] = ()
    hash_key: str | None = None


class RequestMeta(msgspec.Struct, omit_defaults=True):
    """Trace information carried with a request."""

    trace_id: str | None = None
    created_at_ms: int | None = None
    client_key_id: str | None = None


class CanonicalRequestEnvelope(msgspec.Struct, omit_defaults=True):
    """One normalized request (or realtime session open), whatever edge it came from."""

    request_id: str
    operation: Operation
    version: Literal[1] = 1
    task_id: str | None = None
    meta: RequestMeta = msgspec.field(default_factory=RequestMeta)
    routing: RoutingHints = msgspec.field(default_factory=RoutingHints)
    requirements: RequestRequirements = msgspec.field(default_factory=RequestRequirements)
    policy: str | None = None
    timeout_ms: int | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class BackendRef(msgspec.Struct, omit_defaults=True):
    """Which instance served a request, and how."""

    name: str
    kind: str
    latency_ms: float | None = None
    attempts: int = 1


class CanonicalResponseEnvelope(msgspec.Struct, omit_defaults=True):
    """The answer to a canonical request: a result payload or a canonical error."""

    request_id: str
    operation: Operation
    backend: BackendRef | None = None
    result: dict[str, Any] | None = None
    error: CanonicalError | None = None
    version: Literal[1] = 1
