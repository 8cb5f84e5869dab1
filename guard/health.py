"""Health of probe targets: observations, their aggregation, and snapshots.

A *target* is one (address, port) of a higher-priority MX host. Every node probes each
target and publishes its own *observation*; the health of a target is aggregated over
every node's fresh observation (SPEC section 4):

- ``down`` if any fresh observation is down, or failed a probe within ``down_grace``;
- ``up`` if at least ``quorum`` fresh observations are up and none is down;
- ``unknown`` otherwise.

Everything here is pure: times are passed in (seconds since the epoch, because
observations travel between hosts), nothing reads a clock or does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class State(StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass(frozen=True, order=True)
class Target:
    """One address and port of a higher-priority MX host: the unit of health."""

    address: str
    port: int = 25

    def __str__(self) -> str:
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Target:
        """Inverse of ``str()``: ``192.0.2.1:25`` or ``[2001:db8::1]:25``."""
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        ipaddress.ip_address(host)
        return cls(host, int(port))


@dataclass(frozen=True)
class Observation:
    """What one node last concluded about one target, stamped with time and node.

    ``state`` is the node's hysteresis state (``unknown`` until ``rise`` or ``fall``
    probes agree); ``last_fail`` is the time of the newest failed probe, whatever the
    state, because ``down_grace`` is measured against it.
    """

    target: Target
    node: str
    state: State
    since: float
    observed_at: float
    last_ok: float | None = None
    last_fail: float | None = None
    detail: str = ""

    def is_fresh(self, now: float, stale_after: float) -> bool:
        return now - self.observed_at <= stale_after


@dataclass(frozen=True)
class Transition:
    """A change of one node's state for one target, kept in the history."""

    target: Target
    node: str
    old: State
    new: State
    at: float
    detail: str = ""


@dataclass(frozen=True)
class AggregationRules:
    down_grace: float
    stale_after: float
    quorum: int = 1


@dataclass(frozen=True)
class TargetHealth:
    """The aggregated health of one target at one moment, with the evidence used."""

    target: Target
    state: State
    since: float | None
    detail: str
    observations: tuple[Observation, ...] = ()
    # Down only by down_grace, and back: a probe failed that recently, but no fresh
    # observation says down and the newest probe of each one that failed succeeded.
    # (A target whose newest probe failed is failing now, whatever fall says.)
    grace: bool = False


def aggregate(
    target: Target,
    observations: Iterable[Observation],
    now: float,
    rules: AggregationRules,
) -> TargetHealth:
    fresh = [o for o in observations if o.is_fresh(now, rules.stale_after)]
    downs = [o for o in fresh if o.state is State.DOWN]
    recent_fails = [
        o for o in fresh if o.last_fail is not None and now - o.last_fail <= rules.down_grace
    ]
    if downs:
        first = min(downs, key=lambda o: o.since)
        return TargetHealth(
            target, State.DOWN, first.since, f"down at {first.node}: {first.detail}", tuple(fresh)
        )
    if recent_fails:
        newest = max(recent_fails, key=lambda o: o.last_fail or 0.0)
        return TargetHealth(
            target,
            State.DOWN,
            newest.last_fail,
            f"failed a probe within down_grace at {newest.node}: {newest.detail}",
            tuple(fresh),
            grace=all(o.last_ok is not None and o.last_fail is not None
                      and o.last_ok > o.last_fail for o in recent_fails),
        )
    ups = [o for o in fresh if o.state is State.UP]
    if ups and len(ups) >= rules.quorum:
        # Up since the most recent node came up: the claim all the quorum agrees on.
        since = max(o.since for o in ups)
        nodes = ",".join(sorted(o.node for o in ups))
        return TargetHealth(target, State.UP, since, f"up at {nodes}", tuple(fresh))
    if not fresh:
        return TargetHealth(target, State.UNKNOWN, None, "no fresh observation", ())
    return TargetHealth(
        target,
        State.UNKNOWN,
        None,
        f"{len(ups)} fresh up observation(s), quorum is {rules.quorum}",
        tuple(fresh),
    )


_NO_OBSERVATIONS: tuple[Observation, ...] = ()


def _unchanged_around(
    observations: Iterable[Observation], now: float, rules: AggregationRules
) -> tuple[float, float]:
    """The stretch (after, until] around ``now`` in which ``aggregate`` gives the same
    answer: it reads ``now`` only to compare it with these moments."""
    after, until = float("-inf"), float("inf")
    for o in observations:
        moments = [o.observed_at + rules.stale_after]
        if o.last_fail is not None:
            moments.append(o.last_fail + rules.down_grace)
        for m in moments:
            if m < now:
                after = max(after, m)
            else:
                until = min(until, m)
    return after, until


@dataclass(frozen=True)
class HealthSnapshot:
    """An immutable view of every known observation, swapped whole by the refresher.

    Milter callbacks read a snapshot and aggregate at the connection's time, so a
    decision never waits on the store.
    """

    observations: Mapping[Target, tuple[Observation, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    taken_at: float = 0.0
    source: str = "empty"
    # (health, valid after, valid until) per target and rules; see health().
    _healths: dict[tuple[Target, AggregationRules], tuple[TargetHealth, float, float]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False)

    @classmethod
    def build(
        cls, observations: Iterable[Observation], taken_at: float, source: str
    ) -> HealthSnapshot:
        grouped: dict[Target, dict[str, Observation]] = {}
        for obs in observations:
            per_node = grouped.setdefault(obs.target, {})
            known = per_node.get(obs.node)
            if known is None or known.observed_at <= obs.observed_at:
                per_node[obs.node] = obs
        frozen = {t: tuple(nodes.values()) for t, nodes in grouped.items()}
        return cls(MappingProxyType(frozen), taken_at, source)

    def merged(self, own: Iterable[Observation], taken_at: float, source: str) -> HealthSnapshot:
        """This snapshot with ``own`` observations laid over it (newest per node wins)."""
        everything = [o for obs in self.observations.values() for o in obs]
        everything.extend(own)
        return HealthSnapshot.build(everything, taken_at, source)

    def of(self, target: Target) -> tuple[Observation, ...]:
        return self.observations.get(target, _NO_OBSERVATIONS)

    def health(self, target: Target, now: float, rules: AggregationRules) -> TargetHealth:
        # A snapshot never changes, so a target's health is constant between the moments
        # an observation goes stale or a failure leaves down_grace: aggregate once per
        # such stretch, not once per recipient.
        key = (target, rules)
        hit = self._healths.get(key)
        if hit is not None and hit[1] < now <= hit[2]:
            return hit[0]
        observations = self.of(target)
        health = aggregate(target, observations, now, rules)
        after, until = _unchanged_around(observations, now, rules)
        self._healths[key] = (health, after, until)
        return health
