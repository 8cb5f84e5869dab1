"""One contract for every store, then what only the Redis store must add.

The contract runs against ``MemoryStore`` and against ``RedisStore`` on a real
redis-server started for the test. The Redis-only part covers the key layout (TTLs,
prefix isolation, hour buckets), the URL forms (Unix socket, TLS, ACL user, Sentinel) and
faults: a killed, a frozen (SIGSTOP) and a paused (CLIENT PAUSE) server must cost a
call at most ``FAULT_BUDGET_SECONDS``, and a restarted server or a Sentinel failover
must be picked up by the same store object.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from guard.health import Observation, State, Target, Transition
from guard.store.base import HISTORY_MAX, Store, StoreError
from guard.store.memory import MemoryStore
from guard.store.redis import BUCKET_SECONDS, RedisStore, SentinelUrl, mask_password
from tests.support.redis_server import RedisServer, SentinelCluster

T4 = Target("192.0.2.1", 25)
T6 = Target("2001:db8::1", 2525)
FAULT_BUDGET_SECONDS = 0.3  # store timeout 100 ms: one timeout plus a safe margin
FAILOVER_SECONDS = 15.0


def observation(
    target: Target = T4,
    node: str = "mx2",
    state: State = State.UP,
    at: float | None = None,
    detail: str = "220 mx1.example.org ESMTP",
) -> Observation:
    at = time.time() if at is None else at
    return Observation(
        target=target,
        node=node,
        state=state,
        since=at - 42.25,
        observed_at=at,
        last_ok=at if state is State.UP else None,
        last_fail=at if state is State.DOWN else None,
        detail=detail,
    )


def transition(i: int = 0, target: Target = T4, node: str = "mx2") -> Transition:
    old, new = (State.UP, State.DOWN) if i % 2 else (State.DOWN, State.UP)
    return Transition(target, node, old, new, at=time.time() + i / 8, detail=f"change #{i}")


@dataclass
class Kit:
    """Makes stores of one kind, and says where else their state is seen from.

    A Redis store is shared: another node opens its own connection to the same server
    (``other_node``). ``memory://`` is one process on one host: nothing else opens it,
    and two MemoryStore objects share nothing (a test below holds it to that). Its
    only "elsewhere" is another thread of the same guard (the prober writes while the
    refresher reads), which goes through the same object; ``elsewhere`` says so.
    """

    kind: str
    server: RedisServer | None
    stores: list[Store] = field(default_factory=list)
    made_with: dict[int, tuple[float, int]] = field(default_factory=dict)

    def new(self, ttl: float = 60.0, history_max: int = HISTORY_MAX) -> Store:
        store: Store
        if self.server is None:
            store = MemoryStore(observation_ttl=ttl, history_max=history_max)
        else:
            store = RedisStore(self.server.url, observation_ttl=ttl, history_max=history_max)
        self.stores.append(store)
        self.made_with[id(store)] = (ttl, history_max)
        return store

    def other_node(self, store: Store) -> Store:
        """Another node's handle on the same shared state (Redis only)."""
        assert self.server is not None, "memory:// has no other nodes"
        # Same server, prefix, TTL and bound: what another node would open.
        return self.new(*self.made_with[id(store)])

    def elsewhere(self, store: Store) -> Store:
        """Where another writer or reader of ``store``'s state comes from: another
        node for Redis; for memory://, another thread using the same object."""
        return store if self.server is None else self.other_node(store)

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    made = Kit(request.param, server)
    try:
        yield made
    finally:
        made.close()


# -- the contract ---------------------------------------------------------------------


def test_round_trip_keeps_every_field(kit: Kit) -> None:
    now = time.time()
    up = observation(T4, "mx2", State.UP, now - 0.125)
    down = observation(T6, "mx2", State.DOWN, now - 0.5, detail="refused: Connexion refusée")
    unknown = Observation(T6, "mx3 b", State.UNKNOWN, since=now, observed_at=now)
    store = kit.new()
    store.publish([up, down, unknown], [])
    assert set(kit.elsewhere(store).observations()) == {up, down, unknown}
    assert unknown.last_ok is None and unknown.last_fail is None


def test_newest_observation_per_target_and_node_wins(kit: Kit) -> None:
    store = kit.new()
    older = observation(state=State.UP, at=time.time() - 5)
    newer = observation(state=State.DOWN, at=time.time())
    store.publish([older], [])
    store.publish([newer], [])
    assert kit.elsewhere(store).observations() == [newer]


def test_observations_of_two_nodes_are_both_kept(kit: Kit) -> None:
    mx2 = kit.new()
    mx3 = kit.elsewhere(mx2)
    a = observation(node="mx2", state=State.UP)
    b = observation(node="mx3", state=State.DOWN)
    mx2.publish([a], [])
    mx3.publish([b], [])
    assert set(mx2.observations()) == {a, b}
    assert set(mx3.observations()) == {a, b}


def test_observations_expire_one_by_one(kit: Kit) -> None:
    mx2 = kit.new(ttl=1.0)
    mx3 = kit.elsewhere(mx2)
    a = observation(node="mx2")
    mx2.publish([a], [])
    time.sleep(0.6)
    b = observation(node="mx3")
    mx3.publish([b], [])
    assert set(mx2.observations()) == {a, b}
    time.sleep(0.6)  # a is 1.2 s old, b 0.6 s
    assert mx2.observations() == [b]
    time.sleep(0.6)
    assert mx2.observations() == []


def test_history_is_bounded_and_oldest_first(kit: Kit) -> None:
    store = kit.new(history_max=20)
    changes = [transition(i, T6 if i % 3 else T4) for i in range(50)]
    for start in range(0, 50, 7):
        store.publish([], changes[start : start + 7])
    reader = kit.elsewhere(store)
    assert reader.history(100) == changes[-20:]
    assert reader.history(5) == changes[-5:]
    assert reader.history(0) == []
    assert reader.history(-1) == []


def test_wait_for_change_times_out_without_a_transition(kit: Kit) -> None:
    waiter = kit.new()
    writer = kit.elsewhere(waiter)
    assert waiter.wait_for_change(0.3) is False
    writer.publish([observation()], [])  # observations alone are no change notice
    assert waiter.wait_for_change(0.3) is False
    # The same waiter does see a transition: the False above meant "no notice".
    waiter.wait_for_change(0.3)  # a Redis store subscribes on its first wait
    join = wait_in_thread(waiter, 5.0)
    time.sleep(0.2)
    writer.publish([], [transition()])
    assert join()[0] is True


def wait_in_thread(store: Store, timeout: float) -> Callable[[], tuple[bool, float]]:
    """Start ``store.wait_for_change(timeout)`` in a thread; the result joins it."""
    result: list[tuple[bool, float]] = []

    def run() -> None:
        started = time.monotonic()
        changed = store.wait_for_change(timeout)
        result.append((changed, time.monotonic() - started))

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> tuple[bool, float]:
        thread.join(timeout + 2)
        assert result, "wait_for_change did not return"
        return result[0]

    return join


def test_wait_for_change_wakes_on_a_transition_from_elsewhere(kit: Kit) -> None:
    waiter = kit.new()
    writer = kit.elsewhere(waiter)
    waiter.wait_for_change(0.3)  # a Redis store subscribes on its first wait
    join = wait_in_thread(waiter, 5.0)
    time.sleep(0.2)
    writer.publish([observation()], [transition()])
    changed, waited = join()
    assert changed is True
    assert waited < 1.0


def test_memory_stores_share_nothing() -> None:
    """memory:// is one process: a second store (another guard, the CLI) sees nothing
    of the first; only the control socket shows a running guard's memory."""
    first = MemoryStore(observation_ttl=60.0)
    first.publish([observation()], [transition()])
    second = MemoryStore(observation_ttl=60.0)
    assert second.observations() == [] and second.history(10) == []
    assert first.observations() and first.history(10)


# -- Redis: key layout ----------------------------------------------------------------------


def test_every_key_has_a_ttl(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, prefix="ttl:", observation_ttl=60)
    try:
        store.publish([observation(T4), observation(T6)], [transition()])
    finally:
        store.close()
    keys = sorted(redis_server.admin.scan_iter(match="ttl:*"))
    assert len(keys) == 2, keys  # one hour bucket and the history stream
    for key in keys:
        assert redis_server.admin.pttl(key) > 0, key


def test_prefixes_are_isolated(redis_server: RedisServer) -> None:
    a = RedisStore(redis_server.url, prefix="a:")
    b = RedisStore(redis_server.url, prefix="b:")
    try:
        b.wait_for_change(0.3)
        join = wait_in_thread(b, 0.6)
        time.sleep(0.2)
        a.publish([observation()], [transition()])
        assert join()[0] is False
        assert b.observations() == []
        assert b.history() == []
        assert len(a.observations()) == 1
    finally:
        a.close()
        b.close()


def test_an_hour_bucket_is_read_after_the_hour_ends(redis_server: RedisServer) -> None:
    boundary = (math.floor(time.time() / BUCKET_SECONDS) + 1) * BUCKET_SECONDS

    def at(t: float) -> RedisStore:
        return RedisStore(redis_server.url, observation_ttl=60, clock=lambda: t)

    before, after, expired = at(boundary - 0.5), at(boundary + 30), at(boundary + 61)
    try:
        old = observation(at=boundary - 0.5)
        before.publish([old], [])
        assert after.observations() == [old]
        assert expired.observations() == []
        new = observation(state=State.DOWN, at=boundary + 30)
        after.publish([new], [])  # the next hour's hash: the later write wins
        assert after.observations() == [new]
    finally:
        for s in (before, after, expired):
            s.close()


# -- Redis: URLs ------------------------------------------------------------------------------


def test_unix_socket_url(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.unix_url)
    try:
        obs = observation(T6)
        store.publish([obs], [])
        assert store.observations() == [obs]
        assert store.description == redis_server.unix_url
    finally:
        store.close()


def test_tls_url(tls_redis_server: RedisServer) -> None:
    store = RedisStore(tls_redis_server.url)
    try:
        assert tls_redis_server.url.startswith("rediss://")
        assert_works(store)
        tls_redis_server.kill()
        assert_fails_fast(store)
    finally:
        store.close()


def test_acl_user_limited_to_its_prefix_and_channel(redis_server: RedisServer) -> None:
    # The least a guard needs: these commands, its keys, its channel.
    redis_server.admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "guard", "on", ">s3cret",
        "resetkeys", "~mx:*", "resetchannels", "&mx:changes",
        "-@all", "+hset", "+hgetall", "+pexpire", "+xadd", "+xrevrange",
        "+publish", "+subscribe", "+ping",
    )  # fmt: skip
    url = f"redis://guard:s3cret@127.0.0.1:{redis_server.port}/0"
    store, waiter = RedisStore(url, prefix="mx:"), RedisStore(url, prefix="mx:")
    outsider = RedisStore(url, prefix="other:")
    wrong = RedisStore(url.replace("s3cret", "wrong"), prefix="mx:")
    try:
        assert "s3cret" not in store.description
        assert store.description.startswith("redis://guard:***@127.0.0.1:")
        waiter.wait_for_change(0.3)
        join = wait_in_thread(waiter, 5.0)
        time.sleep(0.2)
        obs, change = observation(), transition()
        store.publish([obs], [change])
        assert join()[0] is True
        assert waiter.observations() == [obs]
        assert waiter.history() == [change]
        with pytest.raises(StoreError, match="NoPermissionError"):
            outsider.publish([obs], [])
        with pytest.raises(StoreError):
            wrong.observations()
    finally:
        for s in (store, waiter, outsider, wrong):
            s.close()


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("rediss://u:p@h:6380/1?ssl_cert_reqs=none", "rediss://u:***@h:6380/1?ssl_cert_reqs=none"),
        ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
        ("redis+sentinel://u:p@a:1,b:2/svc", "redis+sentinel://u:***@a:1,b:2/svc"),
    ],
)
def test_description_masks_the_password(url: str, want: str) -> None:
    assert mask_password(url) == want


@pytest.mark.parametrize(
    ("url", "want_sentinels", "want_service", "want_db", "want_user", "want_password"),
    [
        ("redis+sentinel://s1:26380/mymaster", (("s1", 26380),), "mymaster", 0, None, None),
        (
            "redis+sentinel://guard:p%40ss@s1,[::1]:26381,s3:1/mx/2",
            (("s1", 26379), ("::1", 26381), ("s3", 1)),
            "mx", 2, "guard", "p@ss",
        ),
        ("redis+sentinel://:pw@s1:5/mx?db=3", (("s1", 5),), "mx", 3, None, "pw"),
    ],
)  # fmt: skip
def test_sentinel_url(
    url: str,
    want_sentinels: tuple[tuple[str, int], ...],
    want_service: str,
    want_db: int,
    want_user: str | None,
    want_password: str | None,
) -> None:
    parsed = SentinelUrl.parse(url)
    assert parsed.sentinels == want_sentinels
    assert (parsed.service, parsed.db) == (want_service, want_db)
    assert (parsed.username, parsed.password) == (want_user, want_password)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?socket_timeout=5",  # timeouts come from store.timeout
        "redis://127.0.0.1:1/0?ssl_cert_reqs=none",  # TLS options without TLS
        "redis+sentinel://127.0.0.1:1/",  # no service
        "redis+sentinel://127.0.0.1:x/mx",  # bad port
        "http://127.0.0.1/",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        RedisStore(url)


# -- Redis: faults ------------------------------------------------------------------------------


def seconds_to_fail(call: Callable[[], object]) -> float:
    started = time.monotonic()
    with pytest.raises(StoreError):
        call()
    return time.monotonic() - started


def assert_fails_fast(store: RedisStore) -> None:
    for call in (
        lambda: store.publish([observation()], [transition()]),
        store.observations,
        store.history,
    ):
        assert seconds_to_fail(call) < FAULT_BUDGET_SECONDS
    started = time.monotonic()
    assert store.wait_for_change(0.3) is False  # never raises, never overruns
    assert time.monotonic() - started < 0.3 + 0.15


def assert_works(store: RedisStore) -> Observation:
    obs = observation(at=time.time())
    store.publish([obs], [transition()])
    assert obs in store.observations()
    return obs


def held_by(server: RedisServer, obs: Observation) -> bool:
    """Whether ``server`` itself holds ``obs`` (checked without the store)."""
    for key in server.admin.scan_iter(match="mxguard:obs:*"):
        value = server.admin.hget(key, f"{obs.target} {obs.node}")
        if value and json.loads(value)["at"] == obs.observed_at:
            return True
    return False


@pytest.fixture
def used_store(redis_server: RedisServer) -> Iterator[RedisStore]:
    """A store with a pooled connection and a live change subscription."""
    store = RedisStore(redis_server.url)
    try:
        assert_works(store)
        store.wait_for_change(0.3)
        yield store
    finally:
        store.close()


def test_killed_server_fails_fast(redis_server: RedisServer, used_store: RedisStore) -> None:
    redis_server.kill()
    assert_fails_fast(used_store)


def test_frozen_server_fails_within_the_budget(
    redis_server: RedisServer, used_store: RedisStore
) -> None:
    fresh = RedisStore(redis_server.url)  # no connection yet: connects into the backlog
    try:
        redis_server.pause()
        assert_fails_fast(used_store)
        assert_fails_fast(fresh)
        redis_server.resume()
        assert_works(used_store)
        assert_works(fresh)
    finally:
        fresh.close()


def test_client_pause_fails_within_the_budget(
    redis_server: RedisServer, used_store: RedisStore
) -> None:
    admin = redis_server.client()
    admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")  # type: ignore[no-untyped-call]
    paused_at = time.monotonic()
    assert_fails_fast(used_store)
    time.sleep(max(0.0, 2.1 - (time.monotonic() - paused_at)))
    assert_works(used_store)


def test_restarted_server_is_used_by_the_same_store(
    redis_server: RedisServer, used_store: RedisStore
) -> None:
    writer = RedisStore(redis_server.url)
    try:
        redis_server.restart()
        assert_works(used_store)  # the first call after the restart already succeeds
        # The change subscription is rebuilt too: within a few waits a notice arrives.
        for _ in range(5):
            join = wait_in_thread(used_store, 1.0)
            time.sleep(0.3)
            writer.publish([], [transition()])
            if join()[0]:
                break
        else:
            pytest.fail("no change notice after the restart")
    finally:
        writer.close()


# -- Redis: Sentinel ------------------------------------------------------------------------------


def poll_until_works(store: RedisStore, timeout: float) -> Observation:
    started = time.monotonic()
    while True:
        try:
            return assert_works(store)
        except StoreError:
            if time.monotonic() - started > timeout:
                raise
            time.sleep(0.1)


def test_sentinel_master_killed(sentinel_cluster: SentinelCluster) -> None:
    store = RedisStore(sentinel_cluster.url)
    try:
        assert_works(store)
        old = sentinel_cluster.current_master()
        new = sentinel_cluster.kill_master(timeout=FAILOVER_SECONDS)
        assert new.port != old.port
        assert held_by(new, poll_until_works(store, FAILOVER_SECONDS))
    finally:
        store.close()


def test_sentinel_failover_demotes_the_master(sentinel_cluster: SentinelCluster) -> None:
    store = RedisStore(sentinel_cluster.url)
    writer = RedisStore(sentinel_cluster.url)
    try:
        assert_works(store)
        assert_works(writer)
        store.wait_for_change(0.3)
        old = sentinel_cluster.current_master()
        new = sentinel_cluster.failover(timeout=FAILOVER_SECONDS)
        assert new.port != old.port
        # The old master lives on as a replica, where a write would be refused
        # (READONLY): the store must find the new master by itself.
        assert held_by(new, poll_until_works(store, FAILOVER_SECONDS))
        for _ in range(10):
            join = wait_in_thread(store, 1.0)
            time.sleep(0.3)
            poll_until_works(writer, FAILOVER_SECONDS)
            if join()[0]:
                break
        else:
            pytest.fail("no change notice after the failover")
    finally:
        store.close()
        writer.close()
