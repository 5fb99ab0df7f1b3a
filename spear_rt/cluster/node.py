"""A server's place among workers (`serve --workers N`) and nodes (`[cluster] redis_url`).

`Cluster` is what the session manager shares (`SharedSessions`: per-key session places and
the session directory), where the realtime edge sends a resume for a session it does not
hold (`target`), and the loops that keep the shared state current (`run`): the workers'
session files, the node's Redis holdings, ejections out and in.

Where a resume goes, for a session not held here: a worker of this node holding it (its
socket), else, when the request was not already forwarded, the node Redis names (its
`node_address`). A request forwarded to a worker is served there or refused there.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import anyio

from spear_rt.cluster.directory import RUN_DIR_ENV, WorkerDirectory, valid_session_id
from spear_rt.cluster.forward import HOP_NODE, HOP_WORKER, node_tls
from spear_rt.cluster.redis_client import Redis, RedisAddress
from spear_rt.cluster.shared import RedisShare
from spear_rt.config import ClusterConfig, Config
from spear_rt.errors import ConfigError
from spear_rt.redact import register_secret
from spear_rt.router import Router
from spear_rt.router.accounting import SharedUnavailable


class Cluster:
    """Workers' and nodes' shared state for one server (module docstring)."""

    def __init__(
        self,
        config: ClusterConfig,
        workers: WorkerDirectory | None = None,
        redis: RedisShare | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        self.redis = redis
        self.tls: ssl.SSLContext | None = None  # how to reach the other nodes (TLS ones)
        self.forwarded = 0  # resumes sent on to the worker or node holding their session
        self._ejections: dict[tuple[str, str], float] = {}  # to tell the others
        self._ejected = anyio.Event()

    @classmethod
    def from_config(cls, config: Config, worker: int | None) -> Cluster | None:
        """The cluster `config` and the environment describe (None: a server alone)."""
        run_dir = os.environ.get(RUN_DIR_ENV) if worker is not None else None
        workers = WorkerDirectory(run_dir, worker) if run_dir and worker is not None else None
        cluster = config.cluster
        redis = None
        if cluster.redis_url is not None:
            env = cluster.redis_password_env
            password = os.environ.get(env) if env else None
            if env and not password:
                raise ConfigError("cluster.redis_password_env", f"names {env}, which is not set")
            if password:
                register_secret(password)  # masked in every log line
            client = Redis(RedisAddress(cluster.redis_url, password), cluster.redis_timeout_s)
            redis = RedisShare(
                client,
                node_address=cluster.node_address or "",  # "": the listen address, once bound
                prefix=cluster.key_prefix,
                session_ttl_s=cluster.session_ttl_s,
            )
        if workers is None and redis is None:
            return None
        made = cls(cluster, workers, redis)
        if redis is not None:
            made.tls = node_tls(config.server.tls_cert)
        return made

    # --- SharedSessions -----------------------------------------------------------------------

    async def hold(self, key_id: str, member: str, cap: int) -> bool:
        """A place under `key_id`'s cap over every node (workers alone: each counts its own)."""
        return True if self.redis is None else await self.redis.hold(key_id, member, cap)

    def release(self, key_id: str, member: str) -> None:
        """Give the place back."""
        if self.redis is not None:
            self.redis.release(key_id, member)

    def bound(self, host: str, port: int) -> None:
        """The server listens on host:port: the node's address unless the config names one."""
        if self.redis is not None and not self.redis.node_address:
            self.redis.node_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def register(self, session_id: str) -> None:
        """This server holds `session_id` (written before the client hears of the session)."""
        if self.workers is not None:
            await self.workers.register(session_id)
        if self.redis is not None:
            await self.redis.register(session_id)

    def unregister(self, session_id: str) -> None:
        """`session_id` ended."""
        if self.workers is not None:
            self.workers.unregister(session_id)
        if self.redis is not None:
            self.redis.unregister(session_id)

    # --- resumes ------------------------------------------------------------------------------

    async def target(self, session_id: str, hop: bytes | None) -> tuple[str, bytes] | None:
        """Where to forward a resume of `session_id` (address, hop), or None: serve it here."""
        if hop == HOP_WORKER or not valid_session_id(session_id):
            return None
        if self.workers is not None:
            worker = await self.workers.owner(session_id)
            if worker is not None:
                return "unix:" + self.workers.socket_path(worker), HOP_WORKER
        if self.redis is not None and hop is None:
            address = await self.redis.owner(session_id)
            if address is not None and address != self.redis.node_address:
                return address, HOP_NODE
        return None

    # --- ejections ----------------------------------------------------------------------------

    def on_ejection(self, kind: str, instance: str, seconds: float) -> None:
        """The router ejected `instance` (`kind`: breaker or outlier): tell the other nodes."""
        if self.redis is not None:
            self._ejections[(kind, instance)] = seconds  # bounded: one entry per instance
            self._ejected.set()

    async def _tell_ejections(self, redis: RedisShare) -> None:
        while True:
            await self._ejected.wait()
            self._ejected = anyio.Event()
            batch, self._ejections = self._ejections, {}
            for (kind, instance), seconds in batch.items():
                try:
                    await redis.eject(kind, instance, seconds)
                except SharedUnavailable:
                    pass  # logged by RedisShare; the others find out by their own breakers

    async def run(self, router: Callable[[], Router]) -> None:
        """Keep the shared state current until cancelled."""
        async with anyio.create_task_group() as tg:
            if self.workers is not None:
                tg.start_soon(self.workers.write_forever)
            redis = self.redis
            if redis is not None:
                tg.start_soon(redis.refresh_forever)
                tg.start_soon(self._tell_ejections, redis)
                tg.start_soon(
                    redis.sync_ejections_forever,
                    self.config.sync_interval_s,
                    lambda found: router().apply_ejections(found),
                )

    async def aclose(self) -> None:
        """Release connections and files (the server is stopping)."""
        if self.workers is not None:
            self.workers.cleanup()
        if self.redis is not None:
            await self.redis.redis.aclose()
