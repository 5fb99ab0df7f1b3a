"""Property tests of the realtime client-event path (hypothesis, derandomized and bounded).

Random JSON-ish events (known types with random fields, random values, deep nesting), raw
text and binary frames go into `decode_client_event` and into a real session over a real
socket on every driver (trio, asyncio tasks, asyncio callbacks). Whatever arrives: nothing
raises, each bad input is one `error` event (with a one-line message and an event_id of at
most MAX_EVENT_ID_CHARS), the session stays open and its outbound queue stays bounded.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_rt.protocol.client_events import (
    KNOWN_TYPES,
    MAX_EVENT_ID_CHARS,
    ProtocolError,
    decode_client_event,
)
from spear_rt.server.app import Server
from spear_rt.session.machine import State
from tests.conftest import WsClient, make_config
from tests.server.test_realtime import TRANSCRIPTION
from tests.server.test_resume import DRIVERS, IDS

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SESSION_FUZZ = settings(FUZZ, max_examples=12)
MAX_OUTBOUND = 32 * 1024

FIELDS = [
    "type", "event_id", "session", "audio", "input", "format", "rate", "turn_detection",
    "transcription", "model", "language", "prompt", "threshold", "silence_duration_ms",
    "input_audio_format", "input_audio_transcription", "spear", "early_deltas", "item",
    "response", "include", "modalities", "noise_reduction", "instructions",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["pcm16", "g711_ulaw", "audio/pcm", "server_vad", "AAAA", "AAE="])
)
keys = st.sampled_from(FIELDS) | st.text(max_size=8)
jsonish = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=24,
)
events = st.fixed_dictionaries(
    {"type": st.sampled_from([*KNOWN_TYPES, "no.such", ""]) | st.text(max_size=10)},
    optional={
        "event_id": st.text(max_size=300) | scalars,
        "session": jsonish,
        "audio": st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()) | scalars,
        "item": jsonish,
    },
)
deep = st.integers(1000, 5000).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
)
text_frames = (
    events.map(json.dumps)
    | jsonish.map(json.dumps)
    | st.text(max_size=200)
    | deep
    | deep.map(lambda d: '{"type": "session.update", "session": ' + d + "}")
)
frames = st.one_of(text_frames, st.binary(max_size=200))


def check_error(error: ProtocolError) -> None:
    assert error.code and error.message
    assert "\n" not in error.message and len(error.message) < 2000
    assert error.event_id is None or len(error.event_id) <= MAX_EVENT_ID_CHARS
    assert "Traceback" not in error.message and " object at 0x" not in error.message


@FUZZ
@given(text_frames)
def test_decode_client_event_never_raises(frame: str) -> None:
    """Any text frame: an event, or a ProtocolError fit to show to a client."""
    result = decode_client_event(frame)
    if isinstance(result, ProtocolError):
        check_error(result)
    else:
        assert result.event_id is None or len(result.event_id) <= MAX_EVENT_ID_CHARS


@FUZZ
@given(st.binary(max_size=300))
def test_decode_client_event_takes_any_bytes(data: bytes) -> None:
    """Any bytes (a text frame is bytes on the wire): never raises."""
    result = decode_client_event(data)
    if isinstance(result, ProtocolError):
        check_error(result)


async def fuzz_session(server: Server, sent: list[str | bytes]) -> None:
    """Send `sent` on one session, then a marker; every bad frame has its error, the session
    is still open and its outbound queue stayed bounded."""
    assert server.port is not None
    client = await WsClient.connect(server.port, TRANSCRIPTION)
    await client.recv()
    (runner,) = server.sessions.sessions.values()
    machine = runner.machine
    peak = 0
    for frame in sent:
        if isinstance(frame, bytes):
            await client.send_bytes(frame)
        else:
            await client.send_text(frame)
        peak = max(peak, machine.outbound.nbytes)
    await client.send({"type": "spear.metrics.request", "event_id": "marker"})
    errors = 0
    while True:
        event = await client.recv()  # raises if the server closed the session
        if event["type"] == "error":
            errors += 1
            assert len(event["error"].get("event_id") or "") <= MAX_EVENT_ID_CHARS
            assert "\n" not in event["error"]["message"]
        if event["type"] == "spear.metrics":
            break
    bad = sum(
        1 for f in sent if isinstance(f, bytes) or isinstance(decode_client_event(f), ProtocolError)
    )
    assert errors >= bad
    assert machine.state in (State.ACTIVE, State.DRAINING)
    assert machine.close is None
    assert peak <= machine.outbound.hard_limit_bytes
    await client.close()


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_random_frames_into_a_real_session(backend: str, driver: str) -> None:
    """Random frames on a live session, on every driver: an error for each bad one, and the
    session lives on."""
    config = make_config(
        server=f'driver = "{driver}"', realtime=f"max_outbound_bytes = {MAX_OUTBOUND}"
    )

    @SESSION_FUZZ
    @given(st.lists(frames, min_size=1, max_size=25))
    def one(sent: list[str | bytes]) -> None:
        async def main() -> Any:
            server = Server(config)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                with anyio.fail_after(10):
                    await fuzz_session(server, sent)
                tg.cancel_scope.cancel()

        anyio.run(main, backend=backend)

    one()
