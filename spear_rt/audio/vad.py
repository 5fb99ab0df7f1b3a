"""Energy-based voice activity detection with OpenAI `server_vad` semantics, sans-I/O.

Rules (time is audio time: samples fed so far; nothing here reads a clock):

- Audio is cut into 10 ms frames whatever the chunk size; a partial frame waits for more
  samples, so the same audio gives the same events however it is chunked.
- Each frame's level is its RMS in dBFS (full scale 32768; digital silence counts as -100).
- The noise floor is the quietest frame of the last 2 s (minimum statistics): stationary
  noise sets it, speech cannot hold it up for long because speech has dips between syllables.
- A frame is *loud* when its level is at least `start_db = max(abs_db, floor + margin_db)`,
  where `threshold` (0..1) maps linearly to both terms:
      abs_db    = -55 + 20 * threshold   (-45 dBFS at the default 0.5)
      margin_db =   6 + 18 * threshold   (15 dB over the floor at 0.5)
  so a higher threshold needs louder speech, as in OpenAI's VAD. The floor is that of past
  frames (none yet: `abs_db` alone). Why these numbers: a quiet room or line hiss sits around
  -50 dBFS and must never count, even with no floor yet; conversational speech at a normal
  mic gain sits around -30..-10 dBFS, >= 15 dB over the floor. Inside speech a frame keeps
  speech going down to `start_db - 6 dB` (hysteresis), so fading word ends don't count as
  silence.
- Speech starts once 120 ms of loud frames fall within 200 ms: clicks and pops shorter than
  that never start it. The onset is the first of those loud frames.
- Speech stops after `silence_duration_ms` of consecutive non-speech frames.

Transitions (`pad` is prefix_padding_ms, `hold` is silence_duration_ms):

    state   | frame                                  | next    | event
    --------|----------------------------------------|---------|------------------------------
    silence | loud, and 120 ms loud in last 200 ms   | speech  | SpeechStarted(max(0, onset - pad))
    silence | otherwise                              | silence | -
    speech  | level >= start_db - 6 dB               | speech  | - (silence run reset)
    speech  | quieter, silence run < hold            | speech  | -
    speech  | quieter, silence run reaches hold      | silence | SpeechStopped(silence run start)

Events are emitted when they become certain, so `SpeechStarted` arrives ~120 ms after the
onset it reports and `SpeechStopped` `silence_duration_ms` after the end it reports.

`spear_rt.audio.silero.SileroVad` is the neural alternative with the same interface
(`Detector`), settings and events; `VadConfig.detector` says which one a session runs.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from spear_rt.errors import ConfigError

__all__ = [
    "DETECTORS",
    "EAGERNESS",
    "Detector",
    "SpeechStarted",
    "SpeechStopped",
    "VadConfig",
    "VadEvent",
    "VoiceActivityDetector",
]

FRAME_MS = 10
_SILENCE_DB = -100.0  # level reported for digital silence (log of zero)
_FULL_SCALE_SQ = 32768.0 * 32768.0
_FLOOR_WINDOW_MS = 2000
_MIN_SPEECH_MS = 120  # loud audio needed to start speech: rejects clicks
_ONSET_WINDOW_MS = 200  # ...within this much audio, so a short dip in an onset is tolerated
_HYSTERESIS_DB = 6.0

# What decides speech: this module's energy rule, or the Silero network (spear_rt.audio.silero)
DETECTORS = ("energy", "silero")
EAGERNESS = ("low", "medium", "high", "auto")  # OpenAI semantic_vad's values


class VadConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`server_vad` turn detection settings (OpenAI names and defaults).

    `detector` picks what decides speech (`DETECTORS`); `eagerness` is set only when the client
    asked for OpenAI's `semantic_vad` (run by the silero detector with a silence_duration_ms
    that follows it) and is None for `server_vad`.
    """

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    detector: str = "energy"
    eagerness: str | None = None

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(
                "turn_detection.spear.detector",
                f"must be one of {', '.join(DETECTORS)}, got {self.detector!r}",
            )
        if self.eagerness is not None and self.eagerness not in EAGERNESS:
            raise ConfigError(
                "turn_detection.eagerness",
                f"must be one of {', '.join(EAGERNESS)}, got {self.eagerness!r}",
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                "turn_detection.threshold", f"must be between 0.0 and 1.0, got {self.threshold}"
            )
        if self.prefix_padding_ms < 0:
            raise ConfigError(
                "turn_detection.prefix_padding_ms", f"must be >= 0, got {self.prefix_padding_ms}"
            )
        if self.silence_duration_ms < 0:
            raise ConfigError(
                "turn_detection.silence_duration_ms",
                f"must be >= 0, got {self.silence_duration_ms}",
            )

    @property
    def start_abs_db(self) -> float:
        """Absolute level (dBFS) a frame needs to count as speech."""
        return -55.0 + 20.0 * self.threshold

    @property
    def start_margin_db(self) -> float:
        """Level above the noise floor (dB) a frame needs to count as speech."""
        return 6.0 + 18.0 * self.threshold


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Speech began; `audio_start_ms` already includes the prefix padding."""

    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """Speech ended at `audio_end_ms` (where the silence that ended it began)."""

    audio_end_ms: int


VadEvent = SpeechStarted | SpeechStopped


class Detector(Protocol):
    """What the turn logic needs of a detector (`VoiceActivityDetector`, `SileroVad`)."""

    @property
    def in_speech(self) -> bool: ...

    @property
    def config(self) -> VadConfig: ...

    @property
    def audio_ms(self) -> int: ...

    def process(self, pcm: NDArray[np.int16]) -> list[VadEvent]: ...

    def reset(self) -> None: ...


class VoiceActivityDetector:
    """Turns a stream of int16 mono audio into `SpeechStarted` / `SpeechStopped` events."""

    def __init__(self, config: VadConfig, sample_rate_hz: int) -> None:
        if sample_rate_hz < 1000:
            raise ValueError(f"sample_rate_hz must be >= 1000, got {sample_rate_hz}")
        self._config = config
        self._rate = sample_rate_hz
        self._frame_len = round(sample_rate_hz * FRAME_MS / 1000)
        frame_ms = self._frame_len * 1000 / sample_rate_hz
        self._floor_frames = math.ceil(_FLOOR_WINDOW_MS / frame_ms)
        self._min_speech_frames = math.ceil(_MIN_SPEECH_MS / frame_ms)
        self._onset_frames = math.ceil(_ONSET_WINDOW_MS / frame_ms)
        self._silence_frames = max(1, math.ceil(config.silence_duration_ms / frame_ms))
        self._start_abs_db = config.start_abs_db
        self._start_margin_db = config.start_margin_db
        self.reset()

    def reset(self) -> None:
        """Forget all audio and state; time starts again at 0 ms."""
        self._pending = np.zeros(0, dtype=np.int16)
        self._frame_index = 0  # frames fully processed
        # Monotonic deque of (frame index, level): levels increase front to back, so the
        # front is the minimum of the window in O(1) amortised per frame.
        self._floor: collections.deque[tuple[int, float]] = collections.deque()
        self._loud_frames: collections.deque[int] = collections.deque()
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
        """Audio time consumed so far, in ms (whole frames only)."""
        return self._ms(self._frame_index)

    @property
    def noise_floor_db(self) -> float | None:
        """Current noise floor estimate in dBFS, or None before the first frame."""
        return self._floor[0][1] if self._floor else None

    def process(self, pcm: NDArray[np.int16]) -> list[VadEvent]:
        """Consume the next chunk of audio (any length) and return the events it completes."""
        if len(self._pending):
            pcm = np.concatenate((self._pending, pcm))
        n_frames = len(pcm) // self._frame_len
        used = n_frames * self._frame_len
        # Copy the tail so we don't pin the caller's (possibly large) buffer.
        self._pending = pcm[used:].copy()
        if n_frames == 0:
            return []
        events: list[VadEvent] = []
        for level in _frame_levels_db(pcm[:used], self._frame_len):
            event = self._step(level)
            if event is not None:
                events.append(event)
        return events

    def _ms(self, frame_index: int) -> int:
        return frame_index * self._frame_len * 1000 // self._rate

    def _step(self, level: float) -> VadEvent | None:
        """Advance one frame; the state machine of the module docstring."""
        index = self._frame_index
        self._frame_index += 1
        floor = self._floor[0][1] if self._floor else None
        self._push_floor(index, level)

        start_db = self._start_abs_db
        if floor is not None:
            start_db = max(start_db, floor + self._start_margin_db)

        if not self._in_speech:
            if level < start_db:
                return None
            loud = self._loud_frames
            loud.append(index)
            while loud[0] <= index - self._onset_frames:
                loud.popleft()
            if len(loud) < self._min_speech_frames:
                return None
            onset = loud[0]
            loud.clear()
            self._in_speech = True
            self._silence_start = None
            start_ms = max(0, self._ms(onset) - self._config.prefix_padding_ms)
            return SpeechStarted(audio_start_ms=start_ms)

        if level >= start_db - _HYSTERESIS_DB:
            self._silence_start = None
            return None
        if self._silence_start is None:
            self._silence_start = index
        if index - self._silence_start + 1 < self._silence_frames:
            return None
        self._in_speech = False
        end_ms = self._ms(self._silence_start)
        self._silence_start = None
        return SpeechStopped(audio_end_ms=end_ms)

    def _push_floor(self, index: int, level: float) -> None:
        window = self._floor
        while window and window[-1][1] >= level:
            window.pop()
        window.append((index, level))
        while window[0][0] <= index - self._floor_frames:
            window.popleft()


def _frame_levels_db(pcm: NDArray[np.int16], frame_len: int) -> list[float]:
    """RMS level in dBFS of each whole frame of `pcm`."""
    frames = pcm.reshape(-1, frame_len).astype(np.int64)
    # Exact integer sums of squares: the result can't depend on how the audio was chunked.
    sumsq = np.einsum("ij,ij->i", frames, frames)
    mean_sq = sumsq.astype(np.float64) / (frame_len * _FULL_SCALE_SQ)
    with np.errstate(divide="ignore"):
        levels = 10.0 * np.log10(mean_sq)
    return np.maximum(levels, _SILENCE_DB).tolist()  # type: ignore[no-any-return]
