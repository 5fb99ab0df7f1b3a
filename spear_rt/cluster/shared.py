"""What nodes share through Redis: key limits, budgets, session caps, the session directory,
and instance ejections (`[cluster] redis_url`).

Keys (all under `key_prefix`, default ``spear:``): ``rate:<key id>`` (token bucket),
``spend:<key id>`` + ``spent:<key id>`` (budget window), ``keysessions:<key id>`` (the
key's live sessions, each with an expiry), ``session:<session id>`` (the owning node's
address), ``ejected`` (instance ejections in force). Client keys appear only as the ids the
server already derives from them (hashes), never as keys.

Rules:

1. Limits and caps are checked in Redis, atomically (scripts.py), so N nodes count what one
   node would: the same rate × time + burst, the same cap.
2. A node keeps what it holds alive: every `session_ttl_s / 3` it refreshes its sessions'
   directory entries and cap places in one script call; a node that dies holds nothing
   after `session_ttl_s`. A session is in the directory before its client hears of it;
   endings and releases are queued (bounded by the node's live sessions) and written by the
   same loop at once.
3. Ejections: a breaker that opens (or an outlier ejection) is written with its duration;
   every node reads the ejections every `sync_interval_s` and applies those in force.
4. Redis down: every call raises `SharedUnavailable` within `redis_timeout_s` and the caller
   counts alone (the node's own limiter and caps); one log line per outage, not per call.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import anyio

from spear_rt.cluster import scripts
from spear_rt.cluster.redis_client import Redis, RedisUnavailable
from spear_rt.cluster.resp import RedisError, Reply
from spear_rt.router.accounting import SharedUnavailable

log = logging.getLogger(__name__)


class RedisShare:
    """One node's view of the shared state (module docstring)."""

    def __init__(
        self, redis: Redis, *, node_address: str, prefix: str, session_ttl_s: float
    ) -> None:
        self.redis = redis
        self.node_address = node_address
        self._prefix = prefix
        self._ttl_ms = max(1, int(session_ttl_s * 1000))
        self._id = secrets.token_hex(4)  # makes this node's budget entries unique
        self._count = 0
        self._sessions: set[str] = set()  # registered in the directory
        self._places: dict[str, str] = {}  # member -> key id (cap places held)
        self._gone: set[str] = set()  # directory keys to delete
        self._released: set[tuple[str, str]] = set()  # (key id, member) to remove
        self._dirty = anyio.Event()
        self.down = False
        self.errors = 0

    def _k(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def _script(self, source: str, keys: list[str], args: list[str | int | float]) -> Reply:
        try:
            reply = await self.redis.script(source, keys, args)
        except (RedisUnavailable, RedisError) as exc:
            self.errors += 1
            if not self.down:
                self.down = True
                log.warning("cluster: Redis unavailable, counting alone: %s", exc)
            raise SharedUnavailable(str(exc)) from None
        if self.down:
            self.down = False
            log.warning("cluster: Redis reachable again")
        return reply

    # --- limits (router.accounting.SharedCounters) -------------------------------------------

    async def take_token(self, name: str, rate_per_s: float, burst: float) -> float | None:
        """None when a token was taken from `name`'s bucket, else seconds until one."""
        reply = await self._script(
            scripts.TOKEN_BUCKET, [self._k("rate", name)], [rate_per_s, burst]
        )
        taken, wait = _pair(reply)
        return None if taken == "1" else float(wait)

    async def spent(self, name: str, window_s: float) -> tuple[float, float]:
        """What `name` spent in the window, and seconds until its oldest spend leaves it."""
        return await self._budget(name, window_s, ["check"])

    async def spend(self, name: str, amount: float, window_s: float) -> None:
        """Add `amount` to `name`'s spend."""
        self._count += 1
        await self._budget(name, window_s, ["charge", amount, f"{self._id}.{self._count}"])

    async def _budget(
        self, name: str, window_s: float, args: list[str | int | float]
    ) -> tuple[float, float]:
        keys = [self._k("spend", name), self._k("spent", name)]
        total, retry = _pair(await self._script(scripts.BUDGET, keys, [window_s, *args]))
        return float(total), float(retry)

    # --- session caps and directory (session.manager.SharedSessions) ------------------------

    async def hold(self, key_id: str, member: str, cap: int) -> bool:
        """Take one of `key_id`'s `cap` session places for `member`; False at the cap."""
        reply = await self._script(
            scripts.HOLD_SESSION, [self._k("keysessions", key_id)], [member, cap, self._ttl_ms]
        )
        if reply == 1:
            self._places[member] = key_id
            return True
        return False

    def release(self, key_id: str, member: str) -> None:
        """Give the place back (written by the refresh loop at once)."""
        if self._places.pop(member, None) is not None:
            self._released.add((key_id, member))
            self._dirty.set()

    async def register(self, session_id: str) -> None:
        """This node owns `session_id` (a resume on another node is forwarded here): written
        at once, so a resume right after the session's start finds it; the refresh loop
        retries when Redis is away."""
        self._sessions.add(session_id)
        self._gone.discard(session_id)
        try:
            await self.redis.call(
                "SET", self._k("session", session_id), self.node_address, "PX", self._ttl_ms
            )
        except (RedisUnavailable, RedisError) as exc:
            self.errors += 1
            log.warning("cluster: cannot record a session's node: %s", exc)
            self._dirty.set()

    def unregister(self, session_id: str) -> None:
        """`session_id` ended."""
        if session_id in self._sessions:
            self._sessions.discard(session_id)
            self._gone.add(session_id)
            self._dirty.set()

    async def owner(self, session_id: str) -> str | None:
        """The address of the node holding `session_id`, if any node does."""
        try:
            reply = await self.redis.call("GET", self._k("session", session_id))
        except (RedisUnavailable, RedisError) as exc:
            self.errors += 1
            log.warning("cluster: cannot look up a session's node: %s", exc)
            return None
        return reply.decode() if isinstance(reply, bytes) else None

    async def refresh_forever(self) -> None:
        """Rule 2: write registrations and releases at once, refresh everything on a period."""
        period = self._ttl_ms / 3000
        while True:
            with anyio.move_on_after(period):
                await self._dirty.wait()
            self._dirty = anyio.Event()
            try:
                await self._flush()
            except (RedisUnavailable, RedisError) as exc:
                self.errors += 1
                log.warning("cluster: cannot refresh this node's sessions: %s", exc)
                await anyio.sleep(min(period, 1.0))

    async def _flush(self) -> None:
        commands: list[list[str | int | float]] = []
        gone, self._gone = self._gone, set()
        released, self._released = self._released, set()
        if gone:
            commands.append(["DEL", *(self._k("session", s) for s in gone)])
        for key_id, member in released:
            commands.append(["ZREM", self._k("keysessions", key_id), member])
        places = list(self._places.items())
        cap_keys = [self._k("keysessions", key_id) for _, key_id in places]
        dir_keys = [self._k("session", s) for s in self._sessions]
        if cap_keys or dir_keys:
            args: list[str | int | float] = [self._ttl_ms, len(cap_keys)]
            args += [member for member, _ in places]
            args.append(self.node_address)
            commands.append(
                [
                    "EVAL",
                    scripts.REFRESH,
                    len(cap_keys) + len(dir_keys),
                    *cap_keys,
                    *dir_keys,
                    *args,
                ]
            )
        if not commands:
            return
        try:
            replies = await self.redis.pipeline(commands)
        except RedisUnavailable:
            self._gone |= gone  # try again next time
            self._released |= released
            raise
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply

    # --- ejections ----------------------------------------------------------------------------

    async def eject(self, kind: str, instance: str, seconds: float) -> None:
        """Tell every node `instance` is out for `seconds` (0: back in)."""
        await self._script(scripts.EJECT, [self._k("ejected")], [f"{kind}:{instance}", seconds])

    async def ejections(self) -> dict[tuple[str, str], float]:
        """(kind, instance) -> seconds left, for every ejection in force."""
        reply = await self._script(scripts.EJECTIONS, [self._k("ejected")], [])
        assert isinstance(reply, list) and reply and isinstance(reply[0], int)
        now = reply[0]
        out: dict[tuple[str, str], float] = {}
        for field, until in zip(reply[1::2], reply[2::2], strict=True):
            assert isinstance(field, bytes) and isinstance(until, int)
            kind, _, name = field.decode().partition(":")
            out[(kind, name)] = (until - now) / 1000
        return out

    async def sync_ejections_forever(
        self, interval_s: float, apply: Callable[[dict[tuple[str, str], float]], None]
    ) -> None:
        """Rule 3: read the ejections in force every `interval_s` and `apply` them."""
        while True:
            try:
                apply(await self.ejections())
            except SharedUnavailable:
                pass  # logged once by _script
            await anyio.sleep(interval_s)


def _pair(reply: Reply) -> tuple[str, str]:
    if not (isinstance(reply, list) and len(reply) == 2):
        raise SharedUnavailable(f"unexpected reply from Redis: {reply!r}"[:200])
    first, second = reply
    return _text(first), _text(second)


def _text(value: Reply) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
