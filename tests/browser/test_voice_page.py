"""The voice page in a real Chromium: a WAV as the microphone, a real spear-rt serve.

Each test drives the page as a person would (select, click) and asserts on the DOM and on the
page's own counters (`window.spearStats`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.rig import Proxy, browser_page, mic_wav, spear_server
from tests.conftest import FIXTURES

pytestmark = pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs chromium")
WHISPER = '[server]\nlisten = "127.0.0.1:0"\n\n[[backends]]\nname = "whisper"\nkind = "whisper"\n'
TURN_MS = 30_000


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", " ", text.lower().replace("-", " ")).split()


def transcript_of(name: str) -> str:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    return next(str(m["transcript"]) for m in manifest if m["file"] == name)


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
        proxy = Proxy(port)
        p: Any = page
        p.goto(f"http://127.0.0.1:{proxy.port}/")
        assert p.locator("#status").text_content() == "idle"
        p.select_option("#mode", "transcribe")
        p.click("#connect")
        expect(p.locator("#status")).to_have_text("live", timeout=TURN_MS)
        p.wait_for_selector("#transcript .final", timeout=TURN_MS)
        final = p.locator("#transcript .final").first
        text = final.evaluate("li => li.lastChild.textContent")
        assert heard(transcript_of(name), text) >= 0.7, text  # tiny.en: WER ~0.13 here
        assert "whisper" in (p.locator("#backend").text_content() or "")
        stats = p.evaluate("window.spearStats")
        assert stats["lastLatencyMs"] is not None and stats["lastLatencyMs"] > 0
        proxy.close()
