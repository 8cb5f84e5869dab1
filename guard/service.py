"""The running guard: wires discovery, store, prober and refresher together.

``Guard`` owns the background threads and exposes what the milter needs on the hot
path: ``decide()``, which reads only in-memory state (the MX directory and the health
snapshot) and never waits on DNS; only a bypass makes one bounded store round trip
for its evidence (``guard.lookup``). In the witness role (on a primary MX) there is no
deciding: ``witness`` records connecting clients, and nothing is probed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from guard import metrics
from guard.config import Config, WitnessRole
from guard.discovery import MxDirectory, directory_for
from guard.evidence import EvidenceRules, bypass_try, registrable_domain
from guard.health import HealthSnapshot, Observation, State, Target
from guard.lookup import EvidenceLookup
from guard.policy import Connection, Reason, Verdict, decide, with_evidence
from guard.prober import Prober, Publisher
from guard.refresher import Refresher
from guard.store import Store, open_store
from guard.witness import WitnessRecorder

log = logging.getLogger("guard.service")


class Guard:
    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        directory: MxDirectory | None = None,
        probing: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config)
        self.directory = directory if directory is not None else directory_for(config)
        self._clock = clock
        self.witness = (WitnessRecorder(self.store, config, clock)
                        if config.witness.role is WitnessRole.WITNESS else None)
        probing = probing and self.witness is None
        self.evidence = EvidenceLookup(self.store)
        self.publisher = Publisher(self.store)
        self.prober = (
            Prober(config, self.directory.targets, self.publisher,
                   on_transition=lambda _: self.refresher.lay_own(),
                   remembered=self._remembered, clock=clock)
            if probing else None
        )
        self.refresher = Refresher(
            self.store,
            self.prober.own_observations if self.prober else list,
            config.store.refresh,
            config.aggregation,
            clock,
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

    def decide(self, conn: Connection, domain: str, sender: str = "",
               recipient: str = "") -> Verdict:
        """The verdict for one recipient; a bypass looks up its evidence first."""
        config = self.config
        verdict = decide(conn, domain, self.directory.get(domain), self.snapshot, config)
        if verdict.reason is not Reason.BYPASS or conn.client is None:
            return verdict
        if self.prober is not None:
            # Is the primary really up? Ask for a probe of what the bypass rested on now,
            # without waiting: the next sender benefits if it just died.
            self.prober.request_probe(t.target for h in verdict.hosts
                                      if h.state is State.UP for t in h.targets)
        bypass = bypass_try(conn.client, conn.client_name, sender, recipient or domain,
                            self._clock(), config.release)
        return with_evidence(verdict, self.evidence.lookup(bypass, EvidenceRules.of(config)),
                             config)

    def start(self) -> None:
        if self.witness is None:
            # The Public Suffix List takes tens of milliseconds to load: not in the
            # first bypass's callback.
            registrable_domain("example.org")
        if self.witness is not None:
            log.info("starting node %s as a witness: recording clients in store %s, "
                     "deciding nothing", self.config.me.node, self.store.description)
            if self.config.metrics.listen:
                metrics.serve(self.config.metrics.listen)
            self.witness.start()
            return
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
        if self.witness is not None:
            self.witness.stop()
            self.store.close()
            return
        if self.prober is not None:
            self.prober.stop()
        self.publisher.stop()
        self.refresher.stop()
        self.directory.stop()
        self.store.close()
