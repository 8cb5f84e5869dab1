"""The evidence half of the store contract, for the memory store and a real Redis.

Both stores must count tries and traps, keep first-try times, expire identities, and
read witness records the same way (guard/evidence.py's rules), count right when
several secondaries count one identity at once, and cost one round trip per bypass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from guard.config import Action, Config, parse_config
from guard.evidence import BypassTry, Evidence, EvidenceRules, Trap, bypass_try
from guard.health import Observation, State, Target, Transition
from guard.policy import Connection, Reason, client_address
from guard.service import Guard
from guard.store.base import Store
from guard.store.memory import MemoryStore
from guard.store.redis import RedisStore
from tests.support.redis_server import RedisServer

NOW = time.time()
RULES = EvidenceRules(attempts=3, min_age=900.0, release_ttl=3600.0, witness_fresh=60.0,
                      trap_ttl=86400.0)
CONFIG = parse_config({"self": {"node": "mx2", "names": ["mx2.example.org"]}})


def attempt(at: float = NOW, client: str = "203.0.113.7", name: str | None = None,
            sender: str = "<a@sender.example>") -> BypassTry:
    address = client_address(client)
    assert address is not None
    return bypass_try(address, name, sender, "<user@example.org>", at, CONFIG.release)


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """Handles on one shared state: the memory store is one object (one host)."""
    made: list[Store] = []
    memory = MemoryStore(observation_ttl=60.0)

    def new() -> Store:
        if request.param == "memory":
            return memory
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(server.url)
        made.append(store)
        return store

    yield new
    for s in made:
        s.close()
    memory.close()


def test_tries_count_up_and_the_first_try_time_stays(stores: StoreFactory) -> None:
    store = stores()
    got = [store.record_bypass(attempt(NOW + 60 * i), RULES) for i in range(4)]
    assert [e.identities[0].tries for e in got] == [1, 2, 3, 4]
    assert {e.identities[0].first_at for e in got} == {NOW}
    assert got[0].identities[0].identity.startswith("net 203.0.113.0/24 from=<a@")
    assert [e.released_by(RULES) is not None for e in got] == [False, False, False, False]


def test_third_try_fifteen_minutes_on_is_released_and_stays_so(stores: StoreFactory) -> None:
    store = stores()
    store.record_bypass(attempt(NOW), RULES)
    store.record_bypass(attempt(NOW + 300), RULES)
    third = store.record_bypass(attempt(NOW + 900), RULES)
    later = store.record_bypass(attempt(NOW + 7200), RULES)
    assert third.released_by(RULES) is not None and later.released_by(RULES) is not None
    # Released tries are no traps: only the first two counted against the client.
    assert (third.trap_count, later.trap_count) == (2, 2)


def test_a_pool_is_released_by_its_pool_identity(stores: StoreFactory) -> None:
    store = stores()
    results = [
        store.record_bypass(attempt(NOW + 600 * n, client=f"54.240.{n}.9",
                                    name=f"a{n}.smtp-out.amazonses.com",
                                    sender=f"<0102{n:04x}@amazonses.com>"), RULES)
        for n in range(3)
    ]
    assert [r.identities[0].tries for r in results] == [1, 1, 1]
    assert [r.identities[1].tries for r in results] == [1, 2, 3]
    assert results[2].released_by(RULES) == results[2].identities[1]


def test_identities_expire_after_their_ttl(stores: StoreFactory) -> None:
    store = stores()
    short = EvidenceRules(3, 900.0, release_ttl=0.3, witness_fresh=60.0, trap_ttl=0.3)
    store.record_bypass(attempt(), short)
    assert store.record_bypass(attempt(), short).identities[0].tries == 2
    time.sleep(0.5)
    fresh = store.record_bypass(attempt(NOW + 1), short)
    assert fresh.identities[0].tries == 1 and fresh.identities[0].first_at == NOW + 1
    assert fresh.trap_count == 1


def test_witness_records_and_heartbeat(stores: StoreFactory) -> None:
    store = stores()
    none = store.record_bypass(attempt(), RULES)
    assert (none.heartbeat_at, none.seen_at) == (None, None)
    store.record_witness("mx1", ["203.0.113.0/24"], NOW - 10, ttl=3600)
    store.record_witness("mx1b", [], NOW - 2, ttl=3600)  # a second witness, newer beat
    seen = store.record_bypass(attempt(client="203.0.113.99"), RULES)
    assert (seen.heartbeat_at, seen.seen_at) == (NOW - 2, NOW - 10)
    assert seen.seen_at_primary(RULES)
    assert seen.trap_count == 0  # seen at the primary: not counted against the client
    skipped = store.record_bypass(attempt(client="198.51.100.1"), RULES)
    assert skipped.seen_at is None and skipped.trap_count == 1


def test_a_stale_witness_does_not_save_a_client_from_the_trap(stores: StoreFactory) -> None:
    store = stores()
    store.record_witness("mx1", ["203.0.113.0/24"], NOW - 300, ttl=3600)
    e = store.record_bypass(attempt(), RULES)
    assert e.seen_at == NOW - 300 and not e.witness_fresh(RULES)
    assert e.trap_count == 1


def test_trap_list(stores: StoreFactory) -> None:
    store = stores()
    for _ in range(3):
        store.record_bypass(attempt(client="203.0.113.7", sender="<x@a.example>"), RULES)
    store.record_bypass(attempt(NOW + 5, client="2001:db8::5"), RULES)
    assert store.traps(NOW + 10, RULES.trap_ttl) == [
        Trap("203.0.113.7", 3, NOW), Trap("2001:db8::5", 1, NOW + 5)]
    assert store.traps(NOW + 10, 7.0) == [Trap("2001:db8::5", 1, NOW + 5)]


def test_peek_counts_nothing_and_foretells_the_next_try(stores: StoreFactory) -> None:
    store = stores()
    store.record_witness("mx1", [], NOW - 1, ttl=3600)
    for i in range(2):
        store.record_bypass(attempt(NOW + i), RULES)
    later = attempt(NOW + 900)
    peeked = [store.peek_bypass(later, RULES) for _ in range(3)]
    assert peeked[0] == peeked[2]
    assert store.record_bypass(later, RULES) == peeked[0]
    assert peeked[0].identities[0].tries == 3 and peeked[0].released_by(RULES) is not None
    assert peeked[0].trap_count == 2 and peeked[0].heartbeat_at == NOW - 1
    assert store.heartbeats() == {"mx1": NOW - 1}
    new = store.peek_bypass(attempt(NOW, client="198.51.100.1"), RULES)
    assert (new.identities[0].tries, new.identities[0].first_at, new.trap_count) == (1, NOW, 1)


def test_two_secondaries_counting_one_identity_at_once_count_right(
        stores: StoreFactory) -> None:
    per_thread, threads = 50, 4
    seen: list[int] = []
    lock = threading.Lock()
    handles = [stores() for _ in range(threads)]  # two or more "secondaries"
    start = threading.Barrier(threads)

    def count(store: Store) -> None:
        start.wait()
        for _ in range(per_thread):
            e = store.record_bypass(attempt(), RULES)
            with lock:
                seen.append(e.identities[0].tries)

    workers = [threading.Thread(target=count, args=(h,)) for h in handles]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(seen) == list(range(1, per_thread * threads + 1))


def test_redis_bypass_is_one_script_call(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        store.record_bypass(attempt(), RULES)  # loads the script (EVALSHA, then EVAL)
        admin = redis_server.admin
        before = admin.info("commandstats")
        store.record_bypass(attempt(), RULES)
        after = admin.info("commandstats")
    finally:
        store.close()

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    assert calls(after, "evalsha") - calls(before, "evalsha") == 1
    assert calls(after, "eval") == calls(before, "eval")


def test_redis_bypass_after_script_flush_sends_the_text_once(
        redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        assert store.record_bypass(attempt(), RULES).identities[0].tries == 1
        redis_server.admin.script_flush()
        admin = redis_server.admin
        before = admin.info("commandstats")
        again = store.record_bypass(attempt(), RULES)
        after = admin.info("commandstats")
        third = store.record_bypass(attempt(), RULES)
    finally:
        store.close()
    assert (again.identities[0].tries, third.identities[0].tries) == (2, 3)

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    # EVALSHA answered NOSCRIPT, then EVAL with the text: two trips for that call only.
    assert calls(after, "eval") - calls(before, "eval") == 1


# -- round trips per path, through the running guard's own decide() -------------------


class CountingStore:
    """A Store that counts the calls (one round trip each) the hot path makes."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def description(self) -> str:
        return self.inner.description

    def publish(self, observations: Sequence[Observation],
                transitions: Sequence[Transition]) -> None:
        self.inner.publish(observations, transitions)

    def observations(self) -> list[Observation]:
        return self.inner.observations()

    def history(self, limit: int = 50) -> list[Transition]:
        return self.inner.history(limit)

    def record_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        self.calls.append("record_bypass")
        return self.inner.record_bypass(bypass, rules)

    def peek_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        self.calls.append("peek_bypass")
        return self.inner.peek_bypass(bypass, rules)

    def heartbeats(self) -> dict[str, float]:
        return self.inner.heartbeats()

    def record_witness(self, node: str, networks: Sequence[str], at: float,
                       ttl: float) -> None:
        self.calls.append("record_witness")
        self.inner.record_witness(node, networks, at, ttl)

    def traps(self, now: float, ttl: float) -> list[Trap]:
        return self.inner.traps(now, ttl)

    def wait_for_change(self, timeout: float) -> bool:
        return self.inner.wait_for_change(timeout)

    def close(self) -> None:
        self.inner.close()


MX1 = Target("192.0.2.1", 25)
UNKNOWN_MX = Target("192.0.2.50", 25)
BACK_MX = Target("192.0.2.60", 25)  # failed a probe a minute ago, up again since


def path_config() -> Config:
    def mx(address: str) -> list[dict[str, Any]]:
        return [{"host": "mx1.example.org", "preference": 10, "addresses": [address]},
                {"host": "mx2.example.org", "preference": 20}]

    return parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "domain": [{"name": "up.example", "mx": mx(MX1.address)},
                   {"name": "down.example", "mx": mx("192.0.2.9")},
                   {"name": "unknown.example", "mx": mx(UNKNOWN_MX.address)},
                   {"name": "back.example", "mx": mx(BACK_MX.address)}],
    })


def guard_on(store: Store) -> tuple[Guard, CountingStore]:
    counting = CountingStore(store)
    guard = Guard(path_config(), store=counting, probing=False)
    now = time.time()
    counting.publish([
        Observation(MX1, "mx2", State.UP, now - 3600, now, now),
        Observation(Target("192.0.2.9"), "mx2", State.DOWN, now - 60, now, None, now),
        Observation(BACK_MX, "mx2", State.UP, now - 30, now, now, now - 60),
    ], [])
    guard.refresher.refresh_once()
    return guard, counting


@pytest.mark.parametrize(("client", "domain", "want_reason", "want_trips"), [
    ("127.0.0.1", "up.example", Reason.TRUSTED, 0),
    ("203.0.113.7", "other.example", Reason.NOT_SECONDARY, 0),
    ("203.0.113.7", "down.example", Reason.PRIMARY_DOWN, 0),
    ("203.0.113.7", "unknown.example", Reason.HEALTH_UNKNOWN, 0),
    ("203.0.113.7", "back.example", Reason.RECENTLY_DOWN, 0),
    (None, "up.example", Reason.CLIENT_UNKNOWN, 0),
    ("203.0.113.7", "up.example", Reason.BYPASS, 1),
])
def test_store_round_trips_per_path(stores: StoreFactory, client: str | None, domain: str,
                                    want_reason: Reason, want_trips: int) -> None:
    guard, counting = guard_on(stores())
    conn = Connection(client_address(client), time.time())
    verdict = guard.decide(conn, domain, "<a@sender.example>", f"<user@{domain}>")
    assert verdict.reason is want_reason
    assert len(counting.calls) == want_trips, counting.calls


def test_a_frozen_redis_costs_a_bypass_at_most_the_budget(redis_server: RedisServer) -> None:
    guard, counting = guard_on(RedisStore(redis_server.url))
    conn = Connection(client_address("203.0.113.7"), time.time())
    try:
        warm = guard.decide(conn, "up.example", "<a@s.example>", "<user@up.example>")
        assert warm.evidence is not None
        redis_server.pause()  # SIGSTOP: connections hang, nothing is refused
        try:
            started = time.monotonic()
            frozen = guard.decide(conn, "up.example", "<a@s.example>", "<user@up.example>")
            took = time.monotonic() - started
            started = time.monotonic()
            after = guard.decide(conn, "up.example", "<a@s.example>", "<user@up.example>")
            took_after = time.monotonic() - started
        finally:
            redis_server.resume()
    finally:
        counting.close()
    assert (frozen.action, frozen.reason, frozen.evidence) == (Action.TEMPFAIL, Reason.BYPASS,
                                                               None)
    assert took < 0.25, took  # the SPEC's budget for everything a callback waits on
    # Within the back-off the store is not asked at all.
    assert after.reason is Reason.BYPASS and after.evidence is None
    assert counting.calls == ["record_bypass"] * 2  # the second was never sent
    assert took_after < took  # and cost no store timeout


def test_memory_store_expires_evidence_a_little_per_call_and_caps_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.store import memory

    now = [NOW]
    store = MemoryStore(observation_ttl=60.0, clock=lambda: now[0])
    short = EvidenceRules(3, 900.0, release_ttl=10.0, witness_fresh=60.0, trap_ttl=10.0)
    for n in range(100):
        store.record_bypass(attempt(NOW, sender=f"<s{n}@x.example>"), short)
    assert len(store._identities) == 100
    now[0] += 60  # all of them expired
    store.record_bypass(attempt(now[0]), short)  # one call drops a few, not all
    assert len(store._identities) == 100 + 1 - memory.EXPIRE_PER_CALL
    for _ in range(10):
        store.record_bypass(attempt(now[0]), short)
    assert len(store._identities) == 1  # the live one
    monkeypatch.setattr(memory, "ENTRIES_MAX", 5)
    for n in range(8):
        store.record_bypass(attempt(now[0], sender=f"<t{n}@x.example>"), short)
    assert len(store._identities) == 5
