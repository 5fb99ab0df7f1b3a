"""Normalize: OpenAI-shaped one-shot requests -> canonical envelopes (validation, no I/O).

The JSON body is decoded once into builtins; a per-operation `Head` Struct validates only the
fields spear_rt itself needs (model, stream, the inputs) and derives the features the request
requires (a request with `tools` needs `supports_tools`, ...). Everything else passes through
untouched, so a pass-through backend can forward the client's bytes as they came.
"""

from __future__ import annotations

from typing import Any

import msgspec

from spear_rt.audio import AudioFormatError
from spear_rt.audio.files import AudioLimitError, AudioLimits, decode_audio_bytes
from spear_rt.backend import AudioInput, OneShotRequest
from spear_rt.ir import (
    CanonicalRequestEnvelope,
    Feature,
    Operation,
    RequestMeta,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.transcripts import TIMED_FORMATS


class InvalidInput(ValueError):
    """The request is malformed; `param` names the field when known."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ChatHead(msgspec.Struct):
    """What spear_rt reads of a chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingsHead(msgspec.Struct):
    """What spear_rt reads of an embeddings request."""

    model: str
    # text, texts, tokens or token lists (msgspec allows one array-like type per union)
    input: str | list[str | int | list[int]]
    dimensions: int | None = None


class SpeechHead(msgspec.Struct):
    """What spear_rt reads of a text-to-speech request."""

    model: str
    input: str
    voice: str | None = None
    response_format: str = "mp3"


class ImageHead(msgspec.Struct):
    """What spear_rt reads of an image generation request."""

    prompt: str
    model: str | None = None
    n: int = 1


HEADS: dict[Operation, type[msgspec.Struct]] = {
    Operation.CHAT_COMPLETIONS: ChatHead,
    Operation.EMBEDDINGS: EmbeddingsHead,
    Operation.TEXT_TO_SPEECH: SpeechHead,
    Operation.IMAGE_GENERATION: ImageHead,
}

TRANSCRIPTION_FIELDS = ("model", "language", "prompt", "response_format", "temperature")
GRANULARITIES = "timestamp_granularities[]"


def _msgspec_error(exc: msgspec.ValidationError) -> InvalidInput:
    text = str(exc)
    reason, sep, where = text.rpartition(" - at `$.")
    param = where.rstrip("`") if sep else None
    if text.startswith("Object missing required field"):
        field = text.split("`")[1]
        return InvalidInput(
            f"you must provide a `{field}` parameter", field, "missing_required_parameter"
        )
    return InvalidInput(f"{reason or text}", param)


def _features(op: Operation, head: msgspec.Struct) -> frozenset[Feature]:
    needs: set[Feature] = set()
    match head:
        case ChatHead(stream=stream, tools=tools, response_format=fmt, messages=messages):
            if stream:
                needs.add(Feature.SUPPORTS_STREAM)
            if tools:
                needs.add(Feature.SUPPORTS_TOOLS)
            if fmt is not None and fmt.get("type") == "json_schema":
                needs.add(Feature.SUPPORTS_JSON_SCHEMA)
            if any(
                isinstance(m.get("content"), list)
                and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
                for m in messages
            ):
                needs.add(Feature.SUPPORTS_IMAGE_INPUT)
        case EmbeddingsHead(dimensions=dimensions) if dimensions is not None:
            needs.add(Feature.SUPPORTS_DIMENSIONS)
    return frozenset(needs)


def envelope_for(
    op: Operation,
    *,
    request_id: str,
    model: str | None,
    features: frozenset[Feature],
    hints: dict[str, str | None],
    client_key_id: str | None,
) -> CanonicalRequestEnvelope:
    """The canonical envelope of a one-shot request; `hints` come from `spear-*` headers."""

    def names(value: str | None) -> tuple[str, ...] | None:
        return tuple(n.strip() for n in value.split(",") if n.strip()) if value else None

    timeout = hints.get("timeout_ms")
    if timeout is not None and not timeout.isdigit():
        raise InvalidInput(
            "spear-timeout-ms must be a whole number of milliseconds", "spear-timeout-ms"
        )
    return CanonicalRequestEnvelope(
        request_id=request_id,
        operation=op,
        meta=RequestMeta(client_key_id=client_key_id),
        routing=RoutingHints(
            backend=hints.get("backend"),
            model=model,
            allowlist=names(hints.get("allow")),
            denylist=names(hints.get("deny")) or (),
        ),
        requirements=RequestRequirements(
            required_features=features, required_transports=frozenset({Transport.HTTP})
        ),
        policy=hints.get("policy"),
        timeout_ms=int(timeout) if timeout is not None else None,
    )


class Normalized(msgspec.Struct):
    """A validated one-shot request: its envelope and what a backend receives."""

    envelope: CanonicalRequestEnvelope
    request: OneShotRequest

    def for_model(self, model: str | None) -> OneShotRequest:
        """The backend request with the model an instance serves (raw body dropped if changed)."""
        payload = self.request.payload
        if model is None or payload.get("model") == model:
            return self.request
        return msgspec.structs.replace(
            self.request, payload={**payload, "model": model}, raw_body=None
        )


MAX_JSON_DEPTH = 200  # arrays/objects inside each other; real requests stay far below


def decode_json_body(body: bytes) -> Any:
    """Decode a JSON request body; InvalidInput when it is not JSON or nests too deep.

    msgspec stops at the interpreter's recursion limit (RecursionError, ~1000 levels less the
    stack in use); anything it decoded is walked without recursion, unless the body holds too
    few brackets to be deep at all (the common case: one `bytes.count` each).
    """
    too_deep = InvalidInput(
        f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels",
        None,
        "invalid_json",
    )
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        raise too_deep from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(
            f"the request body is not valid JSON: {exc}", None, "invalid_json"
        ) from None
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` in a decoded JSON value (no recursion;
    a container holding no containers costs one C-level `map(type, ...)`)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        children = list(item.values()) if isinstance(item, dict) else item
        kinds = set(map(type, children))
        if list in kinds or dict in kinds:
            if depth >= limit:
                return True
            stack.extend((c, depth + 1) for c in children if type(c) in _CONTAINERS)
    return False


_CONTAINERS = (list, dict)


def normalize_json(op: Operation, body: bytes, **envelope_args: Any) -> Normalized:
    """Decode and validate a JSON one-shot request."""
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object", None, "invalid_json")
    payload = decode_json_body(body)
    if not isinstance(payload, dict):
        raise InvalidInput("the request body must be a JSON object", None, "invalid_json")
    try:
        head = msgspec.convert(payload, HEADS[op])
    except msgspec.ValidationError as exc:
        raise _msgspec_error(exc) from None
    if isinstance(head, ChatHead) and not head.messages:
        raise InvalidInput("messages must contain at least one message", "messages")
    if isinstance(head, EmbeddingsHead) and not head.input:
        raise InvalidInput("input must not be empty", "input")
    model = getattr(head, "model", None)
    envelope = envelope_for(op, model=model, features=_features(op, head), **envelope_args)
    stream = bool(getattr(head, "stream", False))
    return Normalized(envelope, OneShotRequest(op, payload, raw_body=body, stream=stream))


def decode_upload(
    data: bytes, filename: str, content_type: str, limits: AudioLimits | None = None
) -> AudioInput:
    """Decode an uploaded audio file (any format soundfile reads) to mono int16 within `limits`.

    Refused from its header (rate, channels, length) before decoding; CPU-bound, so the
    server calls it in a worker thread.
    """
    try:
        pcm, rate = decode_audio_bytes(data, filename, limits or AudioLimits())
    except AudioLimitError as exc:
        raise InvalidInput(str(exc), "file", exc.code) from None
    except AudioFormatError as exc:
        raise InvalidInput(str(exc), "file", "unsupported_audio") from None
    return AudioInput(data, filename, content_type, pcm, rate)


AUDIO_SOURCES = ("file", "file_ref", "file_url")


def transcription_source(form: dict[str, Any]) -> tuple[str, str | None]:
    """Which one of `file`, `file_ref` or `file_url` a transcription form carries.

    ``("file", None)`` for a multipart upload, else the field's name and its text value (a
    ``spear-media://`` reference or an http(s) URL, resolved by the caller: this module does
    no I/O). Exactly one must be present.
    """
    given = [name for name in AUDIO_SOURCES if name in form]
    if len(given) > 1:
        raise InvalidInput(
            f"give exactly one of `file`, `file_ref` or `file_url`, not {' and '.join(given)}",
            given[1],
        )
    if not given or (given == ["file"] and form["file"].filename is None):
        raise InvalidInput(
            "you must provide a `file` (multipart file field), or a `file_ref` "
            "(spear-media://<sha256> from POST /v1/media) or a `file_url`",
            "file",
            "missing_required_parameter",
        )
    name = given[0]
    if name == "file":
        return name, None
    value: str = form[name].data.decode("utf-8", "replace").strip()
    if not value:
        raise InvalidInput(f"`{name}` is empty", name)
    return name, value


def normalize_transcription(
    form: dict[str, Any], *, audio_limits: AudioLimits | None = None, **envelope_args: Any
) -> Normalized:
    """Validate a transcription form (`file` + fields) into a canonical request.

    A `file_ref` or `file_url` must have been resolved into a `file` part by the caller. The
    upload is decoded here (within `audio_limits`): call it in a worker thread.
    """
    upload = form.get("file")
    if upload is None or upload.filename is None:
        raise InvalidInput(
            "you must provide a `file` (multipart file field)", "file", "missing_required_parameter"
        )
    fields: dict[str, Any] = {
        k: form[k].data.decode("utf-8", "replace") for k in TRANSCRIPTION_FIELDS if k in form
    }
    if GRANULARITIES in form:  # a list field: the SDKs send one part per value
        fields[GRANULARITIES] = [v.decode("utf-8", "replace") for v in form[GRANULARITIES].values()]
    if "model" not in fields:
        raise InvalidInput(
            "you must provide a `model` parameter", "model", "missing_required_parameter"
        )
    audio = decode_upload(
        upload.data,
        upload.filename,
        upload.content_type or "application/octet-stream",
        audio_limits,
    )
    features: set[Feature] = set()  # the operation itself implies audio input
    if "language" in fields:
        features.add(Feature.SUPPORTS_LANGUAGE)
    # verbose_json, srt and vtt all carry timings: only a backend that has them can answer
    if fields.get("response_format") in TIMED_FORMATS or GRANULARITIES in form:
        features.add(Feature.SUPPORTS_TIMESTAMPS)
    envelope = envelope_for(
        Operation.SPEECH_TO_TEXT,
        model=fields["model"],
        features=frozenset(features),
        **envelope_args,
    )
    return Normalized(envelope, OneShotRequest(Operation.SPEECH_TO_TEXT, dict(fields), audio=audio))
