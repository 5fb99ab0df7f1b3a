"""The ``cchat_*`` calls on an fd table, without WASM (rules in `spear_rt.hostcalls.cchat`).

The model is a scripted `Complete` (answers in order, each request recorded); tools are a
scripted `CallTool`. What must hold: upstream's error codes for SET_PARAM, nothing a guest
sets reaches beyond a model or backend name, failures still give a readable response, the
tool loop's limits, and the arena layout of the spec.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from spear_rt.hostcalls.abi import (
    EACCES,
    EAGAIN,
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    ENOSPC,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    BytesMemory,
    write_u32,
)
from spear_rt.hostcalls.cchat import (
    FLAG_AUTO_TOOL_CALL,
    FLAG_METRICS,
    FLAG_STREAM,
    ChatSession,
    Completed,
    SseText,
)
from spear_rt.hostcalls.chatcalls import GET_METRICS, SET_PARAM, ChatCalls
from spear_rt.hostcalls.epoll import EpollSet, FakeClock
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.upstream import arena_layout
from tests.hostcalls.conftest import ARG, LEN, OUT, OUT_CAP


def text_answer(content: str, usage: int = 3) -> Completed:
    body = {"choices": [{"message": {"role": "assistant", "content": content}}],
            "model": "m1", "usage": {"prompt_tokens": usage, "completion_tokens": 1,
                                      "total_tokens": usage + 1}}  # fmt: skip
    return Completed(200, msgspec.json.encode(body), "inst")


def tool_answer(*names: str) -> Completed:
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": '{"x":1}'}}
        for i, n in enumerate(names)
    ]
    body = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": calls}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    return Completed(200, msgspec.json.encode(body), "inst")


class Script:
    """A model answering in order, and tools answering by fn_offset."""

    def __init__(self, *answers: Completed, tools: dict[int, tuple[int, bytes]] | None = None):
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.tools = tools or {}
        self.tool_calls: list[tuple[int, bytes]] = []

    def complete(self, body: dict[str, Any], session: ChatSession) -> Completed:
        self.requests.append(json.loads(json.dumps(body)))
        return self.answers.pop(0)

    def call_tool(self, offset: int, args: bytes, session: ChatSession) -> tuple[int, bytes]:
        self.tool_calls.append((offset, args))
        return self.tools[offset]


def calls_for(script: Script) -> tuple[ChatCalls, BytesMemory]:
    return ChatCalls(FdTable(), script.complete, script.call_tool), BytesMemory(65536)


def set_param(calls: ChatCalls, mem: BytesMemory, fd: int, raw: bytes) -> int:
    mem.put(ARG, raw)
    write_u32(mem, LEN, len(raw))
    return calls.cchat_ctl(mem, fd, SET_PARAM, ARG, LEN)


def param(key: str, value: Any) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


def write_msg(calls: ChatCalls, mem: BytesMemory, fd: int, role: str, content: str) -> int:
    mem.put(ARG, role.encode())
    mem.put(ARG + 64, content.encode())
    return calls.cchat_write_msg(mem, fd, ARG, len(role), ARG + 64, len(content.encode()))


def recv(calls: ChatCalls, mem: BytesMemory, fd: int) -> Any:
    write_u32(mem, LEN, OUT_CAP)
    n = calls.cchat_recv(mem, fd, OUT, LEN)
    assert n > 0, n
    return json.loads(mem.read(OUT, n))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", -EIO),
        (param("", 1), -EIO),
        (b'{"value": 1}', -EIO),
        (param("base_url", "x"), -EACCES),
        (param("api_key", "x"), -EACCES),
        (param("user", "https://evil.example/"), -EACCES),
        (param("user", "sk-abcdef"), -EACCES),
        (param("mcp.enabled", True), 0),
        (param("mcp.server_ids", ["fs"]), 0),
        (param("mcp.task_policy", "any"), -EACCES),
        (param("mcp.bogus", 1), -EINVAL),
        (param("mcp.enabled", "yes"), -EINVAL),
        (param("stream", True), -EINVAL),
        (param("messages", []), -EINVAL),
        (param("backend", "a\r\nx-evil: 1"), -EINVAL),
        (param("timeout_ms", 0), -EINVAL),
        (param("max_iterations", -1), -EINVAL),
        (param("mcp.enabled", False), 0),
        (param("mcp.tool_allowlist", ["read_*"]), 0),
        (param("max_tokens", 16), 0),
        (param("model", ""), 0),
    ],
)
def test_set_param_codes(raw: bytes, expected: int) -> None:
    calls, mem = calls_for(Script())
    fd = calls.cchat_create()
    assert set_param(calls, mem, fd, raw) == expected


def test_the_request_carries_messages_tools_and_extra_fields_only() -> None:
    script = Script(text_answer("hi"))
    calls, mem = calls_for(script)
    fd = calls.cchat_create()
    for raw in (param("model", "gpt-4o-mini"), param("temperature", 0.5),
                param("max_tokens", 16), param("max_iterations", 1000),
                param("backend", "stub"), param("stream", False)):  # fmt: skip
        assert set_param(calls, mem, fd, raw) == 0
    assert write_msg(calls, mem, fd, "system", "be brief") == 0
    assert write_msg(calls, mem, fd, "user", "héllo") == 0
    schema = b'{"name":"f","parameters":{"type":"object"}}'
    mem.put(ARG, schema)
    assert calls.cchat_write_fn(mem, fd, 5, ARG, len(schema)) == 0
    other = b'{"type":"function","function":{"name":"f"}}'  # the same name: the first wins
    mem.put(ARG, other)
    assert calls.cchat_write_fn(mem, fd, 9, ARG, len(other)) == 0
    response = calls.cchat_send(fd, 0)
    assert response > fd
    [request] = script.requests
    assert request == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "héllo"}],
        "tools": [{"type": "function", "function": json.loads(schema)}],
        "temperature": 0.5,
        "max_tokens": 16,
    }  # fmt: skip
    session = calls.table.others[fd]
    assert isinstance(session, ChatSession)
    assert session.max_iterations == 128 and session.backend == "stub"  # clamped to the cap
    body = recv(calls, mem, response)
    assert body["_spear"] == {"backend": "inst", "model": "gpt-4o-mini"}
    assert recv(calls, mem, response) == body  # recv does not consume


def test_responses_are_readable_and_bounded_like_other_fds() -> None:
    calls, mem = calls_for(Script(text_answer("x" * 300)))
    fd = calls.cchat_create()
    response = calls.cchat_send(fd, 0)
    epolls = EpollSet(calls.table, FakeClock())
    ep = epolls.spear_epoll_create()
    assert epolls.spear_epoll_ctl(ep, 1, response, EPOLLIN) == 0
    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT, LEN, 0) == 1
    write_u32(mem, LEN, 10)
    assert calls.cchat_recv(mem, response, OUT, LEN) == -ENOSPC
    assert mem.get_u32(LEN) == len(calls.table.others[response].body)  # type: ignore[attr-defined]
    assert calls.cchat_recv(mem, response, 1 << 20, LEN) == -EFAULT
    write_u32(mem, LEN, 64)
    assert calls.cchat_ctl(mem, response, GET_METRICS, OUT, LEN) == 2  # "{}" without the flag
    assert calls.cchat_ctl(mem, fd, GET_METRICS, OUT, LEN) == -EBADF
    assert calls.cchat_ctl(mem, response, 7, OUT, LEN) == -EINVAL
    assert set_param(calls, mem, response, param("model", "m")) == 0  # ignored on a response
    assert calls.cchat_recv(mem, fd, OUT, LEN) == -EBADF
    assert calls.cchat_close(response) == 0
    assert calls.cchat_close(response) == 0  # closed before: 0, as upstream
    assert calls.cchat_close(9999) == -EBADF  # never given out
    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT, LEN, 0) == 1  # the close: one EPOLLHUP
    assert calls.cchat_send(12345, 0) == -EBADF


def test_a_failed_completion_is_still_a_response() -> None:
    error = b'{"error":{"message":"no backend serves gpt-9","code":"no_backend"}}'
    calls, mem = calls_for(Script(Completed(503, error), Completed(502, b"<html>")))
    fd = calls.cchat_create()
    assert recv(calls, mem, calls.cchat_send(fd, 0)) == json.loads(error)  # no _spear
    assert recv(calls, mem, calls.cchat_send(fd, 0)) == {
        "error": {"message": "the backend answered HTTP 502"}
    }


def test_the_tool_loop_feeds_outputs_back_and_keeps_going_on_failures() -> None:
    script = Script(
        tool_answer("f", "nope", "g"),
        text_answer("done", usage=5),
        tools={1: (0, b'{"ok":true}'), 2: (-5, b"")},
    )
    calls, mem = calls_for(script)
    fd = calls.cchat_create()
    for offset, name in ((1, "f"), (2, "g")):
        schema = json.dumps({"name": name}).encode()
        mem.put(ARG, schema)
        assert calls.cchat_write_fn(mem, fd, offset, ARG, len(schema)) == 0
    body = recv(calls, mem, calls.cchat_send(fd, FLAG_AUTO_TOOL_CALL | FLAG_METRICS))
    assert body["choices"][0]["message"]["content"] == "done"
    assert script.tool_calls == [(1, b'{"x":1}'), (2, b'{"x":1}')]
    outputs = [(m["tool_call_id"], m["content"]) for m in script.requests[1]["messages"]
               if m["role"] == "tool"]  # fmt: skip
    assert outputs == [
        ("call_0", '{"ok":true}'),
        ("call_1", '{"error":{"code":"unknown_tool","message":"unknown tool: nope"}}'),
        ("call_2", '{"error":{"code":"tool_exec_failed","message":"tool rc: -5"}}'),
    ]
    response = max(calls.table.others)
    write_u32(mem, LEN, 128)
    n = calls.cchat_ctl(mem, response, GET_METRICS, OUT, LEN)
    assert json.loads(mem.read(OUT, n)) == {"prompt_tokens": 6, "completion_tokens": 2,
                                            "total_tokens": 8}  # fmt: skip


@pytest.mark.parametrize(
    ("key", "limit", "answers", "message"),
    [
        ("max_iterations", 2, 3, "exceeded max_iterations"),
        ("max_total_tool_calls", 1, 2, "exceeded max_total_tool_calls"),
    ],
)
def test_the_tool_loop_stops_at_its_limits(
    key: str, limit: int, answers: int, message: str
) -> None:
    script = Script(*[tool_answer("f") for _ in range(answers)], tools={1: (0, b"{}")})
    calls, mem = calls_for(script)
    fd = calls.cchat_create()
    assert set_param(calls, mem, fd, param(key, limit)) == 0
    mem.put(ARG, b'{"name":"f"}')
    calls.cchat_write_fn(mem, fd, 1, ARG, 12)
    body = recv(calls, mem, calls.cchat_send(fd, FLAG_AUTO_TOOL_CALL))
    assert body == {"error": {"code": "tool_call_limit", "message": message}}
    assert len(script.requests) <= limit + 1


def test_without_auto_tool_call_the_tool_calls_come_back_as_they_are() -> None:
    script = Script(tool_answer("f"), tools={1: (0, b"{}")})
    calls, mem = calls_for(script)
    fd = calls.cchat_create()
    body = recv(calls, mem, calls.cchat_send(fd, 0))
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"
    assert script.tool_calls == []


@pytest.mark.parametrize(
    ("ptr", "length", "n", "expected"),
    [
        (16781120, 131072, 15, (16781120 + 16, 65536, 16781120 + 16 + 65536)),
        (1024, 4096, 15, (1040, 4096 - 16 - 8, 1040 + 4072)),
        (0, 4096, 15, -EFAULT),
        (1024, 0, 15, -EFAULT),
        (1024, 24, 15, -ENOSPC),
    ],
)
def test_the_tool_arena_layout(ptr: int, length: int, n: int, expected: Any) -> None:
    assert arena_layout(ptr, length, n, 65536) == expected


class Streams:
    """A StartStream that only records; the test feeds the stream itself."""

    def __init__(self) -> None:
        self.started: list[tuple[dict[str, Any], Any, Any]] = []

    def __call__(self, body: dict[str, Any], session: ChatSession, stream: Any, feed: Any) -> None:
        stream.cancel = lambda: self.started.append(({"cancelled": True}, None, None))
        self.started.append((body, stream, feed))


def test_a_streaming_send_reads_text_as_it_arrives() -> None:
    starter = Streams()
    calls = ChatCalls(FdTable(), Script().complete, Script().call_tool, starter)
    mem = BytesMemory(65536)
    fd = calls.cchat_create()
    assert calls.cchat_send(fd, FLAG_STREAM | FLAG_AUTO_TOOL_CALL) == -EINVAL
    response = calls.cchat_send(fd, FLAG_STREAM)
    [(body, stream, feed)] = starter.started
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    write_u32(mem, LEN, OUT_CAP)
    assert calls.cchat_recv(mem, response, OUT, LEN) == -EAGAIN and stream.events() == 0
    assert feed.text(stream, "Par") and feed.text(stream, "is")
    assert stream.events() == EPOLLIN
    write_u32(mem, LEN, OUT_CAP)
    assert calls.cchat_recv(mem, response, OUT, LEN) == 5 and mem.read(OUT, 5) == b"Paris"
    write_u32(mem, LEN, OUT_CAP)
    assert calls.cchat_recv(mem, response, OUT, LEN) == -EAGAIN  # consumed
    feed.end(stream, {"total_tokens": 3})
    assert stream.events() == EPOLLIN | EPOLLHUP
    write_u32(mem, LEN, OUT_CAP)
    assert calls.cchat_recv(mem, response, OUT, LEN) == 0  # the end
    write_u32(mem, LEN, 64)
    n = calls.cchat_ctl(mem, response, GET_METRICS, OUT, LEN)
    assert json.loads(mem.read(OUT, n)) == {"total_tokens": 3}
    assert calls.cchat_close(response) == 0
    assert starter.started[-1][0] == {"cancelled": True}  # closing stops the request
    assert not feed.text(stream, "late")


def test_a_failed_stream_ends_with_its_error() -> None:
    starter = Streams()
    calls = ChatCalls(FdTable(), Script().complete, Script().call_tool, starter)
    mem = BytesMemory(65536)
    response = calls.cchat_send(calls.cchat_create(), FLAG_STREAM)
    _body, stream, feed = starter.started[0]
    feed.end(stream, {}, b'{"error":{"message":"no backend"}}')
    assert stream.events() == EPOLLIN | EPOLLHUP | EPOLLERR
    write_u32(mem, LEN, OUT_CAP)
    n = calls.cchat_recv(mem, response, OUT, LEN)
    assert json.loads(mem.read(OUT, n)) == {"error": {"message": "no backend"}}


def test_sse_text_survives_chunks_split_anywhere() -> None:
    events = [{"choices": [{"delta": {"role": "assistant"}}]},
              {"choices": [{"delta": {"content": "hel"}}]},
              {"choices": [{"delta": {"content": "lo"}}]},
              {"choices": [], "usage": {"total_tokens": 2}}]  # fmt: skip
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    raw += b"data: [DONE]\n\n"
    for size in (1, 7, len(raw)):
        sse = SseText()
        text = "".join(sse.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        assert text == "hello" and sse.usage == {"total_tokens": 2} and sse.done


def test_an_mcp_tool_call_is_answered_that_no_mcp_server_runs_here() -> None:
    script = Script(tool_answer("mcp__ZnM__cmVhZF9maWxl"), text_answer("no file"))
    calls, mem = calls_for(script)
    fd = calls.cchat_create()
    assert set_param(calls, mem, fd, param("mcp.enabled", True)) == 0
    body = recv(calls, mem, calls.cchat_send(fd, FLAG_AUTO_TOOL_CALL))
    assert body["choices"][0]["message"]["content"] == "no file"
    [tool] = [m for m in script.requests[1]["messages"] if m["role"] == "tool"]
    assert json.loads(tool["content"])["error"]["code"] == "mcp_unavailable"
