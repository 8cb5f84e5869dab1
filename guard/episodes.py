"""Fault episodes: a fault is logged once when it starts and once when it ends.

A dead store would otherwise log once per message or per probe and drown the log.
"""

from __future__ import annotations

import logging
import threading
import time


class FaultEpisode:
    """Logs a fault once when it starts and once when it ends, not once per call."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what
        self._log = logger
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: Exception) -> bool:
        """Note a failure; True if it started an episode (and was logged)."""
        with self._lock:
            if self._since is not None:
                return False
            self._since = time.monotonic()
            self._log.warning("%s failing: %s; carrying on without it", self._what, error)
            return True

    def succeeded(self, summary: str = "") -> None:
        """The fault ended; ``summary`` (", 12 lines lost") ends the log line."""
        with self._lock:
            if self._since is not None:
                lasted = time.monotonic() - self._since
                self._since = None
                self._log.warning("%s recovered after %.1fs%s", self._what, lasted, summary)
