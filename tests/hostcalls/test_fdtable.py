"""The fd table without WASM: every errno path of rt_*, the buffer contract, both queues."""

from __future__ import annotations

import base64
import json

from spear_rt.hostcalls.abi import (
    EAGAIN,
    EBADF,
    ECONNRESET,
    EFAULT,
    EINVAL,
    EIO,
    ENOSPC,
    ENOSYS,
    ENOTCONN,
    EPIPE,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    BytesMemory,
    Cmd,
)
from spear_rt.hostcalls.fdtable import FdState, FdTable
from tests.hostcalls.conftest import (
    ARG,
    CREATED,
    LEN,
    OUT,
    RecordingPort,
    completed,
    connected,
    ctl,
    delta,
    event,
    get,
    read,
    set_param,
    write,
)

# --- descriptors ------------------------------------------------------------------------------


def test_fds_are_positive_and_never_reused(table: FdTable) -> None:
    first = table.rt_create()
    assert first > 0
    assert table.rt_close(first) == 0
    assert table.rt_create() > first


def test_unknown_fd_is_ebadf_everywhere(table: FdTable, mem: BytesMemory) -> None:
    assert ctl(table, mem, 42, Cmd.CONNECT) == -EBADF
    assert write(table, mem, 42, b"\0\0") == -EBADF
    assert read(table, mem, 42) == -EBADF
    assert table.rt_close(42) == -EBADF


def test_closed_fd_is_ebadf(table: FdTable, mem: BytesMemory) -> None:
    fd = table.rt_create()
    table.rt_close(fd)
    assert table.rt_close(fd) == -EBADF
    assert read(table, mem, fd) == -EBADF


def test_unknown_command_is_einval(table: FdTable, mem: BytesMemory) -> None:
    assert ctl(table, mem, table.rt_create(), 99) == -EINVAL  # type: ignore[arg-type]


# --- before and at CONNECT --------------------------------------------------------------------


def test_io_before_connect_is_enotconn(table: FdTable, mem: BytesMemory) -> None:
    fd = table.rt_create()
    assert write(table, mem, fd, b"\0\0") == -ENOTCONN
    assert read(table, mem, fd) == -ENOTCONN
    assert ctl(table, mem, fd, Cmd.COMMIT) == -ENOTCONN
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, b'{"type":"x"}') == -ENOTCONN
    assert ctl(table, mem, fd, Cmd.SHUTDOWN_WRITE) == -ENOTCONN
    assert table.fds[fd].events() == 0


def test_connect_asks_the_port_once(table: FdTable, mem: BytesMemory, port: RecordingPort) -> None:
    fd = table.rt_create()
    assert ctl(table, mem, fd, Cmd.CONNECT) == 0
    assert ctl(table, mem, fd, Cmd.CONNECT) == -EINVAL
    assert port.connected == [fd]
    assert get(table, mem, fd, Cmd.GET_STATUS)["state"] == "connecting"


def test_connect_without_a_session_host_is_enosys(mem: BytesMemory) -> None:
    table = FdTable(None)
    assert ctl(table, mem, table.rt_create(), Cmd.CONNECT) == -ENOSYS


def test_session_params_go_first_as_one_update(table: FdTable, mem: BytesMemory) -> None:
    fd = table.rt_create()
    assert set_param(table, mem, fd, "turn_detection", None) == 0
    assert set_param(table, mem, fd, "input_sample_rate_hz", 16000) == 0
    assert ctl(table, mem, fd, Cmd.CONNECT) == 0
    assert write(table, mem, fd, b"\1\0") == 2
    batch = table.take_input(table.fds[fd], lambda: None)
    first = json.loads(batch.messages[0])
    assert first == {
        "type": "transcription_session.update",
        "session": {
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            "turn_detection": None,
        },
    }
    assert json.loads(batch.messages[1])["type"] == "input_audio_buffer.append"


def test_created_event_opens_the_fd(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    status = get(table, mem, fd, Cmd.GET_STATUS)
    assert status["state"] == "open" and status["connected"] is True


# --- writes -----------------------------------------------------------------------------------


def test_write_becomes_one_append_event(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    audio = bytes(range(200))
    assert write(table, mem, fd, audio) == 200
    assert write(table, mem, fd, b"") == 0
    [message] = table.take_input(table.fds[fd], lambda: None).messages
    decoded = json.loads(message)
    assert decoded["type"] == "input_audio_buffer.append"
    assert base64.b64decode(decoded["audio"]) == audio


def test_write_is_all_or_nothing(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    assert set_param(table, mem, fd, "max_send_queue_bytes", 4096) == 0
    assert write(table, mem, fd, b"\0" * 4080) == 4080
    assert write(table, mem, fd, b"\0" * 98) == -EAGAIN
    assert get(table, mem, fd, Cmd.GET_STATUS)["send_queue_bytes"] == 4080
    assert ctl(table, mem, fd, Cmd.COMMIT) == -EAGAIN  # control events count too
    table.take_input(table.fds[fd], lambda: None)
    assert write(table, mem, fd, b"\0" * 98) == 98


def test_write_that_can_never_fit_or_splits_a_sample_is_einval(
    table: FdTable, mem: BytesMemory
) -> None:
    fd = connected(table, mem)
    assert set_param(table, mem, fd, "max_send_queue_bytes", 4096) == 0
    assert write(table, mem, fd, b"\0" * 4098) == -EINVAL
    assert write(table, mem, fd, b"\0" * 3) == -EINVAL  # pcm16: 2 bytes per sample
    assert set_param(table, mem, fd, "input_audio_format", "g711_ulaw") == 0
    assert write(table, mem, fd, b"\0" * 3) == 3  # one byte per sample


def test_write_out_of_bounds_is_efault(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    size = len(mem.data)
    assert table.rt_write(mem, fd, size - 2, 4) == -EFAULT
    assert table.rt_write(mem, fd, -2, 4) == -EFAULT  # 0xfffffffe as an unsigned pointer
    assert get(table, mem, fd, Cmd.GET_STATUS)["send_queue_bytes"] == 0


def test_shutdown_write_then_writes_are_epipe(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    assert ctl(table, mem, fd, Cmd.COMMIT) == 0
    assert ctl(table, mem, fd, Cmd.SHUTDOWN_WRITE) == 0
    assert ctl(table, mem, fd, Cmd.SHUTDOWN_WRITE) == 0
    assert write(table, mem, fd, b"\0\0") == -EPIPE
    assert ctl(table, mem, fd, Cmd.CLEAR) == -EPIPE
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, b'{"type":"x"}') == -EPIPE
    rt = table.fds[fd]
    assert not rt.events() & EPOLLOUT
    assert len(table.take_input(rt, lambda: None).messages) == 1  # what came before still goes
    assert table.take_input(rt, lambda: None).draining


def test_send_event_needs_a_typed_json_object(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, b"not json") == -EINVAL
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, b"[1, 2]") == -EINVAL
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, b'{"audio": "x"}') == -EINVAL
    raw = b'{"type":"input_audio_buffer.clear","event_id":"e1"}'
    assert ctl(table, mem, fd, Cmd.SEND_EVENT, raw) == 0
    assert table.take_input(table.fds[fd], lambda: None).messages == [raw]


def test_ctl_argument_out_of_bounds_is_efault(table: FdTable, mem: BytesMemory) -> None:
    fd = table.rt_create()
    assert table.rt_ctl(mem, fd, Cmd.SET_PARAM, ARG, len(mem.data)) == -EFAULT  # length slot
    mem.set_u32(LEN, 100)
    assert table.rt_ctl(mem, fd, Cmd.SET_PARAM, len(mem.data) - 10, LEN) == -EFAULT
    assert table.rt_ctl(mem, fd, Cmd.GET_STATUS, len(mem.data) - 10, LEN) == -EFAULT


def test_input_wakes_the_waiting_session_reader_once(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    wakes: list[int] = []
    assert table.take_input(table.fds[fd], lambda: wakes.append(1)).messages == []
    assert write(table, mem, fd, b"\0\0") == 2
    assert write(table, mem, fd, b"\0\0") == 2
    assert get(table, mem, fd, Cmd.GET_STATUS)
    assert wakes == [1]


# --- reads ------------------------------------------------------------------------------------


def test_read_gives_exactly_one_event_then_eagain(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    assert read(table, mem, fd) == -EAGAIN
    table.push_event(table.fds[fd], delta("a"))
    table.push_event(table.fds[fd], completed("a"))
    assert read(table, mem, fd) == delta("a")
    assert read(table, mem, fd) == completed("a")
    assert read(table, mem, fd) == -EAGAIN


def test_read_too_small_is_enospc_with_required_length(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    table.push_event(table.fds[fd], completed("hello"))
    size = len(completed("hello"))
    assert read(table, mem, fd, cap=10) == -ENOSPC
    assert mem.get_u32(LEN) == size
    assert read(table, mem, fd, cap=size) == completed("hello")  # the event waited


def test_read_out_of_bounds_is_efault_and_keeps_the_event(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    table.push_event(table.fds[fd], completed("x"))
    mem.set_u32(LEN, 100)
    assert table.rt_read(mem, fd, len(mem.data) - 50, LEN) == -EFAULT  # capacity crosses the end
    assert table.rt_read(mem, fd, OUT, len(mem.data) - 2) == -EFAULT  # the length slot itself
    assert table.rt_read(mem, fd, OUT, -1) == -EFAULT
    assert read(table, mem, fd) == completed("x")


def test_get_status_follows_the_buffer_contract(table: FdTable, mem: BytesMemory) -> None:
    fd = table.rt_create()
    mem.set_u32(LEN, 4)
    assert table.rt_ctl(mem, fd, Cmd.GET_STATUS, OUT, LEN) == -ENOSPC
    required = mem.get_u32(LEN)
    assert table.rt_ctl(mem, fd, Cmd.GET_STATUS, OUT, LEN) == required
    assert json.loads(mem.read(OUT, required)) == {
        "state": "init",
        "connected": False,
        "send_queue_bytes": 0,
        "recv_queue_bytes": 0,
        "dropped_events": 0,
        "last_error": None,
    }


def test_get_metrics_counts_traffic(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    write(table, mem, fd, b"\0" * 10)
    ctl(table, mem, fd, Cmd.COMMIT)
    table.push_event(table.fds[fd], completed("x"))
    metrics = get(table, mem, fd, Cmd.GET_METRICS)
    assert metrics["writes"] == 1 and metrics["bytes_written"] == 10
    assert metrics["events_sent"] == 1
    assert metrics["events_received"] == 2 and metrics["events_read"] == 1  # created + completed
    assert metrics["recv_queue_events"] == 1


# --- recv queue bounds ------------------------------------------------------------------------


def test_full_recv_queue_drops_the_oldest_delta_and_counts(
    table: FdTable, mem: BytesMemory
) -> None:
    fd = connected(table, mem)
    assert set_param(table, mem, fd, "max_recv_queue_bytes", 4096) == 0
    rt = table.fds[fd]
    lifecycle = event("input_audio_buffer.committed", item_id="i", pad="x" * 1000)
    deltas = [delta(f"{i:04}" + "y" * 900) for i in range(4)]
    assert table.push_event(rt, lifecycle)
    for d in deltas:
        assert table.push_event(rt, d)
    assert table.push_event(rt, completed("done"))
    assert rt.recv_bytes <= 4096
    status = get(table, mem, fd, Cmd.GET_STATUS)
    assert status["dropped_events"] == 2
    got = [read(table, mem, fd) for _ in range(4)]
    assert got == [lifecycle, deltas[2], deltas[3], completed("done")]


def test_drop_newest_delta_policy_keeps_the_queued_ones(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    set_param(table, mem, fd, "max_recv_queue_bytes", 4096)
    assert set_param(table, mem, fd, "drop_policy", "drop_newest_delta") == 0
    rt = table.fds[fd]
    deltas = [delta(f"{i:04}" + "y" * 1500) for i in range(3)]
    for d in deltas:
        table.push_event(rt, d)
    assert [read(table, mem, fd) for _ in range(2)] == deltas[:2]
    assert rt.dropped == 1


def test_guest_that_never_reads_turns_the_fd_to_error(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    set_param(table, mem, fd, "max_recv_queue_bytes", 4096)
    rt = table.fds[fd]
    results = [table.push_event(rt, completed("z" * 1000)) for _ in range(20)]
    size = len(completed("z" * 1000))
    assert results.index(False) == 4 * 4096 // size  # the first past 4x the bound
    assert rt.state is FdState.ERROR and rt.events() & EPOLLERR
    assert table.take_input(rt, lambda: None).eof


# --- ends -------------------------------------------------------------------------------------


def test_session_end_hangs_up_and_reads_reach_end_of_file(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    rt = table.fds[fd]
    table.push_event(rt, completed("bye"))
    table.session_closed(rt, 1000, "done")
    assert rt.events() == EPOLLIN | EPOLLHUP
    assert read(table, mem, fd) == completed("bye")
    assert read(table, mem, fd) == 0
    assert write(table, mem, fd, b"\0\0") == -EPIPE
    assert ctl(table, mem, fd, Cmd.SHUTDOWN_WRITE) == -EPIPE


def test_session_failure_is_epollerr_with_last_error(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    rt = table.fds[fd]
    table.session_closed(rt, 1011, "upstream failed")
    table.session_closed(rt, 1000, "later close changes nothing")
    assert rt.events() == EPOLLERR | EPOLLHUP
    status = get(table, mem, fd, Cmd.GET_STATUS)
    assert status["state"] == "error"
    assert status["last_error"] == "session closed (1011): upstream failed"
    assert write(table, mem, fd, b"\0\0") == -ECONNRESET


def test_error_events_are_kept_as_last_error(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    table.push_event(table.fds[fd], event("error", error={"message": "bad audio"}))
    assert get(table, mem, fd, Cmd.GET_STATUS)["last_error"] == "bad audio"
    assert get(table, mem, fd, Cmd.GET_STATUS)["state"] == "open"


def test_close_cancels_only_connected_sessions(
    table: FdTable, mem: BytesMemory, port: RecordingPort
) -> None:
    idle = table.rt_create()
    live = connected(table, mem)
    rt = table.fds[live]
    assert table.rt_close(idle) == 0
    assert table.rt_close(live) == 0
    assert port.cancelled == [live]
    assert not table.push_event(rt, CREATED)  # the session learns it should end
    assert table.take_input(rt, lambda: None).eof


def test_shutdown_hangs_up_every_fd(table: FdTable, mem: BytesMemory) -> None:
    fd = connected(table, mem)
    table.shutdown()
    assert table.fds[fd].events() & EPOLLHUP
    assert table.rt_create() == -EIO
