"""The embedded ``memory://`` store: one host, no Redis, same contract as the others.

Entries expire like Redis keys would, so the contract tests hold for both stores.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence

from guard.health import Observation, Target, Transition
from guard.store.base import HISTORY_MAX


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

    def wait_for_change(self, timeout: float) -> bool:
        with self._changed:
            seen = self._generation
            return self._changed.wait_for(lambda: self._generation != seen, timeout)

    def close(self) -> None:
        with self._changed:
            self._generation += 1  # wake any waiter so it can notice shutdown
            self._changed.notify_all()
