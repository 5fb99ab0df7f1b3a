"""pocketsphinx one-shot: cuts in pauses, a bound on segment length, resampling off the loop."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
import trio

from spear_rt.audio import load_audio, resample
from spear_rt.backend import AudioInput, InstanceInfo, OneShotRequest
from spear_rt.ir import Operation
from spear_rt.registry import load_kind
from spear_rt_backends import pocketsphinx_live, sphinx_oneshot
from spear_rt_backends.sphinx_oneshot import MAX_SEGMENT_S, RATE_HZ, cut_points
from tests.conftest import FIXTURES


def test_one_utterance_is_one_segment_over_the_whole_file() -> None:
    pcm, _ = load_audio(FIXTURES / "speech_go_forward.wav")
    assert cut_points(pcm, 400) == [(0, pcm.size)]


def test_two_utterances_are_cut_inside_the_pause_between_them() -> None:
    pcm, _ = load_audio(FIXTURES / "speech_two_utterances.wav")
    (a, cut), (cut2, end) = cut_points(pcm, 400)
    assert (a, end) == (0, pcm.size) and cut == cut2
    level = np.abs(pcm[cut - 800 : cut + 800].astype(np.int32)).max()
    assert level < 0.05 * np.abs(pcm.astype(np.int32)).max()  # a quiet place, not a word


def test_long_speech_without_pauses_is_cut_at_most_every_max_segment() -> None:
    rng = np.random.default_rng(3)
    pcm = rng.integers(-8000, 8000, int(95 * RATE_HZ), dtype=np.int16)  # no pause at all
    ranges = cut_points(pcm, 400)
    assert ranges[0][0] == 0 and ranges[-1][1] == pcm.size
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert all(end - start <= MAX_SEGMENT_S * RATE_HZ for start, end in ranges)
    assert len(ranges) == 4


@pytest.mark.parametrize("kind", ["pocketsphinx", "pocketsphinx_live"])
async def test_one_shot_resampling_runs_in_a_worker_thread(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload at 48 kHz is resampled to 16 kHz off the event loop, on both kinds."""
    module = sphinx_oneshot if kind == "pocketsphinx" else pocketsphinx_live
    threads: list[int] = []
    original = module.resample

    def spy(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return original(*args)

    monkeypatch.setattr(module, "resample", spy)
    pcm, _ = load_audio(FIXTURES / "speech_turn_left.wav")
    pcm48 = resample(pcm, 16000, 48000)
    audio = AudioInput(b"", "t.wav", "audio/wav", pcm=pcm48, rate_hz=48000)
    request = OneShotRequest(Operation.SPEECH_TO_TEXT, {"model": "m"}, audio=audio)
    with trio.fail_after(60):
        answer = await load_kind(kind).call(InstanceInfo(name=f"{kind}-resample"), request)
    assert msgspec.json.decode(answer.body)["text"]
    assert threads and threading.get_ident() not in threads


def test_the_kind_serves_one_event_loop_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its worker limiter belongs to the loop that made it. It was keyed by id() of the loop's
    token, which a later loop can reuse (a 500, "must be called from async context", in CI):
    here every object has the same id in the kind's module, as after such a reuse."""
    from spear_rt_backends import sphinx

    monkeypatch.setattr(sphinx, "id", lambda _: 1, raising=False)
    pcm, _ = load_audio(FIXTURES / "speech_go_forward.wav")
    audio = AudioInput(b"", "t.wav", "audio/wav", pcm=pcm, rate_hz=16000)
    request = OneShotRequest(Operation.SPEECH_TO_TEXT, {"model": "m"}, audio=audio)
    instance = InstanceInfo(name="pocketsphinx-loops", options={"workers": 1})

    async def transcribe() -> str:
        with anyio.fail_after(60):
            answer = await load_kind("pocketsphinx").call(instance, request)
        return str(msgspec.json.decode(answer.body)["text"])

    texts = [anyio.run(transcribe, backend=backend) for backend in ("trio", "asyncio")]
    assert texts[0] and texts[0] == texts[1]
