"""A session's input audio cut into turns (sans-I/O): where turns open and end, what goes upstream.

With ``turn_detection: null`` a turn opens at the first appended audio and ends at the client's
commit. With server VAD a turn opens at speech start (audio from ``audio_start_ms``, prefix
padding included) and commits itself at speech stop; the detector is the one the settings name
(`detector_for`). Each turn's audio goes upstream
resampled to the upstream's rate, as commands handed to `send` (in order); what the client
must be told comes back from `append` as `TurnEvent`s, in order.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from spear_rt.audio import Detector, InputFormat, StreamResampler, VadConfig, VoiceActivityDetector
from spear_rt.audio.silero import SileroVad
from spear_rt.audio.vad import SpeechStarted as VadStarted
from spear_rt.audio.vad import SpeechStopped as VadStopped
from spear_rt.backend import AppendAudio, BeginTurn, Clear, Commit, Pcm16, UpstreamCommand
from spear_rt.session.history import AudioHistory


class SpeechBegan(msgspec.Struct, frozen=True):
    """Server VAD opened turn `item_id` at `audio_start_ms`."""

    item_id: str
    audio_start_ms: int


class SpeechEnded(msgspec.Struct, frozen=True):
    """Server VAD found the end of turn `item_id`'s speech (its commit follows)."""

    item_id: str
    audio_end_ms: int


class TurnCommitted(msgspec.Struct, frozen=True):
    """Turn `item_id` was committed upstream, with `audio_seconds` of input audio."""

    item_id: str
    audio_seconds: float = 0.0


TurnEvent = SpeechBegan | SpeechEnded | TurnCommitted


def detector_for(config: VadConfig, sample_rate_hz: int) -> Detector:
    """The server VAD detector `config.detector` names, for audio at `sample_rate_hz`."""
    match config.detector:
        case "silero":
            return SileroVad(config, sample_rate_hz)
        case _:
            return VoiceActivityDetector(config, sample_rate_hz)


class Turns:
    """The current turn and the audio path to the upstream (module docstring)."""

    def __init__(
        self,
        input_format: InputFormat,
        turn_detection: VadConfig | None,
        upstream_rate_hz: int,
        send: Callable[[UpstreamCommand], None],
        ids: Callable[[str], str],
    ) -> None:
        self.turn_id: str | None = None
        self.turn_samples = 0
        self.last_commit_seconds = 0.0  # input audio of the turn committed last
        self._format = input_format
        self._detection = turn_detection
        self._upstream_rate = upstream_rate_hz
        self._command = send
        self._ids = ids
        self._samples_in = 0
        self._resampler: StreamResampler | None = None
        self._vad: Detector | None = None
        self._history: AudioHistory | None = None
        self._reset_detector()

    def append(self, pcm: Pcm16) -> list[TurnEvent]:
        """Take decoded client audio; what happened to turns because of it."""
        events: list[TurnEvent] = []
        if self._vad is None:
            if self.turn_id is None:
                self._open(self._ids("item"))
            self._send(pcm)
        else:
            self._append_with_vad(pcm, events)
        self._samples_in += pcm.size
        return events

    def commit(self) -> str:
        """The client commits the open turn (it must hold audio); its item id."""
        item_id = self._commit()
        if self._vad is not None:
            # The client ended this turn itself: the detector starts over, so speech that
            # goes on becomes a new turn (with its own speech_started) instead of a
            # speech_stopped for an item that no longer exists.
            self._vad.reset()
        return item_id

    def clear(self) -> None:
        """Drop the open turn's audio (upstream too) and restart the detector."""
        if self.turn_id is not None:
            self.discard()
        if self._vad is not None:
            self._vad.reset()

    def discard(self) -> None:
        """Drop the open turn without committing it."""
        self._command(Clear())
        self.turn_id = None
        self._resampler = None
        self.turn_samples = 0

    def reconfigure(self, input_format: InputFormat, turn_detection: VadConfig | None) -> None:
        """New input format or turn detection; an open turn carries on at the new rate."""
        if input_format == self._format and turn_detection == self._detection:
            return
        if self.turn_id is not None and input_format != self._format:
            self._flush_resampler()
            self._resampler = StreamResampler(input_format.rate_hz, self._upstream_rate)
        self._format, self._detection = input_format, turn_detection
        self._reset_detector()

    # --- internals ----------------------------------------------------------------------------

    def _append_with_vad(self, pcm: Pcm16, events: list[TurnEvent]) -> None:
        assert self._vad is not None and self._history is not None
        chunk_start = self._samples_in
        chunk_end = chunk_start + pcm.size
        self._history.append(pcm, chunk_start)
        rate = self._format.rate_hz
        cursor = chunk_start
        for vad_event in self._vad.process(pcm):
            match vad_event:
                case VadStarted(audio_start_ms=start_ms):
                    if self.turn_id is not None:  # a manual commit raced the VAD: new turn
                        self._send(self._history.slice(cursor, chunk_end))
                        events.append(TurnCommitted(self._commit(), self.last_commit_seconds))
                    item_id = self._ids("item")
                    self._open(item_id)
                    events.append(SpeechBegan(item_id, start_ms))
                    cursor = min(start_ms * rate // 1000, chunk_end)
                case VadStopped(audio_end_ms=end_ms):
                    if self.turn_id is None:
                        continue  # its turn was committed or cleared by the client already
                    silence = self._detection.silence_duration_ms if self._detection else 0
                    stop = min((end_ms + silence) * rate // 1000, chunk_end)
                    events.append(SpeechEnded(self.turn_id, end_ms))
                    self._send(self._history.slice(cursor, max(stop, cursor)))
                    events.append(TurnCommitted(self._commit(), self.last_commit_seconds))
                    cursor = max(stop, cursor)
        if self.turn_id is not None and cursor < chunk_end:
            self._send(self._history.slice(cursor, chunk_end))

    def _open(self, item_id: str) -> None:
        self.turn_id = item_id
        self.turn_samples = 0
        self._resampler = StreamResampler(self._format.rate_hz, self._upstream_rate)
        self._command(BeginTurn(item_id))

    def _send(self, pcm: Pcm16) -> None:
        if pcm.size == 0 or self._resampler is None:
            return
        self.turn_samples += pcm.size
        out = self._resampler.process(pcm)
        if out.size:
            self._command(AppendAudio(out))

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            tail = self._resampler.flush()
            if tail.size:
                self._command(AppendAudio(tail))

    def _commit(self) -> str:
        item_id = self.turn_id
        assert item_id is not None
        self._flush_resampler()
        self._command(Commit(item_id))
        self.last_commit_seconds = self.turn_samples / self._format.rate_hz
        self.turn_id = None
        self._resampler = None
        return item_id

    def _reset_detector(self) -> None:
        turn, rate = self._detection, self._format.rate_hz
        if turn is None:
            self._vad = None
            self._history = None
        else:
            self._vad = detector_for(turn, rate)
            # enough to reach back over the prefix padding plus the detector's own delay
            self._history = AudioHistory(rate * (turn.prefix_padding_ms + 2000) // 1000)
