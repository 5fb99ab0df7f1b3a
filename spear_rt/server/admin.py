"""Operator endpoints: route explanations, Prometheus metrics, config reload.

`/admin/*` always needs an admin key (`server.admin_keys_env`): with none configured it is
refused (403; SIGHUP still reloads). `/metrics` needs an admin key when admin keys are
configured, else a loopback peer; `server.metrics_open` serves it to anyone. A reload
rebuilds the registry from the config file atomically: a bad file is refused with its
reason and the old config stays; live sessions keep the instance they were routed to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from spear_rt.errors import CanonicalFailure, ConfigError
from spear_rt.ir import (
    CanonicalRequestEnvelope,
    Feature,
    Operation,
    RequestMeta,
    RequestRequirements,
    RoutingHints,
    Transport,
)
from spear_rt.server.http import (
    HttpError,
    HttpRequest,
    Response,
    canonical_error_response,
    json_response,
    keys_from_env,
    match_key,
)
from spear_rt.session.machine import new_id

if TYPE_CHECKING:
    from spear_rt.server.app import Server

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ExplainRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of `POST /v1/route/explain`: what a request would declare."""

    operation: Operation
    model: str | None = None
    backend: str | None = None
    policy: str | None = None
    required_features: list[Feature] = msgspec.field(default_factory=list)
    required_transports: list[Transport] = msgspec.field(default_factory=list)
    preferred_backends: list[str] = msgspec.field(default_factory=list)
    allowlist: list[str] | None = None
    denylist: list[str] = msgspec.field(default_factory=list)
    hash_key: str | None = None
    task_id: str | None = None

    def envelope(self) -> CanonicalRequestEnvelope:
        """The canonical request this describes."""
        return CanonicalRequestEnvelope(
            request_id=new_id("req"),
            operation=self.operation,
            task_id=self.task_id,
            meta=RequestMeta(),
            routing=RoutingHints(
                backend=self.backend,
                model=self.model,
                allowlist=tuple(self.allowlist) if self.allowlist is not None else None,
                denylist=tuple(self.denylist),
                hash_key=self.hash_key,
            ),
            requirements=RequestRequirements(
                required_features=frozenset(self.required_features),
                required_transports=frozenset(self.required_transports),
                preferred_backends=tuple(self.preferred_backends),
            ),
            policy=self.policy,
        )


_explain_decoder = msgspec.json.Decoder(ExplainRequest)


def decode_json(decoder: msgspec.json.Decoder[Any], body: bytes, what: str) -> object:
    """Decode a JSON body or raise HttpError 400 saying what is wrong."""
    if not body:
        raise HttpError(400, f"{what}: the request body is empty; send JSON", "invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"{what}: {exc}", "invalid_value") from None
    except RecursionError:
        raise HttpError(400, f"{what}: the body nests too deep", "invalid_json") from None
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"{what}: the body is not valid JSON: {exc}", "invalid_json") from None


class AdminApi:
    """The operator endpoints of one server."""

    def __init__(self, server: Server, reload_config: Callable[[], dict[str, object]]) -> None:
        self.server = server
        self._reload_config = reload_config

    def routes(self) -> dict[tuple[bytes, str], Callable[[HttpRequest], object]]:
        """(method, path) -> handler."""
        return {
            (b"POST", "/v1/route/explain"): self.explain,
            (b"GET", "/metrics"): self.metrics,
            (b"POST", "/admin/reload"): self.reload,
        }

    async def explain(self, request: HttpRequest) -> Response:
        """What the router would pick for a request, and why, without sending it."""
        body = decode_json(_explain_decoder, request.body, "route/explain")
        assert isinstance(body, ExplainRequest)
        req = body.envelope()
        router = self.server.router
        try:
            _instance, decision = router.explain(req)
        except CanonicalFailure as exc:
            return canonical_error_response(exc.error)
        payload = msgspec.to_builtins(decision)
        payload["policy"] = decision.policy
        if decision.selected is None:
            payload["error"] = msgspec.to_builtins(router.no_candidate_error(req, decision))
        return json_response(200, payload)

    async def metrics(self, request: HttpRequest) -> Response:
        """Prometheus text exposition."""
        self._authorize_metrics(request)
        text = self.server.metrics.render()
        share = self.server.metrics_share
        if share is not None:  # one of serve --workers N: every worker's samples, summed
            share.publish(text)
            text = share.aggregate(text)
        return Response(200, text.encode(), content_type=PROMETHEUS_TEXT)

    async def reload(self, request: HttpRequest) -> Response:
        """Rebuild the registry from the config file; a bad file keeps the old one."""
        self._authorize_admin(request)
        try:
            summary = self._reload_config()
        except ConfigError as exc:
            return json_response(
                400,
                {
                    "reloaded": False,
                    "error": {"key": exc.key, "reason": exc.reason, "message": str(exc)},
                },
            )
        return json_response(200, {"reloaded": True, **summary})

    def _authorize_admin(self, request: HttpRequest) -> None:
        keys = keys_from_env(self.server.config.server.admin_keys_env)
        if not keys:
            raise HttpError(
                403,
                "admin endpoints need an admin key and none is configured: set "
                "[server] admin_keys_env (or reload with SIGHUP)",
                "forbidden",
            )
        if match_key(keys, request.bearer()) is None:
            raise HttpError(401, "missing or invalid admin key", "unauthorized")

    def _authorize_metrics(self, request: HttpRequest) -> None:
        config = self.server.config.server
        if config.metrics_open:
            return
        if keys_from_env(config.admin_keys_env):
            self._authorize_admin(request)
        elif not request.peer_is_loopback:
            raise HttpError(
                403,
                "/metrics is loopback only without admin keys: set [server] admin_keys_env "
                "(scrape with the key) or metrics_open = true",
                "forbidden",
            )
