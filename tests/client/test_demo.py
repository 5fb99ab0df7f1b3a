"""`spear-rt demo` on a stub-only config, and its word error rate."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import anyio
import pytest
import trio

from spear_rt.audio import AudioFormatError
from spear_rt.client.demo import demo, fixture_clips
from spear_rt.client.scoring import normalized_wer, word_error_rate
from spear_rt.config import BackendConfig
from tests.client import FIXTURES, stub_config

TIMEOUT_S = 30


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("open the window", "open the window", (0.0, 0, 3)),
        ("open the window", "Open the Window.", (0.0, 0, 3)),
        ("open the window", "open window", (1 / 3, 1, 3)),
        ("open the window", "open a the window", (1 / 3, 1, 3)),
        ("go forward ten meters", "go backward ten", (0.5, 2, 4)),
        ("open the window", "", (1.0, 3, 3)),
        ("", "", (0.0, 0, 0)),
    ],
)
def test_word_error_rate_is_word_levenshtein_over_reference_length(
    reference: str, hypothesis: str, expected: tuple[float, int, int]
) -> None:
    assert word_error_rate(reference, hypothesis) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("go forward ten meters", "Go forward 10 meters.", (0.0, 0, 4)),
        ("five five five one two three four", "5-5-5-1-2-3-4", (0.0, 0, 7)),
        ("one hundred five", "105", (0.0, 0, 3)),
        ("twenty one thousand", "21,000", (0.0, 0, 3)),
        ("a well known fact", "a well-known fact", (0.0, 0, 4)),
        ("go forward ten meters", "go forward 11 meters", (0.25, 1, 4)),
    ],
)
def test_normalized_wer_reads_numbers_as_words_and_hyphens_as_spaces(
    reference: str, hypothesis: str, expected: tuple[float, int, int]
) -> None:
    assert normalized_wer(reference, hypothesis) == pytest.approx(expected)


async def test_demo_on_the_stub_prints_transcript_and_reference_for_every_fixture() -> None:
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await demo(stub_config(), [], pace="fast", out=out)
    text = out.getvalue()
    clips = fixture_clips(FIXTURES)
    assert status == 0
    assert "transcription backend: stub (deterministic stub" in text
    assert text.count("  heard:     ") == len(clips)
    for clip in clips:
        assert f"{clip.path.name} (" in text
        assert f"  reference: {clip.reference}\n" in text
    assert text.count("  WER ") == len(clips)
    assert f"summary: {len(clips)} files, mean WER " in text and "stub backend" in text


async def test_demo_scores_a_named_fixture_and_leaves_other_files_unscored(tmp_path: Path) -> None:
    other = tmp_path / "mine.wav"
    shutil.copy(FIXTURES / "speech_go_forward.wav", other)
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await demo(
            stub_config(), [str(FIXTURES / "speech_open_window.wav"), str(other)], out=out
        )
    text = out.getvalue()
    assert status == 0
    assert "  reference: open the window\n" in text
    assert "mine.wav (2.6 s)\n  heard:     " in text and "  reference: (none)\n" in text
    assert "summary: 2 files, mean WER" in text


async def test_demo_refuses_an_unreadable_file_before_starting() -> None:
    with trio.fail_after(TIMEOUT_S), pytest.raises(AudioFormatError, match="no such file"):
        await demo(stub_config(), ["/nonexistent.wav"], out=io.StringIO())


def test_demo_runs_on_asyncio_too() -> None:
    out = io.StringIO()

    async def main() -> int:
        with anyio.fail_after(TIMEOUT_S):
            return await demo(stub_config(), [str(FIXTURES / "speech_go_forward.wav")], out=out)

    assert anyio.run(main, backend="asyncio") == 0
    assert "  reference: go forward ten meters\n" in out.getvalue()


async def test_demo_without_a_speech_engine_names_the_stub_itself() -> None:
    """The embedded default's stub serves only when named: with no engine installed the demo
    names it (and says so) rather than failing or silently getting it."""
    config = stub_config()
    config.backends = [BackendConfig(name="stub", kind="stub", only_when_named=True)]
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await demo(config, [str(FIXTURES / "speech_open_window.wav")], out=out)
    text = out.getvalue()
    assert status == 0
    assert "transcription backend: stub (deterministic stub" in text
    assert "  heard:     " in text and "stub backend" in text
