"""`relay.restore_commands`: a new speech-to-speech upstream gets the conversation in order.

A user audio turn still waiting for its transcript is replayed where it stands (the journal's
audio and commit), and the item after it is appended (only the upstream knows the committed
item's id); a turn the journal no longer holds is left out.
"""

from __future__ import annotations

import numpy as np

from spear_rt.backend import AppendAudio, BeginTurn, Commit, CreateItem, UpdateConversation
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.session.conversation_items import Item
from spear_rt.session.relay import restore_commands


def user_text(item_id: str, text: str) -> Item:
    return Item(id=item_id, role="user", content=[{"kind": "input_text", "text": text}])


def user_audio(item_id: str, transcript: str | None) -> Item:
    return Item(
        id=item_id, role="user", content=[{"kind": "input_audio", "transcript": transcript}]
    )


def answer(item_id: str, text: str) -> Item:
    return Item(id=item_id, role="assistant", content=[{"kind": "audio", "transcript": text}])


def test_an_untranscribed_turn_is_replayed_in_its_place() -> None:
    pcm = np.zeros(480, np.int16)
    turn = [BeginTurn("u2"), AppendAudio(pcm), Commit("u2")]
    replays = {"u2": turn, "u9": [BeginTurn("u9"), Commit("u9")]}
    items = [user_text("u1", "hi"), answer("a1", "hello"), user_audio("u2", None),
             answer("a2", "it is")]  # fmt: skip
    commands = restore_commands(ConversationSettings(), items, replays)
    assert isinstance(commands[0], UpdateConversation)
    created = [(c.item["id"], c.previous_item_id) for c in commands if isinstance(c, CreateItem)]
    assert created == [("u1", "root"), ("a1", "u1"), ("a2", None)]
    kinds = [type(c).__name__ for c in commands[1:]]
    assert kinds == ["CreateItem", "CreateItem", "BeginTurn", "AppendAudio", "Commit",
                     "CreateItem"]  # fmt: skip
    assert replays == {"u9": [BeginTurn("u9"), Commit("u9")]}  # not placed: the caller sends it


def test_a_transcribed_turn_is_text_and_a_lost_one_is_left_out() -> None:
    items = [user_audio("u1", "what time"), user_audio("u2", None), answer("a1", "noon")]
    commands = restore_commands(ConversationSettings(), items, {})
    created = [c.item for c in commands if isinstance(c, CreateItem)]
    assert [i["id"] for i in created] == ["u1", "a1"]
    assert created[0]["content"] == [{"type": "input_text", "text": "what time"}]
    assert created[1]["content"] == [{"type": "output_text", "text": "noon"}]
