"""Live Whisper through the gateway: accuracy, latency, real-time factor and capacity.

Used by `bench/asr_accuracy.py --kind whisper` (accuracy and latency per file) and
`--capacity N,M,..` (concurrent sessions). Every session streams a recording in 20 ms frames at
realtime pace with `server_vad` and takes each item's `completed` transcript.

* **first delta**: the client time of an item's first delta, minus the time its speech onset
  was sent: `speech_started.audio_start_ms` + the session's 300 ms `prefix_padding_ms` after
  the first frame left (an `audio_start_ms` of 0 may be clamped: onset taken as 0, which
  overstates that turn's latency);
* **commit to completed**: from the item's `input_audio_buffer.committed` to its `completed`;
* **RTF**: the server process's CPU seconds during the run over the seconds of audio (the
  client is in the same process; it costs ~1 % of that);
* **loop lag** (capacity runs): the worst lateness of a 10 ms timer on the event loop the
  server and its clients share, while decodes run in worker threads;
* **direct live**: the same `Redecoder` rule driven in-process with the engine, every decode
  it asks for run at once (a recognizer that always keeps up): what the gateway's live words
  would be with no network and no waiting for a worker.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np

from spear_rt.backend import InstanceInfo, TranscriptCompleted, TranscriptDelta
from spear_rt.client.stream import transcribe
from spear_rt.redecode import Redecoder
from spear_rt_backends import whisper
from spear_rt_backends.whisper_live import (
    RATE_HZ,
    decode,
    redecode_config,
)

FRAME = RATE_HZ // 50
PREFIX_PADDING_MS = 300  # server_vad default: audio_start_ms is onset minus this


class SessionLog:
    """Client times of one session's events (fed by `transcribe`'s callback)."""

    def __init__(self) -> None:
        self.started: float | None = None  # session.created came: frames start right after
        self.onsets: dict[str, float] = {}  # item -> audio_start_ms / 1000
        self.first_delta: dict[str, float] = {}
        self.committed: dict[str, float] = {}
        self.completed: dict[str, float] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        now, kind = anyio.current_time(), event["type"]
        item = event.get("item_id", "")
        if kind.endswith("session.created"):
            self.started = now
        elif kind == "input_audio_buffer.speech_started":
            start_ms = event["audio_start_ms"]
            self.onsets[item] = (start_ms + PREFIX_PADDING_MS if start_ms else 0) / 1000
        elif kind.endswith("transcription.delta"):
            self.first_delta.setdefault(item, now)
        elif kind == "input_audio_buffer.committed":
            self.committed[item] = now
        elif kind.endswith("transcription.completed"):
            self.completed[item] = now

    def first_delta_s(self) -> list[float]:
        """Per item with speech and a delta: seconds from its onset being sent to its first word."""
        start = self.started or 0.0
        return [
            self.first_delta[i] - (start + onset)
            for i, onset in self.onsets.items()
            if i in self.first_delta
        ]

    def completed_after_commit_s(self) -> list[float]:
        """Per committed item: seconds from `committed` to `completed`."""
        return [self.completed[i] - t for i, t in self.committed.items() if i in self.completed]


async def live_session(port: int, pcm24k: np.ndarray) -> tuple[str, SessionLog]:
    """One realtime-paced server_vad session: (the items' transcripts joined, its log)."""
    log = SessionLog()
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    items = await transcribe(url, pcm24k, pace="realtime", vad=True, on_event=log)
    for t in items:
        if t.text != t.deltas:
            raise AssertionError(f"completed {t.text!r} is not its deltas {t.deltas!r}")
    return " ".join(t.text for t in items if t.text), log


def direct_live(pcm16k: np.ndarray, options: dict[str, Any]) -> str:
    """The Redecoder rule with the engine in-process, every requested decode run at once."""
    instance = InstanceInfo(name="direct", options=options)
    settings = whisper.settings_of(instance)
    model = whisper.load_model(settings)
    machine = Redecoder(redecode_config(instance))
    texts: list[str] = []

    def drain() -> None:
        while (request := machine.next_request()) is not None:
            text = decode(model, request, settings.beam_size)  # as the gateway decodes
            for event in machine.decoded(text):
                if isinstance(event, TranscriptCompleted):
                    texts.append(event.transcript)
                elif not isinstance(event, TranscriptDelta):
                    raise AssertionError(f"unexpected {event!r}")

    machine.begin("item")
    for start in range(0, pcm16k.size, FRAME):
        machine.append(pcm16k[start : start + FRAME])
        drain()
    texts.extend(e.transcript for e in machine.commit("item") if isinstance(e, TranscriptCompleted))
    drain()
    return " ".join(t for t in texts if t)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile in ms (nan when empty)."""
    return float(np.percentile(values, q) * 1000) if values else float("nan")


async def capacity(port: int, pcm24k: np.ndarray, sessions: int) -> dict[str, Any]:
    """`sessions` concurrent live sessions of the same recording, started 100 ms apart."""
    logs: list[SessionLog] = []
    cpu, wall = time.process_time(), time.perf_counter()

    lag = [0.0]  # the event loop's worst lateness for a 10 ms timer (server and clients share it)

    async def one(delay: float) -> None:
        await anyio.sleep(delay)
        logs.append((await live_session(port, pcm24k))[1])

    async def ticker() -> None:
        while True:
            due = anyio.current_time() + 0.01
            await anyio.sleep(0.01)
            lag[0] = max(lag[0], anyio.current_time() - due)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with anyio.create_task_group() as runs:
            for n in range(sessions):
                runs.start_soon(one, n * 0.1)
        tg.cancel_scope.cancel()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    first = [s for log in logs for s in log.first_delta_s()]
    done = [s for log in logs for s in log.completed_after_commit_s()]
    return {
        "sessions": sessions,
        "turns": len(done),
        "first_delta_p50_ms": round(percentile(first, 50)),
        "first_delta_p99_ms": round(percentile(first, 99)),
        "completed_p50_ms": round(percentile(done, 50)),
        "completed_p99_ms": round(percentile(done, 99)),
        "cpu_per_audio_s": round(cpu / (sessions * pcm24k.size / 24000), 3),
        "wall_s": round(wall, 1),
        "max_loop_lag_ms": round(lag[0] * 1000, 1),
    }
