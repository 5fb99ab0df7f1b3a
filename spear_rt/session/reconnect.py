"""Upstream reconnect: a session keeps its transcription upstream across drops.

`ReconnectingUpstream` is the I/O around the sans-I/O `TurnJournal` (session/journal.py, which
states what is kept and replayed).

* A retryable failure (receive: `BackendFailure(retryable=True)` or `EndOfStream`; send:
  `BackendFailure(retryable=True)`) closes the upstream after draining its events, then up to
  `max_attempts` opens, each after a backoff (doubling, capped, with jitter; at least the
  failure's `retry_after_s`, capped too) and bounded by `connect_timeout_s`. Once one opens:
  `UpstreamReconnected` (and failures of unreplayable committed turns) are emitted, the replay
  is sent, and commands flow again. A non-retryable failure, or the last attempt failing, is
  final: `receive` raises it after every event that came before, `send` raises it.
* Commands during a reconnect: `send` waits until the upstream is back (taking nothing
  before), `send_nowait` returns False. A command is journaled once the upstream took it, or
  when sending it failed (the replay then sends it): cancelling a `send` leaves it either
  taken or not, so the caller may retry it. Nothing is lost or sent twice.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager

import anyio
import anyio.abc
import msgspec

from spear_rt.backend import (
    AppendAudio,
    Commit,
    TranscriptionUpstream,
    UpstreamCommand,
    UpstreamEvent,
    UpstreamReconnected,
    waits_idle,
)
from spear_rt.errors import BackendFailure, CanonicalFailure, ConfigError
from spear_rt.session.journal import MiB, TurnJournal

Opener = Callable[[int], AbstractAsyncContextManager[tuple[TranscriptionUpstream, str]]]
Restore = Callable[[dict[str, list[UpstreamCommand]]], list[UpstreamCommand]]
"""`opener(attempt)` (0 = the first open): a context that yields (upstream, instance name)."""


class ReconnectPolicy(msgspec.Struct, frozen=True):
    """How hard a session tries to get its upstream back, and what it keeps to replay."""

    max_attempts: int = 5  # opens per reconnect before giving up
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    jitter: float = 0.2  # fraction: each backoff is scaled by 1 ± jitter·random
    connect_timeout_s: float = 10.0  # per reopen (the first open is bounded by the caller)
    max_replay_audio_bytes: int = 8 * MiB
    max_pending_events: int = 64  # events waiting for `receive`
    drain_timeout_s: float = 1.0  # after a send failed: wait this long for the events left

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_pending_events", "max_replay_audio_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reconnect.{name}", "must be at least 1")
        for name in ("initial_backoff_s", "max_backoff_s", "connect_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"reconnect.{name}", "must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("reconnect.jitter", "must be between 0 and 1")

    def backoff_s(self, attempt: int, random_value: float) -> float:
        """Wait before attempt `attempt` (1-based) for a `random_value` in [0, 1)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (attempt - 1))
        return base * (1.0 + self.jitter * (2.0 * random_value - 1.0))


DEFAULT_POLICY = ReconnectPolicy()


# --- the upstream that reconnects ----------------------------------------------------------------


class _State(enum.Enum):
    OPEN = "open"  # commands go to the current upstream
    RECONNECTING = "reconnecting"  # commands are journaled, the replay will send them
    REPLAYING = "replaying"  # the replay is being sent: commands wait
    FAILED = "failed"  # final: everything raises the failure
    CLOSED = "closed"  # the context has exited


class ReconnectStatistics(msgspec.Struct, frozen=True):
    """A reconnecting upstream's state and occupancy."""

    connected: bool
    instance: str
    reconnects: int
    unfinished_turns: int
    journal_audio_bytes: int
    events_buffered: int
    max_pending_events: int


def _lost() -> BackendFailure:
    return BackendFailure("the upstream connection was lost", retryable=True)


class ReconnectingUpstream:
    """A `TranscriptionUpstream` that reopens its upstream and replays (module docstring).

    Built by `reconnecting_upstream`. Events wait in a queue bounded by `max_pending_events`
    (backpressure: the upstream is not read while it is full; nothing is dropped). One sender
    at a time, as for any upstream. A send cancelled while the upstream waits stays journaled.
    """

    def __init__(self, opener: Opener, policy: ReconnectPolicy, rng: Callable[[], float]) -> None:
        self.input_rate_hz = 0
        self.journal = TurnJournal(policy.max_replay_audio_bytes)
        self._opener = opener
        self._policy = policy
        self._rng = rng
        self._tx, self._rx = anyio.create_memory_object_stream[UpstreamEvent](
            policy.max_pending_events
        )
        self._state = _State.RECONNECTING
        self._changed = anyio.Event()
        self._up: TranscriptionUpstream | None = None
        # the current connection's optional fast paths (looked up once per connection)
        self._up_send_nowait: Callable[[UpstreamCommand], bool] | None = None
        self._up_cork: Callable[[], None] | None = None
        self._up_flush: Callable[[], None] | None = None
        self._instance = ""
        self._generation = 0  # connections opened
        self._reconnects = 0
        self._failure: BackendFailure | None = None
        self._ending: BackendFailure | None = None  # why the current connection is ending
        self._noticed = 0.0  # when it was noticed
        self._drain_deadline = math.inf
        self._receive_scope: anyio.CancelScope | None = None
        self._sending = False
        self._stopping = False  # the context is exiting: close the upstream, stop
        self._phase: anyio.CancelScope | None = None  # what `_request_stop` cancels
        # Sent on each new connection before the journal's replay (a relayed conversation's
        # settings and items): given the replays of committed turns by item id, it takes
        # (pops) those it places among its items. Told of each connection's failure (the
        # router's breaker).
        self.restore: Restore = lambda replays: []
        self.report: Callable[[str, BackendFailure], None] = lambda instance, failure: None
        # A command that no longer applies when its turn to be sent comes (a cut response's
        # create that waited out the reconnect) is dropped, not sent.
        self.stale: Callable[[UpstreamCommand], bool] = lambda command: False
        self._sink: Callable[[UpstreamEvent], bool] | None = None
        self._sink_done: Callable[[], None] = _nothing
        self._receiving = False  # `receive` is waiting (see `set_sink`)

    # --- TranscriptionUpstream ----------------------------------------------------------------

    def cork(self) -> None:
        """Hold the connection's writes until `flush` (if it can: see `RealtimeTranscription`)."""
        if (cork := self._up_cork) is not None:
            cork()

    def flush(self) -> None:
        """Write what the connection held since `cork`."""
        if (flush := self._up_flush) is not None:
            flush()

    def send_nowait(self, command: UpstreamCommand) -> bool:
        """Send without waiting; False (nothing done) while reconnecting or when it would wait."""
        if self._state is not _State.OPEN:
            self._raise_if_over()
            return False
        fast = self._up_send_nowait
        if self._sending or fast is None:
            return False
        # audio is never stale (only a cut response's create is): the check costs an append
        if not isinstance(command, AppendAudio) and self.stale(command):
            return True  # taken, and dropped
        if self.journal.dropped(command):
            if isinstance(command, Commit) and not self._has_room():
                return False
            self.journal.record_command(command)
            for failed in self.journal.take_failures():
                self._tx.send_nowait(failed)
            return True
        try:
            accepted = fast(command)
        except BackendFailure as exc:
            self._connection_failed(exc, self._generation)
            if not exc.retryable:
                raise
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._connection_failed(_lost(), self._generation)
            return False
        if accepted:
            self.journal.record_command(command)
        return accepted

    async def send(self, command: UpstreamCommand) -> None:
        """Send `command`, first waiting out a reconnect (see the module docstring)."""
        while self._state is not _State.OPEN:
            self._raise_if_over()
            await self._changed.wait()
        if self.stale(command):
            return
        up, generation = self._up, self._generation
        assert up is not None
        if self.journal.dropped(command):
            self.journal.record_command(command)
            await self._deliver_failures()
            return
        self._sending = True
        try:
            await up.send(command)
        except BackendFailure as exc:
            self.journal.record_command(command)  # not delivered: the replay sends it
            self._connection_failed(exc, generation)
            if not exc.retryable:
                raise
            return
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.journal.record_command(command)
            self._connection_failed(_lost(), generation)
            return
        finally:
            self._sending = False
        self.journal.record_command(command)

    def set_sink(
        self,
        sink: Callable[[UpstreamEvent], bool] | None,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Hand events to `sink` as the upstream reads them, where it can (an upstream with
        `set_sink`, the asyncio link): only while the connection is open and `receive` waits
        with nothing queued or in flight, so order holds. `sink` returning False (not now)
        queues the event as usual. Failures and reconnects still go through `receive`.
        `done` follows the events of one upstream read that `sink` took.
        """
        self._sink, self._sink_done = sink, done or _nothing

    async def receive(self) -> UpstreamEvent:
        """Next event; after a final failure, the events before it, then the failure."""
        self._receiving = True
        try:
            return await self._rx.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._failure is not None:
                raise self._failure from None
            raise anyio.EndOfStream from None
        finally:
            self._receiving = False

    def statistics(self) -> ReconnectStatistics:
        """Current state and occupancy."""
        return ReconnectStatistics(
            connected=self._state is _State.OPEN,
            instance=self._instance,
            reconnects=self._reconnects,
            unfinished_turns=len(self.journal.items),
            journal_audio_bytes=self.journal.audio_bytes,
            events_buffered=self._rx.statistics().current_buffer_used,
            max_pending_events=self._policy.max_pending_events,
        )

    # --- state ---------------------------------------------------------------------------------

    def _set_state(self, state: _State) -> None:
        self._state = state
        self._changed.set()
        self._changed = anyio.Event()

    def _raise_if_over(self) -> None:
        if self._state is _State.FAILED:
            assert self._failure is not None
            raise self._failure
        if self._state is _State.CLOSED:
            raise anyio.ClosedResourceError

    async def _wait_open(self, generation: int) -> None:
        """Wait for a connection newer than `generation` to take commands (or the end)."""
        while not (self._state is _State.OPEN and self._generation > generation):
            self._raise_if_over()
            await self._changed.wait()

    def _sink_for(self, generation: int) -> Callable[[UpstreamEvent], bool]:
        """What connection `generation` hands its events to while `_pump` waits on it."""

        def take(event: UpstreamEvent) -> bool:
            sink = self._sink
            if (
                sink is None
                or generation != self._generation
                or self._state is not _State.OPEN
                or not (self._receiving and waits_idle(self._tx))
            ):
                return False
            forwarded = self.journal.record_event(event)
            if forwarded is not None and not sink(forwarded):
                self._tx.send_nowait(forwarded)  # there is room: nothing is queued
            return True

        return take

    def _has_room(self) -> bool:
        stats = self._tx.statistics()
        return stats.current_buffer_used < stats.max_buffer_size or stats.tasks_waiting_receive > 0

    async def _deliver_failures(self) -> None:
        for failed in self.journal.take_failures():
            await self._tx.send(failed)

    def _connection_failed(self, failure: BackendFailure, generation: int) -> None:
        """The current connection is over: stop sending to it, drain it, then reconnect."""
        if generation != self._generation or self._state not in (_State.OPEN, _State.REPLAYING):
            return
        self._ending, self._noticed = failure, anyio.current_time()
        if failure.retryable:
            self._set_state(_State.RECONNECTING)
        else:
            self._failure = failure
            self._set_state(_State.FAILED)
        self._drain_deadline = self._noticed + self._policy.drain_timeout_s
        if self._receive_scope is not None:
            self._receive_scope.deadline = self._drain_deadline

    def _give_up(self, failure: BackendFailure) -> None:
        if self._state is not _State.FAILED:
            self._failure = failure
            self._set_state(_State.FAILED)
        self._tx.close()

    def _close(self) -> None:
        if self._state is not _State.FAILED:
            self._set_state(_State.CLOSED)
        self._tx.close()
        self._request_stop()

    # --- the supervisor -----------------------------------------------------------------------

    async def _supervise(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Own each upstream context in turn: open, serve, drain, back off, reopen."""
        policy = self._policy
        last: BackendFailure | None = None  # what the current reconnect recovers from
        tries = opens = 0
        try:
            while not self._stopping:
                if last is not None:
                    if tries >= policy.max_attempts:
                        self._give_up(BackendFailure(
                            f"the upstream could not be reopened in {tries} attempts: {last}",
                            retryable=last.retryable, status=last.status,
                        ))  # fmt: skip
                        return
                    tries += 1
                    retry_after = min(last.retry_after_s or 0.0, policy.max_backoff_s)
                    with self._phase_scope():
                        await anyio.sleep(max(policy.backoff_s(tries, self._rng()), retry_after))
                    if self._stopping:
                        return
                opens += 1
                first = task_status if last is None else None
                ended, served = await self._connect(opens - 1, first, tries)
                if self._stopping:
                    return
                if self._state is _State.FAILED or not ended.retryable:
                    self._give_up(ended)
                    return
                if served:  # a new reconnect starts
                    tries = 0
                last = ended
        finally:
            self._close()

    async def _connect(
        self, attempt: int, task_status: anyio.abc.TaskStatus[None] | None, tries: int
    ) -> tuple[BackendFailure, bool]:
        """Open, serve and close one upstream; why it ended, and whether it took over.

        A failure of the first open (`task_status` given) propagates unchanged.
        """
        opened = False
        ended: tuple[BackendFailure, bool] | None = None
        with anyio.CancelScope() as scope:  # bounds the open, cancelled on stop while opening
            self._phase = scope
            if task_status is None:
                scope.deadline = anyio.current_time() + self._policy.connect_timeout_s
            try:
                async with self._opener(attempt) as (up, instance):
                    opened = True
                    scope.deadline = math.inf
                    with self._phase_scope():  # on stop, the context exits gracefully
                        ended = await self._serve(up, instance, task_status, tries)
                    if not self._stopping:
                        self.report(instance, ended[0])
            except BackendFailure as exc:
                if task_status is not None and not opened:
                    raise
                ended = ended or (exc, opened)
            except CanonicalFailure as exc:
                if task_status is not None and not opened:
                    raise
                ended = ended or (BackendFailure(str(exc), retryable=exc.error.retryable), opened)
            finally:
                self._phase = None
        if ended is not None:
            return ended
        message = "the upstream context ended without an upstream"
        if scope.cancelled_caught and not opened:
            message = f"reopening the upstream timed out ({self._policy.connect_timeout_s:g}s)"
        return BackendFailure(message, retryable=True), opened

    @contextmanager
    def _phase_scope(self) -> Iterator[None]:
        """A scope that `_request_stop` cancels."""
        with anyio.CancelScope() as scope:
            self._phase = scope
            if self._stopping:
                scope.cancel()
            try:
                yield
            finally:
                self._phase = None

    def _request_stop(self) -> None:
        self._stopping = True
        if self._phase is not None:
            self._phase.cancel()

    async def _serve(
        self,
        up: TranscriptionUpstream,
        instance: str,
        task_status: anyio.abc.TaskStatus[None] | None,
        tries: int,
    ) -> tuple[BackendFailure, bool]:
        """Run one connection until it ends; the failure, and whether it took over."""
        self._generation += 1
        generation = self._generation
        self._up, self._ending, self._drain_deadline = up, None, math.inf
        self._up_send_nowait = getattr(up, "send_nowait", None)
        self._up_cork, self._up_flush = getattr(up, "cork", None), getattr(up, "flush", None)
        set_sink: Callable[[Callable[[UpstreamEvent], bool], Callable[[], None]], None] | None = (
            getattr(up, "set_sink", None)
        )
        if set_sink is not None:
            set_sink(self._sink_for(generation), lambda: self._sink_done())
        replay: list[UpstreamCommand] = []
        if task_status is not None:
            self.input_rate_hz = up.input_rate_hz
            self._instance = instance
            self._set_state(_State.OPEN)
            task_status.started()
        else:
            if up.input_rate_hz != self.input_rate_hz:
                message = f"{instance} takes {up.input_rate_hz} Hz, not {self.input_rate_hz} Hz"
                return BackendFailure(message, retryable=True), False
            self._set_state(_State.REPLAYING)
            failed = self.journal.restart()
            replay = self._replay()
            items = self.journal.replayed_items()
            self._instance = instance
            self._reconnects += 1
            downtime = anyio.current_time() - self._noticed
            events: list[UpstreamEvent] = [*failed]
            events.append(UpstreamReconnected(instance, tries, downtime, items))
            for event in events:
                await self._tx.send(event)
        ended: list[BackendFailure] = []
        async with anyio.create_task_group() as tg:

            async def pump() -> None:
                ended.append(await self._pump(up, generation))
                tg.cancel_scope.cancel()  # a replay still being sent goes nowhere

            tg.start_soon(pump)
            for command in replay:
                try:
                    await up.send(command)
                except BackendFailure as exc:
                    self._connection_failed(exc, generation)
                    break
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    self._connection_failed(_lost(), generation)
                    break
            if self._state is _State.REPLAYING:
                self._set_state(_State.OPEN)
        return ended[0], True

    def _replay(self) -> list[UpstreamCommand]:
        """The restore with the committed turns it placed, then the journal's other turns."""
        turns = self.journal.replay_turns()
        waiting = {t.item_id: t.commands for t in turns if t.committed and t.item_id is not None}
        commands = self.restore(waiting)
        for turn in turns:
            if not turn.committed or turn.item_id in waiting:
                commands.extend(turn.commands)
        return commands

    async def _pump(self, up: TranscriptionUpstream, generation: int) -> BackendFailure:
        """Forward events until the connection ends (or, after a failed send, the drain does)."""
        while True:
            failure: BackendFailure | None = None
            with anyio.CancelScope(deadline=self._drain_deadline) as scope:
                self._receive_scope = scope
                try:
                    event = await up.receive()
                except BackendFailure as exc:
                    failure = exc
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    failure = BackendFailure("the upstream closed the session", retryable=True)
                finally:
                    self._receive_scope = None
            if scope.cancelled_caught:  # drained for long enough after a send failed
                failure = self._ending
            if failure is not None:
                break
            forwarded = self.journal.record_event(event)
            if forwarded is not None:  # outside the drain deadline: an event is never cut off
                await self._tx.send(forwarded)
        self._connection_failed(failure, generation)
        if self._state is _State.FAILED:
            self._tx.close()  # every event before the failure is queued: `receive` may end
        if self._ending is not None and not self._ending.retryable:
            return self._ending  # a send's final failure wins
        return failure


def _nothing() -> None:
    pass


@asynccontextmanager
async def reconnecting_upstream(
    opener: Opener,
    policy: ReconnectPolicy = DEFAULT_POLICY,
    *,
    rng: Callable[[], float] = random.random,
) -> AsyncIterator[ReconnectingUpstream]:
    """An upstream that reopens itself through `opener(attempt)` (0 = the first open).

    The first open happens on entry; whatever it raises (BackendFailure, CanonicalFailure, a
    cancellation) leaves unchanged. Bound it with the caller's own timeout scope. The body's
    own exception also leaves unwrapped.
    """
    upstream = ReconnectingUpstream(opener, policy, rng)
    failed: BaseException | None = None
    raised: BaseException | None = None
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(upstream._supervise)
        except BaseException as exc:  # re-raised below, outside the task group
            failed = exc
        else:
            try:
                yield upstream
            except BaseException as exc:  # re-raised below, outside the task group
                raised = exc
            finally:
                upstream._close()  # the supervisor closes the upstream gracefully and ends
    if failed is not None:
        raise failed
    if raised is not None:
        raise raised
