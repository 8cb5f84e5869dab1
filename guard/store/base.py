"""The store interface: where nodes share their observations of targets.

A store keeps, per (target, node), that node's newest observation with a TTL; a bounded
history of transitions; a change notice that wakes the refresher; and the evidence of
``guard.evidence``: retry identities, witness records and heartbeats, trap counts. Implementations:
``memory://`` (one host, no Redis) and Redis. Every call is bounded by the store's
timeout and raises ``StoreError`` on any fault, so callers decide how to degrade.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from guard.evidence import BypassTry, Evidence, EvidenceRules, Trap
from guard.health import Observation, Transition

HISTORY_MAX = 1000  # transitions kept; enough for a day of a flapping primary per node


class StoreError(Exception):
    """The shared store failed or did not answer in time (transient: try again later)."""


class Store(Protocol):
    """What the prober, the refresher and the CLI need from shared state."""

    @property
    def description(self) -> str:
        """Where the store is, safe to log (no password)."""
        ...

    def publish(
        self, observations: Sequence[Observation], transitions: Sequence[Transition]
    ) -> None:
        """Write this node's observations and append transitions, in one round trip."""
        ...

    def observations(self) -> list[Observation]:
        """Every node's unexpired observation of every target, in one round trip."""
        ...

    def history(self, limit: int = 50) -> list[Transition]:
        """The newest transitions, oldest first."""
        ...

    def record_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        """Count a bypass try under its identities, read the witness record and
        heartbeat, and count a trap unless released or seen: one round trip, atomic, so
        several secondaries counting the same identity at once all count right."""
        ...

    def peek_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        """What ``record_bypass`` would answer for this try, counting nothing (for
        ``mx-guard explain``): one round trip."""
        ...

    def heartbeats(self) -> dict[str, float]:
        """Each witness node's newest heartbeat."""
        ...

    def record_witness(self, node: str, networks: Sequence[str], at: float,
                       ttl: float) -> None:
        """A witness's client networks (seen at ``at``) and heartbeat: one round trip."""
        ...

    def traps(self, now: float, ttl: float) -> list[Trap]:
        """Every trapped client address counted within ``ttl`` before ``now``."""
        ...

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a change notice; True if one came."""
        ...

    def close(self) -> None: ...
