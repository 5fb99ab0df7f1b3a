"""Silero VAD (a small neural network) with OpenAI `server_vad` semantics, sans-I/O.

Same interface, events and settings as the energy detector (`VoiceActivityDetector`); only what
counts as speech differs. Rules (time is audio time: samples fed so far; no clock is read):

- Audio is resampled to 16 kHz (the only rate the model takes; a pass-through at 16 kHz) by one
  `StreamResampler` for the whole stream, then cut into 32 ms windows of 512 samples whatever
  the chunk size; a partial window waits for more samples. Resampling streams give the same
  samples however the input is chunked, and so do the windows: same audio, same events.
- Silero VAD v6 (the ONNX export faster-whisper ships) gives each window a speech probability
  `p` in 0..1, seeing the window, the 64 samples before it and the network's recurrent state
  carried over from every window before.
- `threshold` is that probability: a window is *speech* when `p >= threshold`. Inside speech a
  window keeps speech going down to `p >= threshold - 0.15` (at least 0.01), Silero's own
  hysteresis, so fading word ends don't count as silence. (`threshold` 0 makes every window
  speech, digital silence included, as the setting asks.)
- Speech starts once 3 speech windows (96 ms) fall within 5 (160 ms): a cough or click the
  network is briefly unsure about never starts it. The onset is the first of those windows.
- Speech stops after `silence_duration_ms` of consecutive non-speech windows, rounded up to
  whole windows (at least one).

Transitions (`pad` is prefix_padding_ms, `hold` is silence_duration_ms):

    state   | window                                  | next    | event
    --------|-----------------------------------------|---------|-----------------------------
    silence | p >= threshold, 3 of the last 5 windows | speech  | SpeechStarted(max(0, onset - pad))
    silence | otherwise                               | silence | -
    speech  | p >= threshold - 0.15                   | speech  | - (silence run reset)
    speech  | lower, silence run < hold               | speech  | -
    speech  | lower, silence run reaches hold         | silence | SpeechStopped(silence run start)

Events are emitted when they become certain: `SpeechStarted` ~96 ms after the onset it reports
(plus the resampler's delay, ~20 ms from 24 kHz), `SpeechStopped` `silence_duration_ms`
after the end it reports.

Cost (bench/vad_compare.py on this project's 2-core VM, shared with other jobs, so +-40 %):
one `run` over one window takes ~150 us of CPU on a quiet core (up to ~250 us under load).
With the usual 20 ms appends at 24 kHz that is 7-14 ms of CPU per second of audio, about 1 %
of a core per session (resampling ~1 ms of it), against ~1 ms for the energy detector. The
model takes a batch of windows in one `run` (it scans the batch in order, carrying its state:
bit-identical probabilities to one window per call on every fixture), so all the windows an
append completes go in one call and larger appends cost less: 4-7 ms/s at 100 ms appends,
2.3-3.4 ms/s for a whole file at 16 kHz. Loading is once per process, on the first session that
picks silero: ~130 ms to import onnxruntime, then ~10 ms for the model.

One `InferenceSession` is shared by the whole process (onnxruntime's `run` is thread-safe);
each detector keeps its own state. onnxruntime and the model file come with the `whisper`
extra; without them `require()` raises `DetectorUnavailable` naming the install command.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from spear_rt.audio.resample import StreamResampler
from spear_rt.audio.vad import SpeechStarted, SpeechStopped, VadConfig, VadEvent
from spear_rt.errors import SpearError

__all__ = ["DetectorUnavailable", "SileroVad", "model_path", "require"]

MODEL_RATE_HZ = 16000
WINDOW = 512  # samples at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous window the model sees with each window
WINDOW_MS = WINDOW * 1000 / MODEL_RATE_HZ
_MODEL_FILE = ("assets", "silero_vad_v6.onnx")  # inside the faster_whisper package
_STATE_SHAPE = (1, 1, 128)  # the LSTM's h and c
_HYSTERESIS = 0.15
_MIN_NEG_THRESHOLD = 0.01
_MIN_SPEECH_WINDOWS = 3  # 96 ms of speech windows ...
_ONSET_WINDOWS = 5  # ... within 160 ms start speech
_INSTALL = "pip install 'spear-rt[whisper]'"


class DetectorUnavailable(SpearError):
    """The silero detector cannot run here (onnxruntime or the model file is missing)."""


def model_path() -> Path | None:
    """Where faster-whisper's Silero model file is, found without importing faster_whisper."""
    try:
        spec = importlib.util.find_spec("faster_whisper")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MODEL_FILE)
        if path.is_file():
            return path
    return None


_lock = threading.Lock()
_session: Any = None  # onnxruntime.InferenceSession, loaded on first use


def require() -> None:
    """Load the shared model now (once per process); raises `DetectorUnavailable`."""
    _shared_session()


def _shared_session() -> Any:
    global _session
    if _session is not None:
        return _session
    with _lock:
        if _session is None:
            _session = _load()
    return _session


def _load() -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]  # heavy: imported on first use
    except ImportError:
        raise DetectorUnavailable(
            f"the silero VAD detector needs onnxruntime, which is not installed: {_INSTALL}"
        ) from None
    path = model_path()
    if path is None:
        raise DetectorUnavailable(
            "the silero VAD detector needs faster-whisper's silero_vad_v6.onnx, which is not "
            f"installed: {_INSTALL}"
        )
    options = onnxruntime.SessionOptions()
    # It runs on the event loop, a window at a time: no thread pools of its own.
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4  # errors reach us as exceptions, not stderr
    try:
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise DetectorUnavailable(
            f"the silero VAD model {path} failed to load ({type(exc).__name__}); "
            f"reinstall it: {_INSTALL}"
        ) from None


class SileroVad:
    """Turns a stream of int16 mono audio into `SpeechStarted` / `SpeechStopped` events."""

    def __init__(self, config: VadConfig, sample_rate_hz: int) -> None:
        if sample_rate_hz < 1000:
            raise ValueError(f"sample_rate_hz must be >= 1000, got {sample_rate_hz}")
        self._model = _shared_session()
        self._config = config
        self._rate = sample_rate_hz
        self._threshold = config.threshold
        self._neg_threshold = max(config.threshold - _HYSTERESIS, _MIN_NEG_THRESHOLD)
        self._silence_windows = max(1, math.ceil(config.silence_duration_ms / WINDOW_MS))
        self._resampler = StreamResampler(sample_rate_hz, MODEL_RATE_HZ)
        self.reset()

    def reset(self) -> None:
        """Forget all audio and state; time starts again at 0 ms."""
        self._resampler.reset()
        self._pending = np.zeros(0, dtype=np.float32)  # 16 kHz samples short of a window
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._window_index = 0  # windows fully processed
        self._speech_windows: collections.deque[int] = collections.deque()
        self._silence_start: int | None = None
        self._in_speech = False

    @property
    def in_speech(self) -> bool:
        """True between a `SpeechStarted` and the next `SpeechStopped`."""
        return self._in_speech

    @property
    def config(self) -> VadConfig:
        """The settings this detector was built with."""
        return self._config

    @property
    def audio_ms(self) -> int:
        """Audio time consumed so far, in ms (whole windows only)."""
        return self._ms(self._window_index)

    def process(self, pcm: NDArray[np.int16]) -> list[VadEvent]:
        """Consume the next chunk of audio (any length) and return the events it completes."""
        samples = self._resampler.process(pcm).astype(np.float32) / 32768.0
        if len(self._pending):
            samples = np.concatenate((self._pending, samples))
        n_windows = len(samples) // WINDOW
        used = n_windows * WINDOW
        self._pending = samples[used:].copy()
        if n_windows == 0:
            return []
        events: list[VadEvent] = []
        for p in self._probabilities(samples[:used].reshape(n_windows, WINDOW)):
            event = self._step(p)
            if event is not None:
                events.append(event)
        return events

    def _probabilities(self, windows: NDArray[np.float32]) -> list[float]:
        """Speech probability of each window, in one `run` (the model scans the batch)."""
        contexts = np.empty((len(windows), CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        contexts[1:] = windows[:-1, -CONTEXT:]
        self._context = windows[-1, -CONTEXT:].copy()
        batch = np.concatenate((contexts, windows), axis=1)
        feeds = {"input": batch, "h": self._h, "c": self._c}
        probs, self._h, self._c = self._model.run(None, feeds)
        return np.asarray(probs, dtype=np.float64).reshape(-1).tolist()

    def _ms(self, window_index: int) -> int:
        return window_index * WINDOW * 1000 // MODEL_RATE_HZ

    def _step(self, p: float) -> VadEvent | None:
        """Advance one window; the state machine of the module docstring."""
        index = self._window_index
        self._window_index += 1
        if not self._in_speech:
            if p < self._threshold:
                return None
            speech = self._speech_windows
            speech.append(index)
            while speech[0] <= index - _ONSET_WINDOWS:
                speech.popleft()
            if len(speech) < _MIN_SPEECH_WINDOWS:
                return None
            onset = speech[0]
            speech.clear()
            self._in_speech = True
            self._silence_start = None
            start_ms = max(0, self._ms(onset) - self._config.prefix_padding_ms)
            return SpeechStarted(audio_start_ms=start_ms)

        if p >= self._neg_threshold:
            self._silence_start = None
            return None
        if self._silence_start is None:
            self._silence_start = index
        if index - self._silence_start + 1 < self._silence_windows:
            return None
        self._in_speech = False
        end_ms = self._ms(self._silence_start)
        self._silence_start = None
        return SpeechStopped(audio_end_ms=end_ms)
