"""The witness role: a guard on the primary MX records who connects, and decides nothing.

Each connecting client's network (/24, /64, as ``[release]`` sets them) goes into a
bounded queue in the connect callback, which never waits; a writer thread drains the
queue and writes the networks, with this witness's heartbeat, in one pipelined round
trip (``Store.record_witness``). Secondaries trust the records only while the newest
heartbeat is fresh. When the queue is full or the store fails, records are dropped and
counted (``mxguard_witness_records_total{result="dropped"}``); a store fault is logged
once per episode.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from guard import metrics
from guard.config import Config
from guard.episodes import FaultEpisode
from guard.evidence import IPAddress, client_network
from guard.store.base import Store, StoreError

log = logging.getLogger("guard.witness")

BATCH_MAX = 1000  # networks in one write


class WitnessRecorder:
    def __init__(self, store: Store, config: Config,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._queue: queue.Queue[str] = queue.Queue(config.witness.queue)
        self._stopping = threading.Event()
        self._episode = FaultEpisode(f"store {store.description} (witness records)", log)
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)
        self.written = 0
        self.dropped = 0

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: ttl, heartbeat and the network prefixes apply from the next
        record on; the queue keeps the size it was started with."""
        self._config = config

    def saw(self, client: IPAddress) -> None:
        """Note a connecting client; never blocks (a full queue drops the record)."""
        try:
            self._queue.put_nowait(client_network(client, self._config.release))
        except queue.Full:
            self._drop(1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _drop(self, n: int) -> None:
        self.dropped += n
        metrics.WITNESS_RECORDS.labels("dropped").inc(n)

    def _batch(self, timeout: float) -> list[str]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_MAX:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def flush(self) -> None:
        """Write what is queued, and the heartbeat, now (for a caller on its own clock)."""
        batch = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.write(batch)

    def write(self, batch: list[str]) -> None:
        """One store call: these client networks and this witness's heartbeat."""
        networks = list(dict.fromkeys(batch))  # one write per network, in order
        try:
            self._store.record_witness(self._config.me.node, networks, self._clock(),
                                       self._config.witness.ttl)
            self._episode.succeeded()
            self.written += len(batch)
            metrics.WITNESS_RECORDS.labels("written").inc(len(batch))
        except StoreError as e:
            self._episode.failed(e)
            metrics.STORE_ERRORS.labels("witness").inc()
            self._drop(len(batch))
        except Exception:  # a bug must not end recording for good
            log.exception("writing witness records failed")
            self._drop(len(batch))

    def _run(self) -> None:
        heartbeat_due = 0.0
        while not self._stopping.is_set():
            batch = self._batch(max(0.0, min(heartbeat_due - time.monotonic(), 0.5)))
            if not batch and time.monotonic() < heartbeat_due:
                continue
            self.write(batch)
            heartbeat_due = time.monotonic() + self._config.witness.heartbeat
