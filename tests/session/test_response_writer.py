"""The response writer keeps an upstream's output item ids, and one item stays one item."""

from __future__ import annotations

from typing import Any

from spear_rt.backend import AudioOut
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.session.conversation_items import Item
from spear_rt.session.response_writer import OpenResponse, ResponseWriter


def writer() -> tuple[ResponseWriter, list[Item], list[Any]]:
    items: list[Item] = [Item(id="item_taken", role="user")]
    events: list[Any] = []
    count = iter(range(1, 100))
    return ResponseWriter(events.append, lambda p: f"{p}_own{next(count)}", items), items, events


def test_an_upstream_item_id_is_kept_unless_taken_and_its_deltas_stay_in_one_item() -> None:
    for upstream_id, expected in (("item_up", "item_up"), ("item_taken", "item_own1"),
                                  ("x" * 100, "item_own1")):  # fmt: skip
        w, items, _ = writer()
        response = OpenResponse("resp_1", ConversationSettings(), False, None)
        w.text(response, "Hello", upstream_id)
        w.audio(response, AudioOut("resp_1", "AAAA", 10.0, 5, upstream_id))
        w.text(response, " there", upstream_id)
        assert [i.id for i in response.output] == [expected]
        assert items[-1].content[0]["transcript"] == "Hello there"


def test_a_new_upstream_item_opens_a_new_item() -> None:
    w, _, _ = writer()
    response = OpenResponse("resp_1", ConversationSettings(), False, None)
    w.text(response, "one", "item_a")
    w.text(response, "two", "item_b")
    w.text(response, "three", None)  # no id: the open item goes on
    assert [i.id for i in response.output] == ["item_a", "item_b"]
    assert response.output[1].content[0]["transcript"] == "twothree"
