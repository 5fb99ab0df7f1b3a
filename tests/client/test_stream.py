"""The realtime client and `spear-rt stream` against a real in-process server (stub backend)."""

from __future__ import annotations

import argparse
import io
import json
import socket
from typing import Any

import numpy as np
import pytest
import trio

from spear_rt.client import ConnectError, ServerError, transcribe
from spear_rt.client.stream import (
    FRAME_MS,
    RATE_HZ,
    _stream_frames,
    load_pcm24k,
    stream_file,
    stream_file_cli,
)
from tests.client import FIXTURES, running_server, stub_config

TIMEOUT_S = 20


def _args(file: str, url: str, **overrides: Any) -> argparse.Namespace:
    base = {"file": file, "url": url, "pace": "fast", "vad": False, "key": None, "json": False}
    base["no_resume"] = False
    return argparse.Namespace(**{**base, **overrides})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_manual_fast_stream_gives_one_transcript_equal_to_its_deltas() -> None:
    pcm = load_pcm24k(FIXTURES / "speech_go_forward.wav")
    events: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await transcribe(url, pcm, pace="fast", vad=False, on_event=events.append)
    assert len(transcripts) == 1
    (result,) = transcripts
    assert result.text and result.text == result.deltas
    assert result.failed is None and result.latency_s >= 0
    deltas = [e["delta"] for e in events if e["type"].endswith("transcription.delta")]
    assert "".join(deltas) == result.text


async def test_vad_mode_splits_two_utterances_into_two_items() -> None:
    pcm = load_pcm24k(FIXTURES / "speech_two_utterances.wav")
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await transcribe(url, pcm, pace="fast", vad=True)
    assert len(transcripts) == 2
    assert len({t.item_id for t in transcripts}) == 2
    assert all(t.text and t.text == t.deltas for t in transcripts)


async def test_vad_mode_commits_a_turn_still_open_at_the_end_of_the_audio() -> None:
    # Speech cut off mid-utterance: the trailing silence or the fallback commit closes the turn.
    pcm = load_pcm24k(FIXTURES / "speech_go_forward.wav")[: RATE_HZ * 3 // 2]
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await transcribe(url, pcm, pace="fast", vad=True)
    assert len(transcripts) == 1 and transcripts[0].text


async def test_realtime_pace_sends_one_20ms_frame_every_20ms(
    autojump_clock: trio.abc.Clock,
) -> None:
    sent: list[tuple[float, int]] = []

    class Recorder:
        async def send_audio(self, pcm16: bytes) -> None:
            sent.append((trio.current_time(), len(pcm16)))

    start = trio.current_time()
    await _stream_frames(Recorder(), np.zeros(RATE_HZ // 10 + 5, np.int16), "realtime")  # type: ignore[arg-type]
    assert [n for _, n in sent] == [960] * 5 + [10]
    assert [round(t - start, 6) for t, _ in sent] == [i * FRAME_MS / 1000 for i in range(6)]


async def test_stream_file_prints_deltas_on_one_line_ending_at_completed() -> None:
    pcm = load_pcm24k(FIXTURES / "speech_open_window.wav")
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            transcripts = await stream_file(
                url, pcm, pace="fast", vad=False, key=None, json_lines=False, out=out, err=err
            )
    assert out.getvalue() == transcripts[0].text + "\n"
    assert err.getvalue() == "spear-rt: session served by backend stub [stub]\n"


async def test_stream_file_json_prints_every_server_event_as_a_json_line() -> None:
    pcm = load_pcm24k(FIXTURES / "speech_open_window.wav")
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            await stream_file(
                url,
                pcm,
                pace="fast",
                vad=False,
                key=None,
                json_lines=True,
                out=out,
                err=io.StringIO(),
            )
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0]["type"] == "transcription_session.created"
    assert events[-1]["type"] == "conversation.item.input_audio_transcription.completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_missing_client_key_is_a_readable_server_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPEAR_RT_TEST_KEY", "sekrit")
    pcm = load_pcm24k(FIXTURES / "speech_open_window.wav")
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config(client_keys_env=["SPEAR_RT_TEST_KEY"])) as url:
            with pytest.raises(ServerError, match="client key"):
                await transcribe(url, pcm, pace="fast")
            transcripts = await transcribe(url, pcm, pace="fast", key="sekrit")
    assert len(transcripts) == 1


async def test_unknown_endpoint_is_a_connect_error_with_the_servers_message() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_server(stub_config()) as url:
            with pytest.raises(ConnectError, match="HTTP 404: no WebSocket endpoint"):
                await transcribe(
                    url.replace("/v1/realtime", "/v1/nowhere"), np.zeros(960, np.int16)
                )


def test_stream_cli_missing_file_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = stream_file_cli(_args("/nonexistent/clip.wav", "ws://127.0.0.1:9/v1/realtime"))
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err == "spear-rt: cannot read audio file /nonexistent/clip.wav: no such file\n"


def test_stream_cli_unreachable_server_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"ws://127.0.0.1:{_free_port()}/v1/realtime"
    status = stream_file_cli(_args(str(FIXTURES / "speech_open_window.wav"), url))
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith(f"spear-rt: cannot connect to {url}: ") and err.count("\n") == 1
    assert "refused" in err
