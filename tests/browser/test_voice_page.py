"""The voice page in a real Chromium: a WAV as the microphone, a real spear-rt serve.

Each test drives the page as a person would (select, click) and asserts on the DOM and on the
page's own counters (`window.spearStats`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from playwright.sync_api import expect

from tests.browser.rig import Proxy, browser_page, mic_wav, spear_server
from tests.conftest import FIXTURES, serve_in_thread
from tests.fakes.openai_upstream import FakeOpenAI, text_events

WHISPER = '[server]\nlisten = "127.0.0.1:0"\n\n[[backends]]\nname = "whisper"\nkind = "whisper"\n'
TURN_MS = 30_000
CASCADE = """
[[backends]]
name = "fake"
kind = "openai_http"
base_url = "{url}"

[[backends]]
name = "espeak"
kind = "espeak"

[conversation]
chat_backend = "fake"
speech_backend = "espeak"
"""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", " ", text.lower().replace("-", " ")).split()


def transcript_of(name: str) -> str:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return next(str(m["transcript"]) for m in manifest if m["file"] == name)


def until_stats(page: Any, done: Any, timeout_ms: int = TURN_MS) -> dict[str, Any]:
    """Poll `window.spearStats` until `done(stats)` (the page's CSP forbids wait_for_function)."""
    for _ in range(timeout_ms // 100):
        stats: dict[str, Any] = page.evaluate("window.spearStats")
        if done(stats):
            return stats
        page.wait_for_timeout(100)
    raise AssertionError(f"spearStats never got there: {stats}")


def go_live(page: Any, port: int, mode: str = "transcribe") -> None:
    """Open the page, pick `mode`, press Start and wait for `live`."""
    page.goto(f"http://127.0.0.1:{port}/")
    assert page.locator("#status").text_content() == "idle"
    page.select_option("#mode", mode)
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("live", timeout=TURN_MS)


def final_words(page: Any) -> str:
    """The words of the first final turn (without its time)."""
    page.wait_for_selector("#transcript .final", timeout=TURN_MS)
    text: str = page.locator("#transcript .final").first.evaluate("li => li.lastChild.textContent")
    return text


def heard(expected: str, got: str) -> float:
    """Share of the expected words found in what the page shows (order kept)."""
    want, have = words(expected), words(got)
    hits, at = 0, 0
    for w in want:
        if w in have[at:]:
            at = have.index(w, at) + 1
            hits += 1
    return hits / len(want)


def test_transcribe_shows_the_spoken_words_as_a_final_turn(tmp_path: Path) -> None:
    name = "speech_quick_brown_fox.wav"
    mic = mic_wav(tmp_path / "mic.wav", [(name, 3.0)])
    with spear_server(WHISPER, tmp_path) as port, browser_page(mic, tmp_path, "transcribe") as page:
        p: Any = page
        go_live(p, port)
        text = final_words(p)
        assert heard(transcript_of(name), text) >= 0.7, text  # tiny.en: WER ~0.13 here
        assert "whisper" in (p.locator("#backend").text_content() or "")
        stats = p.evaluate("window.spearStats")
        print(f"voice page: speech stop -> final transcript {stats['lastLatencyMs']} ms")
        assert stats["lastLatencyMs"] is not None and stats["lastLatencyMs"] > 0
        with p.expect_download() as download:
            p.click("#download")
        saved = Path(download.value.path()).read_text()
        assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] (.+)\n", saved), saved
        assert text in saved


def test_a_cut_socket_reconnects_resumes_and_loses_no_words(tmp_path: Path) -> None:
    """The connection dies mid-turn: `reconnecting`, then `resumed`, and the turn is whole."""
    name = "speech_turn_left.wav"
    mic = mic_wav(tmp_path / "mic.wav", [(name, 3.0)])
    with spear_server(WHISPER, tmp_path) as port, browser_page(mic, tmp_path, "resume") as page:
        proxy = Proxy(port)
        p: Any = page
        go_live(p, proxy.port)
        p.wait_for_selector("#transcript .partial", timeout=TURN_MS)  # mid-turn
        assert proxy.cut() >= 1
        expect(p.locator("#status")).to_have_text("resumed", timeout=TURN_MS)
        text = final_words(p)
        assert p.locator("#transcript .final").count() == 1
        assert heard(transcript_of(name), text) >= 0.7, text
        log = p.locator("#log").text_content() or ""
        assert "reconnecting" in log and "resumed session" in log, log
        proxy.close()


@asynccontextmanager
async def fake_chat() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        yield fake
        tg.cancel_scope.cancel()


def test_talk_mode_answers_in_text_and_plays_the_audio(tmp_path: Path) -> None:
    """Speak a turn in talk mode: the answer is shown and its audio plays to the end."""
    mic = mic_wav(tmp_path / "mic.wav", [("speech_open_window.wav", 2.0)])
    with serve_in_thread(fake_chat) as fake:
        config = WHISPER + CASCADE.format(url=fake.base_url)
        with spear_server(config, tmp_path) as port, browser_page(mic, tmp_path, "talk") as page:
            p: Any = page
            go_live(p, port, "talk")
            expect(p.locator("#answer .assistant")).to_contain_text("echo", timeout=TURN_MS)
            stats = until_stats(p, lambda s: s["answersPlayed"] >= 1)
            assert stats["audioPlayedMs"] > 300, stats
            print(f"voice page: speech stop -> first answer audio {stats['lastLatencyMs']} ms")
            assert stats["lastLatencyMs"] is not None
            assert "window" in (p.locator("#answer .user").first.text_content() or "").lower()


LONG_ANSWER = (
    "Sure. Opening a window lets fresh air in, and on a warm day it cools the room quickly. "
    "Mind the rain, keep an eye on the cat, and close it again before you leave the house."
)


def test_speaking_over_an_answer_stops_it_and_the_new_turn_is_answered(tmp_path: Path) -> None:
    """Barge-in: the second turn starts while the first (long) answer plays."""
    mic = mic_wav(tmp_path / "mic.wav", [("speech_open_window.wav", 3.5),
                                         ("speech_quick_brown_fox.wav", 2.0)])  # fmt: skip
    with serve_in_thread(fake_chat) as fake:
        slow = fake.slow_stream(text_events([w + " " for w in LONG_ANSWER.split()]))
        slow.release(1000)  # all of it, at once: a long answer, not a slow one
        config = WHISPER + CASCADE.format(url=fake.base_url)
        with spear_server(config, tmp_path) as port, browser_page(mic, tmp_path, "barge") as page:
            p: Any = page
            go_live(p, port, "talk")
            expect(p.locator("#answer .assistant.cut")).to_have_count(1, timeout=TURN_MS)
            assert "barge-in" in (p.locator("#log").text_content() or "")
            expect(p.locator("#answer .assistant").nth(1)).to_contain_text("fox", timeout=TURN_MS)
            stats = until_stats(p, lambda s: s["answersPlayed"] >= 1)
            assert stats["audioPlayedMs"] > 500, stats


def test_client_key_and_push_to_talk(tmp_path: Path) -> None:
    """With client keys the page needs one (typed once, kept in the tab); push to talk commits
    the held turn."""
    mic = mic_wav(tmp_path / "mic.wav", [("speech_open_window.wav", 0.3)], tail_s=0.3)  # loops
    keyed = WHISPER.replace("[server]\n", '[server]\nclient_keys_env = ["SPEAR_PAGE_KEY"]\n')
    env = {"SPEAR_PAGE_KEY": "page-key-0123456789"}
    with spear_server(keyed, tmp_path, env) as port, browser_page(mic, tmp_path, "ptt") as page:
        p: Any = page
        p.goto(f"http://127.0.0.1:{port}/")
        p.click("#connect")
        expect(p.locator("#status")).to_have_text(re.compile(r"^error: "), timeout=TURN_MS)
        p.fill("#key", "page-key-0123456789")
        p.select_option("#turns", "ptt")
        p.click("#connect")
        expect(p.locator("#status")).to_have_text("live", timeout=TURN_MS)
        assert p.evaluate("sessionStorage.getItem('spear-key')") == "page-key-0123456789"
        p.locator("#ptt").hover()
        p.mouse.down()
        expect(p.locator("#ptt")).to_have_attribute("aria-pressed", "true")
        p.wait_for_timeout(4000)  # a person holding the button while speaking
        p.mouse.up()
        text = final_words(p)
        assert "window" in words(text), text


def test_talk_mode_resumes_mid_answer_and_the_answer_plays_once(tmp_path: Path) -> None:
    """The socket dies while a long answer is playing: `resumed`, and that answer is shown
    once, whole, and finishes playing (its audio from the replay, not a second answer)."""
    mic = mic_wav(tmp_path / "mic.wav", [("speech_open_window.wav", 2.0)])
    with serve_in_thread(fake_chat) as fake:
        slow = fake.slow_stream(text_events([w + " " for w in LONG_ANSWER.split()]))
        slow.release(1000)
        config = WHISPER + CASCADE.format(url=fake.base_url)
        with (
            spear_server(config, tmp_path) as port,
            browser_page(mic, tmp_path, "talk-resume") as page,
        ):
            proxy = Proxy(port)
            p: Any = page
            go_live(p, proxy.port, "talk")
            until_stats(p, lambda s: s["audioPlayedMs"] > 300)  # the answer is playing
            assert proxy.cut() >= 1
            expect(p.locator("#status")).to_have_text("resumed", timeout=TURN_MS)
            stats = until_stats(p, lambda s: s["answersPlayed"] >= 1)
            expect(p.locator("#answer .assistant")).to_have_count(1)
            shown = p.locator("#answer .assistant").first.text_content() or ""
            assert "close it again before you leave the house" in shown, shown
            assert stats["audioPlayedMs"] > 3000 and stats["answersPlayed"] == 1, stats
            log = p.locator("#log").text_content() or ""
            assert "reconnecting" in log and "resumed session" in log, log
            proxy.close()


def test_push_to_talk_in_talk_mode_answers_the_held_turn(tmp_path: Path) -> None:
    """Talk mode with push to talk: what is said while the button is held is one turn, and
    releasing it gets that turn answered (and nothing is answered before)."""
    mic = mic_wav(tmp_path / "mic.wav", [("speech_open_window.wav", 0.3)], tail_s=0.3)  # loops
    with serve_in_thread(fake_chat) as fake:
        config = WHISPER + CASCADE.format(url=fake.base_url)
        with (
            spear_server(config, tmp_path) as port,
            browser_page(mic, tmp_path, "ptt-talk") as page,
        ):
            p: Any = page
            p.goto(f"http://127.0.0.1:{port}/")
            p.select_option("#mode", "talk")
            p.select_option("#turns", "ptt")
            p.click("#connect")
            expect(p.locator("#status")).to_have_text("live", timeout=TURN_MS)
            p.locator("#ptt").hover()
            p.mouse.down()
            p.wait_for_timeout(4000)  # a person holding the button while speaking
            assert p.locator("#answer .assistant").count() == 0  # nothing until released
            p.mouse.up()
            expect(p.locator("#answer .assistant")).to_contain_text("window", timeout=TURN_MS)
            stats = until_stats(p, lambda s: s["answersPlayed"] >= 1)
            assert stats["audioPlayedMs"] > 300, stats
            expect(p.locator("#answer .assistant")).to_have_count(1)
