"""Property tests of the HTTP edge (hypothesis, derandomized and bounded).

Garbled request bytes and multipart bodies go to a real server on 127.0.0.1 (the asyncio
callback driver, in a thread of its own) over plain blocking sockets, in random-sized writes.
Whatever arrives: never a 500 and never a traceback in the log; each answer is a well-formed
response with a 1xx-4xx status (501 for a transfer coding h11 does not know, as RFC 9112 asks),
and the server ends the connection once the client has half-closed. The multipart parser on
its own raises nothing but a one-line `MultipartError`.
"""

from __future__ import annotations

import itertools
import logging
import re
import socket
import threading
from collections.abc import Iterator

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_rt.server import multipart
from spear_rt.server.app import Server
from tests.conftest import FIXTURES, make_config

WAV = (FIXTURES / "speech_turn_left.wav").read_bytes()[:4000]
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SOCKET_TIMEOUT_S = 10.0
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3})[^\r\n]*\r\n")


class Collect(logging.Handler):
    """Keeps every log record at ERROR or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


class Running:
    """A server on a thread of its own (its own event loop), stopped at the end."""

    def __init__(self, tmp: str, backend: str) -> None:
        self.port = 0
        self._ready, self._stop = threading.Event(), threading.Event()
        media = f'[media]\nroot = "{tmp}/media"\n'
        self._config = make_config(server="max_http_body_bytes = 200000", extra=media)
        self._thread = threading.Thread(
            target=anyio.run, args=(self._main,), kwargs={"backend": backend}, daemon=True
        )

    async def _main(self) -> None:
        server = Server(self._config)
        async with anyio.create_task_group() as tg:
            self.port = await tg.start(server.serve)
            self._ready.set()
            await anyio.to_thread.run_sync(self._stop.wait)
            tg.cancel_scope.cancel()

    def __enter__(self) -> Running:
        self._thread.start()
        assert self._ready.wait(30), "the server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module", params=["trio", "asyncio"], ids=["trio", "asyncio-callbacks"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, Collect]]:
    """A server per driver: trio (anyio tasks) and asyncio (its callback driver, the default)."""
    collect = Collect()
    logger = logging.getLogger("spear_rt")
    logger.addHandler(collect)
    try:
        with Running(str(tmp_path_factory.mktemp("fuzz")), request.param) as server:
            yield server.port, collect
    finally:
        logger.removeHandler(collect)


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send `data` in pieces (cut at `cuts`), half-close, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        try:
            for start, end in itertools.pairwise(bounds):
                if end > start:
                    sock.sendall(data[start:end])
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the server answered and closed first
            pass
        out = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out.append(chunk)  # a timeout here (server never closed) fails the test
        return b"".join(out)


def statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in `raw`, checking each is framed by Content-Length."""
    found = []
    while raw:
        match = _STATUS.match(raw)
        assert match, raw[:200]
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        length = re.search(rb"(?im)^content-length: *(\d+)\r?$", head)
        status = int(match.group(1))
        size = int(length.group(1)) if length else 0
        assert length or status < 200, head
        assert len(rest) >= size, head
        found.append(status)
        raw = rest[size:]
    return found


def check(raw: bytes, collect: Collect) -> list[int]:
    codes = statuses(raw)
    assert all(100 <= c < 500 or c == 501 for c in codes), codes
    assert not collect.bad, [r.getMessage() for r in collect.bad]
    return codes


def _request(method: str, target: str, headers: list[str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _form(boundary: str, parts: list[bytes]) -> bytes:
    b = boundary.encode("latin-1")
    return b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--\r\n"


JSON = "Content-Type: application/json"
_CHAT = b'{"model":"stub","messages":[{"role":"user","content":"hi"}]}'
_UPLOAD = _form(
    "xyz",
    [
        b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + WAV,
        b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1',
    ],
)
TEMPLATES = [
    _request("GET", "/healthz", []),
    _request("POST", "/v1/chat/completions", [JSON, f"Content-Length: {len(_CHAT)}"], _CHAT),
    _request(
        "POST",
        "/v1/embeddings",
        [JSON, "Transfer-Encoding: chunked"],
        b'9\r\n{"model":\r\n13;ext=1\r\n"stub","input":"x"}\r\n0\r\nTrailer: y\r\n\r\n',
    ),
    _request(
        "POST",
        "/v1/audio/transcriptions",
        ["Content-Type: multipart/form-data; boundary=xyz", f"Content-Length: {len(_UPLOAD)}"],
        _UPLOAD,
    ),
    _request(
        "POST",
        "/v1/media",
        ["Expect: 100-continue", "Content-Type: audio/wav", f"Content-Length: {len(WAV)}"],
        WAV,
    ),
]
_BYTES = st.binary(min_size=1, max_size=24) | st.sampled_from(
    [
        b"\r\n",
        b"\r\n\r\n",
        b":",
        b" ",
        b"\x00",
        b"\xff",
        b"-1",
        b"zz",
        b"chunked",
        b"0\r\n\r\n",
        b"Content-Length: 9999999\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b'"',
        b";",
        b"\\",
    ]
)
_EDIT = st.tuples(
    st.sampled_from(["insert", "delete", "replace", "repeat"]), st.integers(0, 10**6), _BYTES
)


_SIZE_LINES = st.sampled_from(
    [b"zz", b"-2", b"0x10", b"f" * 40, b"1;a=b", b" 5", b"5 ", b"", b"5\x00", b"+5", b"\xff"]
) | st.binary(max_size=8)


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    """A chunked POST whose chunk-size lines are drawn from odd and broken ones."""
    body = b""
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.binary(max_size=20))
        size = draw(st.one_of(st.just(b"%x" % len(data)), _SIZE_LINES))
        body += size + b"\r\n" + data + b"\r\n"
    body += draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX: y\r\n\r\n", b"", b"0\r\n"]))
    path = draw(st.sampled_from(["/v1/embeddings", "/v1/media", "/healthz"]))
    return _request("POST", path, [JSON, "Transfer-Encoding: chunked"], body)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """Apply byte-level edits (positions wrap around the current length)."""
    for op, where, blob in edits:
        pos = where % (len(data) + 1)
        if op == "insert":
            data = data[:pos] + blob + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + len(blob) :]
        elif op == "replace":
            data = data[:pos] + blob + data[pos + len(blob) :]
        else:  # repeat a stretch: doubled headers, chunks, boundaries
            data = data[:pos] + data[pos : pos + 64] * (1 + len(blob) % 4) + data[pos:]
    return data


@FUZZ
@given(
    template=st.sampled_from(TEMPLATES) | chunked(),
    edits=st.lists(_EDIT, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
)
def test_garbled_requests_get_a_clean_4xx_or_an_answer_never_a_5xx(
    running: tuple[int, Collect],
    template: bytes,
    edits: list[tuple[str, int, bytes]],
    cuts: list[int],
) -> None:
    port, collect = running
    check(exchange(port, mutate(template, edits), cuts), collect)


@FUZZ
@given(
    template=st.sampled_from(TEMPLATES),
    cuts=st.lists(st.integers(0, 10**6), min_size=1, max_size=20),
)
def test_valid_requests_in_any_pieces_are_answered(
    running: tuple[int, Collect], template: bytes, cuts: list[int]
) -> None:
    port, collect = running
    codes = check(exchange(port, template, cuts), collect)
    assert codes and codes[-1] in (200, 201), codes  # 100 Continue may come first


_NAMES = st.sampled_from(["file", "model", "file_ref", "response_format", "language", "x"])
_PARAM_TEXT = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=40
)


@st.composite
def forms(draw: st.DrawFn) -> tuple[str, bytes]:
    """A multipart body from plausible parts, some headers garbled, then byte edits."""
    boundary = draw(st.sampled_from(["xyz", "----WebKitFormBoundary7MA4YWxk", "a b", '"q"']))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_NAMES)
        disposition = draw(
            st.sampled_from(
                [
                    f'form-data; name="{name}"',
                    f'form-data; name="{name}"; filename="a.wav"',
                    f"form-data; name={name}; filename*=UTF-8''%C3%A9.wav",
                    f"form-data; {draw(_PARAM_TEXT)}",
                    f'form-data; name="{draw(_PARAM_TEXT)}',
                ]
            )
        )
        data = draw(
            st.sampled_from([WAV, b"whisper-1", b"", b"--xyz", draw(st.binary(max_size=64))])
        )
        head = f"Content-Disposition: {disposition}\r\nContent-Type: audio/wav\r\n\r\n"
        parts.append(head.encode("latin-1") + data)
    body = mutate(_form(boundary.strip('"'), parts), draw(st.lists(_EDIT, max_size=3)))
    return f"multipart/form-data; boundary={boundary}", body


@settings(FUZZ, max_examples=300)
@given(form=forms())
def test_the_multipart_parser_raises_only_a_one_line_multipart_error(
    form: tuple[str, bytes],
) -> None:
    content_type, body = form
    try:
        parts = multipart.parse_multipart(body, content_type)
    except multipart.MultipartError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert all(isinstance(p, multipart.Part) for p in parts.values())


@FUZZ
@given(form=forms(), path=st.sampled_from(["/v1/audio/transcriptions", "/v1/media"]))
def test_multipart_uploads_are_answered_without_a_5xx(
    running: tuple[int, Collect], form: tuple[str, bytes], path: str
) -> None:
    port, collect = running
    content_type, body = form
    raw = _request(
        "POST", path, [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"], body
    )
    codes = check(exchange(port, raw, [len(raw) // 3]), collect)
    assert len(codes) == 1, codes
