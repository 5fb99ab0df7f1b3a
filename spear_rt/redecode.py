"""Live transcript deltas from a recognizer that is not incremental (sans-I/O).

Whisper transcribes a whole window of audio at a time. To stream, the open window is decoded
again and again as it grows, and only what two consecutive hypotheses agree on is sent
(LocalAgreement, as in whisper_streaming). `Redecoder` decides what to decode and what to emit;
the caller runs the decodes (one at a time per session, anywhere it likes) and feeds back the
results. Nothing here waits or reads a clock: time is audio time (samples received).

Rules (audio arrives at `rate_hz`; a *window* is a stretch of one turn's audio):

1. **Windows.** A turn's audio goes into the open window. The window is *cut* (closed and
   queued for its final decode; a new open window starts empty) when the pause detector (an
   energy VAD, `pause_ms` of quiet) hears a pause after speech, or when it reaches
   `max_window_ms`, at its quietest 20 ms in the last `CUT_SEARCH_MS` (between words, as a
   rule). So no decode ever covers more than `max_window_ms`, and cost per second of audio is
   bounded however long the turn. A commit closes the open window as the turn's last.
2. **Decodes.** At most one is in flight (`next_request` returns None meanwhile). Closed
   windows go first, in order (a *final* decode); then, once the open window has heard
   speech and `step_ms` of audio arrived since its last decode (or since the speech onset),
   a *partial* decode of the whole open window. A window in which the pause detector heard
   no speech gets no partials; its final decode still runs (a quiet voice the detector
   missed is still transcribed), except for a window of digital silence.
3. **Forced prefix.** Every decode of a window is given the window's committed words as a
   *prefix* the recognizer must continue (Whisper: decoder prefix tokens) plus `context`
   (text committed before the window, last `context_chars`). The recognizer returns only the
   continuation. So every hypothesis starts with what was sent: a later hypothesis cannot
   contradict a delta, by construction (divergence 0), and the final decode only appends.
4. **Agreement.** Partial hypotheses (committed words + continuation) go to a `StablePrefix`
   (no time rule, `agreement` hypotheses, `hold_back` newest words, words compared
   lowercased without punctuation): words they agree on are committed and sent as a delta.
   A final decode commits its whole continuation.
5. **Deltas** are words joined by single spaces, a leading space unless they are the turn's
   first words (a word that is only punctuation sticks to the one before);
   `TranscriptCompleted` comes once the turn's last window is decoded, with the
   concatenation of the turn's deltas. Events carry the turn's item id (the BeginTurn's; a
   Commit naming another id wins from then on).
6. **Clear** drops the open turn: its queued windows are not decoded, a result in flight for
   it is dropped, nothing more is emitted for it.
7. **Failure** of a decode fails its turn: one `TranscriptFailed`, then nothing more for it.
8. **Bounds.** Undecoded audio (open window + queued windows) is `pending_samples`; the caller
   stops taking audio while it is over its bound (backpressure, nothing dropped). Before any
   speech an open window keeps only its last `LEAD_MS` (silence is not worth decoding).
"""

from __future__ import annotations

import re
from collections import deque

import msgspec
import numpy as np

from spear_rt.audio import VadConfig, VoiceActivityDetector
from spear_rt.audio.vad import SpeechStarted, SpeechStopped
from spear_rt.backend import (
    Pcm16,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    UpstreamEvent,
    words,
)
from spear_rt.stable_prefix import StablePrefix

__all__ = ["DecodeRequest", "RedecodeConfig", "Redecoder", "quietest_cut"]

CUT_SEARCH_MS = 3000
LEAD_MS = 1000
_PAUSE_THRESHOLD = 0.3  # sensitive: a missed word costs more than an extra cut


class RedecodeConfig(msgspec.Struct, frozen=True):
    """The cadence and window rule (module docstring)."""

    rate_hz: int = 16000
    step_ms: int = 300
    max_window_ms: int = 15000
    pause_ms: int = 500
    agreement: int = 2
    hold_back: int = 1
    context_chars: int = 200

    def __post_init__(self) -> None:
        if self.step_ms <= 0 or self.max_window_ms < 2 * CUT_SEARCH_MS or self.pause_ms <= 0:
            raise ValueError("step_ms and pause_ms must be > 0, max_window_ms >= 2 * CUT_SEARCH_MS")


def quietest_cut(audio: Pcm16, window: int, frame: int) -> int:
    """Where to cut `audio`: the middle of its quietest `frame`-sample frame among the last
    `window` samples (the latest of equals), or its end when it is shorter than a frame."""
    frames = min(window, audio.size) // frame
    if not frames:
        return int(audio.size)
    start = audio.size - frames * frame
    tail = audio[start:].astype(np.float32).reshape(frames, frame)
    energy = np.einsum("ij,ij->i", tail, tail)
    quietest = frames - 1 - int(np.argmin(energy[::-1]))
    return int(start + quietest * frame + frame // 2)


def _key(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def joined(words_: list[str], *, after_text: bool) -> str:
    """Words as text: single spaces, a leading one when `after_text`; a word that is only
    punctuation ("," in "spades , four") sticks to the word before it."""
    out: list[str] = []
    for word in words_:
        glue = not _key(word) and (out or after_text)
        out.append(word if glue else " " + word)
    text = "".join(out)
    return text if after_text else text.lstrip()


class _Turn:
    def __init__(self, item_id: str) -> None:
        self.item_id = item_id
        self.text = ""  # the concatenation of its deltas
        self.failed = False
        self.dropped = False


class _Window:
    def __init__(self, turn: _Turn, config: RedecodeConfig) -> None:
        self.turn = turn
        self.chunks: list[Pcm16] = []
        self.samples = 0
        self.speech = False  # the pause detector heard speech in it
        self.loud = False  # any non-zero sample (digital silence is never decoded)
        self.decoded_at = 0  # samples covered by its latest partial (or its speech onset)
        self.ends_turn = False
        self.prefix = StablePrefix(
            min_stable_ms=0, agreement=config.agreement, hold_back=config.hold_back, key=_key
        )

    def audio(self) -> Pcm16:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, np.int16)

    def append(self, pcm: Pcm16) -> None:
        self.chunks.append(pcm)
        self.samples += pcm.size
        self.loud = self.loud or bool(pcm.any())

    def keep_last(self, samples: int) -> None:
        audio = self.audio()
        if audio.size > samples:
            self.chunks = [audio[audio.size - samples :]]
            self.samples = samples


class DecodeRequest(msgspec.Struct, frozen=True):
    """Decode `audio` (int16 at the config's rate), continuing `prefix`, conditioned on
    `context`; answer with `Redecoder.decoded(continuation)` or `failed(reason)`."""

    audio: Pcm16
    prefix: str
    context: str
    final: bool


class Redecoder:
    """One session's windows and decodes (module docstring)."""

    def __init__(self, config: RedecodeConfig | None = None) -> None:
        self.config = config = config or RedecodeConfig()
        self._rate = config.rate_hz
        self._step = config.rate_hz * config.step_ms // 1000
        self._max_window = config.rate_hz * config.max_window_ms // 1000
        self._search = config.rate_hz * CUT_SEARCH_MS // 1000
        self._lead = config.rate_hz * LEAD_MS // 1000
        self._pause = VadConfig(
            threshold=_PAUSE_THRESHOLD, prefix_padding_ms=0, silence_duration_ms=config.pause_ms
        )
        # Awaiting their final decode, in order; bounded by the caller through pending_samples
        # (rule 8: it stops taking audio past its bound), so never more than that audio.
        self._closed: deque[_Window] = deque()
        self._context = ""
        self._in_flight: _Window | None = None
        self._in_flight_final = False
        self._turn = _Turn("")
        self._open = _Window(self._turn, config)
        self._vad = VoiceActivityDetector(self._pause, self._rate)
        self.decodes = 0  # partial + final decodes requested (for metrics and tests)

    @property
    def pending_samples(self) -> int:
        """Audio not yet covered by a final decode."""
        return sum(w.samples for w in self._closed) + self._open.samples

    @property
    def busy(self) -> bool:
        """A decode is in flight."""
        return self._in_flight is not None

    # --- commands ----------------------------------------------------------------------------

    def begin(self, item_id: str) -> None:
        """The current turn is named `item_id` (a new one, as a rule: the last ended at commit)."""
        self._turn.item_id = item_id

    def append(self, pcm: Pcm16) -> None:
        """Audio of the current turn; may cut the open window (rule 1)."""
        window = self._open
        start = window.samples
        window.append(pcm)
        for event in self._vad.process(pcm):
            if isinstance(event, SpeechStarted) and not window.speech:
                window.speech = True
                onset = window.samples - (self._vad.audio_ms - event.audio_start_ms) * (
                    self._rate // 1000
                )
                window.decoded_at = max(start, onset, 0)
            elif isinstance(event, SpeechStopped) and window.speech:
                self._cut(window.samples)
                window = self._open
        if not window.speech and window.samples > self._lead:
            window.keep_last(self._lead)
        while self._open.samples >= self._max_window:
            audio = self._open.audio()
            self._cut(quietest_cut(audio[: self._max_window], self._search, self._rate // 50))

    def commit(self, item_id: str) -> list[UpstreamEvent]:
        """End the turn as `item_id`: its last window is queued for the final decode."""
        self._turn.item_id = item_id
        self._open.ends_turn = True
        events = self._close_open()
        self._new_turn("")
        return events

    def clear(self) -> None:
        """Drop the open turn (rule 6)."""
        self._turn.dropped = True
        self._drop_queued(self._turn)
        self._new_turn("")

    # --- decodes -----------------------------------------------------------------------------

    def next_request(self) -> DecodeRequest | None:
        """The decode to run now (rule 2), or None; at most one is in flight."""
        if self._in_flight is not None:
            return None
        if self._closed:
            window, final = self._closed[0], True
        else:
            window, final = self._open, False
            waiting = window.samples - window.decoded_at < self._step
            if window.turn.failed or not window.speech or waiting:
                return None
            window.decoded_at = window.samples
        self._in_flight, self._in_flight_final = window, final
        self.decodes += 1
        prefix = joined(list(words(window.prefix.committed)), after_text=False)
        return DecodeRequest(window.audio(), prefix, self._context, final)

    def decoded(self, continuation: str) -> list[UpstreamEvent]:
        """The in-flight decode's continuation of its prefix; the events it yields."""
        window = self._take_in_flight()
        turn = window.turn
        if turn.dropped or turn.failed:
            return []
        committed = window.prefix.committed
        if not self._in_flight_final:
            hypothesis = f"{committed} {continuation}" if committed else continuation
            return self._emit(turn, window.prefix.update(hypothesis))
        delta, said = window.prefix.finish(f"{committed} {continuation}")
        events = self._emit(turn, delta)
        if said:  # context: what was said before the next window (never the window itself)
            said = joined(list(words(said)), after_text=False)
            self._context = (self._context + " " + said)[-self.config.context_chars :].lstrip()
        if window.ends_turn:
            events.append(TranscriptCompleted(turn.item_id, turn.text))
        return events

    def failed(self, reason: str) -> list[UpstreamEvent]:
        """The in-flight decode failed: its turn fails (rule 7)."""
        window = self._take_in_flight()
        turn = window.turn
        if turn.dropped or turn.failed:
            return []
        turn.failed = True
        self._drop_queued(turn)
        return [TranscriptFailed(turn.item_id, reason)]

    # --- internals ---------------------------------------------------------------------------

    def _take_in_flight(self) -> _Window:
        window = self._in_flight
        if window is None:
            raise RuntimeError("no decode in flight")
        self._in_flight = None
        if self._in_flight_final and self._closed and self._closed[0] is window:
            self._closed.popleft()
        return window

    def _drop_queued(self, turn: _Turn) -> None:
        """Forget `turn`'s windows that await their final decode."""
        self._closed = deque(w for w in self._closed if w.turn is not turn)

    def _emit(self, turn: _Turn, delta: str) -> list[UpstreamEvent]:
        text = joined(list(words(delta)), after_text=bool(turn.text))
        if not text:
            return []
        turn.text += text
        return [TranscriptDelta(turn.item_id, text)]

    def _new_turn(self, item_id: str) -> None:
        self._turn = _Turn(item_id)
        self._open = _Window(self._turn, self.config)
        self._vad = VoiceActivityDetector(self._pause, self._rate)

    def _cut(self, at: int) -> None:
        """Close the open window's first `at` samples; the rest opens the next window."""
        window = self._open
        audio = window.audio()
        rest = audio[at:]
        window.chunks = [audio[:at]]
        window.samples = at
        self._close_open()
        self._open = _Window(self._turn, self.config)
        self._open.speech = self._vad.in_speech
        if rest.size:
            self._open.append(rest)

    def _close_open(self) -> list[UpstreamEvent]:
        window = self._open
        turn = window.turn
        if turn.failed or turn.dropped:
            return []
        if window.loud or window.prefix.committed:
            self._closed.append(window)
            return []
        if not window.ends_turn:
            return []  # digital silence: nothing to decode
        queued = [w for w in self._closed if w.turn is turn]
        if queued:  # the turn's last queued window carries its end instead
            queued[-1].ends_turn = True
            return []
        return [TranscriptCompleted(turn.item_id, turn.text)]
