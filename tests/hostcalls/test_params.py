"""SET_PARAM: names and narrower limits only; a URL or a key is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spear_rt.hostcalls.abi import EACCES, EINVAL, EPERM
from spear_rt.hostcalls.params import (
    DEFAULT_POLICY,
    FdParams,
    HostPolicy,
    apply_param,
    session_update,
)


def apply(key: str, value: Any, *, connected: bool = False, params: FdParams | None = None) -> int:
    params = params or FdParams(DEFAULT_POLICY)
    raw = json.dumps({"key": key, "value": value}).encode()
    return apply_param(params, raw, DEFAULT_POLICY, connected=connected)[0]


@pytest.mark.parametrize(
    "key",
    [
        "base_url",
        "url",
        "api_key",
        "apiKey",
        "endpoint",
        "authorization",
        "key",
        "credential_ref",
        "upstream_host",
        "token",
    ],
)
def test_host_only_keys_are_eacces(key: str) -> None:
    assert apply(key, "anything") == -EACCES


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("backend", "https://evil.example/v1"),
        ("backend", "ws://127.0.0.1:9/"),
        ("model", "http:evil"),
        ("model", "sk-proj-abcdef0123456789"),
        ("backend", "Bearer abc"),
        ("drop_policy", "file:///etc/passwd"),
        ("turn_detection", {"type": "server_vad", "extra": "wss://x"}),
    ],
)
def test_values_carrying_a_url_or_a_key_are_eacces(key: str, value: Any) -> None:
    assert apply(key, value) == -EACCES


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("colour", "blue"),
        ("backend", "has space"),
        ("backend", "a/b"),
        ("model", 7),
        ("input_audio_format", "mp3"),
        ("input_audio_format", 16),
        ("input_sample_rate_hz", "16000"),
        ("input_sample_rate_hz", True),
        ("input_sample_rate_hz", 1),
        ("turn_detection", {"type": "semantic_vad", "threshold": 0.5}),  # follows eagerness
        ("turn_detection", {"type": "semantic_vad", "eagerness": "eager"}),
        ("turn_detection", {"type": "server_vad", "threshold": 2.0}),
        ("turn_detection", {"type": "server_vad", "spear": {"detector": "psychic"}}),
        ("turn_detection", {"type": "push_to_talk"}),
        ("turn_detection", "server_vad"),
        ("max_recv_queue_bytes", 100),
        ("max_send_queue_bytes", True),
        ("drop_policy", "drop_everything"),
    ],
)
def test_bad_keys_and_values_are_einval(key: str, value: Any) -> None:
    assert apply(key, value) == -EINVAL


def test_malformed_arguments_are_einval() -> None:
    params = FdParams(DEFAULT_POLICY)
    for raw in (
        b"",
        b"{",
        b"[]",
        b'{"value": 1}',
        b'{"key": "model"}',
        b'{"key":"model","value":"m","x":1}',
    ):
        assert apply_param(params, raw, DEFAULT_POLICY, connected=False)[0] == -EINVAL


def test_guests_may_only_narrow_queue_bounds() -> None:
    assert apply("max_send_queue_bytes", (1 << 20) + 1) == -EPERM
    params = FdParams(HostPolicy(max_recv_queue_bytes=8192))
    raw = json.dumps({"key": "max_recv_queue_bytes", "value": 8193}).encode()
    assert (
        apply_param(params, raw, HostPolicy(max_recv_queue_bytes=8192), connected=False)[0]
        == -EPERM
    )
    assert apply("max_recv_queue_bytes", 4096, params=params) == 0
    assert params.max_recv_queue_bytes == 4096


def test_names_are_accepted_until_connect() -> None:
    params = FdParams(DEFAULT_POLICY)
    assert apply("backend", "stub", params=params) == 0
    assert apply("model", "openai/whisper-large-v3", params=params) == 0
    assert (params.backend, params.model) == ("stub", "openai/whisper-large-v3")
    assert apply("backend", "other", connected=True, params=params) == -EINVAL


def test_format_and_rate_must_agree() -> None:
    params = FdParams(DEFAULT_POLICY)
    assert apply("input_audio_format", "g711_alaw", params=params) == 0
    assert params.input_format.rate_hz == 8000
    assert apply("input_sample_rate_hz", 16000, params=params) == -EINVAL  # G.711 is 8 kHz
    assert apply("input_audio_format", "pcm16", params=params) == 0
    assert apply("input_sample_rate_hz", 16000, params=params) == 0
    assert params.input_format.rate_hz == 16000


@pytest.mark.parametrize(
    "value",
    [
        {"type": "semantic_vad", "eagerness": "low"},
        {"type": "server_vad", "spear": {"detector": "silero"}},
    ],
)
def test_turn_detection_takes_what_a_session_update_takes(value: dict[str, Any]) -> None:
    params = FdParams(DEFAULT_POLICY)
    assert apply("turn_detection", value, params=params) == 0
    update = json.loads(session_update(params) or b"")
    assert update["session"]["turn_detection"] == value


def test_session_update_carries_only_what_was_set() -> None:
    params = FdParams(DEFAULT_POLICY)
    assert session_update(params) is None
    assert (
        apply("turn_detection", {"type": "server_vad", "silence_duration_ms": 300}, params=params)
        == 0
    )
    update = json.loads(session_update(params) or b"")
    assert update == {
        "type": "transcription_session.update",
        "session": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}},
    }
