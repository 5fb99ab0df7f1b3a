"""The turn journal (sans-I/O): what a new upstream needs to carry on a session's turns.

* It notes every command sent and every event received. It keeps, for each turn whose
  `TranscriptCompleted` / `TranscriptFailed` has not arrived, its item id, all of its audio from
  the start (as sent upstream) and whether it was committed. `Clear` drops the open turn; a
  final event forgets its turn: a completed turn is never sent again.
* Bounded in bytes (`max_replay_audio_bytes` of audio for all turns): a turn whose audio no
  longer fits is kept without audio and is *unreplayable*. After a reconnect it fails
  (`TranscriptFailed`, retryable=False) instead of being replayed: at once if it was
  committed, else when its `Commit` comes (its remaining audio is not sent upstream).
* Replay, on a new upstream, for every unfinished turn in order: `BeginTurn(id)`, its audio,
  `Commit(id)` if committed. Deltas of a replayed item start again from the beginning: only
  text beyond what was already forwarded goes on to the session; `TranscriptCompleted` is
  forwarded as is (when the new upstream hears the audio differently, the completed
  transcript, not the deltas, is the truth).
"""

from __future__ import annotations

from typing import NamedTuple

from spear_rt.backend import (
    AppendAudio,
    BeginTurn,
    Clear,
    Commit,
    Pcm16,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    UpstreamCommand,
    UpstreamEvent,
)

MiB = 1024 * 1024
TOO_LONG = "audio too long to replay after the upstream reconnected"


class TurnReplay(NamedTuple):
    """One unfinished turn as a new upstream gets it again."""

    item_id: str | None  # None until a commit names the turn
    committed: bool
    commands: list[UpstreamCommand]


class _Turn:
    __slots__ = ("audio", "audio_bytes", "begun", "committed", "forwarded", "item_id",
                 "replayable", "seen")  # fmt: skip

    def __init__(self, item_id: str | None, begun: bool) -> None:
        self.item_id = item_id
        self.begun = begun  # a BeginTurn was sent for it
        self.audio: list[Pcm16] = []
        self.audio_bytes = 0
        self.committed = False
        self.replayable = True
        self.forwarded = 0  # characters of deltas forwarded to the session
        self.seen = 0  # characters of deltas received from the current upstream


class TurnJournal:
    """What a new upstream needs to carry on: the unfinished turns (see the module docstring).

    Bounded: at most `max_replay_audio_bytes` of audio are kept; the arrays are kept as given
    (senders must not reuse them). The commit of a turn failed at a reconnect owes the session
    a `TranscriptFailed`: the caller delivers it (`take_failures`).
    """

    def __init__(self, max_replay_audio_bytes: int = 8 * MiB) -> None:
        self.max_replay_audio_bytes = max_replay_audio_bytes
        self.audio_bytes = 0  # kept for all turns
        self._turns: list[_Turn] = []  # unfinished, in order
        self._open: _Turn | None = None  # not committed yet
        self._discarding = False  # the open turn failed at a reconnect: drop its commands
        self._failures: list[TranscriptFailed] = []

    @property
    def items(self) -> tuple[str, ...]:
        """Item ids of the unfinished turns, in order."""
        return tuple(t.item_id for t in self._turns if t.item_id is not None)

    def dropped(self, command: UpstreamCommand) -> bool:
        """True when `command` must not go upstream (its turn was failed at a reconnect)."""
        return self._discarding and not isinstance(command, BeginTurn)

    def record_command(self, command: UpstreamCommand) -> bool:
        """Note a command sent (or to be replayed); False when it must not go upstream."""
        if self._discarding and self.dropped(command):
            if isinstance(command, Commit):
                self._failures.append(self._failed(command.item_id))
            if not isinstance(command, AppendAudio):
                self._discarding = False
            return False
        self._discarding = False
        match command:
            case BeginTurn(item_id=item_id):
                turn = _Turn(item_id, begun=True)
                previous = self._open
                if previous is not None:  # the upstream's buffer still holds its audio
                    self._forget(previous)
                    turn.audio, turn.audio_bytes = previous.audio, previous.audio_bytes
                    turn.replayable = previous.replayable
                    self.audio_bytes += turn.audio_bytes
                self._turns.append(turn)
                self._open = turn
            case AppendAudio(pcm=pcm):
                turn = self._open or self._begin_anonymous()
                if not turn.replayable:
                    pass
                elif self.audio_bytes + pcm.nbytes > self.max_replay_audio_bytes:
                    turn.replayable = False
                    self.audio_bytes -= turn.audio_bytes
                    turn.audio, turn.audio_bytes = [], 0
                else:
                    turn.audio.append(pcm)
                    turn.audio_bytes += pcm.nbytes
                    self.audio_bytes += pcm.nbytes
            case Commit(item_id=item_id):
                turn = self._open or self._begin_anonymous()
                turn.item_id, turn.committed = item_id, True
                self._open = None
            case Clear():
                if self._open is not None:
                    self._forget(self._open)
        return True

    def record_event(self, event: UpstreamEvent) -> UpstreamEvent | None:
        """The event to forward to the session (a delta without text already forwarded)."""
        match event:
            case TranscriptDelta(item_id=item_id, delta=delta):
                turn = self._find(item_id)
                if turn is None:
                    return event
                start = turn.seen
                turn.seen += len(delta)
                if turn.seen <= turn.forwarded:
                    return None
                skip = max(0, turn.forwarded - start)
                turn.forwarded = turn.seen
                return event if not skip else TranscriptDelta(item_id, delta[skip:])
            case TranscriptCompleted(item_id=item_id) | TranscriptFailed(item_id=item_id):
                turn = self._find(item_id)
                if turn is not None:
                    self._forget(turn)
        return event

    def restart(self) -> list[TranscriptFailed]:
        """A new upstream takes over: fail committed unreplayable turns, recount the deltas."""
        failed: list[TranscriptFailed] = []
        for turn in list(self._turns):
            if turn.replayable:
                turn.seen = 0
                continue
            self._forget(turn)
            if turn.committed and turn.item_id is not None:
                failed.append(self._failed(turn.item_id))
            elif not turn.committed:
                self._discarding = True  # its Commit gets the failure
        return failed

    def replay(self) -> list[UpstreamCommand]:
        """Commands that bring a new upstream to where the old one was, in order."""
        return [command for turn in self.replay_turns() for command in turn.commands]

    def replay_turns(self) -> list[TurnReplay]:
        """`replay`, turn by turn (a relayed conversation places committed turns among its
        items: `relay.restore_commands`)."""
        turns: list[TurnReplay] = []
        for turn in self._turns:
            if not turn.replayable:
                continue
            commands: list[UpstreamCommand] = []
            if turn.begun and turn.item_id is not None:
                commands.append(BeginTurn(turn.item_id))
            commands.extend(AppendAudio(pcm) for pcm in turn.audio)
            committed = turn.committed and turn.item_id is not None
            if committed and turn.item_id is not None:
                commands.append(Commit(turn.item_id))
            turns.append(TurnReplay(turn.item_id, committed, commands))
        return turns

    def replayed_items(self) -> tuple[str, ...]:
        """Item ids of the turns `replay` sends again."""
        return tuple(t.item_id for t in self._turns if t.replayable and t.item_id is not None)

    def take_failures(self) -> list[TranscriptFailed]:
        """Failures owed to the session for commits of turns failed at a reconnect."""
        failures, self._failures = self._failures, []
        return failures

    def _failed(self, item_id: str) -> TranscriptFailed:
        message = (
            f"{TOO_LONG} (more than {self.max_replay_audio_bytes} bytes of audio are kept "
            "for a replay); the turn was not transcribed"
        )
        return TranscriptFailed(item_id, message, retryable=False)

    def _begin_anonymous(self) -> _Turn:
        turn = _Turn(None, begun=False)
        self._turns.append(turn)
        self._open = turn
        return turn

    def _find(self, item_id: str) -> _Turn | None:
        return next((t for t in self._turns if t.item_id == item_id), None)

    def _forget(self, turn: _Turn) -> None:
        self._turns.remove(turn)
        self.audio_bytes -= turn.audio_bytes
        if turn is self._open:
            self._open = None
