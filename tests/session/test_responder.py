"""The responder against scripted stages (no sockets): what runs after a cancel.

The machine sends `response.done` the moment it cancels; nothing of the response may reach an
upstream after that, however the tasks happen to be scheduled. Explicit events order the
steps; no test sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio
import trio.lowlevel
import trio.testing

from spear_rt.config import ConversationConfig
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.session.conversation import AudioOut, CancelResponse, StartResponse
from spear_rt.session.responder import Responder
from spear_rt.session.stages import ChatChunk


class Conversation:
    def __init__(self) -> None:
        self.actions: list[Any] = []
        self.wake: Any = lambda: None

    def act(self, action: Any) -> None:
        self.actions.append(action)
        self.wake()


class Machine:
    """What the responder touches of a SessionMachine; `cancel` is Conversation._cancel."""

    session_id = "sess_test"

    def __init__(self) -> None:
        self.conversation = Conversation()
        self.done = False
        self.outputs: list[Any] = []
        self.first_audio = trio.Event()

    def response_output(self, out: Any) -> None:
        self.outputs.append(out)
        if isinstance(out, AudioOut):
            self.first_audio.set()

    def cancel(self, response_id: str) -> None:
        self.done = True  # response.done (cancelled) is out
        self.conversation.act(CancelResponse(response_id))


class Host:
    def after(self) -> None:
        pass

    async def wait_room(self) -> None:
        pass


class Stages:
    """Sentence one, then sentence two handed to the waiting speech task and, in the same
    tick, a barge-in."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.requests: list[tuple[str, bool]] = []  # (sentence, after response.done)
        self.chats = 0
        self.closed = trio.Event()

    @asynccontextmanager
    async def chat(self, payload: dict[str, Any]) -> AsyncIterator[AsyncIterator[ChatChunk]]:
        self.chats += 1

        async def chunks() -> AsyncIterator[ChatChunk]:
            yield ChatChunk(text="One. ")
            await self.machine.first_audio.wait()  # sentence one is spoken...
            await trio.testing.wait_all_tasks_blocked()  # ...and the speech task waits for more
            yield ChatChunk(text="Two. ")  # handed to the waiting speech task: runnable
            self.machine.cancel("resp_1")
            try:
                await trio.sleep_forever()
                yield ChatChunk(text="never")
            finally:
                self.closed.set()  # the cancel reached the chat stream

        yield chunks()

    async def speech(self, text: str, voice: str) -> tuple[Any, int]:
        self.requests.append((text, self.machine.done))
        await trio.lowlevel.checkpoint()
        return np.zeros(2400, dtype=np.int16), 24000

    def names(self) -> dict[str, str]:
        return {}


async def run_responder(machine: Machine, stages: Stages, *actions: Any) -> None:
    responder = Responder(machine, stages, Host(), ConversationConfig())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.run)
        for action in actions:
            machine.conversation.act(action)
        await stages.closed.wait()
        await trio.testing.wait_all_tasks_blocked()  # whatever was runnable has run
        nursery.cancel_scope.cancel()


async def test_no_speech_request_starts_after_the_cancel() -> None:
    """A speech request for a sentence handed over in the cancel's own tick started after
    response.done (seen in the load bench: 4 of 100 cancels at N=50)."""
    for _ in range(5):  # trio runs a batch of runnable tasks in either order: try a few
        machine = Machine()
        stages = Stages(machine)
        await run_responder(machine, stages, StartResponse("resp_1", [], ConversationSettings()))
        assert stages.requests == [("One.", False)]


async def test_a_response_cancelled_before_it_started_never_starts() -> None:
    machine = Machine()
    stages = Stages(machine)
    start = StartResponse("resp_1", [], ConversationSettings())
    responder = Responder(machine, stages, Host(), ConversationConfig())  # type: ignore[arg-type]
    machine.conversation.actions.extend([start])
    machine.cancel("resp_1")  # before the responder's task ever ran
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert stages.chats == 0 and machine.outputs == []
