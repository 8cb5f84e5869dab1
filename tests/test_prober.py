"""Probes over real sockets against a fake primary, and the prober's schedule."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from guard.config import Config, ProbeMode, parse_config
from guard.health import AggregationRules, State, Target
from guard.prober import Prober, Publisher, UrgentProbes, next_probe_delay
from guard.probes import ProbeClass, probe
from guard.refresher import Refresher
from guard.store.memory import MemoryStore
from tests.support.fakeprimary import Behaviour, FakePrimary
from tests.support.smtpserver import free_port

RULES = AggregationRules(down_grace=0.01, stale_after=5.0, quorum=1)


def run_probe(target: Target, mode: ProbeMode, timeout: float = 1.0) -> ProbeClass:
    return asyncio.run(probe(target, mode, timeout, "mx2.test")).result


@pytest.mark.parametrize(("behaviour", "mode", "want"), [
    (Behaviour.GREET, ProbeMode.TCP, ProbeClass.OK),
    (Behaviour.GREET, ProbeMode.BANNER, ProbeClass.OK),
    (Behaviour.GREET, ProbeMode.EHLO, ProbeClass.OK),
    (Behaviour.BUSY, ProbeMode.TCP, ProbeClass.OK),
    (Behaviour.BUSY, ProbeMode.BANNER, ProbeClass.BAD_GREETING),
    (Behaviour.BUSY, ProbeMode.EHLO, ProbeClass.BAD_GREETING),
    (Behaviour.SILENT, ProbeMode.BANNER, ProbeClass.TIMEOUT),
    (Behaviour.HANGUP, ProbeMode.BANNER, ProbeClass.CLOSED),
    (Behaviour.RAMBLE, ProbeMode.BANNER, ProbeClass.ERROR),
])
def test_probe_classes(behaviour: Behaviour, mode: ProbeMode, want: ProbeClass) -> None:
    with FakePrimary(behaviour=behaviour) as mx1:
        assert run_probe(Target(mx1.host, mx1.port), mode, timeout=0.5) is want


def test_probe_refused_and_ipv6() -> None:
    assert run_probe(Target("127.0.0.1", free_port()), ProbeMode.BANNER) is ProbeClass.REFUSED
    with FakePrimary(host="::1") as mx1:
        assert run_probe(Target("::1", mx1.port), ProbeMode.EHLO) is ProbeClass.OK


def test_silent_primary_costs_one_timeout() -> None:
    with FakePrimary(behaviour=Behaviour.SILENT) as mx1:
        started = time.monotonic()
        run_probe(Target(mx1.host, mx1.port), ProbeMode.BANNER, timeout=0.3)
        assert time.monotonic() - started < 1.0


def fast_config(targets: int = 1, stale_after: str = "5s", **probe: object) -> Config:
    return parse_config({
        "self": {"node": "mx2", "names": ["mx2.test"]},
        "probe": {"interval": "100ms", "down_interval": "100ms", "timeout": "500ms",
                  "rise": 2, "fall": 2, **probe},
        "policy": {"stale_after": stale_after},
    })


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def memory_store() -> Iterator[MemoryStore]:
    store = MemoryStore(observation_ttl=10)
    yield store
    store.close()


def test_prober_follows_the_primary_through_the_store(memory_store: MemoryStore) -> None:
    config = fast_config()
    mx1 = FakePrimary().start()
    target = Target(mx1.host, mx1.port)
    publisher = Publisher(memory_store)
    prober = Prober(config, lambda: [target], publisher)
    refresher = Refresher(memory_store, prober.own_observations, 0.1, RULES)

    def state() -> State:
        return refresher.snapshot.health(target, time.time(), RULES).state

    publisher.start()
    prober.start()
    refresher.start()
    try:
        assert wait_for(lambda: state() is State.UP)
        mx1.stop()
        assert wait_for(lambda: state() is State.DOWN)
        # The snapshot lays the prober's own view over the store's; the publisher
        # writes the transition from its own thread, a moment later.
        assert wait_for(lambda: len(memory_store.history()) == 2)
        transitions = [(t.old, t.new) for t in memory_store.history()]
        assert transitions == [(State.UNKNOWN, State.UP), (State.UP, State.DOWN)]
        [down] = [o for o in memory_store.observations() if o.target == target]
        assert down.node == "mx2" and down.last_fail is not None
        assert down.detail.startswith("refused")
    finally:
        refresher.stop()
        prober.stop()
        publisher.stop()
        mx1.stop()


def test_thousands_of_silent_targets_are_probed_concurrently() -> None:
    """300 targets that accept and never greet: with a bound of 256 the first round
    takes two timeouts, not 300."""
    listeners = []
    for _ in range(300):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)  # the kernel completes the handshake; nobody ever greets
        listeners.append(s)
    targets = [Target("127.0.0.1", s.getsockname()[1]) for s in listeners]
    config = fast_config(timeout="300ms", concurrency=256)
    prober = Prober(config, lambda: targets, None)
    prober.start()
    try:
        assert wait_for(lambda: len(prober.own_observations()) == len(targets), timeout=10)
        details = {o.detail for o in prober.own_observations()}
        assert all(d.startswith("timeout") for d in details), details
    finally:
        prober.stop()
        for s in listeners:
            s.close()


def test_a_broken_primary_never_stops_the_prober() -> None:
    """A greeting longer than the stream's line limit used to end the probe task."""
    with FakePrimary(behaviour=Behaviour.RAMBLE) as mx1:
        target = Target(mx1.host, mx1.port)
        prober = Prober(fast_config(), lambda: [target], None)
        prober.start()
        try:
            seen: set[float] = set()

            def probed_three_times() -> bool:
                seen.update(o.observed_at for o in prober.own_observations())
                return len(seen) >= 3

            assert wait_for(probed_three_times)
            [observation] = prober.own_observations()
            assert observation.state is State.DOWN and observation.detail.startswith("error")
        finally:
            prober.stop()


def test_next_probe_delay_follows_state_and_a_seeded_jitter() -> None:
    import random

    first = [next_probe_delay(s, 10.0, 3.0, random.Random(7).uniform)
             for s in (State.UP, State.DOWN, State.UNKNOWN)]
    again = [next_probe_delay(s, 10.0, 3.0, random.Random(7).uniform)
             for s in (State.UP, State.DOWN, State.UNKNOWN)]
    assert first == again
    assert 9.0 <= first[0] <= 11.0
    assert 2.7 <= first[1] <= 3.3 and 2.7 <= first[2] <= 3.3


def test_urgent_probes_are_single_flight_and_spaced() -> None:
    t, other = Target("192.0.2.1"), Target("192.0.2.2")
    urgent = UrgentProbes(spacing=3.0)
    assert urgent.grant(t, 100.0)
    assert not urgent.grant(t, 101.0)  # within the spacing
    assert urgent.grant(other, 101.0)  # per target
    assert urgent.grant(t, 103.0)
    urgent.started(t)
    assert not urgent.grant(t, 200.0)  # a probe is under way: it answers the question
    urgent.finished(t)
    assert urgent.grant(t, 200.0)


def test_a_bypass_request_probes_at_once_not_at_the_next_interval(
        memory_store: MemoryStore) -> None:
    """With a 30 s interval, a primary that dies is noticed when a bypass asks, within
    a second, and only once however often it asks."""
    config = fast_config(interval="30s", down_interval="3s", stale_after="60s")
    mx1 = FakePrimary().start()
    target = Target(mx1.host, mx1.port)
    prober = Prober(config, lambda: [target], None)
    prober.start()
    try:
        assert wait_for(lambda: [o.state for o in prober.own_observations()] == [State.UNKNOWN])
        assert wait_for(lambda: bool(prober.request_probe([target])))  # the second probe
        assert wait_for(lambda: [o.state for o in prober.own_observations()] == [State.UP])
        mx1.stop()
        time.sleep(3.1)  # past the spacing of the last request
        assert prober.request_probe([target]) == [target]
        assert prober.request_probe([target]) == []  # single flight, spaced
        assert wait_for(lambda: prober.own_observations()[0].last_fail is not None,
                        timeout=2.0)
    finally:
        prober.stop()
        mx1.stop()
