"""`spear-rt talk` (and `demo-voice`) against a real server: stub ears and chat, espeak voice.

Each run speaks fixtures as user turns of one GA conversation session with server VAD; the
checks are on what it printed, the turns it returns and the WAVs it wrote. A dropped socket
(shut down when a chosen event arrives, or just before a chosen client event goes out) must
resume into the same turns, text and audio, byte for byte, as an unbroken run.
"""

from __future__ import annotations

import io
import socket
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from spear_rt.cli import main
from spear_rt.client import ResumePolicy, ServerError
from spear_rt.client import talk as talk_module
from spear_rt.client.talk import (
    Speech,
    TalkOptions,
    load_speech,
    realtime_url,
    talk,
    talk_status,
)
from spear_rt.client.talk_demo import DEMO_FIXTURES, demo_voice
from spear_rt.client.talk_turns import Answered, Heard, TalkBook, Unanswered
from spear_rt.config import load_config
from spear_rt.server.app import Server
from tests.client import FIXTURES
from tests.client.conftest import Sockets
from tests.conftest import load_fixture_24k, make_config, running_server

TIMEOUT_S = 20
FAST = TalkOptions(pace="fast")
FAST_RESUME = ResumePolicy(initial_delay_s=0.01)
RESUMED = "spear.session.resumed"
VOICE_BACKENDS = """
[[backends]]
name = "stub"
kind = "stub"

[[backends]]
name = "espeak"
kind = "espeak"
priority = 10
"""


def _url(server: Server) -> str:
    return realtime_url(f"ws://127.0.0.1:{server.port}")


def _wav(path: Path) -> tuple[int, bytes]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.getframerate(), wav.readframes(wav.getnframes())


async def _talk(
    files: list[str], out_dir: Path | None, realtime: str = "", **kwargs: Any
) -> tuple[list[Any], str, str]:
    out, err = io.StringIO(), io.StringIO()
    async with running_server(make_config(backends=VOICE_BACKENDS, realtime=realtime)) as server:
        kwargs.setdefault("options", FAST)
        turns = await talk(
            _url(server),
            load_speech([FIXTURES / f for f in files]),
            out_dir=out_dir,
            out=out,
            err=err,
            **kwargs,
        )
    return turns, out.getvalue(), err.getvalue()


async def test_a_spoken_turn_is_heard_answered_timed_and_saved(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        turns, out, err = await _talk(["speech_open_window.wav"], tmp_path)
    (turn,) = turns
    assert turn.heard and turn.answer.startswith("stub:") and turn.status == "completed"
    assert f"\n[1/1] speech_open_window.wav (2.5 s)\n  heard:     {turn.heard}\n" in out
    assert f"\n  assistant: {turn.answer}\n  latency:   heard " in out
    # every latency is measured from the end of speech, in the order things happen
    times = [turn.heard_at, turn.first_text_at, turn.first_audio_at, turn.done_at]
    assert all(t is not None and t >= turn.ended_at for t in times)
    assert turn.since_end(turn.done_at) >= turn.since_end(turn.first_audio_at) > 0
    v2v = turn.since_end(turn.first_audio_at)
    assert f"voice-to-voice {v2v:.2f} s, total " in out
    rate, pcm = _wav(tmp_path / "answer-1.wav")
    assert rate == 24000 and len(pcm) > 0 and pcm == bytes(turn.audio)
    assert f"-> {tmp_path / 'answer-1.wav'}\n" in out
    assert "summary: 1 turn from 1 file, 1 answered; voice-to-voice mean " in out
    assert "answer-1.wav\n" in out.split("summary:")[1]
    assert "answered by chat stub (deterministic stub, not a model), speech " in out
    assert "spear-rt: session served by backend stub [stub]" in err
    assert talk_status(turns, ["speech_open_window.wav"]) == 0


async def test_turns_follow_one_another_in_one_session_and_silence_is_reported(
    tmp_path: Path,
) -> None:
    files = ["speech_go_forward.wav", "silence.wav", "speech_open_window.wav"]
    events: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT_S):
        turns, out, _ = await _talk(files, tmp_path, on_event=events.append)
    assert [t.file for t in turns] == [files[0], files[2]] and [t.number for t in turns] == [1, 2]
    assert len({e["session"]["id"] for e in events if e["type"] == "session.created"}) == 1
    # the second answer was asked for only after the first was done
    done = [i for i, e in enumerate(events) if e["type"] == "response.done"]
    second = next(
        i
        for i, e in enumerate(events)
        if e["type"] == "input_audio_buffer.committed" and e["item_id"] == turns[1].item_id
    )
    assert done[0] < second < done[1]
    assert (
        "[2/3] silence.wav (2.0 s)\n  heard:     (no speech detected: nothing to answer)\n" in out
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer-1.wav", "answer-2.wav"]
    assert "silence.wav" in out.split("summary:")[1] and "no speech detected" in out
    assert talk_status(turns, files) == 1  # a file went unanswered


async def test_text_only_answers_in_text_and_writes_no_audio(tmp_path: Path) -> None:
    options = TalkOptions(pace="fast", text_only=True, instructions="Be brief.")
    with trio.fail_after(TIMEOUT_S):
        turns, out, _ = await _talk(["speech_go_forward.wav"], tmp_path, options=options)
    (turn,) = turns
    assert turn.answer.startswith("stub:") and not turn.audio and turn.first_audio_at is None
    assert "voice-to-voice -, total " in out and not list(tmp_path.iterdir())


async def test_a_turn_the_vad_leaves_open_is_committed_by_hand(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(talk_module, "TRAILING_SILENCE_MS", 0)  # the audio ends mid-word
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        async with running_server(make_config(backends=VOICE_BACKENDS)) as server:
            turns = await talk(
                _url(server),
                [Speech("cut.wav", load_fixture_24k("speech_open_window.wav")[: 24000 * 14 // 10])],
                options=FAST,
                out=out,
                err=io.StringIO(),
            )
    (turn,) = turns
    assert turn.manual and turn.answered and turn.status == "completed"
    assert "assistant: stub:" in out.getvalue()


def _killer(
    sockets: Sockets, kind: str, nth: int, log: list[dict[str, Any]]
) -> Callable[..., None]:
    """An on_event that logs events and kills the socket when the nth event of `kind` came."""
    seen = 0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal seen
        log.append(event)
        if event["type"] == kind:
            seen += 1
            if seen == nth:
                sockets.kill_latest()

    return on_event


def _outcome(turns: list[Any]) -> list[tuple[Any, ...]]:
    return [(t.file, t.heard, t.answer, t.status, bytes(t.audio)) for t in turns]


@pytest.mark.parametrize(
    ("kind", "nth", "before_send"),
    [
        ("response.output_audio.delta", 2, {}),  # mid-answer
        ("input_audio_buffer.speech_stopped", 1, {}),  # between the turn's end and its answer
        ("", 0, {b"input_audio_buffer.append": 30}),  # while the audio goes out
        ("", 0, {b'"session":{"type":"realtime"},': 2}),  # the second file's end-of-file barrier
    ],
)
async def test_a_dropped_connection_resumes_and_the_turns_complete_as_unbroken(
    tmp_path: Path, sockets: Sockets, kind: str, nth: int, before_send: dict[bytes, int]
) -> None:
    files = ["speech_open_window.wav", "speech_go_forward.wav"]
    # The stub hears ~10 words, so an answer is ~5 s of audio (320 kB of deltas): more than the
    # default replay buffer (256 KiB), which the server closes the session on when an answer
    # made while the client is away overflows it. Room for the whole answer here.
    realtime = "replay_buffer_bytes = 4194304"
    with trio.fail_after(TIMEOUT_S):
        plain, _, _ = await _talk(files, None, realtime)
        assert sockets.kills == 0
        events: list[dict[str, Any]] = []
        sockets.before_send = before_send
        turns, out, err = await _talk(
            files,
            tmp_path,
            realtime,
            resume=FAST_RESUME,
            on_event=_killer(sockets, kind, nth, events),
        )
    assert sockets.kills == 1 and len(sockets.streams) == 3  # plain, killed, its resume
    received = [e for e in events if e["type"] != RESUMED]
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))  # no gap, no dup
    assert _outcome(turns) == _outcome(plain) and len(turns) == 2
    assert _wav(tmp_path / "answer-1.wav")[1] == bytes(plain[0].audio)
    if kind == "response.output_audio.delta":  # the drop came mid-answer
        types = [e["type"] for e in events]
        assert types.index(RESUMED) < types.index("response.done")
    assert "spear-rt: connection dropped; resumed after event " in err
    assert "summary: 2 turns from 2 files, 2 answered" in out


async def test_a_server_error_event_ends_the_run_with_its_one_line() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_server(make_config(backends=VOICE_BACKENDS)) as server:
            url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
            with pytest.raises(ServerError) as info:
                await talk(
                    url,
                    load_speech([FIXTURES / "speech_open_window.wav"]),
                    options=FAST,
                    out=io.StringIO(),
                    err=io.StringIO(),
                )
    assert str(info.value).startswith("server error: unknown_parameter: session.")
    assert "\n" not in str(info.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ws://127.0.0.1:{_free_port()}"
    status = main(["talk", "--url", url, str(FIXTURES / "speech_open_window.wav")])
    out, err = capsys.readouterr()
    assert status == 2 and not out
    assert err.count("\n") == 1 and err.startswith(f"spear-rt: cannot connect to {url}/v1/realtime")
    assert "is `spear-rt serve` running?" in err


@pytest.mark.parametrize(
    ("file", "message"),
    [("/nonexistent.wav", "no such file"), (__file__, "cannot read audio file")],
)
def test_a_bad_file_is_one_line_and_exit_2_before_connecting(
    capsys: pytest.CaptureFixture[str], file: str, message: str
) -> None:
    url = f"ws://127.0.0.1:{_free_port()}"  # never reached: files are read first
    status = main(["talk", "--url", url, str(FIXTURES / "speech_open_window.wav"), file])
    out, err = capsys.readouterr()
    assert status == 2 and not out
    assert err.count("\n") == 1 and message in err and "cannot connect" not in err


async def test_demo_voice_talks_to_its_own_server_over_the_demo_fixtures(tmp_path: Path) -> None:
    out = io.StringIO()
    with trio.fail_after(TIMEOUT_S):
        status = await demo_voice(
            make_config(backends=VOICE_BACKENDS),
            [],
            pace="fast",
            out_dir=tmp_path,
            out=out,
            err=io.StringIO(),
        )
    text = out.getvalue()
    assert status == 0
    assert text.startswith("spear-rt demo-voice: server on 127.0.0.1:")
    for name in DEMO_FIXTURES:
        assert f"] {name} (" in text
    assert text.count("  assistant: stub:") == len(DEMO_FIXTURES)
    assert text.count(", voice-to-voice ") == len(DEMO_FIXTURES)
    assert f"summary: {len(DEMO_FIXTURES)} turns from {len(DEMO_FIXTURES)} files" in text
    assert len(list(tmp_path.glob("answer-*.wav"))) == len(DEMO_FIXTURES)


async def test_the_embedded_default_converses_offline_with_a_real_model(tmp_path: Path) -> None:
    """pocketsphinx hears, SmolLM2 (the `llama` extra, installed by `make test`) answers,
    espeak-ng speaks: no stub, no network."""
    out = io.StringIO()
    with trio.fail_after(90):
        status = await demo_voice(
            load_config(None),
            [str(FIXTURES / "speech_open_window.wav")],
            pace="fast",
            out_dir=tmp_path,
            out=out,
            err=io.StringIO(),
        )
    text = out.getvalue()
    assert status == 0, text
    assert "answered by chat smollm2, speech espeak" in text
    answer = next(line for line in text.splitlines() if line.startswith("  assistant: "))
    assert len(answer) > len("  assistant: ") + 2 and "stub:" not in answer
    with wave.open(str(tmp_path / "answer-1.wav")) as wav:
        assert wav.getnframes() > 24000 // 4  # a spoken answer, not a click


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("ws://127.0.0.1:8787", "ws://127.0.0.1:8787/v1/realtime?model=gpt-realtime"),
        ("ws://h:1/", "ws://h:1/v1/realtime?model=gpt-realtime"),
        ("wss://h/v1/realtime?model=m&x=1", "wss://h/v1/realtime?model=m&x=1"),
        ("ws://h/proxy/v1/realtime", "ws://h/proxy/v1/realtime?model=gpt-realtime"),
    ],
)
def test_realtime_url(base: str, url: str) -> None:
    assert realtime_url(base) == url


# --- the bookkeeping alone --------------------------------------------------------------------


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


def test_a_queued_response_answers_the_turns_before_it_and_empty_turns_get_none() -> None:
    book = TalkBook()
    book.begin_file("a.wav")
    feed = [
        (_event("session.updated"), 0.0),
        (_event("input_audio_buffer.speech_started", item_id="u1"), 0.1),
        (_event("input_audio_buffer.speech_stopped", item_id="u1"), 1.0),
        (_event("input_audio_buffer.committed", item_id="u1"), 1.0),
        (_event("input_audio_buffer.speech_started", item_id="u2"), 1.2),
        (_event("input_audio_buffer.speech_stopped", item_id="u2"), 2.0),
        (_event("input_audio_buffer.committed", item_id="u2"), 2.0),
        (_event("input_audio_buffer.speech_started", item_id="u3"), 2.2),
        (_event("input_audio_buffer.speech_stopped", item_id="u3"), 3.0),
        (_event("input_audio_buffer.committed", item_id="u3"), 3.0),
        (_event("session.updated"), 3.1),  # the barrier
        (
            _event(
                "conversation.item.input_audio_transcription.completed",
                item_id="u1",
                transcript="one",
            ),
            3.2,
        ),
        (_event("response.created", response={"id": "r1"}), 3.4),
        (
            _event(
                "conversation.item.input_audio_transcription.completed",
                item_id="u2",
                transcript="two",
            ),
            3.4,
        ),
    ]
    for event, now in feed:
        book.feed(event, now)
    assert not book.file_settled(2)  # the answer is in progress
    notes = book.feed(
        _event(
            "conversation.item.input_audio_transcription.completed", item_id="u3", transcript=" "
        ),
        3.5,
    )
    assert [type(n) for n in notes] == [Heard, Unanswered]
    book.feed(_event("response.output_audio.delta", response_id="r1", delta="AAA="), 3.6)
    notes = book.feed(_event("response.done", response={"id": "r1", "status": "completed"}), 3.8)
    (answered,) = notes
    assert isinstance(answered, Answered) and answered.turn.item_id == "u3"
    assert answered.turn.since_end(answered.turn.first_audio_at) == pytest.approx(0.6)
    assert bytes(answered.turn.audio) == b"\x00\x00" and book.file_settled(2)
    assert not book.file_settled(3)  # another barrier not yet answered


def test_a_manual_commit_times_the_turn_from_the_commit_and_expects_an_answer() -> None:
    book = TalkBook()
    book.begin_file("b.wav")
    book.feed(_event("input_audio_buffer.speech_started", item_id="u1"), 0.5)
    book.feed(_event("session.updated"), 1.0)
    assert book.passed(1) and book.open_item == "u1" and not book.file_settled(1)
    book.manual_commit(1.5)
    book.feed(_event("input_audio_buffer.committed", item_id="u1"), 1.6)
    book.feed(
        _event(
            "conversation.item.input_audio_transcription.completed", item_id="u1", transcript=""
        ),
        1.7,
    )
    (turn,) = book.turns
    assert turn.manual and turn.ended_at == 1.5 and turn.expects_answer
    assert not book.file_settled(1)  # the response.create it sent will be answered
    with pytest.raises(ServerError, match="boom"):
        book.feed(_event("error", error={"code": "x", "message": "boom"}), 2.0)
