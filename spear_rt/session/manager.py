"""The session manager: admission, routing at connect, upstream open, and live sessions.

A session is routed once, at connect (operation `speech_to_text` over transport `websocket`
for transcription, `realtime_voice` otherwise), holds a lease on its instance for its whole
life (in-flight count), and runs in its own task group (`SessionRunner`). Caps are checked
before routing; over a cap the client gets an `error` event and close 1013 with a retry hint,
never an unbounded wait.

Resume: a connection naming a live session, its resume token and the same client key is
handed to that session's runner (`attach`); anything else closes 4004 without saying which
check failed.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio

from spear_rt.backend import TranscriptionSpec, TranscriptionUpstream
from spear_rt.config import Config
from spear_rt.errors import BackendFailure, CanonicalFailure
from spear_rt.ir import (
    CanonicalError,
    CanonicalRequestEnvelope,
    ErrorCode,
    Feature,
    Hosting,
    Operation,
    RequestMeta,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.protocol.conversation_settings import ConversationSettings
from spear_rt.protocol.settings import SessionKind, SessionSettings, TranscriptionSettings
from spear_rt.registry import RegisteredInstance, lease
from spear_rt.router import Router
from spear_rt.router.accounting import SharedUnavailable
from spear_rt.router.execute import Executor
from spear_rt.session.admission import (
    Attach,
    ConnectRequest,
    ResponderFactory,
    ResumeRequest,
    Runner,
    RunnerFactory,
    SharedSessions,
    reject,
    reject_resume,
)
from spear_rt.session.machine import ResumeError, SessionMachine, State, Timeouts, new_id
from spear_rt.session.outbound import OutboundQueue
from spear_rt.session.reconnect import (
    Opener,
    ReconnectingUpstream,
    ReconnectPolicy,
    reconnecting_upstream,
)
from spear_rt.session.replay import ReplayBuffer
from spear_rt.session.responder import ConversationMetrics, Responder, ResponseHost
from spear_rt.session.runner import ClientLink, SessionRunner
from spear_rt.session.stages import RoutedStages

log = logging.getLogger(__name__)
# Replay kept per second of answer audio: 24 kHz pcm16 in base64 and its events' JSON.
AUDIO_REPLAY_BYTES_PER_S = 24000 * 2 * 4 / 3 * 1.1


# Per-session counters the server reports summed over every session it has run.
_SESSION_COUNTERS: dict[str, Callable[[SessionMachine], int]] = {
    "dropped_events": lambda m: m.outbound.dropped,
    "upstream_reconnects": lambda m: m.upstream_reconnects,
    "resumes": lambda m: m.resumes,
}


class SessionManager:
    """Owns every live realtime session of a server."""

    def __init__(self, config: Config, router: Callable[[], Router]) -> None:
        self._config = config
        self._router = router
        self.executor: Executor | None = None  # the server's: conversations route through it
        self.conversation_metrics: ConversationMetrics | None = None
        self.shared: SharedSessions | None = None  # a cluster's (cluster/node.py)
        self._reconnect = reconnect_policy(config)
        self.sessions: dict[str, Runner] = {}
        self._owners: dict[str, str | None] = {}  # session id -> client key id
        self._per_key: dict[str, int] = {}
        self._admitted = 0  # sessions past admission, including those still opening upstream
        self.total_sessions = 0
        self.draining = False
        self._ended = dict.fromkeys(_SESSION_COUNTERS, 0)  # the counters of ended sessions
        self._emptied = anyio.Event()

    async def wait_empty(self) -> None:
        """Return once no session is live (a draining server's last step)."""
        while self.sessions:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    def reconfigure(self, config: Config) -> None:
        """Use `config` for sessions opened from now on."""
        self._reconnect = reconnect_policy(config)
        self._config = config

    def _total(self, counter: str) -> int:
        """A per-session counter summed over ended and live sessions."""
        of = _SESSION_COUNTERS[counter]
        return self._ended[counter] + sum(of(r.machine) for r in self.sessions.values())

    def upstream_reconnects(self) -> int:
        """Upstream reconnects over live and ended sessions."""
        return self._total("upstream_reconnects")

    def resumes(self) -> int:
        """Client resumes served, over live and ended sessions."""
        return self._total("resumes")

    def detached(self) -> int:
        """Sessions waiting for their client to resume."""
        return sum(1 for r in self.sessions.values() if r.machine.state is State.DETACHED)

    def dropped_events(self) -> int:
        """Deltas dropped for slow clients, over live and ended sessions."""
        return self._total("dropped_events")

    def _admission_error(self, key_id: str | None) -> CanonicalError | None:
        server = self._config.server
        if self.draining:
            return CanonicalError(
                ErrorCode.NO_CANDIDATE_BACKEND,
                "the server is draining",
                retryable=True,
                retry_after_s=5.0,
            )
        if self._admitted >= server.max_sessions:
            return CanonicalError(
                ErrorCode.RATE_LIMITED,
                f"the server holds its maximum of {server.max_sessions} sessions",
                retryable=True,
                retry_after_s=1.0,
            )
        if key_id is not None and self._per_key.get(key_id, 0) >= server.max_sessions_per_key:
            return CanonicalError(
                ErrorCode.RATE_LIMITED,
                f"this key holds its maximum of {server.max_sessions_per_key} sessions",
                retryable=True,
                retry_after_s=1.0,
            )
        return None

    def envelope(self, req: ConnectRequest, speech: bool = False) -> CanonicalRequestEnvelope:
        """The canonical form of a session open, as the router sees it.

        `speech`: a conversation asking for a speech-to-speech instance (one declaring
        `supports_audio_output`), which holds the whole conversation.
        """
        features = frozenset({Feature.SUPPORTS_AUDIO_OUTPUT}) if speech else frozenset()
        return CanonicalRequestEnvelope(
            request_id=new_id("req"),
            operation=_operation(req),
            meta=RequestMeta(client_key_id=req.client_key_id),
            routing=RoutingHints(backend=req.backend, model=req.model),
            requirements=RequestRequirements(
                required_features=features, required_transports=frozenset({Transport.WEBSOCKET})
            ),
        )

    def _route(self, req: ConnectRequest) -> tuple[RegisteredInstance, bool]:
        """The session's instance, and whether it is speech-to-speech (else: a cascade)."""
        router = self._router()
        if req.kind is SessionKind.REALTIME:
            speech = self.envelope(req, speech=True)
            probe, _ = router.explain(speech)  # no side effect: no instance is not an error
            if probe is not None and _holds_conversations(probe):
                instance, _ = router.route(speech)
                if _holds_conversations(instance):
                    return instance, True
        instance, _ = router.route(self.envelope(req))
        return instance, False

    async def serve(
        self, conn: ClientLink, req: ConnectRequest, make_runner: RunnerFactory | None = None
    ) -> None:
        """Run one session on an accepted WebSocket until it ends.

        `make_runner` lets an edge driver run the session its own way (the asyncio driver's
        callback runner); by default the task-based `SessionRunner` drives `conn`.
        """
        key = req.client_key_id
        error = self._admission_error(key)
        place = None
        if error is None and key is not None and self.shared is not None:
            place = new_id("place")
            error = await self._hold_shared(self.shared, key, place)
        if error is not None:
            await reject(conn, error, 1013)
            return
        if key is not None:
            self._per_key[key] = self._per_key.get(key, 0) + 1
        self._admitted += 1
        try:
            await self._serve_routed(conn, req, make_runner)
        finally:
            self._admitted -= 1
            if key is not None:
                self._per_key[key] -= 1
                if not self._per_key[key]:
                    del self._per_key[key]
                if place is not None and self.shared is not None:
                    self.shared.release(key, place)

    async def _hold_shared(
        self, shared: SharedSessions, key: str, place: str
    ) -> CanonicalError | None:
        """The per-key cap counted over every node (this node's count alone without Redis)."""
        cap = self._config.server.max_sessions_per_key
        try:
            if await shared.hold(key, place, cap):
                return None
        except SharedUnavailable:
            return None  # the local check passed
        return CanonicalError(
            ErrorCode.RATE_LIMITED,
            f"this key holds its maximum of {cap} sessions (over every node)",
            retryable=True,
            retry_after_s=1.0,
        )

    async def _serve_routed(
        self, conn: ClientLink, req: ConnectRequest, make_runner: RunnerFactory | None
    ) -> None:
        try:
            instance, speech = self._route(req)
        except CanonicalFailure as exc:
            await reject(conn, exc.error, 1013 if exc.error.retryable else 1011)
            return
        assert instance.kind is not None  # the filter keeps only instances whose kind loaded
        realtime = self._config.realtime
        spec = TranscriptionSpec(model=req.model)
        # The connect timeout is a scope around the whole session whose deadline is lifted
        # once the upstream is open: an upstream context may hold a task group, and a
        # scope must not end while a task group opened inside it is still running.
        opened = False
        try:
            with anyio.CancelScope(
                deadline=anyio.current_time() + realtime.upstream_connect_timeout_s
            ) as scope:
                async with self._upstream(instance, req, spec, speech) as upstream:
                    opened = True
                    scope.deadline = math.inf
                    await self._run_session(conn, req, instance, upstream, make_runner, speech)
        except BackendFailure as exc:
            if opened:
                raise
            await reject(conn, _backend_error(f"{instance.name}: {exc}", exc.retryable), 1011)
            return
        except CanonicalFailure as exc:
            if opened:
                raise
            await reject(conn, exc.error, 1008)
            return
        if scope.cancelled_caught and not opened:
            await reject(
                conn, _backend_error(f"{instance.name}: upstream connect timed out", True), 1011
            )

    def _upstream(
        self,
        instance: RegisteredInstance,
        req: ConnectRequest,
        spec: TranscriptionSpec,
        speech: bool,
    ) -> AbstractAsyncContextManager[TranscriptionUpstream]:
        """The session's upstream: reopened after drops when the instance is remote."""
        operation = _operation(req)

        @asynccontextmanager
        async def open_upstream(
            attempt: int,
        ) -> AsyncIterator[tuple[TranscriptionUpstream, str]]:
            # The first retry goes back to the same instance (most drops are transient),
            # later ones ask the router, which knows about breakers and ejections.
            target = instance if attempt <= 1 else self._reroute(req, instance, speech)
            kind: Any = target.kind
            opener = kind.open_conversation if speech else kind.open_transcription
            with lease(target):
                try:
                    async with opener(target.info, spec) as upstream:
                        yield upstream, target.name
                except BackendFailure as exc:
                    self._router().connection_failed(target.name, operation, exc)
                    raise

        if self._reconnect is not None and instance.hosting is Hosting.REMOTE:
            return reconnecting_upstream(open_upstream, self._reconnect)
        return _first_only(open_upstream)

    def _reroute(
        self, req: ConnectRequest, previous: RegisteredInstance, speech: bool
    ) -> RegisteredInstance:
        try:
            instance, _decision = self._router().route(self.envelope(req, speech))
        except CanonicalFailure:
            return previous  # nothing else can serve it: try the same one again
        if speech and not _holds_conversations(instance):
            return previous
        return instance

    async def _run_session(
        self,
        conn: ClientLink,
        req: ConnectRequest,
        instance: RegisteredInstance,
        upstream: TranscriptionUpstream,
        make_runner: RunnerFactory | None,
        speech: bool = False,
    ) -> None:
        realtime = self._config.realtime
        resumable = realtime.resume_grace_seconds > 0
        replay_bytes = realtime.replay_buffer_bytes
        if req.kind is SessionKind.REALTIME:  # answers are audio: kept by duration
            seconds = self._config.conversation.replay_audio_seconds
            replay_bytes = max(replay_bytes, round(seconds * AUDIO_REPLAY_BYTES_PER_S))
        machine = SessionMachine(
            session_id=new_id("sess"),
            upstream_rate_hz=upstream.input_rate_hz,
            settings=SessionSettings(
                kind=req.kind,
                model=req.model,
                transcription=TranscriptionSettings(),
                conversation=ConversationSettings(
                    instructions=self._config.conversation.instructions or None
                ),
            ),
            dialect=req.dialect,
            outbound=OutboundQueue(realtime.max_outbound_bytes),
            timeouts=Timeouts(
                realtime.idle_timeout_s, realtime.max_session_seconds, realtime.drain_deadline_s
            ),
            resume_token=secrets.token_urlsafe(24) if resumable else None,
            spear_info={"backend": instance.name, "kind": instance.config.kind},
            replay=ReplayBuffer(replay_bytes) if resumable else None,
            relay=speech,
        )
        if isinstance(upstream, ReconnectingUpstream):
            if speech:
                upstream.restore = machine.restore_commands
                upstream.stale = machine.stale_command
            router, operation = self._router, _operation(req)
            upstream.report = lambda name, exc: router().connection_failed(name, operation, exc)
        responder = None if speech else self._responder(machine, req)
        runner: Runner = (
            make_runner(machine, upstream, responder)
            if make_runner
            else SessionRunner(
                machine,
                conn,
                upstream,
                resume_grace_s=realtime.resume_grace_seconds,
                responder=responder,
            )
        )
        self.sessions[machine.session_id] = runner
        self._owners[machine.session_id] = req.client_key_id
        self.total_sessions += 1
        try:
            if self.shared is not None and resumable:
                await self.shared.register(machine.session_id)
            await runner.run()
        finally:
            if self.shared is not None and resumable:
                self.shared.unregister(machine.session_id)
            del self.sessions[machine.session_id]
            del self._owners[machine.session_id]
            for counter, of in _SESSION_COUNTERS.items():
                self._ended[counter] += of(machine)
            if not self.sessions:
                self._emptied.set()

    def _responder(self, machine: SessionMachine, req: ConnectRequest) -> ResponderFactory | None:
        """How a conversation session composes its responses (None: it transcribes only)."""
        executor = self.executor
        if machine.conversation is None or executor is None:
            return None
        config = self._config.conversation
        stages = RoutedStages(self._router, executor, config, req.client_key_id)

        def responder(host: ResponseHost) -> Responder:
            return Responder(machine, stages, host, config, self.conversation_metrics)

        return responder

    async def resume(self, conn: ClientLink, req: ResumeRequest, attach: Attach) -> None:
        """Continue a detached session on `conn`, or close it 4004."""
        runner = self.sessions.get(req.session_id)
        token = runner.machine.resume_token if runner is not None else None
        if (
            runner is None
            or token is None
            or not hmac.compare_digest(token.encode(), req.token.encode())
            or self._owners.get(req.session_id) != req.client_key_id
        ):
            await reject_resume(
                conn,
                f"no resumable session {req.session_id!r} with this token: it ended, its "
                "resume grace ran out, or the token is wrong",
            )
            return
        try:
            await attach(runner, req.last_seq)
        except ResumeError as exc:
            await reject_resume(conn, f"cannot resume {req.session_id!r}: {exc}")
            return

    def drain(self, deadline_s: float) -> None:
        """Refuse new sessions and ask every live one to finish its turns and close."""
        self.draining = True
        for runner in list(self.sessions.values()):
            runner.drain(deadline_s)


def _operation(req: ConnectRequest) -> Operation:
    """What a session open asks of the registry."""
    if req.kind is SessionKind.TRANSCRIPTION:
        return Operation.SPEECH_TO_TEXT
    return Operation.REALTIME_VOICE


def _holds_conversations(instance: RegisteredInstance) -> bool:
    """The instance's kind relays whole conversations (speech-to-speech)."""
    return hasattr(instance.kind, "open_conversation")


@asynccontextmanager
async def _first_only(opener: Opener) -> AsyncIterator[TranscriptionUpstream]:
    """Open once, without reconnecting."""
    async with opener(0) as (upstream, _instance):
        yield upstream


def reconnect_policy(config: Config) -> ReconnectPolicy | None:
    """The upstream reconnect policy `[realtime]` asks for (None: off)."""
    realtime = config.realtime
    if realtime.upstream_reconnect_attempts <= 0:
        return None
    return ReconnectPolicy(
        max_attempts=realtime.upstream_reconnect_attempts,
        initial_backoff_s=realtime.upstream_reconnect_backoff_s,
        max_backoff_s=realtime.upstream_reconnect_max_backoff_s,
        connect_timeout_s=realtime.upstream_connect_timeout_s,
        max_replay_audio_bytes=realtime.upstream_replay_audio_bytes,
    )


def _backend_error(message: str, retryable: bool) -> CanonicalError:
    return CanonicalError(ErrorCode.BACKEND_ERROR, message, retryable=retryable)
