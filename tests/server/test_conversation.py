"""Voice conversations end to end over a real socket (conversation.md).

The user speaks (fixture audio, server VAD), pocketsphinx hears it, the fake chat upstream
streams a scripted answer, espeak speaks it sentence by sentence, and the answer's audio,
recognized back by pocketsphinx, matches its transcript. Every event validates against the
SDK's models.
"""

from __future__ import annotations

from typing import Any

import pytest

from spear_rt.server.app import Server
from tests.conftest import DRIVERS, IDS, load_fixture_24k
from tests.fakes.openai_upstream import FakeOpenAI, text_events
from tests.server.conversation_rig import (
    Talk,
    answer_pcm,
    heard_fraction,
    response_events,
    run_rig,
    transcribe_back,
)

INSTRUCTIONS = "You are a helpful robot. Answer in one sentence."
COMPLETED = "conversation.item.input_audio_transcription.completed"
VAD = {"type": "server_vad", "silence_duration_ms": 500}
# Scripted answers (content deltas) in words the local recognizer hears back reliably.
ANSWERS = [
    ["The weather ", "is nice today. ", "Let us ", "go outside."],
    ["Please open ", "the window. ", "It is warm ", "in here."],
]
FIXTURES = ("speech_go_forward.wav", "speech_turn_left.wav")
VOICE = "nova"  # espeak-ng en-us+f2: the voice pocketsphinx hears best (NOTES.md)


def voice_session(dialect: str) -> dict[str, Any]:
    """Server VAD (answers each turn), audio out, our instructions; in the dialect's shape."""
    if dialect == "ga":
        return {
            "instructions": INSTRUCTIONS,
            "audio": {"input": {"turn_detection": VAD}, "output": {"voice": VOICE}},
        }
    return {"instructions": INSTRUCTIONS, "turn_detection": VAD, "voice": VOICE}


def chat_requests(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path == "/v1/chat/completions"]


async def spoken_turns(server: Server, fake: FakeOpenAI, dialect: str) -> dict[str, Any]:
    """Two spoken turns; what was heard, answered, and heard back from the answer's audio."""
    assert server.port is not None
    talk = await Talk.open(server.port, dialect, **voice_session(dialect))
    turns = []
    for fixture, answer in zip(FIXTURES, ANSWERS, strict=True):
        fake.slow_stream(text_events(answer)).release(len(answer) + 4)
        await talk.say(load_fixture_24k(fixture))
        events = await talk.until(COMPLETED)
        heard = events[-1]["transcript"]
        events = await talk.until("response.done")
        done = events[-1]["response"]
        mine = response_events(events, done["id"])
        answer = "".join(e["delta"] for e in mine if e["type"] == talk.names("transcript_delta"))
        pcm = answer_pcm(mine, talk.names("audio_delta"))
        turns.append(
            {
                "heard": heard,
                "done": done,
                "answer": answer,
                "audio_s": len(pcm) / 24000,
                "heard_back": await transcribe_back(server.port, pcm),
                "types": [e["type"] for e in mine],
            }
        )
    await talk.close()
    return {"turns": turns, "chat": chat_requests(fake), "checked": talk.checker.checked}


def check_spoken_turns(result: dict[str, Any], dialect: str) -> None:
    turns, chat = result["turns"], result["chat"]
    assert len(chat) == 2  # one chat request per turn, nothing else
    for turn, (request, script) in zip(turns, zip(chat, ANSWERS, strict=True), strict=True):
        assert turn["heard"].strip(), turn
        assert request["messages"][-1] == {"role": "user", "content": turn["heard"]}
        done = turn["done"]
        assert done["status"] == "completed", done
        assert turn["answer"] == "".join(script)  # the transcript is the chat's text
        assert done["output"][0]["content"][0]["transcript"] == turn["answer"]
        assert turn["audio_s"] > 0.5
        # the spoken answer says what its transcript says (local recognizer, espeak voice)...
        assert heard_fraction(turn["answer"], turn["heard_back"]) >= 0.5, turn
        assert done["spear"]["chat"] == "fake"
        assert done["spear"]["speech"] == "espeak"
    first, second = turns
    # ...and not what the other answer says
    for this, other in ((first, second), (second, first)):
        own = heard_fraction(this["answer"], this["heard_back"])
        assert own > heard_fraction(other["answer"], this["heard_back"]), (this, other)
    # the second turn's chat request carries the first turn and its answer, after instructions
    assert chat[1]["messages"] == [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": first["heard"]},
        {"role": "assistant", "content": first["answer"]},
        {"role": "user", "content": second["heard"]},
    ]
    assert chat[1]["stream"] is True
    audio_delta = "response.output_audio.delta" if dialect == "ga" else "response.audio.delta"
    assert audio_delta in second["types"]
    assert second["types"][-1] == "response.done"
    assert result["checked"] > 40


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_spoken_questions_get_spoken_answers_with_history(backend: str, driver: str) -> None:
    result = run_rig(backend, driver, lambda s, f: spoken_turns(s, f, "ga"))
    check_spoken_turns(result, "ga")


def test_spoken_conversation_in_the_beta_dialect() -> None:
    result = run_rig("trio", "auto", lambda s, f: spoken_turns(s, f, "beta"))
    check_spoken_turns(result, "beta")
