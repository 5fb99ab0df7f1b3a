"""One-shot hostcall families (the seeds' Option A): ``emb_*``, ``asr_*``, ``tts_*``, ``img_*``.

Each has the shape of ``cchat_*``: ``X_create() -> fd``; ``X_write(fd, ptr, len)`` gives the
input (text to embed, audio file bytes to transcribe, text to speak, an image prompt;
``emb_write`` may be called again for more inputs); ``X_ctl(fd, 1 SET_PARAM, {"key","value"})``
sets ``model``, ``backend``, ``timeout_ms`` or a field of the request (``voice``,
``response_format``, ``size``, ``language``, ...), with cchat's rules (a URL or a key ->
``-EACCES``); ``X_send(fd, 0) -> response fd`` runs the request through the router exactly
like the HTTP endpoint; ``X_recv(resp, out, out_len)`` copies the whole body (the endpoint's
JSON, or for tts the audio bytes); ``X_ctl(resp, 2 GET_STATUS)`` gives ``{status,
content_type, backend, bytes}``; ``X_close``. A failed request still gives a response fd,
its body the error JSON and its status the HTTP status.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from spear_rt.hostcalls.abi import (
    EACCES,
    EBADF,
    EFAULT,
    EINVAL,
    EIO,
    EMFILE,
    EPOLLIN,
    EPOLLOUT,
    GuestMemory,
    MemoryFault,
    deliver,
    read_input,
)
from spear_rt.hostcalls.cchat import ChatSession, Complete, Completed
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.params import carries_secret, host_only_key, key_value, routing_name_ok
from spear_rt.hostcalls.rtfd import PlainFd

MAX_INPUT_BYTES = 32 << 20
SET_PARAM, GET_STATUS = 1, 2


class Sent(msgspec.Struct, frozen=True):
    """An answer of the one-shot path."""

    status: int
    body: bytes
    content_type: str
    instance: str | None = None


# (path, content type, body, backend, timeout_ms) -> the answer
Send = Callable[[str, str, bytes, str | None, int | None], Sent]
CHAT_PATH = "/v1/chat/completions"


def chat_over(send: Send) -> Complete:
    """cchat's request (`Complete`) sent as POST /v1/chat/completions through `send`."""

    def complete(body: dict[str, Any], session: ChatSession) -> Completed:
        sent = send(CHAT_PATH, "application/json", msgspec.json.encode(body), session.backend,
                    session.timeout_ms)  # fmt: skip
        return Completed(sent.status, sent.body, sent.instance)

    return complete


class Family(msgspec.Struct, frozen=True):
    """One family: its endpoint and how the input becomes the request."""

    name: str
    path: str
    input_field: str  # the JSON field (or form field) the written input goes to
    multipart: bool = False
    many: bool = False  # each write is one more input (a list)


FAMILIES = {
    "emb": Family("emb", "/v1/embeddings", "input", many=True),
    "asr": Family("asr", "/v1/audio/transcriptions", "file", multipart=True),
    "tts": Family("tts", "/v1/audio/speech", "input"),
    "img": Family("img", "/v1/images/generations", "prompt"),
}


class OneShotFd(PlainFd):
    """A request being built."""

    def __init__(self, fd: int, family: Family) -> None:
        super().__init__(fd)
        self.family = family
        self.inputs: list[bytes] = []
        self.size = 0
        self.fields: dict[str, Any] = {}
        self.backend: str | None = None
        self.timeout_ms: int | None = None

    def events(self) -> int:
        """Always writable."""
        return EPOLLOUT

    def set_param(self, raw: bytes) -> int:
        """``{"key","value"}``: 0 or -errno (cchat's rules)."""
        param = key_value(raw)
        if param is None:
            return -EIO
        key, value = param
        if host_only_key(key) or carries_secret(value):
            return -EACCES
        if key in ("model", "backend") and not routing_name_ok(key, value):
            return -EINVAL
        if key == "backend":
            self.backend = value
        elif key == "timeout_ms":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                return -EINVAL
            self.timeout_ms = value
        elif key in (self.family.input_field, "stream"):
            return -EINVAL  # the input comes from X_write; one-shot answers are whole
        else:
            self.fields[key] = value
        return 0

    def request(self) -> tuple[str, bytes]:
        """(content type, body) of the request."""
        family = self.family
        if family.multipart:
            return _multipart(self.fields, self.inputs[-1] if self.inputs else b"")
        texts = [data.decode("utf-8", "replace") for data in self.inputs]
        value: Any = texts if family.many and len(texts) != 1 else "".join(texts)
        return "application/json", msgspec.json.encode({**self.fields, family.input_field: value})


class OneShotResponse(PlainFd):
    """A send's result: readable at once, read whole by every recv."""

    def __init__(self, fd: int, sent: Sent) -> None:
        super().__init__(fd)
        self.sent = sent

    def events(self) -> int:
        """Always readable."""
        return EPOLLIN


def _multipart(fields: dict[str, Any], data: bytes) -> tuple[str, bytes]:
    boundary = "spear" + secrets.token_hex(12)
    parts = []
    for key, value in fields.items():
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(key)}"'
                     f"\r\n\r\n{text}\r\n".encode())  # fmt: skip
    head = 'Content-Disposition: form-data; name="file"; filename="audio"'
    parts.append(
        f"--{boundary}\r\n{head}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
    )
    parts.append(data + f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _quoted(name: str) -> str:
    return name.replace('"', "").replace("\r", "").replace("\n", "")


class OneShotCalls:
    """The four families' calls over `table`, sending through `send`."""

    def __init__(self, table: FdTable, send: Send) -> None:
        self.table = table
        self.send = send

    def create(self, family: Family) -> int:
        """``X_create``."""
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            if self.table.down:
                return -EIO
            fd = OneShotFd(self.table.alloc(), family)
            self.table.others[fd.fd] = fd
            return fd.fd

    def write(self, family: Family, mem: GuestMemory, fd: int, ptr: int, length: int) -> int:
        """``X_write``: the input (appended for emb); its length."""
        try:
            data = mem.read(ptr, length)
        except MemoryFault:
            return -EFAULT
        with self.table.lock:
            target = self._fd(fd, family)
            if target is None:
                return -EBADF
            if target.size + len(data) > MAX_INPUT_BYTES:
                return -EINVAL
            if not family.many:
                target.inputs, target.size = [], 0
            target.inputs.append(data)
            target.size += len(data)
            return len(data)

    def ctl(
        self, family: Family, mem: GuestMemory, fd: int, cmd: int, arg: int, arg_len: int
    ) -> int:
        """``X_ctl``: SET_PARAM on a request, GET_STATUS on a response."""
        with self.table.lock:
            target = self.table.others.get(fd)
            try:
                if isinstance(target, OneShotFd) and target.family is family and cmd == SET_PARAM:
                    return target.set_param(read_input(mem, arg, arg_len))
                if isinstance(target, OneShotResponse) and cmd == GET_STATUS:
                    sent = target.sent
                    status = {"status": sent.status, "content_type": sent.content_type,
                              "backend": sent.instance, "bytes": len(sent.body)}  # fmt: skip
                    return deliver(mem, arg, arg_len, msgspec.json.encode(status))
            except MemoryFault:
                return -EFAULT
            return -EBADF if not isinstance(target, OneShotFd | OneShotResponse) else -EINVAL

    def send_request(self, family: Family, fd: int, flags: int) -> int:
        """``X_send``: a response fd (readable at once)."""
        with self.table.lock:
            target = self._fd(fd, family)
            if target is None:
                return -EBADF
            if not target.inputs:
                return -EINVAL
            content_type, body = target.request()
            backend, timeout_ms = target.backend, target.timeout_ms
        sent = self.send(family.path, content_type, body, backend, timeout_ms)
        with self.table.lock:
            if self.table.full():
                return -EMFILE
            response = OneShotResponse(self.table.alloc(), sent)
            self.table.others[response.fd] = response
            return response.fd

    def recv(self, mem: GuestMemory, fd: int, out_ptr: int, out_len: int) -> int:
        """``X_recv``: the whole body (not consumed)."""
        with self.table.lock:
            response = self.table.others.get(fd)
            if not isinstance(response, OneShotResponse):
                return -EBADF
            try:
                return deliver(mem, out_ptr, out_len, response.sent.body)
            except MemoryFault:
                return -EFAULT

    def close(self, fd: int) -> int:
        """``X_close``."""
        with self.table.lock:
            if not isinstance(self.table.others.get(fd), OneShotFd | OneShotResponse):
                return self.table.closed_before(fd)
            self.table.close_other(fd)
            return 0

    def _fd(self, fd: int, family: Family) -> OneShotFd | None:
        target = self.table.others.get(fd)
        if isinstance(target, OneShotFd) and target.family is family:
            return target
        return None


def imports(calls: OneShotCalls) -> dict[str, tuple[int, bool, Callable[..., int]]]:
    """name -> (arity, takes memory, function) for every family."""
    table: dict[str, tuple[int, bool, Callable[..., int]]] = {}
    for prefix, family in FAMILIES.items():
        table[f"{prefix}_create"] = (0, False, lambda f=family: calls.create(f))
        table[f"{prefix}_write"] = (
            3,
            True,
            lambda m, fd, p, n, f=family: calls.write(f, m, fd, p, n),
        )
        table[f"{prefix}_ctl"] = (
            4,
            True,
            lambda m, fd, c, a, n, f=family: calls.ctl(f, m, fd, c, a, n),
        )
        table[f"{prefix}_send"] = (2, False, lambda fd, fl, f=family: calls.send_request(f, fd, fl))
        table[f"{prefix}_recv"] = (3, True, calls.recv)
        table[f"{prefix}_close"] = (1, False, calls.close)
    return table
