"""The evidence lookup of a secondary: one store round trip per bypass, never more.

``EvidenceLookup.lookup`` counts a bypass try and reads what the store knows about it
(``Store.record_bypass``), within ``[store] timeout`` (and at most one quick retry).
Any fault gives None, and the plain ``action`` applies: the guard never waits longer,
never fails a callback. After a fault the store is left alone for ``BACKOFF_SECONDS``,
so a frozen Redis costs one callback a timeout per second, not every callback; the
fault is logged once per episode.
"""

from __future__ import annotations

import logging
import time

from guard import metrics
from guard.episodes import FaultEpisode
from guard.evidence import BypassTry, Evidence, EvidenceRules
from guard.store.base import Store, StoreError

log = logging.getLogger("guard.lookup")

BACKOFF_SECONDS = 1.0


class EvidenceLookup:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._episode = FaultEpisode(f"store {store.description} (bypass evidence)", log)
        self._resume_at = 0.0  # monotonic; no lookups before it
        self._ok = metrics.EVIDENCE_LOOKUPS.labels("ok")
        self._failed = metrics.EVIDENCE_LOOKUPS.labels("failed")
        self._skipped = metrics.EVIDENCE_LOOKUPS.labels("skipped")

    def lookup(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence | None:
        if time.monotonic() < self._resume_at:
            self._skipped.inc()
            return None
        try:
            evidence = self._store.record_bypass(bypass, rules)
        except StoreError as e:
            self._resume_at = time.monotonic() + BACKOFF_SECONDS
            self._episode.failed(e)
            metrics.STORE_ERRORS.labels("evidence").inc()
            self._failed.inc()
            return None
        except Exception as e:  # a bug in the store: the plain action, and say so once
            self._resume_at = time.monotonic() + BACKOFF_SECONDS
            if self._episode.failed(e):
                log.exception("looking up bypass evidence failed")
            self._failed.inc()
            return None
        self._episode.succeeded()
        self._ok.inc()
        return evidence
