"""Upstream SPEAR's chat family (``cchat_*``, spear-guests.md §5): fds, parameters, tool loop.

Pure Python, no I/O: a `ChatSession` fd collects messages, tools and parameters; `send`
runs one chat request (or, with AUTO_TOOL_CALL, the tool loop) through two callables the
binding gives it — `Complete` (the request through spear_rt's own one-shot path: normalize,
router, backend) and `CallTool` (the guest's function at ``fn_offset``) — and the result is
a `ChatResponse` fd, readable at once.

Rules:

1. SET_PARAM takes ``{"key":K,"value":V}``; bad JSON or an empty key -> ``-EIO`` (upstream's
   code); a key naming a URL or a credential, or a value carrying one -> ``-EACCES`` (the
   guest names a backend or a model, never where or with what key); ``stream: true``,
   ``messages`` and ``tools`` -> ``-EINVAL``; ``mcp.*`` is accepted (this host runs no MCP
   servers for guests, so no MCP tool joins the request) but ``mcp.task_*`` -> ``-EACCES``
   (task policy is the host's); the bounded keys are clamped to
   their caps; any other key becomes a field of the request. On a response fd: 0, ignored.
2. A failed completion still gives a response fd whose body is ``{"error":{...}}``; only a
   bad session fd (or a host fault) makes `cchat_send` negative.
3. The tool loop: at most ``max_iterations`` model calls and ``max_total_tool_calls`` tool
   calls (over either: a ``tool_call_limit`` error body); a registered tool runs in the
   guest, an unknown one (``mcp__`` ones too: no MCP servers here) or a failed callback gives
   the model an error object as the tool's output and the loop goes on.
4. A successful body gets ``_spear: {backend, model}`` (the routed instance; the requested
   model, else the response's); a non-object body is wrapped as ``{"_spear":…,"result":…}``.
   Encoded compact, as upstream guests search its text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from spear_rt.hostcalls.abi import EACCES, EINVAL, EIO, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from spear_rt.hostcalls.params import carries_secret, host_only_key, key_value, routing_name_ok
from spear_rt.hostcalls.rtfd import PlainFd

MAX_TOOL_OUTPUT_BYTES = (65536, 1 << 20)  # (default, cap)
MAX_TOTAL_TOOL_CALLS = (32, 10_000)
MAX_ITERATIONS = (8, 128)
MAX_MESSAGES_BYTES = 4 << 20  # a session's messages and tools together
FLAG_METRICS = 1
FLAG_AUTO_TOOL_CALL = 2
FLAG_STREAM = 4  # ours, not upstream's: deltas readable on the response fd as they arrive
MAX_STREAM_UNREAD = 4 << 20  # a guest not reading its stream: the request is cancelled
_REFUSED_FIELDS = frozenset({"messages", "tools"})
_COUNT_KEYS = frozenset({"max_tokens", "max_completion_tokens"})  # "token" is not a secret here


class Completed(msgspec.Struct, frozen=True):
    """What one chat request through the router gave: HTTP status, body and who answered."""

    status: int
    body: bytes
    instance: str | None = None


# (request body) -> the answer; runs the request through spear_rt's one-shot path.
Complete = Callable[[dict[str, Any], "ChatSession"], Completed]
# (fn_offset, arguments JSON text, session) -> (rc, output bytes)
CallTool = Callable[[int, bytes, "ChatSession"], tuple[int, bytes]]


class ChatSession(PlainFd):
    """A ``cchat_create`` fd: the request being built."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.messages: list[dict[str, Any]] = []
        self.tools: dict[str, tuple[int, dict[str, Any]]] = {}  # name -> (fn_offset, schema)
        self.fields: dict[str, Any] = {}  # extra request fields, in order
        self.model: str | None = None
        self.backend: str | None = None
        self.timeout_ms: int | None = None
        self.arena = (0, 0)  # tool_arena_ptr, tool_arena_len
        self.max_tool_output_bytes = MAX_TOOL_OUTPUT_BYTES[0]
        self.max_total_tool_calls = MAX_TOTAL_TOOL_CALLS[0]
        self.max_iterations = MAX_ITERATIONS[0]
        self.mcp: dict[str, list[str]] = {}
        self.mcp_enabled = False
        self.size = 0  # bytes of messages and tools held

    def events(self) -> int:
        """Always writable: messages are appended at once."""
        return EPOLLOUT

    def write_msg(self, role: str, content: str) -> int:
        """Append one message; -EINVAL past `MAX_MESSAGES_BYTES` for the session."""
        if self.size + len(role) + len(content) > MAX_MESSAGES_BYTES:
            return -EINVAL
        self.size += len(role) + len(content)
        self.messages.append({"role": role, "content": content})
        return 0

    def write_fn(self, fn_offset: int, raw: bytes) -> int:
        """Register a tool (OpenAI shape or bare ``{name, parameters}``; first name wins)."""
        try:
            schema = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return 0  # upstream drops a schema that is not JSON
        if not isinstance(schema, dict) or self.size + len(raw) > MAX_MESSAGES_BYTES:
            return -EINVAL
        function = schema.get("function") if schema.get("type") == "function" else schema
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            return -EINVAL
        if name not in self.tools:
            self.size += len(raw)
            tool = schema if "function" in schema else {"type": "function", "function": schema}
            self.tools[name] = (fn_offset, tool)
        return 0

    def set_param(self, raw: bytes) -> int:
        """Apply one SET_PARAM (rule 1): 0 or -errno."""
        param = key_value(raw)
        if param is None:
            return -EIO
        key, value = param
        if (host_only_key(key) and key not in _COUNT_KEYS) or carries_secret(value):
            return -EACCES
        return _apply(self, key, value)

    def request(self) -> dict[str, Any]:
        """The OpenAI chat request this session sends now."""
        body: dict[str, Any] = {"model": self.model or "", "messages": list(self.messages)}
        if self.tools:
            body["tools"] = [tool for _offset, tool in self.tools.values()]
        return {**body, **self.fields}


class ChatResponse(PlainFd):
    """A ``cchat_send`` result: readable at once, read whole by every ``cchat_recv``."""

    def __init__(self, fd: int, body: bytes, usage: dict[str, Any] | None) -> None:
        super().__init__(fd)
        self.body = body
        self.usage = usage  # None: metrics were not asked for at send

    def events(self) -> int:
        """Always readable."""
        return EPOLLIN

    def metrics(self) -> bytes:
        """The GET_METRICS object: the backend's usage (``{}`` unless asked for at send)."""
        return msgspec.json.encode(self.usage or {})


class ChatStream(PlainFd):
    """A streaming ``cchat_send`` result (FLAG_STREAM): the answer's text as it arrives.

    ``cchat_recv`` takes what arrived since the last read (consumed); ``-EAGAIN`` while the
    request runs with nothing new; 0 at the end. Readiness: IN text unread or the end
    reached, HUP at the end, ERR when it failed (the error JSON is then the last text).
    Fed from the event loop (`ChatCalls.feed`), under the table lock.
    """

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.unread = bytearray()
        self.done = False
        self.failed = False
        self.usage: dict[str, Any] = {}
        self.cancel: Callable[[], None] | None = None  # stops the request (any thread)

    def events(self) -> int:
        """IN / HUP / ERR as the class docstring says."""
        ready = EPOLLIN if self.unread or self.done else 0
        if self.done:
            ready |= EPOLLHUP
        if self.failed:
            ready |= EPOLLERR
        return ready

    def metrics(self) -> bytes:
        """The usage the stream reported (``{}`` until it does)."""
        return msgspec.json.encode(self.usage)


class SseText:
    """A chat completion's SSE bytes -> its content deltas and usage (chunks split anywhere)."""

    def __init__(self) -> None:
        self._pending = b""
        self.usage: dict[str, Any] = {}
        self.done = False

    def feed(self, chunk: bytes) -> str:
        """The content text in `chunk`'s complete events."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        text = []
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                event = msgspec.json.decode(data)
            except msgspec.DecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                self.usage = event["usage"]
            delta = _first_delta(event)
            if delta:
                text.append(delta)
        return "".join(text)


def _first_delta(event: Any) -> str | None:
    try:
        content = event["choices"][0]["delta"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else None


def _bounded(value: Any, limits: tuple[int, int]) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return None
    return min(value, limits[1])


def _apply(session: ChatSession, key: str, value: Any) -> int:
    match key:
        case "model" | "backend":
            if value == "":
                value = None  # upstream: the routed backend's own model
            if not routing_name_ok(key, value):
                return -EINVAL
            setattr(session, key, value)
        case "timeout_ms":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                return -EINVAL
            session.timeout_ms = value
        case "tool_arena_ptr" | "tool_arena_len":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
                return -EINVAL
            ptr, length = session.arena
            session.arena = (value, length) if key == "tool_arena_ptr" else (ptr, value)
        case "max_tool_output_bytes" | "max_total_tool_calls" | "max_tool_calls" | "max_iterations":
            name = "max_total_tool_calls" if key == "max_tool_calls" else key
            limits = {"max_tool_output_bytes": MAX_TOOL_OUTPUT_BYTES,
                      "max_total_tool_calls": MAX_TOTAL_TOOL_CALLS,
                      "max_iterations": MAX_ITERATIONS}[name]  # fmt: skip
            bounded = _bounded(value, limits)
            if bounded is None:
                return -EINVAL
            setattr(session, name, bounded)
        case "mcp.enabled":
            if not isinstance(value, bool):
                return -EINVAL
            session.mcp_enabled = value
        case "mcp.server_ids" | "mcp.tool_allowlist" | "mcp.tool_denylist":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return -EINVAL
            session.mcp[key] = value
        case _ if key.startswith("mcp.task_"):
            return -EACCES
        case _ if key.startswith("mcp."):
            return -EINVAL  # not an MCP parameter upstream knows
        case "stream":
            if value is not False:
                return -EINVAL  # not in upstream's ABI; our guests read deltas another way
        case _ if key in _REFUSED_FIELDS:
            return -EINVAL  # built by write_msg / write_fn, one choice only
        case _:
            session.fields[key] = value
    return 0


def error_body(code: str | None, message: str) -> bytes:
    """An upstream-shaped error body."""
    error: dict[str, str] = (
        {"message": message} if code is None else {"code": code, "message": message}
    )
    return msgspec.json.encode({"error": error})


def spear_body(answer: Any, instance: str | None, model: str | None) -> bytes:
    """A successful body with `_spear` (rule 4)."""
    if isinstance(answer, dict):
        served = model or answer.get("model")
        return msgspec.json.encode({**answer, "_spear": {"backend": instance, "model": served}})
    return msgspec.json.encode({"_spear": {"backend": instance, "model": model}, "result": answer})


class ChatOutcome(msgspec.Struct):
    """A send's result: the body for the response fd and the summed usage."""

    body: bytes
    usage: dict[str, int] = msgspec.field(default_factory=dict)


def run_send(
    session: ChatSession, flags: int, complete: Complete, call_tool: CallTool
) -> ChatOutcome:
    """One ``cchat_send``: a request, or the tool loop with AUTO_TOOL_CALL (rules 2-4)."""
    outcome = ChatOutcome(b"")
    calls = 0
    for _round in range(session.max_iterations):
        done = complete(session.request(), session)
        try:
            answer = msgspec.json.decode(done.body)
        except msgspec.DecodeError:
            answer = None
        if done.status != 200:
            outcome.body = (
                done.body
                if isinstance(answer, dict)
                else error_body(None, f"the backend answered HTTP {done.status}")
            )
            return outcome
        _add_usage(outcome.usage, answer)
        message = _first_message(answer)
        tool_calls = message.get("tool_calls") if message is not None else None
        if not (flags & FLAG_AUTO_TOOL_CALL) or not tool_calls or message is None:
            if message is not None:
                session.messages.append(message)
            outcome.body = spear_body(answer, done.instance, session.model)
            return outcome
        session.messages.append(message)
        for call in tool_calls:
            calls += 1
            if calls > session.max_total_tool_calls:
                outcome.body = error_body("tool_call_limit", "exceeded max_total_tool_calls")
                return outcome
            output = _run_tool(session, call, call_tool)
            call_id = call.get("id") if isinstance(call, dict) else None
            session.messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
    outcome.body = error_body("tool_call_limit", "exceeded max_iterations")
    return outcome


def _first_message(answer: Any) -> dict[str, Any] | None:
    try:
        message = answer["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    return message if isinstance(message, dict) else None


def _add_usage(total: dict[str, int], answer: Any) -> None:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value


def _run_tool(session: ChatSession, call: Any, call_tool: CallTool) -> str:
    """The output the model gets for one tool call (rule 3)."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", "") if isinstance(function, dict) else ""
    registered = session.tools.get(name) if isinstance(name, str) else None
    if registered is None and isinstance(name, str) and name.startswith(("mcp__", "mcp.")):
        message = f"MCP tool {name}: this host runs no MCP servers"
        return error_body("mcp_unavailable", message).decode()
    if registered is None:
        return error_body("unknown_tool", f"unknown tool: {name}").decode()
    args = arguments.encode() if isinstance(arguments, str) else msgspec.json.encode(arguments)
    rc, output = call_tool(registered[0], args, session)
    if rc != 0:
        return error_body("tool_exec_failed", f"tool rc: {rc}").decode()
    return output.decode("utf-8", "replace")
