"""The running guard: wires discovery, store, prober and refresher together.

``Guard`` owns the background threads and exposes what the milter needs on the hot
path: ``decide()``, which reads only in-memory state (the MX directory and the health
snapshot) and therefore never waits on the store or DNS.
"""

from __future__ import annotations

import logging

from guard import metrics
from guard.config import Config
from guard.discovery import MxDirectory, directory_for
from guard.health import HealthSnapshot, Observation, Target
from guard.policy import Connection, Verdict, decide
from guard.prober import Prober, Publisher
from guard.refresher import Refresher
from guard.store import Store, open_store

log = logging.getLogger("guard.service")


class Guard:
    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        directory: MxDirectory | None = None,
        probing: bool = True,
    ) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config)
        self.directory = directory if directory is not None else directory_for(config)
        self.publisher = Publisher(self.store)
        self.prober = (
            Prober(config, self.directory.targets, self.publisher,
                   on_transition=lambda _: self.refresher.lay_own(),
                   remembered=self._remembered)
            if probing else None
        )
        self.refresher = Refresher(
            self.store,
            self.prober.own_observations if self.prober else list,
            config.store.refresh,
            config.aggregation,
        )

    def _remembered(self, target: Target) -> Observation | None:
        """This node's last shared observation of a target, from before a restart.

        Read from the store's copy, stale or not: a restart that took longer than
        stale_after must not forget a failure within down_grace either.
        """
        shared = self.refresher.shared.of(target)
        mine = [o for o in shared if o.node == self.config.me.node]
        return mine[0] if mine else None

    @property
    def snapshot(self) -> HealthSnapshot:
        return self.refresher.snapshot

    def decide(self, conn: Connection, domain: str) -> Verdict:
        return decide(conn, domain, self.directory.get(domain), self.snapshot, self.config)

    def start(self) -> None:
        log.info(
            "starting node %s: %d domain(s), store %s, probe mode %s",
            self.config.me.node, len(self.config.domains), self.store.description,
            self.config.probe.mode,
        )
        if self.config.metrics.listen:
            metrics.serve(self.config.metrics.listen)
        self.directory.start()
        # The first read of the store comes before the first probe, so the prober can
        # carry over what this node saw before a restart (down_grace survives it).
        self.refresher.start()
        self.publisher.start()
        if self.prober is not None:
            self.prober.start()

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        self.publisher.stop()
        self.refresher.stop()
        self.directory.stop()
        self.store.close()
