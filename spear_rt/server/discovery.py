"""What a server says about itself: `/healthz`, `/v1/backends`, `/v1/capabilities`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from spear_rt.server.http import HttpRequest, Response, json_response

if TYPE_CHECKING:
    from spear_rt.server.app import Server


class DiscoveryApi:
    """The server's open self-description endpoints."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def routes(self) -> dict[tuple[bytes, str], Callable[[HttpRequest], Awaitable[Response]]]:
        """(method, path) -> handler."""
        return {
            (b"GET", "/healthz"): self.healthz,
            (b"GET", "/v1/backends"): self.backends,
            (b"GET", "/v1/capabilities"): self.capabilities,
        }

    async def healthz(self, request: HttpRequest) -> Response:
        """Status, sessions and backends; which worker answered; whether Redis is up."""
        server = self.server
        instances = server.registry.instances.values()
        health: dict[str, object] = {
            "status": "draining" if server.sessions.draining else "ok",
            "sessions": len(server.sessions.sessions),
            "backends_available": sum(1 for i in instances if i.unavailable is None),
            "backends_configured": len(server.registry.instances),
        }
        if server.worker is not None:
            health["worker"] = server.worker  # which of `serve --workers N` answered
        redis = server.cluster.redis if server.cluster is not None else None
        if redis is not None:  # a node of several (its address stays private: /healthz is open)
            health["cluster"] = {"redis": "down" if redis.down else "up"}
        return json_response(200, health)

    async def backends(self, request: HttpRequest) -> Response:
        """Every configured instance, described."""
        return json_response(
            200,
            {
                "config": self.server.config.source,
                "data": [i.describe() for i in self.server.registry.instances.values()],
            },
        )

    async def capabilities(self, request: HttpRequest) -> Response:
        """What the registry can serve, by operation."""
        return json_response(200, {"operations": self.server.registry.capabilities()})
