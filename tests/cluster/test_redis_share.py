"""The state nodes share through a real redis-server (spear_rt/cluster/shared.py).

Two `RedisShare` objects stand for two nodes: they must count one key's rate, budget and
session places together, exactly as one node would; a dead node's places lapse; an ejection
written by one is read by the other; Redis gone is `SharedUnavailable`, quickly. The client
itself runs on trio and on asyncio (redis-py's asyncio client cannot run under trio).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from spear_rt.cluster.redis_client import Redis, RedisAddress, RedisUnavailable
from spear_rt.cluster.resp import RedisError
from spear_rt.cluster.shared import RedisShare
from spear_rt.router.accounting import SharedUnavailable
from tests.redis_rig import free_port

from .conftest import redis_server


def node(url: str, address: str = "127.0.0.2:1", *, ttl_s: float = 10.0, prefix: str) -> RedisShare:
    return RedisShare(Redis(RedisAddress(url), timeout_s=2.0), node_address=address,
                      prefix=prefix, session_ttl_s=ttl_s)  # fmt: skip


def fresh_prefix() -> str:
    return f"t{secrets.token_hex(4)}:"


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_the_client_runs_on_both_loops(redis_url: str, backend: str) -> None:
    async def main() -> None:
        redis = Redis(RedisAddress(redis_url))
        assert await redis.call("SET", "spear-test", "v") == "OK"
        replies = await redis.pipeline([["GET", "spear-test"], ["INCR", "spear-test"]])
        assert replies[0] == b"v" and isinstance(replies[1], RedisError)
        assert await redis.script("return ARGV[1] .. KEYS[1]", ["k"], ["a"]) == b"ak"
        await redis.aclose()

    anyio.run(main, backend=backend)


async def test_two_nodes_share_one_token_bucket(redis_url: str) -> None:
    prefix = fresh_prefix()
    a, b = node(redis_url, prefix=prefix), node(redis_url, prefix=prefix)
    # rate 0.01/s: no token comes back during the test, so the count is the burst exactly
    results = [await (a if n % 2 else b).take_token("key1", 0.01, 5) for n in range(9)]
    assert results[:5] == [None] * 5
    assert all(wait is not None and 50 < wait <= 100 for wait in results[5:])
    assert await a.take_token("key2", 0.01, 5) is None  # another key, its own bucket


async def test_two_nodes_earn_tokens_back_at_the_rate_together(redis_url: str) -> None:
    """20/s burst 2 over 0.5 s of Redis' clock, taken as fast as two nodes can: what one
    bucket would give, burst + rate x time (+-1 for where the window's ends fall)."""
    prefix = fresh_prefix()
    a, b = node(redis_url, prefix=prefix), node(redis_url, prefix=prefix)
    redis = a.redis
    start = await redis.call("TIME")
    taken = 0
    while True:
        for share in (a, b):
            taken += await share.take_token("key", 20.0, 2) is None
        now = await redis.call("TIME")
        assert isinstance(start, list) and isinstance(now, list)
        elapsed = (int(now[0]) - int(start[0])) + (int(now[1]) - int(start[1])) / 1e6
        if elapsed >= 0.5:
            break
    assert abs(taken - (2 + 20 * elapsed)) <= 1.5, (taken, elapsed)


async def test_two_nodes_spend_one_budget(redis_url: str) -> None:
    prefix = fresh_prefix()
    a, b = node(redis_url, prefix=prefix), node(redis_url, prefix=prefix)
    await a.spend("key", 0.25, 3600)
    await b.spend("key", 0.5, 3600)
    spent, retry = await a.spent("key", 3600)
    assert spent == pytest.approx(0.75) and 3590 < retry <= 3600
    assert (await b.spent("other", 3600))[0] == 0


async def test_session_places_are_counted_over_nodes_and_given_back(redis_url: str) -> None:
    prefix = fresh_prefix()
    a, b = node(redis_url, prefix=prefix), node(redis_url, prefix=prefix)
    assert await a.hold("key", "p1", 2) and await b.hold("key", "p2", 2)
    assert not await a.hold("key", "p3", 2)  # the cap counts both nodes' places
    assert await a.hold("key", "p1", 2)  # a place already held is still held
    b.release("key", "p2")
    await b._flush()
    assert await a.hold("key", "p3", 2)


async def test_a_dead_nodes_places_and_sessions_lapse_a_live_ones_do_not(redis_url: str) -> None:
    prefix = fresh_prefix()
    live = node(redis_url, "127.0.0.3:1", ttl_s=0.6, prefix=prefix)
    dead = node(redis_url, "127.0.0.4:1", ttl_s=0.6, prefix=prefix)
    assert await live.hold("key", "live", 2) and await dead.hold("key", "dead", 2)
    await live.register("sess_" + "a" * 20)
    await dead.register("sess_" + "b" * 20)
    await live._flush()
    await dead._flush()
    assert await live.owner("sess_" + "b" * 20) == "127.0.0.4:1"
    with anyio.fail_after(5):  # Redis' clock, not ours: wait for the dead node's entries
        async with anyio.create_task_group() as tg:
            tg.start_soon(live.refresh_forever)  # refreshes every ttl/3
            while await dead.owner("sess_" + "b" * 20) is not None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert await live.owner("sess_" + "a" * 20) == "127.0.0.3:1"
    assert await live.hold("key", "third", 2)  # the dead node's place is free again
    assert not await live.hold("key", "fourth", 2)
    live.unregister("sess_" + "a" * 20)
    await live._flush()
    assert await dead.owner("sess_" + "a" * 20) is None


async def test_an_ejection_by_one_node_is_read_by_the_other(redis_url: str) -> None:
    prefix = fresh_prefix()
    a, b = node(redis_url, prefix=prefix), node(redis_url, prefix=prefix)
    await a.eject("breaker", "up1", 5.0)
    await a.eject("breaker", "up1", 1.0)  # a shorter one does not shorten it
    found = await b.ejections()
    assert list(found) == [("breaker", "up1")] and 4.5 < found[("breaker", "up1")] <= 5.0
    await a.eject("breaker", "up1", 0)  # lifted
    assert await b.ejections() == {}


async def test_redis_gone_is_shared_unavailable_quickly() -> None:
    share = node(f"redis://127.0.0.1:{free_port()}/0", prefix="x:")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: share.take_token("k", 1, 1),
        lambda: share.spent("k", 60),
        lambda: share.hold("k", "m", 1),
        lambda: share.ejections(),
    ]
    with anyio.fail_after(5):
        for call in calls:
            with pytest.raises(SharedUnavailable):
                await call()
        assert await share.owner("sess_" + "c" * 20) is None
        await share.register("sess_" + "c" * 20)
        with pytest.raises(RedisUnavailable):
            await share._flush()
    assert share.down and share.errors == 6  # four calls, the lookup and the registration


async def test_a_redis_that_never_answers_fails_every_call_within_its_timeout() -> None:
    """Twenty calls at once through two connections to a silent server: every one is
    RedisUnavailable by the timeout (waiting for a connection counts), none hangs."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    redis = Redis(RedisAddress(f"redis://127.0.0.1:{port}/0"), timeout_s=0.3, pool_size=2)
    failures: list[float] = []

    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async def one() -> None:
        start = anyio.current_time()
        with pytest.raises(RedisUnavailable, match="no answer in time"):
            await redis.call("PING")
        failures.append(anyio.current_time() - start)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, silent)
            async with anyio.create_task_group() as calls:
                for _ in range(20):
                    calls.start_soon(one)
            tg.cancel_scope.cancel()
    assert len(failures) == 20 and max(failures) < 0.3 + 0.2


def test_a_restarted_redis_costs_no_failed_call(tmp_path: Path) -> None:
    """The pooled connection the restart closed is noticed before it is used."""
    port = free_port()

    async def ping(redis: Redis) -> object:
        return await redis.call("PING")

    redis = Redis(RedisAddress(f"redis://127.0.0.1:{port}/0"), timeout_s=2.0)
    with redis_server(port, tmp_path):
        assert anyio.run(ping, redis, backend="trio") == "PONG"
    with redis_server(port, tmp_path):
        assert anyio.run(ping, redis, backend="trio") == "PONG"
