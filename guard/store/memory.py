"""The embedded ``memory://`` store: one host, no Redis, same contract as the others.

Entries expire like Redis keys would, so the contract tests hold for both stores.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from guard.evidence import (
    BypassTry,
    Evidence,
    EvidenceRules,
    IdentityCount,
    Trap,
    counts_as_trap,
    is_released,
)
from guard.health import Observation, Target, Transition
from guard.store.base import HISTORY_MAX

# Evidence expires a few entries per call, oldest first (each kind is kept in the order
# of its last write, which is the order of expiry): never a sweep of everything inside
# a milter callback. Past ENTRIES_MAX of one kind the oldest goes, so a flood of new
# senders costs bounded memory.
EXPIRE_PER_CALL = 16
ENTRIES_MAX = 1_000_000


@dataclass
class _Identity:
    tries: int
    first_at: float
    expires: float


V = TypeVar("V")


def _expire_oldest(entries: collections.OrderedDict[str, V], expired: Callable[[V], bool],
                   most: int) -> None:
    """Drop up to ``most`` expired entries from the old end, and any past ENTRIES_MAX."""
    for _ in range(most):
        if not entries:
            return
        oldest = next(iter(entries.values()))
        if not expired(oldest):
            break
        entries.popitem(last=False)
    while len(entries) > ENTRIES_MAX:
        entries.popitem(last=False)


class MemoryStore:
    def __init__(
        self,
        observation_ttl: float,
        history_max: int = HISTORY_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = observation_ttl
        self._clock = clock
        self._observations: dict[tuple[Target, str], tuple[float, Observation]] = {}
        self._history: collections.deque[Transition] = collections.deque(maxlen=history_max)
        self._changed = threading.Condition()
        self._generation = 0
        self._identities: collections.OrderedDict[str, _Identity] = collections.OrderedDict()
        # network -> (seen at, expires)
        self._seen: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._heartbeats: dict[str, float] = {}  # witness node -> newest heartbeat
        self._heartbeats_expire = 0.0
        self._traps: collections.OrderedDict[str, Trap] = collections.OrderedDict()

    @property
    def description(self) -> str:
        return "memory://"

    def publish(
        self, observations: Sequence[Observation], transitions: Sequence[Transition]
    ) -> None:
        expires = self._clock() + self._ttl
        with self._changed:
            for obs in observations:
                self._observations[(obs.target, obs.node)] = (expires, obs)
            self._history.extend(transitions)
            if transitions:
                self._generation += 1
                self._changed.notify_all()

    def observations(self) -> list[Observation]:
        now = self._clock()
        with self._changed:
            expired = [k for k, (exp, _) in self._observations.items() if exp <= now]
            for k in expired:
                del self._observations[k]
            return [obs for _, obs in self._observations.values()]

    def history(self, limit: int = 50) -> list[Transition]:
        if limit <= 0:
            return []  # as Redis: [-0:] would be everything
        with self._changed:
            return list(self._history)[-limit:]

    # -- evidence: the same rules as the Redis store's script ------------------------

    def record_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        return self._bypass(bypass, rules, record=True)

    def peek_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        return self._bypass(bypass, rules, record=False)

    def _bypass(self, bypass: BypassTry, rules: EvidenceRules, record: bool) -> Evidence:
        now = self._clock()
        at = bypass.at
        with self._changed:
            counts = []
            released = False
            for identity, key in zip(bypass.identities, bypass.store_keys(), strict=True):
                known = self._identities.get(key)
                if known is None or known.expires <= now:
                    known = _Identity(0, at, 0.0)
                tries = known.tries + 1
                if record:
                    known.tries, known.expires = tries, now + rules.release_ttl
                    self._identities[key] = known
                    self._identities.move_to_end(key)
                counts.append(IdentityCount(identity, tries, known.first_at))
                released = released or is_released(tries, known.first_at, at, rules)
            seen = self._seen.get(bypass.network)
            seen_at = seen[0] if seen is not None and seen[1] > now else None
            heartbeat = self._newest_heartbeat(now)
            fresh = heartbeat is not None and at - heartbeat <= rules.witness_fresh
            trap = self._traps.get(bypass.client)
            if trap is not None and trap.last_at + rules.trap_ttl <= now:
                trap = None
            count = trap.count if trap is not None else 0
            if counts_as_trap(released, fresh, seen_at is not None):
                count += 1
                if record:
                    self._traps[bypass.client] = Trap(bypass.client, count, at)
                    self._traps.move_to_end(bypass.client)
            self._expire_some(now, rules.trap_ttl)
        return Evidence(at, tuple(counts), heartbeat, seen_at, count)

    def _newest_heartbeat(self, now: float) -> float | None:
        if now >= self._heartbeats_expire:
            return None
        return max(self._heartbeats.values(), default=None)

    def heartbeats(self) -> dict[str, float]:
        with self._changed:
            if self._clock() >= self._heartbeats_expire:
                return {}
            return dict(self._heartbeats)

    def record_witness(self, node: str, networks: Sequence[str], at: float,
                       ttl: float) -> None:
        now = self._clock()
        with self._changed:
            for network in networks:
                self._seen[network] = (at, now + ttl)
                self._seen.move_to_end(network)
            if now >= self._heartbeats_expire:
                self._heartbeats.clear()  # as the Redis hash expires with the last witness
            self._heartbeats[node] = at
            self._heartbeats_expire = now + ttl
            _expire_oldest(self._seen, lambda v: v[1] <= now, len(networks) + EXPIRE_PER_CALL)

    def traps(self, now: float, ttl: float) -> list[Trap]:
        with self._changed:
            return sorted((t for t in self._traps.values() if t.last_at + ttl > now),
                          key=lambda t: (-t.count, t.address))

    def _expire_some(self, now: float, trap_ttl: float) -> None:
        _expire_oldest(self._identities, lambda v: v.expires <= now, EXPIRE_PER_CALL)
        _expire_oldest(self._seen, lambda v: v[1] <= now, EXPIRE_PER_CALL)
        _expire_oldest(self._traps, lambda v: v.last_at + trap_ttl <= now, EXPIRE_PER_CALL)

    def wait_for_change(self, timeout: float) -> bool:
        with self._changed:
            seen = self._generation
            return self._changed.wait_for(lambda: self._generation != seen, timeout)

    def close(self) -> None:
        with self._changed:
            self._generation += 1  # wake any waiter so it can notice shutdown
            self._changed.notify_all()
