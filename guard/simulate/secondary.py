"""A secondary MX in the simulation, running the guard's own code on the virtual clock.

Per target it keeps the prober's ``Hysteresis`` and follows the prober's schedule
(``next_probe_delay``: ``interval`` while up, ``down_interval`` otherwise, with the
prober's jitter from a seeded stream); a probe meets the modelled primary and takes the
time it would take (a probe of a black hole lasts ``[probe] timeout``). Observations go
to the shared ``MemoryStore`` (on the virtual clock) as the prober's publisher would
send them; the guard's ``Refresher`` builds the snapshot and ``decide()`` rules.

What is simplified, and why it does not matter for the outcome:
- the refresher runs before a decision whenever any node published since its last run,
  instead of once per ``[store] refresh``: the real one lags by up to a second for
  observations that change no state, and transitions wake it at once anyway;
- probes are never throttled by ``[probe] concurrency``: a handful of targets.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from guard.config import Action, Config
from guard.health import Observation, Target, Transition
from guard.mxset import MxSet, higher_priority_hosts
from guard.policy import Connection, Verdict, client_address, decide
from guard.prober import Hysteresis
from guard.probes import ProbeResult
from guard.refresher import Refresher
from guard.simulate.clock import EventLoop
from guard.simulate.primary import SMALL_RTT, Outcome, Primary, Reply
from guard.store.memory import MemoryStore


class SharedStore:
    """The one store every node shares, and a count of writes so refreshers know when
    there is something new to read."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.writes = 0

    def publish(self, obs: Observation, transition: Transition | None) -> None:
        self.store.publish([obs], [transition] if transition is not None else [])
        self.writes += 1


class SecondaryNode:
    def __init__(self, config: Config, mxset: MxSet, shared: SharedStore, loop: EventLoop,
                 primary: Primary, rng: random.Random) -> None:
        self.config = config
        self.name = config.me.node
        self.mxset = mxset
        self._shared = shared
        self._loop = loop
        self._primary = primary
        self._rng = rng
        p = config.probe
        targets = [t for h in higher_priority_hosts(mxset, config.me.identity)
                   for t in h.targets()]
        self.trackers = {t: Hysteresis(t, self.name, p.rise, p.fall) for t in targets}
        self.refresher = Refresher(shared.store, self.own_observations, config.store.refresh,
                                   config.aggregation, clock=loop.now)
        self._seen_writes = -1
        self.probes = 0
        self.decisions: dict[str, int] = {}
        self.on_verdict: Callable[[SecondaryNode, Verdict], None] = lambda n, v: None

    def own_observations(self) -> list[Observation]:
        observations = [t.observation() for t in self.trackers.values()]
        return [o for o in observations if o is not None]

    # -- the prober's schedule ---------------------------------------------------------

    def start(self) -> None:
        # The real prober starts every target at once; a node starts with the run.
        for target in self.trackers:
            self._loop.after(self._rng.uniform(0.0, 1.0), lambda t=target: self.probe(t))

    def probe(self, target: Target, scheduled: bool = True) -> None:
        p = self.config.probe
        result = self._primary.probe(target, p.mode, p.timeout, self._loop.now())
        self.probes += 1
        self._loop.after(result.elapsed, lambda: self._probed(target, result, scheduled))

    def _probed(self, target: Target, result: ProbeResult, scheduled: bool) -> None:
        tracker = self.trackers[target]
        transition = tracker.record(result, self._loop.now())
        obs = tracker.observation()
        if obs is not None:
            self._shared.publish(obs, transition)
        if transition is not None:
            self.refresher.lay_own()
        if scheduled:
            p = self.config.probe
            delay = tracker.delay(p.interval, p.down_interval, self._rng.uniform)
            self._loop.after(delay, lambda: self.probe(target))

    # -- a connection from a sender ----------------------------------------------------

    def verdict(self, client: str, now: float) -> Verdict:
        if self._seen_writes != self._shared.writes:
            self.refresher.refresh_once()
            self._seen_writes = self._shared.writes
        conn = Connection(client_address(client), "", False, now)
        return decide(conn, self.mxset.domain, self.mxset, self.refresher.snapshot,
                      self.config)

    def deliver(self, client: str, sender: str, recipient: str, client_name: str | None,
                now: float) -> Outcome:
        verdict = self.verdict(client, now)
        self.decisions[str(verdict.reason)] = self.decisions.get(str(verdict.reason), 0) + 1
        self.on_verdict(self, verdict)
        action = verdict.action
        if action is Action.TEMPFAIL:
            return Outcome(Reply.RCPT_4XX, SMALL_RTT, reason=str(verdict.reason))
        if action is Action.REJECT:
            return Outcome(Reply.RCPT_5XX, SMALL_RTT, reason=str(verdict.reason))
        return Outcome(Reply.ACCEPTED, SMALL_RTT, flagged=action is Action.FLAG,
                       reason=str(verdict.reason))
