"""The server's Prometheus gauges: instances (in flight, breaker, availability) and sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from spear_rt.registry import RegisteredInstance

if TYPE_CHECKING:
    from spear_rt.server.app import Server


def register_gauges(server: Server) -> None:
    """Register every gauge of `server` on its metrics registry (read at scrape time)."""

    def per_instance(
        value: Callable[[RegisteredInstance], float],
    ) -> Callable[[], dict[tuple[str, ...], float]]:
        return lambda: {(i.name,): value(i) for i in server.registry.instances.values()}

    server.metrics.gauge(
        "spear_inflight",
        "Requests and sessions in flight per instance",
        ("instance",),
        per_instance(lambda i: i.runtime.inflight),
    )
    server.metrics.gauge(
        "spear_breaker_open",
        "1 when the instance's circuit is not closed",
        ("instance",),
        per_instance(lambda i: float(i.runtime.breaker.state != "closed")),
    )
    server.metrics.gauge(
        "spear_instance_available",
        "1 when the instance can serve",
        ("instance",),
        per_instance(lambda i: float(i.unavailable is None)),
    )
    server.metrics.gauge(
        "spear_sessions",
        "Live realtime sessions",
        (),
        lambda: {(): float(len(server.sessions.sessions))},
    )
    server.metrics.gauge(
        "spear_session_queue_bytes",
        "Bytes queued toward clients, all sessions",
        (),
        lambda: {
            (): float(sum(r.machine.outbound.nbytes for r in server.sessions.sessions.values()))
        },
    )
    server.metrics.gauge(
        "spear_session_events_dropped",
        "Deltas dropped for slow clients (live + ended)",
        (),
        lambda: {(): float(server.sessions.dropped_events())},
    )
    server.metrics.gauge(
        "spear_sessions_detached",
        "Sessions whose client dropped, waiting for it to resume",
        (),
        lambda: {(): float(server.sessions.detached())},
    )
    server.metrics.gauge(
        "spear_session_resumes_total",
        "Client resumes served",
        (),
        lambda: {(): float(server.sessions.resumes())},
    )
    server.metrics.gauge(
        "spear_upstream_reconnects_total",
        "Session upstreams reopened after a drop (live + ended sessions)",
        (),
        lambda: {(): float(server.sessions.upstream_reconnects())},
    )
    server.metrics.gauge(
        "spear_sessions_total",
        "Realtime sessions started",
        (),
        lambda: {(): float(server.sessions.total_sessions)},
    )
    _register_cluster_gauges(server)


def _register_cluster_gauges(server: Server) -> None:
    """Gauges of a server among workers and nodes (none for a server alone)."""
    cluster = server.cluster
    if cluster is None:
        return
    gauges: list[tuple[str, str, Callable[[], float]]] = [
        (
            "spear_resumes_forwarded_total",
            "Resumes sent on to the worker or node holding their session",
            lambda: cluster.forwarded,
        ),
    ]
    redis = cluster.redis
    if redis is not None:
        gauges += [
            (
                "spear_cluster_redis_errors_total",
                "Redis calls that failed (the node counted alone meanwhile)",
                lambda: redis.errors,
            ),
            ("spear_cluster_redis_down", "1 while Redis is unreachable", lambda: redis.down),
        ]
    for name, text, value in gauges:
        server.metrics.gauge(name, text, (), _unlabelled(value))


def _unlabelled(value: Callable[[], float]) -> Callable[[], dict[tuple[str, ...], float]]:
    """A gauge's reader for one unlabelled sample."""
    return lambda: {(): float(value())}
