"""``mic_*`` and ``rtasr_*`` on an fd table, without WASM, on a `FakeClock`.

What must hold: the mic produces one frame per frame_ms of clock time (epoll wakes for it),
drops its oldest frame when full, loses a frame read into a small buffer (upstream's quirk),
restarts on SET_PARAM and, when the recording is over, drains the rtasr sessions; rtasr_ctl
speaks upstream's codes (7/8 are autoflush), its names for states, refuses a guest's URL or
secret, queues writes before CONNECT and hangs up only once its events are read.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from spear_rt.hostcalls.abi import (
    EACCES,
    EAGAIN,
    EINVAL,
    EIO,
    ENOSPC,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    BytesMemory,
    write_u32,
)
from spear_rt.hostcalls.epoll import EpollSet, FakeClock
from spear_rt.hostcalls.fdtable import FdTable
from spear_rt.hostcalls.mic import MicCalls
from spear_rt.hostcalls.rtasr import RtasrCalls
from spear_rt.hostcalls.rtfd import FdState
from tests.hostcalls.conftest import ARG, CREATED, LEN, OUT, OUT_CAP, RecordingPort, completed

RECORDING = bytes(range(256)) * 15  # 3840 bytes: four 20 ms frames of 24 kHz pcm16


def mic_config(**fields: Any) -> bytes:
    return json.dumps({"sample_rate_hz": 24000, "frame_ms": 20, **fields}).encode()


def ctl(fn: Any, mem: BytesMemory, fd: int, cmd: int, arg: bytes = b"") -> int:
    mem.put(ARG, arg)
    write_u32(mem, LEN, len(arg))
    return int(fn(mem, fd, cmd, ARG, LEN))


def get(fn: Any, mem: BytesMemory, fd: int, cmd: int) -> Any:
    write_u32(mem, LEN, OUT_CAP)
    n = fn(mem, fd, cmd, OUT, LEN)
    assert n > 0, n
    return json.loads(mem.read(OUT, n))


def read_frame(mics: MicCalls, mem: BytesMemory, fd: int, cap: int = OUT_CAP) -> bytes | int:
    write_u32(mem, LEN, cap)
    n = mics.mic_read(mem, fd, OUT, LEN)
    return mem.read(OUT, n) if n > 0 else n


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50.0)


@pytest.fixture
def rig(clock: FakeClock) -> tuple[FdTable, MicCalls, RtasrCalls, BytesMemory]:
    table = FdTable(RecordingPort())
    return table, MicCalls(table, clock.now, RECORDING), RtasrCalls(table, clock.now), BytesMemory()


def test_frames_come_in_real_time_and_epoll_waits_for_the_next(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], clock: FakeClock
) -> None:
    table, mics, _rtasr, mem = rig
    mic = mics.mic_create()
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config()) == 0
    assert read_frame(mics, mem, mic) == -EAGAIN  # nothing is due yet
    epolls = EpollSet(table, clock)
    ep = epolls.spear_epoll_create()
    assert epolls.spear_epoll_ctl(ep, 1, mic, EPOLLIN | EPOLLHUP) == 0
    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT, LEN, 2000) == 1  # woke for the frame
    assert clock.time == pytest.approx(50.02)
    assert read_frame(mics, mem, mic) == RECORDING[:960]
    clock.time += 0.045  # two more frames are due
    assert read_frame(mics, mem, mic) == RECORDING[960:1920]
    assert read_frame(mics, mem, mic) == RECORDING[1920:2880]
    assert read_frame(mics, mem, mic) == -EAGAIN
    status = get(mics.mic_ctl, mem, mic, 2)
    assert status["running"] and status["generation"] == 1 and status["dropped_frames"] == 0
    assert status["config"] == {"sample_rate_hz": 24000, "channels": 1, "frame_ms": 20,
                                "format": "pcm16"}  # fmt: skip


def test_a_full_queue_drops_the_oldest_and_a_small_buffer_loses_a_frame(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], clock: FakeClock
) -> None:
    _table, mics, _rtasr, mem = rig
    mic = mics.mic_create()
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config(max_queue_bytes=1920)) == 0
    clock.time += 0.061  # three frames, room for two
    assert get(mics.mic_ctl, mem, mic, 2)["dropped_frames"] == 1
    assert read_frame(mics, mem, mic, cap=100) == -ENOSPC
    assert mem.get_u32(LEN) == 960
    assert read_frame(mics, mem, mic) == RECORDING[1920:2880]  # the second frame was lost
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config(frame_ms=10)) == 0  # restart, cleared
    assert read_frame(mics, mem, mic) == -EAGAIN
    assert get(mics.mic_ctl, mem, mic, 2)["generation"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"[]",
        b"nope",
        mic_config(format="opus"),
        mic_config(channels=3),
        mic_config(frame_ms=0),
        mic_config(fallback={"to_stub": "no"}),
        mic_config(stub_pcm16_base64="%%%"),
    ],
)
def test_bad_mic_settings_are_einval(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], bad: bytes
) -> None:
    _table, mics, _rtasr, mem = rig
    assert ctl(mics.mic_ctl, mem, mics.mic_create(), 1, bad) == -EINVAL


def test_no_recording_falls_back_on_the_stub_or_fails(clock: FakeClock) -> None:
    table, mem = FdTable(RecordingPort()), BytesMemory()
    mics = MicCalls(table, clock.now, None)
    mic = mics.mic_create()
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config(fallback={"to_stub": False})) == -EIO
    assert table.others[mic].events() & EPOLLERR
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config()) == 0  # to_stub: silence
    clock.time += 0.02
    assert read_frame(mics, mem, mic) == bytes(960)


def test_the_recording_ending_drains_rtasr_sessions_which_hang_up_once_read(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], clock: FakeClock
) -> None:
    table, mics, rtasr, mem = rig
    asr = rtasr.rtasr_create()
    mem.put(OUT, b"\1\0" * 480)
    assert rtasr.rtasr_write(mem, asr, OUT, 960) == 960  # queued before CONNECT
    assert ctl(rtasr.rtasr_ctl, mem, asr, 2) == 0
    table.push_event(table.fds[asr], CREATED)
    mic = mics.mic_create()
    assert ctl(mics.mic_ctl, mem, mic, 1, mic_config()) == 0
    clock.time += 1.0
    assert table.others[mic].events() & EPOLLIN  # four frames, then the end
    assert table.fds[asr].state is FdState.DRAINING
    table.push_event(table.fds[asr], completed("go forward"))
    table.session_closed(table.fds[asr], 1000, "session ended")
    rt = table.fds[asr]
    assert not rt.events() & EPOLLHUP  # two events still to read
    mic_fd = table.others[mic]
    while read_frame(mics, mem, mic) != 0:  # the four frames, then the end of the stream
        pass
    assert not mic_fd.events() & EPOLLHUP  # a transcript is still unread
    for _ in range(2):
        write_u32(mem, LEN, OUT_CAP)
        assert table.rt_read(mem, asr, OUT, LEN) > 0
    assert rt.events() & EPOLLHUP
    assert mic_fd.events() & EPOLLHUP  # now the mic ends too


def test_rtasr_ctl_speaks_upstreams_codes(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory],
) -> None:
    table, _mics, rtasr, mem = rig
    asr = rtasr.rtasr_create()
    param = rtasr.rtasr_ctl

    def set_param(key: str, value: Any) -> int:
        return ctl(param, mem, asr, 1, json.dumps({"key": key, "value": value}).encode())

    assert get(param, mem, asr, 3)["state"] == "Init"
    assert set_param("ws_url", "wss://elsewhere/") == -EACCES
    assert set_param("client_secret", "x") == -EACCES
    assert set_param("stub_event_interval_ms", 50) == 0  # upstream's stub tuning: ignored
    assert set_param("transport", "websocket") == 0
    assert set_param("model", "gpt-4o-mini-transcribe") == 0
    assert table.fds[asr].params.model == "gpt-4o-mini-transcribe"
    flush = b'{"strategy":"server_vad","vad":{"silence_ms":600},"flush_on_close":true}'
    assert ctl(param, mem, asr, 7, flush) == 0  # SET_AUTOFLUSH, not SHUTDOWN_WRITE
    turn = table.fds[asr].params.turn_detection
    assert turn is not None and turn["silence_duration_ms"] == 600 and turn["threshold"] == 0.5
    assert get(param, mem, asr, 8) == {"strategy": "server_vad", "flush_on_close": True,
                                       "vad": {"silence_ms": 600}, "client_commit": {}}  # fmt: skip
    assert get(param, mem, asr, 3)["state"] == "Configured"
    assert ctl(param, mem, asr, 7, b'{"strategy":"sometimes"}') == -EINVAL
    assert ctl(param, mem, asr, 9) == -EINVAL
    assert ctl(param, mem, asr, 2) == 0
    status = get(param, mem, asr, 3)
    assert status["state"] == "Connecting" and status["max_send_queue_bytes"] == 1 << 20
    assert set_param("transport", "stub") == -EINVAL  # the backend is chosen at CONNECT


def test_client_commit_flushes_by_bytes_at_least_a_gap_apart(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], clock: FakeClock
) -> None:
    table, _mics, rtasr, mem = rig
    asr = rtasr.rtasr_create()
    rule = b'{"strategy":"client_commit","client_commit":{"max_buffer_bytes":1920}}'
    assert ctl(rtasr.rtasr_ctl, mem, asr, 7, rule) == 0
    assert table.fds[asr].params.turn_detection is None
    mem.put(OUT, bytes(960))
    commits = []
    for _write in range(6):
        clock.time += 0.3
        assert rtasr.rtasr_write(mem, asr, OUT, 960) == 960
        sent = [e for e, _ in table.fds[asr].send if b"commit" in e]
        commits.append(len(sent))
    # 1920 bytes after two writes, but 500 ms apart at least: writes 2, 4 and 6
    assert commits == [0, 1, 1, 2, 2, 3], commits


def test_client_commit_flushes_after_silence_when_epoll_waits(
    rig: tuple[FdTable, MicCalls, RtasrCalls, BytesMemory], clock: FakeClock
) -> None:
    table, _mics, rtasr, mem = rig
    asr = rtasr.rtasr_create()
    rule = b'{"strategy":"client_commit","client_commit":{"silence_ms":600,"min_flush_gap_ms":0}}'
    assert ctl(rtasr.rtasr_ctl, mem, asr, 7, rule) == 0
    epolls = EpollSet(table, clock)
    ep = epolls.spear_epoll_create()
    assert epolls.spear_epoll_ctl(ep, 1, asr, EPOLLIN) == 0
    mem.put(OUT, bytes(960))
    assert rtasr.rtasr_write(mem, asr, OUT, 960) == 960
    written_at = clock.time

    def commits() -> int:
        return sum(b"commit" in e for e, _ in table.fds[asr].send)

    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT + 1024, LEN, 300) == 0  # not silent long enough
    assert commits() == 0
    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT + 1024, LEN, 2000) == 0
    assert commits() == 1  # committed at the deadline, while the guest waited
    assert clock.time == pytest.approx(written_at + 2.3)
    write_u32(mem, LEN, 64)
    assert epolls.spear_epoll_wait(mem, ep, OUT + 1024, LEN, 2000) == 0
    assert commits() == 1  # never without new audio
