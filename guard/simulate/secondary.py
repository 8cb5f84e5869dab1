"""A secondary MX in the simulation: the guard's own ``Guard``, driven on the virtual clock.

The node is a real ``guard.service.Guard`` (config, store, prober state, publisher,
refresher, evidence lookup, ``decide``), built with the simulation's clock and never
started: no thread, no asyncio loop, no socket. What its threads would do, the event
loop does, through the same methods:

- per target, the prober's schedule: ``Prober.track`` makes the ``Hysteresis``, a probe
  meets the modelled primary and lasts what it would (a black hole costs ``[probe]
  timeout``), ``Prober.record`` takes the result, ``Publisher.flush`` writes it to the
  store, and ``Hysteresis.delay`` (jitter from a seeded stream) sets the next probe;
- the refresher's cycle: ``Refresher.refresh_once`` before a decision whenever
  ``[store] refresh`` has passed since the last one (the real one runs on its own
  timer, at most that long before); transitions lay the node's own view over the
  snapshot at once, as in production (``Guard`` wires it); a bypass verdict asks
  ``Prober.request_probe`` for a probe now, which the loop starts at once;
- a connection: ``Guard.decide`` with the client's verified name, envelope sender and
  recipient, which looks up evidence in the store for a bypass, as the milter does.
Probes are never throttled by ``[probe] concurrency``: a handful of targets.
"""

from __future__ import annotations

import functools
import random

from guard.config import Action, Config
from guard.health import Target
from guard.policy import Connection, Verdict, client_address
from guard.probes import ProbeResult
from guard.service import Guard
from guard.simulate.clock import EventLoop
from guard.simulate.primary import SMALL_RTT, Outcome, Primary, Reply
from guard.store.memory import MemoryStore


class SecondaryNode:
    def __init__(self, config: Config, domain: str, store: MemoryStore, loop: EventLoop,
                 primary: Primary, rng: random.Random) -> None:
        self.config = config
        self.name = config.me.node
        self.domain = domain
        self.guard = Guard(config, store, probing=True, clock=loop.now)
        assert self.guard.prober is not None
        self._prober = self.guard.prober
        self._loop = loop
        self._primary = primary
        self._rng = rng
        self.trackers = {t: self._prober.track(t) for t in sorted(self.guard.directory.targets())}
        # A probe on bypass (Prober.request_probe) starts here, on the virtual clock; it
        # replaces the probe due on schedule, as it does in the prober's watch.
        self._prober.wake = self._probe_now
        self._due: dict[Target, int] = dict.fromkeys(self.trackers, 0)
        self._refreshed_at = float("-inf")
        self.probes = 0
        self.urgent_probes = 0
        self.decisions: dict[str, int] = {}

    # -- the prober's schedule ---------------------------------------------------------

    def start(self) -> None:
        # The real prober starts every target at once; a node starts with the run.
        for target in self.trackers:
            self._loop.after(self._rng.uniform(0.0, 1.0), functools.partial(self.probe, target))

    def probe(self, target: Target, due: int = 0) -> None:
        if due != self._due[target]:
            return  # an urgent probe came first and set a new schedule
        p = self.config.probe
        self._prober.begin(target)
        result = self._primary.probe(target, p.mode, p.timeout, self._loop.now())
        self.probes += 1
        self._loop.after(result.elapsed, lambda: self._probed(target, result))

    def _probe_now(self, targets: list[Target]) -> None:
        for target in targets:
            self.urgent_probes += 1
            self._due[target] += 1
            self._loop.after(0.0, functools.partial(self.probe, target, self._due[target]))

    def _probed(self, target: Target, result: ProbeResult) -> None:
        tracker = self.trackers[target]
        self._prober.record(tracker, result)
        self.guard.publisher.flush()
        p = self.config.probe
        delay = tracker.delay(p.interval, p.down_interval, self._rng.uniform)
        self._loop.after(delay, functools.partial(self.probe, target, self._due[target]))

    # -- a connection from a sender ----------------------------------------------------

    def verdict(self, client: str, client_name: str | None, sender: str, recipient: str,
                now: float) -> Verdict:
        if now - self._refreshed_at >= self.config.store.refresh:
            self.guard.refresher.refresh_once()
            self._refreshed_at = now
        conn = Connection(client_address(client), now, client_name=client_name)
        return self.guard.decide(conn, self.domain, sender, recipient)

    def deliver(self, client: str, sender: str, recipient: str, client_name: str | None,
                now: float) -> Outcome:
        verdict = self.verdict(client, client_name, sender, recipient, now)
        self.decisions[str(verdict.reason)] = self.decisions.get(str(verdict.reason), 0) + 1
        action = verdict.action
        if action is Action.TEMPFAIL:
            return Outcome(Reply.RCPT_4XX, SMALL_RTT, reason=str(verdict.reason))
        if action is Action.REJECT:
            return Outcome(Reply.RCPT_5XX, SMALL_RTT, reason=str(verdict.reason))
        return Outcome(Reply.ACCEPTED, SMALL_RTT, flagged=action is Action.FLAG,
                       reason=str(verdict.reason))
