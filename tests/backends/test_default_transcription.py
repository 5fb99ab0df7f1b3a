"""The embedded default config answers honestly: real engines or a clear error, never a stub
it was not asked for.

* transcription, one-shot and realtime, is Whisper's (the `whisper` extra `make test` installs);
* with Whisper denied, `/v1/audio/transcriptions` in every `response_format` falls back to
  pocketsphinx (word timings from the engine), with SubRip for `srt` and WebVTT for `vtt`;
* a request no real engine can serve is a 503 naming why, unless it names the stub (then the
  answer carries `x-spear-stub: true`);
* a config that lists the stub itself has it serve as configured, answers still marked.

Over real sockets, on every driver for the format path.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from spear_rt.client.scoring import normalized
from spear_rt.client.stream import Transcript
from spear_rt.client.stream import transcribe as stream_transcribe
from spear_rt.config import Config, load_config
from spear_rt.server.app import Server
from tests.conftest import FIXTURES, load_fixture_24k, make_config

DRIVERS = [("trio", "auto"), ("asyncio", "auto"), ("asyncio", "anyio")]
IDS = ["trio", "asyncio-callbacks", "asyncio-tasks"]
BOUND_S = 60  # pocketsphinx worker processes start in ~1 s each; only a hang fails this
WAV = (FIXTURES / "speech_two_utterances.wav").read_bytes()
SRT_CUE = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)\n"
)
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)\n")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def default_config(driver: str = "auto") -> Config:
    config = load_config(None)
    config.server.listen = "127.0.0.1:0"
    config.server.driver = driver  # type: ignore[assignment]
    return config


def run_on(backend: str, config: Config, scenario: Callable[[int], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = Server(config)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            with anyio.fail_after(BOUND_S):
                result = await scenario(server.port or 0)
            tg.cancel_scope.cancel()
        return result

    return anyio.run(main, backend=backend)


async def transcribe(client: httpx.AsyncClient, fmt: str, **headers: str) -> httpx.Response:
    data: dict[str, Any] = {"model": "whisper-1", "response_format": fmt}
    if fmt == "verbose_words":
        data = {**data, "response_format": "verbose_json", "timestamp_granularities[]": ["word"]}
    return await client.post(
        "/v1/audio/transcriptions",
        files={"file": ("two.wav", WAV, "audio/wav")},
        data=data,
        headers=headers,
    )


def seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


SPHINX_ONLY = {"spear-deny": "whisper"}  # the fallback, through the default config


def all_formats(formats: tuple[str, ...]) -> Callable[[int], Awaitable[dict[str, httpx.Response]]]:
    """A scenario posting the fixture to pocketsphinx once per format, side by side."""

    async def scenario(port: int) -> dict[str, httpx.Response]:
        answers: dict[str, httpx.Response] = {}

        async def one(c: httpx.AsyncClient, fmt: str) -> None:
            answers[fmt] = await transcribe(c, fmt, **SPHINX_ONLY)

        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as c,
            anyio.create_task_group() as tg,
        ):
            for fmt in formats:
                tg.start_soon(one, c, fmt)
        return answers

    return scenario


FORMATS = ("json", "text", "verbose_json", "verbose_words", "srt", "vtt")


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "driver"), DRIVERS[1:], ids=IDS[1:])
def test_srt_and_vtt_are_text_on_the_asyncio_drivers(backend: str, driver: str) -> None:
    """The same answers through the other drivers' HTTP writers (the formats test is trio's)."""
    answers = run_on(backend, default_config(driver), all_formats(("srt", "vtt")))
    assert answers["srt"].status_code == answers["vtt"].status_code == 200
    assert answers["srt"].headers["content-type"].startswith("text/plain")
    assert answers["srt"].headers["x-spear-instance"] == "pocketsphinx"
    assert [c[0] for c in SRT_CUE.findall(answers["srt"].text)] == ["1", "2"]
    assert answers["vtt"].headers["content-type"].startswith("text/vtt")
    assert answers["vtt"].text.startswith("WEBVTT\n\n")


@pytest.mark.slow
def test_with_whisper_denied_every_response_format_comes_from_pocketsphinx() -> None:
    answers = run_on("trio", default_config(), all_formats(FORMATS))
    for fmt, answer in answers.items():
        assert answer.status_code == 200, (fmt, answer.text[:300])
        assert answer.headers["x-spear-instance"] == "pocketsphinx", fmt
        assert "x-spear-stub" not in answer.headers, fmt
    text = answers["json"].json()["text"]
    assert answers["json"].headers["content-type"].startswith("application/json")
    assert len(text.split()) >= 4
    assert answers["text"].headers["content-type"].startswith("text/plain")
    assert answers["text"].text == text + "\n"

    verbose = answers["verbose_json"].json()
    assert verbose["text"] == text and verbose["duration"] == pytest.approx(5.838, abs=0.01)
    assert len(verbose["segments"]) == 2  # the fixture's two utterances, cut at the pause
    assert " ".join(s["text"] for s in verbose["segments"]) == text
    assert "words" not in verbose  # segment granularity by default
    by_word = answers["verbose_words"].json()
    assert by_word["text"] == text and "segments" not in by_word
    words = by_word["words"]
    assert [w["word"] for w in words] == text.split()
    assert all(0 <= w["start"] < w["end"] <= verbose["duration"] for w in words)
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(words))

    assert answers["srt"].headers["content-type"].startswith("text/plain")
    cues = SRT_CUE.findall(answers["srt"].text)
    assert [c[0] for c in cues] == ["1", "2"] and [c[9] for c in cues] == [
        s["text"] for s in verbose["segments"]
    ]
    first = verbose["segments"][0]
    assert seconds(*cues[0][1:5]) == pytest.approx(first["start"], abs=0.001)
    assert seconds(*cues[0][5:9]) == pytest.approx(first["end"], abs=0.001)

    assert answers["vtt"].headers["content-type"].startswith("text/vtt")
    assert answers["vtt"].text.startswith("WEBVTT\n\n")
    vtt = VTT_CUE.findall(answers["vtt"].text)
    assert [c[8] for c in vtt] == [s["text"] for s in verbose["segments"]]


def test_the_default_config_transcribes_with_whisper_live_and_one_shot() -> None:
    """Whisper (the `whisper` extra, installed by `make test`) serves both paths by default."""

    async def scenario(port: int) -> tuple[list[dict[str, Any]], list[Transcript], httpx.Response]:
        events: list[dict[str, Any]] = []
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        pcm = load_fixture_24k("speech_open_window.wav")
        live = await stream_transcribe(url, pcm, pace="fast", on_event=events.append)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as c:
            return events, live, await transcribe(c, "json")

    events, live, one_shot = run_on("trio", default_config(), scenario)
    created = next(e for e in events if e["type"].endswith("session.created"))
    assert created["spear"]["backend"] == "whisper"
    assert [normalized(t.text) for t in live] == ["open the window"]
    assert one_shot.status_code == 200 and one_shot.headers["x-spear-instance"] == "whisper"
    assert normalized(one_shot.json()["text"]).endswith("then call my sister")


def test_the_default_config_never_answers_with_a_stub_it_was_not_asked_for() -> None:
    async def scenario(port: int) -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as c:
            return {
                "chat": await c.post("/v1/chat/completions", json=CHAT),
                "chat_no_engine": await c.post(
                    "/v1/chat/completions", json=CHAT, headers={"spear-deny": "smollm2"}
                ),
                "named": await c.post(
                    "/v1/chat/completions", json=CHAT, headers={"spear-backend": "stub"}
                ),
                "model": await c.post("/v1/chat/completions", json={**CHAT, "model": "stub"}),
                "no_engine": await transcribe(
                    c, "verbose_json", **{"spear-deny": "whisper,pocketsphinx"}
                ),
            }

    answers = run_on("trio", default_config(), scenario)
    # chat comes from the real local model (the `llama` extra, which `make test` installs)
    chat = answers["chat"]
    assert chat.status_code == 200, chat.text[:300]
    assert chat.headers["x-spear-instance"] == "smollm2"
    assert "x-spear-stub" not in chat.headers
    assert not chat.json()["choices"][0]["message"]["content"].startswith("stub:")
    for name in ("chat_no_engine", "no_engine"):
        answer = answers[name]
        assert answer.status_code == 503, (name, answer.text[:300])
        error = answer.json()["error"]
        assert "x-spear-stub" not in answer.headers
        assert "name it" in error["spear"]["rejected_reasons"]["stub"], error
    for name in ("named", "model"):
        answer = answers[name]
        assert answer.status_code == 200, (name, answer.text[:300])
        assert answer.headers["x-spear-instance"] == "stub"
        assert answer.headers["x-spear-stub"] == "true"
        assert answer.json()["choices"][0]["message"]["content"].startswith("stub:")


def test_a_config_that_lists_the_stub_gets_it_and_every_answer_says_so() -> None:
    async def scenario(port: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as c:
            return await transcribe(c, "srt")

    answer = run_on("trio", make_config(), scenario)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers["x-spear-stub"] == "true"
    assert SRT_CUE.match(answer.text)
