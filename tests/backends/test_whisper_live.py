"""The whisper kind in realtime transcription sessions, over real sockets with the real model.

* at realtime pace with server VAD, words arrive while the user speaks (a delta before the
  turn's `speech_stopped`), deltas only append, every `completed` is exactly the concatenation
  of its item's deltas, and the words are right;
* one session past the instance's `max_concurrency` is refused with close code 1013.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from spear_rt.client.scoring import normalized_wer
from spear_rt.client.stream import transcribe
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


def whisper(limits: str = "") -> str:
    return f'[[backends]]\nname = "whisper"\nkind = "whisper"\n{limits}'


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


async def test_a_session_past_max_concurrency_is_refused_1013(serve: ServerFactory) -> None:
    server = await serve(make_config(backends=whisper("[backends.limits]\nmax_concurrency = 1\n")))
    assert server.port is not None
    with trio.fail_after(BOUND_S):
        async with await WsClient.connect(server.port, TRANSCRIPTION) as first:
            assert (await first.recv())["type"] == "session.created"
            second = await WsClient.connect(server.port, TRANSCRIPTION)
            (error,) = await second.recv_all()
            code, reason = await second.wait_closed()
    assert error["type"] == "error"
    assert error["spear"]["rejected_reasons"]["whisper"].startswith("at capacity")
    assert code == 1013 and reason.startswith("retry after ")
