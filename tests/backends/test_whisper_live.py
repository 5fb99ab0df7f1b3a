"""The whisper kind in realtime transcription sessions, over real sockets with the real model.

* at realtime pace with server VAD, words arrive while the user speaks (a delta before the
  turn's `speech_stopped`), deltas only append, every `completed` is exactly the concatenation
  of its item's deltas, and the words are right;
* one session past the kind's default `max_concurrency` is refused with close code 1013.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from spear_rt.backend import InstanceInfo
from spear_rt.client.scoring import normalized_wer
from spear_rt.client.stream import transcribe
from spear_rt.errors import BackendFailure
from spear_rt.redecode import RedecodeConfig
from spear_rt_backends import whisper as whisper_kind
from spear_rt_backends.whisper_live import redecode_config, repeats_tail
from tests.conftest import (
    ServerFactory,
    WsClient,
    load_fixture_24k,
    make_config,
    running_server,
)

pytest.importorskip("faster_whisper")

TRANSCRIPTION = "/v1/realtime?intent=transcription"
BOUND_S = 60
CLIP, REFERENCE = "speech_turn_left.wav", "turn left at the next street and stop near the red door"
# tiny.en hears this fixture word for word; the bound allows one slip in its twelve words.
WER_BOUND = 0.09


def whisper() -> str:
    return '[[backends]]\nname = "whisper"\nkind = "whisper"\n'


async def test_live_deltas_arrive_while_speaking_and_add_up_to_the_transcript() -> None:
    events: list[dict[str, Any]] = []
    async with running_server(make_config(backends=whisper())) as server:
        url = f"ws://127.0.0.1:{server.port}{TRANSCRIPTION}"
        with trio.fail_after(BOUND_S):
            transcripts = await transcribe(
                url,
                load_fixture_24k(CLIP),
                pace="realtime",
                vad=True,
                on_event=events.append,
            )
    (created,) = [e for e in events if e["type"].endswith("session.created")]
    assert created["spear"]["backend"] == "whisper"
    (turn,) = transcripts
    assert turn.failed is None and turn.text == turn.deltas, turn
    assert normalized_wer(REFERENCE, turn.text)[0] <= WER_BOUND, turn.text
    types = [e["type"].rsplit(".", 1)[-1] for e in events]
    stopped = types.index("speech_stopped")
    early = "".join(e["delta"] for e in events[:stopped] if e["type"].endswith("delta"))
    # most of the words are sent while the user is still speaking, not after
    assert len(early.split()) > len(turn.text.split()) // 2, (early, turn.text)


async def test_a_session_past_the_default_max_concurrency_is_refused_1013(
    serve: ServerFactory,
) -> None:
    """The kind's default cap (`MAX_SESSIONS`, from the capacity bench) holds without config."""
    server = await serve(make_config(backends=whisper()))
    assert server.port is not None
    with trio.fail_after(BOUND_S):
        async with AsyncExitStack() as sessions:
            for _ in range(whisper_kind.MAX_SESSIONS):
                client = await sessions.enter_async_context(
                    await WsClient.connect(server.port, TRANSCRIPTION)
                )
                assert (await client.recv())["type"] == "session.created"
            over = await WsClient.connect(server.port, TRANSCRIPTION)
            (error,) = await over.recv_all()
            code, reason = await over.wait_closed()
    assert error["type"] == "error"
    assert error["spear"]["rejected_reasons"]["whisper"].startswith("at capacity")
    assert code == 1013 and reason.startswith("retry after ")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, RedecodeConfig(rate_hz=16000)),
        ({"hold_back": 0, "step_ms": 200}, RedecodeConfig(rate_hz=16000, hold_back=0, step_ms=200)),
        ({"max_window_ms": 60_000}, RedecodeConfig(rate_hz=16000, max_window_ms=28_000)),
    ],
)
def test_live_options_become_the_redecode_rule(
    options: dict[str, int], expected: RedecodeConfig
) -> None:
    assert redecode_config(InstanceInfo(name="w", options=options)) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hold_back": -1}, "option hold_back must be an integer >= 0"),
        ({"step_ms": 0}, "option step_ms must be a positive integer"),
        ({"agreement": "2"}, "option agreement must be a positive integer"),
        ({"max_window_ms": 4000}, "max_window_ms >= 2 * CUT_SEARCH_MS"),
    ],
)
def test_bad_live_options_are_one_line_errors_naming_the_option(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(BackendFailure) as caught:
        redecode_config(InstanceInfo(name="w", options=options))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "loops"),
    [
        ("10 of close 10 of close", True),
        ("ten of clubs, ten of clubs.", True),
        ("and so my fellow americans", False),
        ("very very good", False),  # one word twice is speech, not a loop
        ("go go", False),
        ("", False),
    ],
)
def test_a_repeated_tail_of_two_or_more_words_is_a_loop(text: str, loops: bool) -> None:
    assert repeats_tail(text) is loops
