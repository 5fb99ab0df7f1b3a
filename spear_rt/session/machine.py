"""The realtime session state machine (sans-I/O: events in, actions out, no await, no clock).

Rules:

1. A session is CREATED until `start()`, which emits ``session.created`` and makes it ACTIVE.
2. While ACTIVE, client events are applied in order. Audio belongs to the *current turn*:
   with ``turn_detection: null`` a turn opens at the first appended audio and ends at the
   client's commit; with server VAD a turn opens at speech start (audio from
   ``audio_start_ms``, prefix padding included) and commits itself at speech stop.
   Each turn's audio goes upstream resampled to the upstream's rate (`session/turns.py`).
3. A commit turns the current turn into an item: ``committed`` + item created go out at once;
   deltas and ``completed`` (with ``usage``: the item's audio seconds) follow as the upstream
   produces them. No event names an item before ``speech_started`` or ``committed`` announced
   it: live deltas of a manual turn wait for its commit (`session/items.py`), unless the
   session set ``spear.early_deltas``.
4. A bad client event yields an ``error`` event and changes nothing else; the session lives on.
5. `drain()` moves ACTIVE to DRAINING: an open server-VAD turn is committed at once; an open
   manual turn stays open for the client to finish and commit (the server commits it itself
   halfway to the deadline); appends that would open a new turn are refused. The session
   closes (1001) once every committed item has its transcript, or at the deadline.
6. Idle for ``idle_timeout``, or older than ``max_session_seconds``: close 1000 with a reason.
7. The upstream failing for good is fatal: ERROR (``last_error`` kept), ``error`` event, close 1011.
8. CLOSED is terminal: every later input is ignored.
9. Every emitted event gets the next ``seq`` and goes to the replay buffer. The client's socket
   dropping without a close frame makes the session DETACHED for the resume grace: the
   upstream carries on and its events go to the replay buffer only. `resume(last_seq)`
   returns ``spear.session.resumed`` (seq 0) followed by every event with seq > last_seq, and
   the session is back where it was. The grace running out, or the replay buffer evicting an
   event the detached client never got, closes the session.
10. A conversation session (kind realtime) also holds a `Conversation` (`session/conversation.py`):
   conversation client events, committed turns, transcripts and ``speech_started`` go to it;
   the responder takes its actions and feeds back `response_output`. Draining waits for its
   response too. Relayed to a speech-to-speech upstream (`relay`), the conversation's
   changes go upstream as commands and the response's output comes back as upstream events;
   a new upstream first gets `restore_commands` (which cuts the response in progress).

Transitions:

    state     input                       next      actions
    CREATED   start                       ACTIVE    emit session.created
    ACTIVE    client event                ACTIVE    emit events, send upstream commands
    ACTIVE    drain                       DRAINING  commit open VAD turn
    DRAINING  last pending item completed CLOSED    close 1001
    ACTIVE    idle / max age              CLOSED    close 1000
    ACTIVE    upstream failed             ERROR     emit error, close 1011
    ACTIVE    socket dropped (detach)     DETACHED  -
    DETACHED  resume                      ACTIVE    replay events after last_seq
    DETACHED  grace over / replay evicted CLOSED    -
    any       client gone                 CLOSED    -

Outputs are collected on the machine: `outbound` (stamped, encoded server events), `upstream`
(commands to send, in order) and `close` (set once). The runner drains them after each call.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable

import msgspec
import numpy as np

from spear_rt.audio import AudioFormatError, decode_audio
from spear_rt.backend import (
    AudioOut,
    CreateResponse,
    Pcm16,
    ResponseEnded,
    TextOut,
    ToolCallOut,
    TranscriptCompleted,
    TranscriptDelta,
    TranscriptFailed,
    UpstreamCommand,
    UpstreamEvent,
    UpstreamReconnected,
)
from spear_rt.protocol import client_events as ce
from spear_rt.protocol import server_events as se
from spear_rt.protocol.settings import (
    Dialect,
    SessionKind,
    SessionSettings,
    SettingsError,
    apply_update,
    render_session,
)
from spear_rt.session.conversation import Conversation, ResponseOutput
from spear_rt.session.items import Items
from spear_rt.session.outbound import OutboundQueue
from spear_rt.session.relay import RelayLink, restore_commands
from spear_rt.session.replay import ReplayBuffer
from spear_rt.session.turns import SpeechBegan, SpeechEnded, TurnCommitted, Turns

RELAY_RECREATIONS = 3  # times a relayed response cut by upstream reconnects is created again
RECONNECTED = "the upstream connection dropped mid-answer and was reopened"


class State(enum.StrEnum):
    """Lifecycle states of a session."""

    CREATED = "created"
    ACTIVE = "active"
    DETACHED = "detached"
    DRAINING = "draining"
    CLOSED = "closed"
    ERROR = "error"


class CloseAction(msgspec.Struct, frozen=True):
    """Close the client connection with this WebSocket code and reason."""

    code: int
    reason: str


class ResumeError(Exception):
    """A resume cannot be served (the session is not detached, or events were evicted)."""


class Timeouts(msgspec.Struct, frozen=True):
    """Session timers, in seconds of event-loop time."""

    idle_timeout_s: float = 600.0
    max_session_seconds: float = 3600.0
    drain_deadline_s: float = 10.0
    expiry_warning_s: float = 60.0  # `spear.session.expiring` this long before max age


DEFAULT_TIMEOUTS = Timeouts()


def new_id(prefix: str) -> str:
    """A random id such as ``item_3f9a...`` (what OpenAI's ids look like)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class SessionMachine:
    """One realtime session's protocol logic."""

    def __init__(
        self,
        *,
        session_id: str,
        upstream_rate_hz: int,
        settings: SessionSettings,
        dialect: Dialect,
        outbound: OutboundQueue,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        resume_token: str | None = None,
        ids: Callable[[str], str] = new_id,
        spear_info: dict[str, object] | None = None,
        replay: ReplayBuffer | None = None,
        relay: bool = False,
    ) -> None:
        self.session_id = session_id
        self.state = State.CREATED
        self.settings = settings
        self.dialect = dialect
        self.outbound = outbound
        self.upstream: list[UpstreamCommand] = []
        self.close: CloseAction | None = None
        self.last_error: str | None = None
        self._timeouts = timeouts
        self.resume_token = resume_token
        self.replay = replay  # None: resume is off
        self.last_event_id: str | None = None  # of the last client event applied
        self.upstream_reconnects = 0
        self.resumes = 0
        self._attached = True
        self._detached_at_seq = 0
        self._detach_deadline: float | None = None
        self._state_before_detach = State.ACTIVE
        self._ids = ids
        self._spear_info = spear_info or {}
        self._seq = 0
        self._event_prefix = f"event_{session_id[-8:]}_"
        self._started_at = 0.0
        self._last_activity = 0.0
        self._drain_deadline: float | None = None
        self._expiry_warned = False
        self.input_audio_bytes = 0
        self._items = Items()
        self._drain_commit_at: float | None = None  # an open manual turn: committed by then
        self._now = 0.0  # event-loop time of the last input that carried one
        # A conversation session's items and responses (rule 10)
        self.conversation: Conversation | None = None
        if settings.kind is SessionKind.REALTIME:
            self.conversation = Conversation(self._emit, self.error, ids)
            self.conversation.configure(settings, self.dialect is Dialect.GA)
            if relay:  # rule 10: a speech-to-speech upstream holds the conversation too
                self.conversation.relay = RelayLink(lambda command: self.upstream.append(command))
                self.conversation.max_recreations = RELAY_RECREATIONS
                self.conversation.relay.settings(self.conversation.settings)
        self._turns = Turns(
            settings.input_format,
            settings.turn_detection,
            upstream_rate_hz,
            lambda command: self.upstream.append(command),  # the runner may swap the list
            ids,
        )

    # --- inputs -------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Open the session: emit session.created."""
        self._started_at = self._last_activity = now
        self.state = State.ACTIVE
        session = render_session(self.settings, self.dialect, self.session_id)
        spear = {"resume_token": self.resume_token, **self._spear_info}
        if self._transcription_beta():
            self._emit(se.TranscriptionSessionCreated(session=session, spear=spear))
        else:
            self._emit(se.SessionCreated(session=session, spear=spear))

    def client_event(self, event: ce.AnyClientEvent | ce.ProtocolError, now: float) -> None:
        """Apply one decoded client event (or answer a decoding error)."""
        if self.state not in (State.ACTIVE, State.DRAINING):
            return
        self._last_activity = self._now = now
        self.last_event_id = event.event_id
        match event:
            case ce.InputAudioBufferAppend():
                self._on_append(event)
            case ce.InputAudioBufferCommit():
                self._on_commit(event.event_id)
            case ce.InputAudioBufferClear():
                self._on_clear()
            case ce.SessionUpdate() | ce.TranscriptionSessionUpdate():
                self._on_update(event)
            case ce.SpearMetricsRequest():
                self._emit(se.SpearMetrics(metrics=self.metrics()))
            case (
                ce.ConversationItemCreate()
                | ce.ConversationItemRetrieve()
                | ce.ConversationItemDelete()
                | ce.ConversationItemTruncate()
                | ce.ResponseCreate()
                | ce.ResponseCancel()
            ):
                if self.conversation is None:
                    self.error(
                        "unsupported_event",
                        f"{event.__struct_config__.tag}: this is a transcription session; "
                        "open a conversation (no intent=transcription) for responses",
                        event.event_id,
                    )
                else:
                    self.conversation.client_event(event, now)
                    self._maybe_finish_drain()
            case ce.ProtocolError():
                self.error(event.code, event.message, event.event_id, event.param)

    def upstream_event(self, event: UpstreamEvent) -> None:
        """Turn one upstream event into client events."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        match event:
            case TranscriptDelta(item_id=item_id, delta=delta):
                if delta and (
                    self.settings.early_deltas
                    or not self._items.hold(item_id, delta, self._turns.turn_id)
                ):
                    self._emit(se.TranscriptionDelta(item_id=item_id, delta=delta))
            case TranscriptCompleted(item_id=item_id, transcript=transcript):
                self._on_completed(item_id, transcript)
            case TranscriptFailed(item_id=item_id, message=message):
                error = {
                    "type": "transcription_error",
                    "code": "transcription_failed",
                    "message": message,
                }
                self._emit(se.TranscriptionFailed(item_id=item_id, error=error))
                if self.conversation is not None:
                    self.conversation.user_transcript(item_id, None)
                self._item_finished(item_id)
            case UpstreamReconnected():
                self.upstream_reconnects += 1
                self._emit(
                    se.SpearUpstreamReconnected(
                        backend=event.instance,
                        attempts=event.attempts,
                        downtime_ms=round(event.downtime_s * 1000),
                        replayed_item_ids=list(event.replayed_items),
                    )
                )
            case TextOut() | AudioOut() | ToolCallOut() | ResponseEnded():
                self.response_output(event)

    @property
    def relayed(self) -> bool:
        """A conversation relayed to a speech-to-speech upstream (rule 10)."""
        return self.conversation is not None and self.conversation.relay is not None

    def restore_commands(self, replays: dict[str, list[UpstreamCommand]]) -> list[UpstreamCommand]:
        """What a new speech-to-speech upstream needs to hold this conversation (relay.py).

        Called as the new upstream takes over, before anything else is sent to it: the
        response in progress is cut now (rule 8: it is created again, after the restore),
        so a `CreateResponse` of it still waiting to be sent is stale (`stale_command`).
        """
        conversation = self.conversation
        if conversation is None or not self.relayed:
            return []
        if conversation.response is not None and self.state not in (State.CLOSED, State.ERROR):
            self.response_output(ResponseEnded(conversation.response.id, interrupted=RECONNECTED))
        return restore_commands(conversation.settings, conversation.items, replays)

    def stale_command(self, command: UpstreamCommand) -> bool:
        """`command` waited out a reconnect and no longer applies (a cut response's create)."""
        conversation = self.conversation
        if not isinstance(command, CreateResponse) or conversation is None:
            return False
        response = conversation.response
        return response is None or response.id != command.response_id

    def response_output(self, out: ResponseOutput) -> None:
        """Apply what the responder produced (a conversation session's response)."""
        if self.conversation is None or self.state in (State.CLOSED, State.ERROR):
            return
        self.conversation.output(out)
        self._maybe_finish_drain()

    def upstream_failed(self, message: str) -> None:
        """The upstream is gone for good: fatal."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        self.last_error = message
        conversation = self.conversation
        if conversation is not None and conversation.response is not None:
            # rule 4 holds to the end: the answer in progress gets its response.done (failed)
            ended = ResponseEnded(conversation.response.id, error=message, code="upstream_error")
            conversation.output(ended)
        self.error("upstream_error", message, error_type="server_error")
        self.state = State.ERROR
        self._close(1011, "upstream failed")

    def drain(self, now: float, deadline_s: float | None = None) -> None:
        """Stop taking audio, finish pending turns, then close with 1001."""
        if self.state is State.DETACHED:
            self._close(1001, "server draining")  # nobody to tell, and no resume on this server
            return
        if self.state is not State.ACTIVE:
            return
        self.state = State.DRAINING
        grace = deadline_s if deadline_s is not None else self._timeouts.drain_deadline_s
        self._drain_deadline = now + grace
        # Tell the client first: it can stop sending and reconnect elsewhere after its turns.
        self._emit(se.SpearServerDraining(deadline_ms=round(grace * 1000)))
        if self._turns.turn_id is not None and not self._turns.turn_samples:
            self._discard_turn()
        elif self._turns.turn_id is not None and self.settings.turn_detection is None:
            # the client is still speaking its manual turn: let it finish and commit
            self._drain_commit_at = now + grace / 2
        elif self._turns.turn_id is not None:
            self._commit_open_turn()
        self._maybe_finish_drain()

    def client_gone(self) -> None:
        """The client connection ended."""
        self.state = State.CLOSED

    def detach(self, now: float, grace_s: float) -> bool:
        """The socket dropped without a close: wait `grace_s` for a resume (False: closed)."""
        if self.state is State.DETACHED:
            return True  # a resume took the link over and its old reader noticed only now
        if (
            self.state not in (State.ACTIVE, State.DRAINING)
            or self.close is not None
            or self.replay is None
            or grace_s <= 0
        ):
            self.client_gone()
            return False
        self._state_before_detach = self.state
        self.state = State.DETACHED
        self._attached = False
        self._detached_at_seq = self._seq
        self._detach_deadline = now + grace_s
        self.outbound.take_all()  # all of it is in the replay buffer
        return True

    def resume(self, now: float, last_seq: int) -> list[bytes]:
        """Reattach a client that saw events up to `last_seq`: the bytes to send it first."""
        if self.state is not State.DETACHED or self.replay is None:
            raise ResumeError("the session is not waiting for a resume")
        if not 0 <= last_seq <= self._seq:
            raise ResumeError(f"last_seq {last_seq} is outside 0..{self._seq}")
        missed = self.replay.since(last_seq)
        if missed is None:
            raise ResumeError(
                f"events after seq {last_seq} are no longer held (the replay buffer keeps "
                f"back to seq {self.replay.evicted_through + 1}; it is sized by "
                "realtime.replay_buffer_bytes, and conversation.replay_audio_seconds)"
            )
        self.state = self._state_before_detach
        self.resumes += 1
        self._attached = True
        self._detach_deadline = None
        self._last_activity = now
        resumed = se.SpearSessionResumed(
            session_id=self.session_id,
            last_seq=last_seq,
            input_audio_bytes=self.input_audio_bytes,
            last_event_id=self.last_event_id,
            event_id=f"{self._event_prefix}resumed",
        )
        return [se.encode_server_event(resumed), *missed]

    def tick(self, now: float) -> None:
        """Check timers; closes the session when one has expired."""
        if self.state is State.DETACHED:
            assert self._detach_deadline is not None
            if now >= self._detach_deadline:
                self._close(1000, "the client did not resume within resume_grace_seconds")
                return
        elif self.state not in (State.ACTIVE, State.DRAINING):
            return
        expires_at = self._started_at + self._timeouts.max_session_seconds
        if not self._expiry_warned and now >= expires_at - self._timeouts.expiry_warning_s:
            self._expiry_warned = True
            if now < expires_at:
                self._emit(se.SpearSessionExpiring(seconds_left=round(expires_at - now, 3)))
        if self._drain_commit_at is not None and now >= self._drain_commit_at:
            self._drain_commit_at = None
            if self.state is State.DRAINING and self._turns.turn_id is not None:
                self._commit_open_turn()  # the client did not commit in time: answer what it sent
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._close(1001, "server draining: deadline reached")
        elif now - self._started_at >= self._timeouts.max_session_seconds:
            self.error(
                "session_expired",
                "the session reached max_session_seconds",
                error_type="server_error",
            )
            self._close(1000, "max_session_seconds reached")
        elif now - self._last_activity >= self._timeouts.idle_timeout_s:
            self._close(1000, "idle timeout")

    def next_deadline(self) -> float:
        """Event-loop time at which `tick` next has something to check."""
        t = self._timeouts
        deadline = min(
            self._started_at + t.max_session_seconds, self._last_activity + t.idle_timeout_s
        )
        if not self._expiry_warned:
            deadline = min(deadline, self._started_at + t.max_session_seconds - t.expiry_warning_s)
        if self._drain_deadline is not None:
            deadline = min(deadline, self._drain_deadline)
        if self._drain_commit_at is not None:
            deadline = min(deadline, self._drain_commit_at)
        if self._detach_deadline is not None:
            deadline = min(deadline, self._detach_deadline)
        return deadline

    # --- client events ------------------------------------------------------------------------

    def _on_append(self, event: ce.InputAudioBufferAppend) -> None:
        if self.state is State.DRAINING and self._turns.turn_id is None:
            self.error(
                "session_draining",
                "the server is draining; no new audio is accepted",
                event.event_id,
            )
            return
        try:
            pcm = decode_audio(self.settings.input_format, event.audio)
        except AudioFormatError as exc:
            self.error("invalid_audio", str(exc), event.event_id, "audio")
            return
        if pcm.size == 0:
            return
        self.input_audio_bytes += len(event.audio)
        for turn_event in self._turns.append(pcm):
            match turn_event:
                case SpeechBegan(item_id=item_id, audio_start_ms=start_ms):
                    self._items.speech_started(item_id)
                    self._emit(se.SpeechStarted(audio_start_ms=start_ms, item_id=item_id))
                    if self.conversation is not None:
                        self.conversation.speech_started()
                case SpeechEnded(item_id=item_id, audio_end_ms=end_ms):
                    self._emit(se.SpeechStopped(audio_end_ms=end_ms, item_id=item_id))
                case TurnCommitted(item_id=item_id, audio_seconds=seconds):
                    self._committed(item_id, seconds, by_vad=True)

    def _on_commit(self, event_id: str | None) -> None:
        if self._turns.turn_id is None or self._turns.turn_samples == 0:
            self.error(
                "input_audio_buffer_commit_empty",
                "cannot commit: the input audio buffer holds no audio",
                event_id,
            )
            return
        self._commit_open_turn()

    def _on_clear(self) -> None:
        self._items.discarded(self._turns.turn_id)
        self._turns.clear()
        self._emit(se.Cleared())
        self._maybe_finish_drain()

    def _on_update(self, event: ce.SessionUpdate | ce.TranscriptionSessionUpdate) -> None:
        if isinstance(event, ce.TranscriptionSessionUpdate):
            self.dialect = Dialect.BETA
            self.settings = msgspec.structs.replace(self.settings, kind=SessionKind.TRANSCRIPTION)
        elif event.session.type is not msgspec.UNSET:
            self.dialect = Dialect.GA  # only the GA dialect names session.type
        try:
            settings = apply_update(self.settings, event.session)
        except SettingsError as exc:
            self.error(exc.code, str(exc), event.event_id, exc.param)
            return
        self.settings = settings
        self._turns.reconfigure(settings.input_format, settings.turn_detection)
        if self.conversation is not None:
            self.conversation.configure(settings, self.dialect is Dialect.GA)
        session = render_session(settings, self.dialect, self.session_id)
        if self._transcription_beta():
            self._emit(se.TranscriptionSessionUpdated(session=session))
        else:
            self._emit(se.SessionUpdated(session=session))

    # --- items ------------------------------------------------------------------------------

    def _commit_open_turn(self) -> None:
        item_id = self._turns.commit()
        self._committed(item_id, self._turns.last_commit_seconds)

    def _discard_turn(self) -> None:
        self._items.discarded(self._turns.turn_id)
        self._turns.discard()

    def _committed(self, item_id: str, audio_seconds: float, *, by_vad: bool = False) -> None:
        """Turn `item_id` went upstream as committed: announce the item, await its transcript."""
        previous, held = self._items.committed(item_id, audio_seconds)
        if self.conversation is not None:
            previous = self.conversation.user_audio_committed(item_id, by_vad, self._now)
            self._items.pending[item_id].previous_item_id = previous
        self._emit(se.Committed(item_id=item_id, previous_item_id=previous))
        item = se.input_item(item_id, None, status="completed")
        if self.dialect is Dialect.GA:
            self._emit(se.ItemAdded(item=item, previous_item_id=previous))
        else:
            self._emit(se.ItemCreated(item=item, previous_item_id=previous))
        for delta in held:
            self._emit(se.TranscriptionDelta(item_id=item_id, delta=delta))
        if self.conversation is not None:
            self.conversation.start_waiting()  # relayed: the answer starts at the commit

    def _on_completed(self, item_id: str, transcript: str) -> None:
        pending = self._items.finished(item_id)
        seconds = pending.audio_seconds if pending is not None else 0.0
        self._emit(
            se.TranscriptionCompleted(
                item_id=item_id, transcript=transcript, usage=se.duration_usage(seconds)
            )
        )
        if self.dialect is Dialect.GA:
            item = se.input_item(item_id, transcript)
            previous = pending.previous_item_id if pending is not None else None
            self._emit(se.ItemDone(item=item, previous_item_id=previous))
        if self.conversation is not None:  # after the transcript: the answer follows it
            self.conversation.user_transcript(item_id, transcript)
        self._maybe_finish_drain()

    def _item_finished(self, item_id: str) -> None:
        self._items.finished(item_id)
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if (
            self.state is State.DRAINING
            and not self._items.pending
            and self._turns.turn_id is None
            and not (self.conversation is not None and self.conversation.busy)
        ):
            self._close(1001, "server draining")

    # --- outputs ------------------------------------------------------------------------------

    def _transcription_beta(self) -> bool:
        return self.dialect is Dialect.BETA and self.settings.kind is SessionKind.TRANSCRIPTION

    def _emit(self, event: se.ServerEvent) -> None:
        self._seq += 1
        event.seq = self._seq
        event.event_id = self._event_prefix + str(self._seq)
        data = se.encode_server_event(event)
        if self.replay is not None:
            self.replay.append(self._seq, data)
            if not self._attached and self.replay.evicted_through > self._detached_at_seq:
                # the detached client can no longer get every event: a resume would lose some
                self._close(1000, "the replay buffer overflowed while the client was away")
        if self._attached:
            self.outbound.push(event, data)

    def error(
        self,
        code: str,
        message: str,
        event_id: str | None = None,
        param: str | None = None,
        *,
        error_type: str = "invalid_request_error",
    ) -> None:
        """Emit an `error` event; the session itself carries on."""
        body = se.ErrorBody(
            type=error_type, code=code, message=message, param=param, event_id=event_id
        )
        self._emit(se.Error(error=body))

    def _close(self, code: int, reason: str) -> None:
        if self.close is None:
            self.close = CloseAction(code, reason)
        if self.state is not State.ERROR:
            self.state = State.CLOSED

    def metrics(self) -> dict[str, int | float]:
        """Per-session counters for `spear.metrics`."""
        return {
            "seq": self._seq,
            "input_audio_bytes": self.input_audio_bytes,
            "outbound_queue_bytes": self.outbound.nbytes,
            "coalesced_deltas": self.outbound.coalesced,
            "dropped_events": self.outbound.dropped + self._items.dropped,
            "pending_items": len(self._items.pending),
            "upstream_reconnects": self.upstream_reconnects,
            "replay_buffer_bytes": self.replay.nbytes if self.replay is not None else 0,
            "responses": self.conversation.responses if self.conversation is not None else 0,
            **({} if self.conversation is None else self.conversation.latest_ms),
        }


def silence(samples: int) -> Pcm16:
    """Zero samples, used by tests and tools."""
    return np.zeros(samples, dtype=np.int16)
