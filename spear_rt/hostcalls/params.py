"""What a guest may set with ``SET_PARAM``: names and narrower limits, never a URL or a key.

The argument is JSON ``{"key": ..., "value": ...}`` with one of the spec's keys:
``input_audio_format``, ``input_sample_rate_hz``, ``model``, ``backend``, ``turn_detection``,
``max_send_queue_bytes``, ``max_recv_queue_bytes``, ``drop_policy``.

Errors, checked in this order:

* a key that names a URL or a credential, or any string value that carries one -> ``-EACCES``
  (base URLs and keys are host configuration, whatever the guest asks);
* malformed JSON, an unknown key, a value of the wrong type or out of range, or ``model`` /
  ``backend`` after ``CONNECT`` (routing happens once) -> ``-EINVAL``;
* a queue bound above the host's -> ``-EPERM`` (guest parameters may only narrow host policy).

Audio format and turn detection reach the session as one ``transcription_session.update``
(`session_update`): at ``CONNECT``, and again whenever they change on a connected fd.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec

from spear_rt.audio import AudioFormat, AudioFormatError, InputFormat, input_format_to_wire
from spear_rt.errors import ConfigError
from spear_rt.hostcalls.abi import EACCES, EINVAL, EPERM
from spear_rt.protocol.client_events import TurnDetectionWire
from spear_rt.protocol.settings import SettingsError, turn_detection_config

DEFAULT_QUEUE_BYTES = 1 << 20
MIN_QUEUE_BYTES = 4096

# A backend is named as in the config; a model name may carry one "org/" prefix.
_BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_MODEL_PART = r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}"
_MODEL_NAME = re.compile(rf"^{_MODEL_PART}(/{_MODEL_PART})?$")
KEYS = frozenset(
    {
        "input_audio_format",
        "input_sample_rate_hz",
        "model",
        "backend",
        "turn_detection",
        "max_send_queue_bytes",
        "max_recv_queue_bytes",
        "drop_policy",
    }
)
_HOST_ONLY_KEY = re.compile(
    r"url|uri|endpoint|host|base|addr|api_?key|secret|token|credential|passw|auth|header|^key$",
    re.IGNORECASE,
)
_FORMATS = frozenset(f.value for f in AudioFormat)
_URL = re.compile(r"://|^(https?|wss?|unix|file|tcp|grpcs?):", re.IGNORECASE)
_SECRET = re.compile(r"^(sk|pk|rk|ak)[-_]|^bearer\s|^basic\s|^key[-_:]|^eyJ", re.IGNORECASE)


class DropPolicy(enum.StrEnum):
    """What the recv queue drops when full; completed, error and lifecycle events never go."""

    DROP_OLDEST_DELTA = "drop_oldest_delta"  # the default: the oldest queued delta
    DROP_NEWEST_DELTA = "drop_newest_delta"  # the delta that does not fit


class HostPolicy(msgspec.Struct, frozen=True):
    """The host's bounds for every fd; guests may only ask for less."""

    max_send_queue_bytes: int = DEFAULT_QUEUE_BYTES
    max_recv_queue_bytes: int = DEFAULT_QUEUE_BYTES
    max_fds: int = 1024  # open descriptors (rt fds + epfds) per guest; one more -> -EMFILE
    max_watches: int = 16384  # epoll watches per guest, over all its epfds; more -> -ENOMEM


DEFAULT_POLICY = HostPolicy()


class _Param(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: Any = msgspec.UNSET


_param_decoder = msgspec.json.Decoder(_Param)


class FdParams:
    """One fd's parameters, as the guest set them (defaults: pcm16, 24000 Hz, mono)."""

    def __init__(self, policy: HostPolicy) -> None:
        self.audio_format = AudioFormat.PCM16
        self.rate_hz: int | None = None  # None: the format's protocol rate
        self.format_set = False
        self.turn_detection: dict[str, Any] | None = None
        self.turn_set = False
        self.model: str | None = None
        self.backend: str | None = None
        self.max_send_queue_bytes = policy.max_send_queue_bytes
        self.max_recv_queue_bytes = policy.max_recv_queue_bytes
        self.drop_policy = DropPolicy.DROP_OLDEST_DELTA

    @property
    def input_format(self) -> InputFormat:
        """The encoding and rate of what `rt_write` carries."""
        if self.rate_hz is None:
            return InputFormat.of(self.audio_format)
        return InputFormat(self.audio_format, self.rate_hz)


def carries_secret(value: Any) -> bool:
    """True when a string anywhere in `value` looks like a URL or a credential."""
    if isinstance(value, str):
        return bool(_URL.search(value) or _SECRET.search(value))
    if isinstance(value, dict):
        return any(carries_secret(k) or carries_secret(v) for k, v in value.items())
    if isinstance(value, list):
        return any(carries_secret(v) for v in value)
    return False


def json_object(raw: bytes) -> dict[str, Any] | None:
    """`raw` decoded as one JSON object, or None (not JSON, or not an object)."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def key_value(raw: bytes) -> tuple[str, Any] | None:
    """A SET_PARAM argument ``{"key": K, "value": V}`` with a non-empty string K, or None."""
    param = json_object(raw)
    if param is None or not isinstance(param.get("key"), str) or not param["key"]:
        return None
    return param["key"], param.get("value")


def routing_name_ok(key: str, value: Any) -> bool:
    """Whether `value` is a valid ``model`` / ``backend`` name (None: the router picks)."""
    pattern = _MODEL_NAME if key == "model" else _BACKEND_NAME
    return value is None or (isinstance(value, str) and bool(pattern.match(value)))


def host_only_key(key: str) -> bool:
    """True when a parameter name asks for a URL, an address or a credential."""
    return bool(_HOST_ONLY_KEY.search(key))


def _queue_bytes(value: Any, host_max: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < MIN_QUEUE_BYTES:
        return -EINVAL
    return -EPERM if value > host_max else value


def apply_param(
    params: FdParams, raw: bytes, policy: HostPolicy, *, connected: bool
) -> tuple[int, bool]:
    """Apply one SET_PARAM argument: (0 or -errno, whether the session settings changed)."""
    try:
        param = _param_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return -EINVAL, False
    key, value = param.key, param.value
    if (key not in KEYS and host_only_key(key)) or carries_secret(value):
        return -EACCES, False
    if value is msgspec.UNSET:
        return -EINVAL, False
    match key:
        case "model" | "backend":
            if connected or not routing_name_ok(key, value):
                return -EINVAL, False
            setattr(params, key, value)
            return 0, False
        case "input_audio_format" | "input_sample_rate_hz":
            return _set_format(params, key, value), True
        case "turn_detection":
            return _set_turn(params, value), True
        case "max_send_queue_bytes" | "max_recv_queue_bytes":
            size = _queue_bytes(value, getattr(policy, key))
            if size > 0:
                setattr(params, key, size)
            return min(size, 0), False
        case "drop_policy":
            try:
                params.drop_policy = DropPolicy(value)
            except ValueError:
                return -EINVAL, False
            return 0, False
    return -EINVAL, False


def _set_format(params: FdParams, key: str, value: Any) -> int:
    fmt, rate = params.audio_format, params.rate_hz
    if key == "input_audio_format" and isinstance(value, str):
        if value not in _FORMATS:
            return -EINVAL
        fmt = AudioFormat(value)
    elif key == "input_sample_rate_hz" and isinstance(value, int) and not isinstance(value, bool):
        rate = value
    else:
        return -EINVAL
    try:
        if rate is not None:
            InputFormat(fmt, rate)  # validates the pair (G.711 is 8000 Hz only)
    except AudioFormatError:
        return -EINVAL
    params.audio_format, params.rate_hz, params.format_set = fmt, rate, True
    return 0


def _set_turn(params: FdParams, value: Any) -> int:
    if value is None:
        params.turn_detection, params.turn_set = None, True
        return 0
    try:
        wire = msgspec.convert(value, TurnDetectionWire)
        turn_detection_config(wire)  # what a session.update would refuse is refused here
    except (msgspec.ValidationError, SettingsError, ConfigError):
        return -EINVAL
    params.turn_detection = {k: v for k, v in msgspec.structs.asdict(wire).items() if v is not None}
    params.turn_set = True
    return 0


def session_update(params: FdParams) -> bytes | None:
    """The ``transcription_session.update`` carrying what the guest set, or None if nothing."""
    session: dict[str, Any] = {}
    if params.format_set:
        session["audio"] = {"input": {"format": input_format_to_wire(params.input_format, ga=True)}}
    if params.turn_set:
        session["turn_detection"] = params.turn_detection
    if not session:
        return None
    return msgspec.json.encode({"type": "transcription_session.update", "session": session})
