"""The one-shot families on an fd table, without WASM: requests built as the endpoints take them."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from spear_rt.hostcalls.abi import EACCES, EBADF, EINVAL, EIO, BytesMemory, write_u32
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.oneshotfd import FAMILIES, GET_STATUS, SET_PARAM, OneShotCalls, Sent
from spear_rt.server.multipart import parse_multipart
from tests.hostcalls.conftest import ARG, LEN, OUT

EMB, ASR = FAMILIES["emb"], FAMILIES["asr"]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes, str | None, int | None]] = []

    def __call__(self, *request: Any) -> Sent:
        self.sent.append(request)
        return Sent(200, b'{"ok":true}', "application/json", "inst")


@pytest.fixture
def rig() -> tuple[OneShotCalls, Recorder, BytesMemory]:
    recorder = Recorder()
    return OneShotCalls(FdTable(), recorder), recorder, BytesMemory(65536)


def set_param(calls: OneShotCalls, family: Any, mem: BytesMemory, fd: int, raw: bytes) -> int:
    mem.put(ARG, raw)
    write_u32(mem, LEN, len(raw))
    return calls.ctl(family, mem, fd, SET_PARAM, ARG, LEN)


def param(key: str, value: Any) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


def test_embedding_inputs_accumulate_and_fields_pass_through(
    rig: tuple[OneShotCalls, Recorder, BytesMemory],
) -> None:
    calls, recorder, mem = rig
    fd = calls.create(EMB)
    assert calls.send_request(EMB, fd, 0) == -EINVAL  # nothing written yet
    for text in (b"one", b"two"):
        mem.put(OUT, text)
        assert calls.write(EMB, mem, fd, OUT, len(text)) == len(text)
    assert set_param(calls, EMB, mem, fd, param("model", "m")) == 0
    assert set_param(calls, EMB, mem, fd, param("backend", "stub")) == 0
    assert set_param(calls, EMB, mem, fd, param("timeout_ms", 500)) == 0
    response = calls.send_request(EMB, fd, 0)
    [(path, content_type, body, backend, timeout)] = recorder.sent
    assert (path, content_type, backend, timeout) == ("/v1/embeddings", "application/json",
                                                      "stub", 500)  # fmt: skip
    assert msgspec.json.decode(body) == {"model": "m", "input": ["one", "two"]}
    write_u32(mem, LEN, 256)
    n = calls.ctl(EMB, mem, response, GET_STATUS, OUT, LEN)
    assert json.loads(mem.read(OUT, n)) == {"status": 200, "content_type": "application/json",
                                            "backend": "inst", "bytes": 11}  # fmt: skip
    assert calls.ctl(EMB, mem, fd, GET_STATUS, OUT, LEN) == -EINVAL
    assert calls.write(ASR, mem, fd, OUT, 3) == -EBADF  # an emb fd is not an asr fd
    assert calls.close(response) == 0 and calls.close(response) == 0  # again: 0, as upstream
    assert calls.close(9999) == -EBADF


def test_audio_goes_as_the_file_of_a_multipart_form(
    rig: tuple[OneShotCalls, Recorder, BytesMemory],
) -> None:
    calls, recorder, mem = rig
    fd = calls.create(ASR)
    audio = bytes(range(256)) * 4
    mem.put(OUT, audio)
    assert calls.write(ASR, mem, fd, OUT, len(audio)) == len(audio)
    assert set_param(calls, ASR, mem, fd, param("language", "en")) == 0
    calls.send_request(ASR, fd, 0)
    [(path, content_type, body, _backend, _timeout)] = recorder.sent
    form = parse_multipart(body, content_type)
    assert path == "/v1/audio/transcriptions"
    assert form["file"].data == audio and form["language"].data == b"en"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"nope", -EIO),
        (param("api_key", "x"), -EACCES),
        (param("prompt", "https://x.y/"), -EACCES),
        (param("input", "x"), -EINVAL),
        (param("stream", True), -EINVAL),
        (param("backend", "no spaces"), -EINVAL),
    ],
)
def test_set_param_codes(
    rig: tuple[OneShotCalls, Recorder, BytesMemory], raw: bytes, expected: int
) -> None:
    calls, _recorder, mem = rig
    assert set_param(calls, EMB, mem, calls.create(EMB), raw) == expected
