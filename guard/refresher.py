"""The snapshot refresher: keeps an immutable health snapshot for the hot path.

Milter callbacks never talk to the store for health: they read ``Refresher.snapshot``,
a ``HealthSnapshot`` replaced whole (an atomic reference swap). The refresher reads
the store once per cycle (one round trip) and at once when the store signals a
change, then lays this node's own fresh observations over it.

While the store is unreachable it keeps the last shared snapshot, still merged with
the node's own observations, so a secondary degrades to standalone instead of going
blind; what is older than ``stale_after`` is dropped, and with nothing fresh left the
health is ``unknown``. The fault is logged once per episode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from guard import metrics
from guard.episodes import FaultEpisode
from guard.health import AggregationRules, HealthSnapshot, Observation
from guard.store.base import Store, StoreError

log = logging.getLogger("guard.refresher")


class Refresher:
    def __init__(
        self,
        store: Store,
        own: Callable[[], list[Observation]],
        interval: float,
        rules: AggregationRules,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._own = own
        self._interval = interval
        self._rules = rules
        self._stale_after = rules.stale_after
        self._clock = clock
        self._shared = HealthSnapshot()
        self.snapshot = HealthSnapshot()
        self._episode = FaultEpisode(f"store {store.description} (reading health)", log)
        self._swap = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refresher", daemon=True)

    def refresh_once(self) -> HealthSnapshot:
        now = self._clock()
        try:
            self._shared = HealthSnapshot.build(self._store.observations(), now, "store")
            self._episode.succeeded()
            source = "store"
        except StoreError as e:
            self._episode.failed(e)
            metrics.STORE_ERRORS.labels("read").inc()
            source = "degraded"
        metrics.STORE_DEGRADED.set(1 if source == "degraded" else 0)
        fresh = [
            o
            for obs in self._shared.observations.values()
            for o in obs
            if o.is_fresh(now, self._stale_after)
        ]
        # Under the lock, so a concurrent lay_own() is never overwritten by older state.
        with self._swap:
            own = [o for o in self._own() if o.is_fresh(now, self._stale_after)]
            self.snapshot = HealthSnapshot.build(fresh, now, source).merged(own, now, source)
            snapshot = self.snapshot
        metrics.count_targets(snapshot.health(t, now, self._rules) for t in snapshot.observations)
        return snapshot

    def reconfigure(self, interval: float, rules: AggregationRules) -> None:
        """A reloaded config: the snapshot and the store's copy are kept as they are."""
        self._interval = interval
        self._rules = rules
        self._stale_after = rules.stale_after

    @property
    def shared(self) -> HealthSnapshot:
        """The last snapshot read from the store, stale observations included."""
        return self._shared

    def lay_own(self) -> None:
        """Lay this node's newest observations over the snapshot now, without the store.

        Called on this node's own transitions, so a change it saw itself applies to the
        very next decision instead of after the next refresh.
        """
        with self._swap:
            now = self._clock()
            self.snapshot = self.snapshot.merged(self._own(), now, self.snapshot.source)

    def start(self) -> None:
        self.refresh_once()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._store.wait_for_change(self._interval)
                if self._stopping.is_set():
                    return
                # A store that answers "changed" in a loop must not spin us.
                spent = time.monotonic() - started
                if spent < 0.05:
                    self._stopping.wait(0.05 - spent)
                self.refresh_once()
            except Exception:  # a bug here must not leave the snapshot frozen forever
                log.exception("refreshing the health snapshot failed")
                self._stopping.wait(self._interval)
