"""One-shot uploads: decoded audio is bounded before decoding, and decoded off the event loop.

A WAV header is a promise about how much audio comes out: a 2 KB file "at 1 Hz" holds 17
minutes, which resampled to 24 kHz is a gigabyte. The header is read first and the request
refused (400) before a single sample is decoded; a file within the limits is decoded in a
worker thread while the server keeps answering. On every driver, over real sockets.
"""

from __future__ import annotations

import io
import threading
import tracemalloc
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import soundfile  # type: ignore[import-untyped]

import spear_rt.audio.files as files
import spear_rt.normalize
from spear_rt.server.app import Server
from tests.conftest import FIXTURES, noise_pcm, run_on

DRIVERS = [("trio", "auto"), ("asyncio", "auto"), ("asyncio", "anyio")]
IDS = ["trio", "asyncio-callbacks", "asyncio-tasks"]
BOUND_S = 20  # only turns a hang into a failure


def wav(pcm: np.ndarray, rate_hz: int, channels: int = 1) -> bytes:
    """A PCM_16 WAV of `pcm` (tiled over `channels`) claiming `rate_hz`."""
    buffer = io.BytesIO()
    data = np.tile(pcm[:, None], (1, channels)) if channels > 1 else pcm
    soundfile.write(buffer, data, rate_hz, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


ONE_HZ = wav(np.zeros(1000, dtype=np.int16), 1)  # 2 KB, "16 min 40 s"


async def transcribe(port: int, data: bytes, name: str = "a.wav") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=BOUND_S) as client:
        return await client.post(
            "/v1/audio/transcriptions",
            files={"file": (name, data, "audio/wav")},
            data={"model": "whisper-1"},
        )


def error_of(response: httpx.Response, code: str) -> str:
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "file", error
    message: str = error["message"]
    assert "\n" not in message and "<" not in message  # one line, no Python repr
    return message


# --- the decoder itself --------------------------------------------------------------------


def test_a_1_hz_header_is_refused_from_the_header_alone() -> None:
    """No sample is decoded: the peak allocation is a few kilobytes, not a gigabyte."""
    tracemalloc.start()
    try:
        with pytest.raises(files.AudioLimitError) as caught:
            files.decode_audio_bytes(ONE_HZ, "a.wav", files.AudioLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "unsupported_audio"
    assert "1 Hz" in str(caught.value) and "8000" in str(caught.value)
    assert peak < 256 * 1024


@pytest.mark.parametrize("rate_hz", [7999, 96001, 192000])
def test_rates_outside_8_to_96_khz_are_refused(rate_hz: int) -> None:
    with pytest.raises(files.AudioLimitError, match=f"{rate_hz} Hz"):
        files.decode_audio_bytes(
            wav(np.zeros(100, dtype=np.int16), rate_hz), "x.wav", files.AudioLimits()
        )


def test_duration_and_sample_limits_hold_before_decoding() -> None:
    two_seconds = wav(noise_pcm(32000), 16000)
    with pytest.raises(files.AudioLimitError, match=r"2\.0 s.*at most 1 s") as caught:
        files.decode_audio_bytes(two_seconds, "x.wav", files.AudioLimits(max_seconds=1.0))
    assert caught.value.code == "audio_too_long"
    with pytest.raises(files.AudioLimitError, match=r"32000 samples.*at most 16000") as caught:
        files.decode_audio_bytes(two_seconds, "x.wav", files.AudioLimits(max_samples=16000))
    assert caught.value.code == "audio_too_long"
    pcm, rate = files.decode_audio_bytes(two_seconds, "x.wav", files.AudioLimits(max_seconds=2.0))
    assert rate == 16000 and pcm.size == 32000


def test_too_many_channels_are_refused() -> None:
    with pytest.raises(files.AudioLimitError, match="9 channels"):
        files.decode_audio_bytes(
            wav(np.zeros(10, dtype=np.int16), 16000, 9), "x.wav", files.AudioLimits()
        )


def test_a_file_within_the_limits_decodes_like_soundfile() -> None:
    data = (FIXTURES / "speech_turn_left.wav").read_bytes()
    expected, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    pcm, got_rate = files.decode_audio_bytes(data, "t.wav", files.AudioLimits())
    assert got_rate == rate and np.array_equal(pcm, expected)
    stereo = wav(noise_pcm(5000), 22050, channels=2)
    pcm, got_rate = files.decode_audio_bytes(stereo, "s.wav", files.AudioLimits())
    assert got_rate == 22050 and np.array_equal(pcm, noise_pcm(5000))


# --- through the server --------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_a_1_hz_upload_is_400_without_a_big_allocation(backend: str, driver: str) -> None:
    async def scenario(server: Server) -> tuple[httpx.Response, int]:
        tracemalloc.start()
        try:
            response = await transcribe(server.port or 0, ONE_HZ)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return response, peak

    response, peak = run_on(backend, driver, scenario)
    message = error_of(response, "unsupported_audio")
    assert '"a.wav"' in message and "1 Hz" in message
    assert peak < 8 << 20  # the old path resampled it: ~100 MB for this 2 KB file


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_an_upload_longer_than_max_audio_seconds_is_400(backend: str, driver: str) -> None:
    async def scenario(server: Server) -> tuple[httpx.Response, httpx.Response]:
        port = server.port or 0
        return (
            await transcribe(port, wav(noise_pcm(48000), 16000)),
            await transcribe(port, wav(noise_pcm(16000), 16000)),
        )

    too_long, fine = run_on(backend, driver, scenario, server="max_audio_seconds = 2")
    message = error_of(too_long, "audio_too_long")
    assert "3.0 s" in message and "max_audio_seconds" in message
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_uploads_decode_in_a_worker_thread_while_healthz_answers(
    backend: str, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode is held inside its thread until /healthz has answered: on the loop, it
    could not be (the gate times out and the thread check fails)."""
    entered, gate = threading.Event(), threading.Event()
    threads: list[int] = []
    original = spear_rt.normalize.decode_upload

    def held_decode(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        entered.set()
        gate.wait(5)
        return original(*args, **kwargs)

    monkeypatch.setattr(spear_rt.normalize, "decode_upload", held_decode)

    async def scenario(server: Server) -> tuple[int, httpx.Response, int]:
        port = server.port or 0
        answers: list[httpx.Response] = []
        data = (FIXTURES / "speech_turn_left.wav").read_bytes()

        async def upload() -> None:
            answers.append(await transcribe(port, data))

        async with anyio.create_task_group() as tg:
            tg.start_soon(upload)
            await anyio.to_thread.run_sync(entered.wait, BOUND_S)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                health = await client.get("/healthz")
            gate.set()
        return health.status_code, answers[0], threading.get_ident()

    health, answer, loop_thread = run_on(backend, driver, scenario)
    assert health == 200
    assert answer.status_code == 200, answer.text
    assert threads and loop_thread not in threads


@pytest.mark.parametrize(("backend", "driver"), DRIVERS, ids=IDS)
def test_a_1_hz_file_by_reference_is_refused_the_same_way(backend: str, driver: str) -> None:
    """`file_ref` (a stored upload) goes through the same bounded decode as `file`."""

    async def scenario(server: Server) -> httpx.Response:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=BOUND_S) as client:
            stored = await client.post(
                "/v1/media", content=ONE_HZ, headers={"content-type": "audio/wav"}
            )
            assert stored.status_code == 201, stored.text
            return await client.post(
                "/v1/audio/transcriptions",
                files={"file_ref": (None, stored.json()["uri"])},
                data={"model": "whisper-1"},
            )

    response = run_on(backend, driver, scenario)
    assert "1 Hz" in error_of(response, "unsupported_audio")
