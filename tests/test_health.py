"""Aggregation over nodes (SPEC section 4) and the per-node hysteresis."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from guard.health import (
    AggregationRules,
    HealthSnapshot,
    Observation,
    State,
    Target,
    aggregate,
)
from guard.prober import Hysteresis
from guard.probes import ProbeClass, ProbeResult

NOW = 1_800_000_000.0
T = Target("192.0.2.1", 25)
RULES = AggregationRules(down_grace=1800, stale_after=60, quorum=1)
UP, DOWN, UNKNOWN = State.UP, State.DOWN, State.UNKNOWN


def obs(node: str, state: State, age: float = 1, last_fail_ago: float | None = None,
        since_ago: float = 100) -> Observation:
    return Observation(T, node, state, NOW - since_ago, NOW - age, None,
                       None if last_fail_ago is None else NOW - last_fail_ago, "d")


@dataclass
class Row:
    label: str
    observations: list[Observation]
    want: State
    quorum: int = 1


ROWS = [
    Row("nothing known", [], UNKNOWN),
    Row("one fresh up", [obs("a", UP)], UP),
    Row("one fresh down", [obs("a", DOWN)], DOWN),
    Row("any down wins over ups", [obs("a", UP), obs("b", UP), obs("c", DOWN)], DOWN),
    Row("up with a recent failure is down", [obs("a", UP, last_fail_ago=60)], DOWN),
    Row("recent failure at another node", [obs("a", UP), obs("b", UP, last_fail_ago=5)], DOWN),
    Row("failure older than down_grace", [obs("a", UP, last_fail_ago=1801)], UP),
    Row("stale up ignored", [obs("a", UP, age=61)], UNKNOWN),
    Row("stale down ignored", [obs("a", DOWN, age=61), obs("b", UP)], UP),
    Row("stale node's recent failure ignored", [obs("a", UP, age=90, last_fail_ago=90),
                                                obs("b", UP)], UP),
    Row("undecided prober", [obs("a", UNKNOWN)], UNKNOWN),
    Row("quorum 2, one up", [obs("a", UP)], UNKNOWN, quorum=2),
    Row("quorum 2, two up", [obs("a", UP), obs("b", UP)], UP, quorum=2),
    Row("quorum 2, one up one stale", [obs("a", UP), obs("b", UP, age=61)], UNKNOWN, quorum=2),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_aggregate(row: Row) -> None:
    rules = AggregationRules(RULES.down_grace, RULES.stale_after, row.quorum)
    got = aggregate(T, row.observations, NOW, rules)
    assert got.state is row.want, got.detail


def test_up_since_is_the_latest_node_to_come_up() -> None:
    got = aggregate(T, [obs("a", UP, since_ago=500), obs("b", UP, since_ago=50)], NOW, RULES)
    assert got.since == NOW - 50


def test_snapshot_keeps_newest_observation_per_node_and_merges_own() -> None:
    older, newer = obs("a", UP, age=30), obs("a", DOWN, age=2)
    snap = HealthSnapshot.build([newer, older, obs("b", UP)], NOW, "store")
    assert {o.node: o.state for o in snap.of(T)} == {"a": DOWN, "b": UP}
    merged = snap.merged([obs("b", DOWN, age=0)], NOW, "store")
    assert {o.node: o.state for o in merged.of(T)} == {"a": DOWN, "b": DOWN}
    assert snap.health(Target("192.0.2.99"), NOW, RULES).state is UNKNOWN


def test_target_text_round_trip() -> None:
    for t in (Target("192.0.2.1", 25), Target("2001:db8::1", 2525)):
        assert Target.parse(str(t)) == t
    assert str(Target("2001:db8::1", 25)) == "[2001:db8::1]:25"


def result(ok: bool) -> ProbeResult:
    return ProbeResult(T, ProbeClass.OK if ok else ProbeClass.REFUSED, "x", 0.001)


@pytest.mark.parametrize(("label", "rise", "fall", "results", "want"), [
    ("one success is not enough with rise 2", 2, 2, [True], UNKNOWN),
    ("rise successes go up", 2, 2, [True, True], UP),
    ("fall failures go down", 2, 2, [False, False], DOWN),
    ("a failure resets the rise count", 2, 2, [True, False, True], UNKNOWN),
    ("one failure while up stays up", 2, 2, [True, True, False], UP),
    ("fall failures while up go down", 2, 2, [True, True, False, False], DOWN),
    ("rise 1 fall 1 follows every probe", 1, 1, [True, False, True], UP),
    ("back up after rise successes", 2, 2, [False, False, True, True], UP),
])
def test_hysteresis(label: str, rise: int, fall: int, results: list[bool], want: State) -> None:
    h = Hysteresis(T, "mx2", rise, fall)
    for i, ok in enumerate(results):
        h.record(result(ok), NOW + i)
    assert h.state is want


def test_hysteresis_failure_always_moves_last_fail_and_reports_transitions() -> None:
    h = Hysteresis(T, "mx2", rise=2, fall=2)
    assert h.observation() is None  # nothing to say before the first probe
    assert h.record(result(True), NOW) is None
    up = h.record(result(True), NOW + 1)
    assert up is not None and (up.old, up.new) == (UNKNOWN, UP)
    assert h.record(result(False), NOW + 2) is None  # still up: fall is 2
    assert h.last_fail == NOW + 2
    observation = h.observation()
    assert observation is not None
    assert observation.state is UP and observation.last_fail == NOW + 2
    assert aggregate(T, [observation], NOW + 2, RULES).state is DOWN  # down_grace
    assert h.delay(interval=10, down_interval=3) > 5


def test_own_observation_goes_stale_when_probing_stops() -> None:
    """Stamped with the last probe, not the time it is read: a stalled prober's view
    drops out after stale_after like any other node's."""
    h = Hysteresis(T, "mx2", rise=1, fall=1)
    h.record(result(True), NOW)
    observation = h.observation()
    assert observation is not None and observation.observed_at == NOW
    assert aggregate(T, [observation], NOW + 30, RULES).state is UP
    assert aggregate(T, [observation], NOW + RULES.stale_after + 1, RULES).state is UNKNOWN


def test_a_restart_remembers_a_failure_within_down_grace() -> None:
    before = obs("mx2", DOWN, last_fail_ago=300)
    h = Hysteresis(T, "mx2", rise=1, fall=1)
    h.remember(before)
    h.record(result(True), NOW)
    observation = h.observation()
    assert observation is not None and observation.state is UP
    assert observation.last_fail == NOW - 300
    assert aggregate(T, [observation], NOW, RULES).state is DOWN


def test_snapshot_health_remembered_between_changes_equals_aggregating_anew() -> None:
    # Observations whose freshness and down_grace end at different moments; the
    # snapshot's remembered answer must match a fresh aggregate at every instant,
    # walking forwards and backwards across each of those moments.
    t = Target("192.0.2.1", 25)
    rules = AggregationRules(down_grace=30.0, stale_after=10.0)
    obs = [Observation(t, "a", State.UP, 0.0, 100.0, 100.0, 80.0, "ok"),
           Observation(t, "b", State.DOWN, 95.0, 104.0, None, 104.0, "refused"),
           Observation(t, "c", State.UP, 50.0, 112.0, 112.0, None, "ok")]
    snapshot = HealthSnapshot.build(obs, 112.0, "test")
    moments = [100.0, 110.0, 114.0, 122.0, 134.0]
    instants = sorted({m + d for m in moments for d in (-0.5, 0.0, 0.5)} | {0.0, 200.0})
    for now in instants + instants[::-1]:
        assert snapshot.health(t, now, rules) == aggregate(t, snapshot.of(t), now, rules), now
