"""The prober: this node's own view of every target, with hysteresis.

Every target gets its own asyncio task on one event loop in one thread; a semaphore
bounds how many probes run at once, so thousands of targets are probed concurrently
and a target that never answers costs one timeout, not a stuck prober.

Per target, ``Hysteresis`` turns probe results into a state: ``rise`` successes in a
row to go up, ``fall`` failures in a row to go down (HAProxy's inter/rise/fall). A
failed probe always moves ``last_fail``, whatever the state, because ``down_grace`` is
measured against it. Probes repeat every ``interval`` while up and every
``down_interval`` otherwise.

A bypass verdict asks for an out-of-schedule probe of the targets it rested on
(``request_probe``): a primary that just died is then noticed at the first mail that
reaches us, not up to ``interval`` later, so fewer fallback senders are tempfailed.
``UrgentProbes`` keeps that cheap: never while a probe of the target is in flight, at
most one per ``down_interval`` per target; the caller never waits for the probe.

Observations leave through the ``Publisher``, a thread that coalesces them and writes
them to the store in one call, so a slow or dead store never stalls probing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from guard import metrics
from guard.config import Config
from guard.episodes import FaultEpisode
from guard.health import Observation, State, Target, Transition
from guard.probes import ProbeResult, probe
from guard.store.base import Store, StoreError

log = logging.getLogger("guard.prober")

RECONCILE_EVERY = 1.0  # seconds between checks for targets added or removed
JITTER = 0.1  # fraction of an interval, so probes of many targets do not march in step
PENDING_TRANSITIONS_MAX = 1000


@dataclass
class Hysteresis:
    """One node's state machine for one target."""

    target: Target
    node: str
    rise: int
    fall: int
    state: State = State.UNKNOWN
    since: float = 0.0
    successes: int = 0
    failures: int = 0
    last_probe: float | None = None
    last_ok: float | None = None
    last_fail: float | None = None
    detail: str = "not probed yet"

    def remember(self, previous: Observation) -> None:
        """Carry over what an earlier run of this node saw (after a restart).

        Only the times: the state must be earned again by ``rise`` or ``fall`` probes,
        but a failure within ``down_grace`` must not be forgotten by a restart.
        """
        self.last_ok = previous.last_ok
        self.last_fail = previous.last_fail

    def record(self, result: ProbeResult, now: float) -> Transition | None:
        self.last_probe = now
        self.detail = f"{result.result}: {result.detail}" if not result.ok else result.detail
        if result.ok:
            self.last_ok = now
            self.successes, self.failures = self.successes + 1, 0
            new = State.UP if self.successes >= self.rise else self.state
        else:
            self.last_fail = now
            self.failures, self.successes = self.failures + 1, 0
            new = State.DOWN if self.failures >= self.fall else self.state
        if new is self.state:
            return None
        old, self.state, self.since = self.state, new, now
        return Transition(self.target, self.node, old, new, now, self.detail)

    def observation(self) -> Observation | None:
        """The newest observation, stamped with the time of the last probe (None before
        the first): a stalled prober's view goes stale like any other node's."""
        if self.last_probe is None:
            return None
        return Observation(
            self.target, self.node, self.state, self.since or self.last_probe,
            self.last_probe, self.last_ok, self.last_fail, self.detail,
        )

    def delay(
        self, interval: float, down_interval: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> float:
        return next_probe_delay(self.state, interval, down_interval, uniform)


def next_probe_delay(
    state: State, interval: float, down_interval: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds from the end of one probe to the start of the next.

    ``uniform`` draws the jitter; a seeded ``random.Random().uniform`` makes the
    schedule reproducible (the simulator runs the prober's schedule on a virtual clock).
    """
    base = interval if state is State.UP else down_interval
    return base * (1.0 + uniform(-JITTER, JITTER))


class UrgentProbes:
    """Which out-of-schedule probes to grant: single-flight per target, and at most one
    per ``spacing`` seconds per target, however many bypasses ask. Not thread-safe:
    the prober calls it under its lock."""

    def __init__(self, spacing: float) -> None:
        self.spacing = spacing  # seconds; a reload may change it
        self._granted: dict[Target, float] = {}
        self._in_flight: set[Target] = set()

    def grant(self, target: Target, now: float) -> bool:
        if target in self._in_flight:
            return False  # the probe under way answers the question
        last = self._granted.get(target)
        if last is not None and now - last < self.spacing:
            return False
        self._granted[target] = now
        return True

    def started(self, target: Target) -> None:
        self._in_flight.add(target)

    def finished(self, target: Target) -> None:
        self._in_flight.discard(target)

    def forget(self, target: Target) -> None:
        self._granted.pop(target, None)
        self._in_flight.discard(target)


@dataclass
class _Outbox:
    observations: dict[Target, Observation] = field(default_factory=dict)
    transitions: collections.deque[Transition] = field(
        default_factory=lambda: collections.deque(maxlen=PENDING_TRANSITIONS_MAX)
    )


class Publisher:
    """Writes this node's observations to the store from its own thread."""

    def __init__(self, store: Store, retry_after: float = 1.0) -> None:
        self._store = store
        self._retry_after = retry_after
        self._outbox = _Outbox()
        self._cond = threading.Condition()
        self._stopping = False
        self._episode = FaultEpisode(f"store {store.description} (publishing)", log)
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def offer(self, obs: Observation, transition: Transition | None) -> None:
        with self._cond:
            self._outbox.observations[obs.target] = obs
            if transition is not None:
                self._outbox.transitions.append(transition)
            self._cond.notify_all()

    def flush(self) -> bool:
        """Write what is waiting, in one store call; False if that failed (what was
        taken is put back for the next try). The thread calls it; so can a caller that
        runs on its own clock (the simulator)."""
        with self._cond:
            batch, self._outbox = self._outbox, _Outbox()
        if not batch.observations and not batch.transitions:
            return True
        try:
            self._store.publish(list(batch.observations.values()), list(batch.transitions))
            self._episode.succeeded()
            return True
        except StoreError as e:
            self._episode.failed(e)
            metrics.STORE_ERRORS.labels("publish").inc()
        except Exception:  # a bug must not end publishing for good
            log.exception("publishing observations failed")
        self._requeue(batch)
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or bool(self._outbox.observations), timeout=1.0
                )
                if self._stopping:
                    return
            if not self.flush():
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=self._retry_after)

    def _requeue(self, batch: _Outbox) -> None:
        with self._cond:
            for target, obs in batch.observations.items():
                newer = self._outbox.observations.get(target)
                if newer is None or newer.observed_at < obs.observed_at:
                    self._outbox.observations[target] = obs
            pending = self._outbox.transitions
            self._outbox.transitions = batch.transitions
            self._outbox.transitions.extend(pending)


class Prober:
    """Probes every target that ``targets()`` names, for as long as it names it."""

    def __init__(
        self,
        config: Config,
        targets: Callable[[], Iterable[Target]],
        publisher: Publisher | None,
        on_transition: Callable[[Transition], None] = lambda t: None,
        remembered: Callable[[Target], Observation | None] = lambda t: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._targets = targets
        self._publisher = publisher
        self._on_transition = on_transition
        self._remembered = remembered
        self._clock = clock
        self._trackers: dict[Target, Hysteresis] = {}
        self._lock = threading.Lock()
        self._urgent = UrgentProbes(config.probe.down_interval)
        self._wakeups: dict[Target, asyncio.Event] = {}
        # How a granted urgent probe is started: by default, wake the target's watch on
        # the event loop; a caller that schedules probes itself (the simulator) sets
        # its own.
        self.wake: Callable[[list[Target]], None] = self._wake_watches
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    # -- the rest of the process reads these ------------------------------------------

    def own_observations(self) -> list[Observation]:
        with self._lock:
            observations = [t.observation() for t in self._trackers.values()]
        return [o for o in observations if o is not None]

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config from the next probe on; every target keeps its state,
        counts and times (probing is not restarted). ``probe.concurrency`` and
        ``self.node`` stay as they were started."""
        with self._lock:
            self._config = config
            self._urgent.spacing = config.probe.down_interval
            for tracker in self._trackers.values():
                tracker.rise, tracker.fall = config.probe.rise, config.probe.fall

    def hysteresis(self) -> list[Hysteresis]:
        """A copy of every target's state machine (for the control socket)."""
        with self._lock:
            return [dataclasses.replace(t) for t in self._trackers.values()]

    def request_probe(self, targets: Iterable[Target]) -> list[Target]:
        """Probe these targets now, out of schedule (a bypass rested on them being up).

        Safe from any thread and never waits for the probe: the targets granted by
        ``UrgentProbes`` are handed to ``wake``. Returns them.
        """
        now = self._clock()
        with self._lock:
            granted = [t for t in targets
                       if t in self._trackers and self._urgent.grant(t, now)]
        if granted:
            metrics.URGENT_PROBES.inc(len(granted))
            self.wake(granted)
        return granted

    def _wake_watches(self, targets: list[Target]) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
            loop.call_soon_threadsafe(self._set_wakeups, targets)

    def _set_wakeups(self, targets: list[Target]) -> None:
        for target in targets:
            event = self._wakeups.get(target)
            if event is not None:
                event.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    # -- the event loop ---------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        limit = asyncio.Semaphore(self._config.probe.concurrency)
        tasks: dict[Target, asyncio.Task[None]] = {}
        try:
            while not self._stop.is_set():
                try:
                    self._reconcile(tasks, limit)
                except Exception:  # e.g. a bug in targets(): keep the probes we have
                    log.exception("updating the set of targets failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), RECONCILE_EVERY)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _reconcile(self, tasks: dict[Target, asyncio.Task[None]],
                   limit: asyncio.Semaphore) -> None:
        wanted = set(self._targets())
        for target, task in list(tasks.items()):
            if task.done() and target in wanted:
                # _watch never returns; a finished one died of a bug: say so, start anew.
                error = None if task.cancelled() else task.exception()
                log.error("probing %s stopped (%r); restarting it", target, error)
                del tasks[target]
        for target in wanted - tasks.keys():
            tasks[target] = asyncio.create_task(self._watch(target, limit))
        for target in tasks.keys() - wanted:
            tasks.pop(target).cancel()
            self._wakeups.pop(target, None)
            with self._lock:
                self._trackers.pop(target, None)
                self._urgent.forget(target)
            log.info("stopped probing %s (no longer a higher-priority MX)", target)

    async def probe_once(self, target: Target) -> ProbeResult:
        p = self._config.probe
        return await probe(target, p.mode, p.timeout, self._config.probe_helo)

    def track(self, target: Target) -> Hysteresis:
        """Start keeping state for a target, with what this node saw before a restart."""
        p = self._config.probe
        tracker = Hysteresis(target, self._config.me.node, p.rise, p.fall)
        previous = self._remembered(target)
        if previous is not None:
            tracker.remember(previous)
        with self._lock:
            self._trackers[target] = tracker
        return tracker

    def begin(self, target: Target) -> None:
        """A probe of the target starts: no urgent one until ``record`` takes its result."""
        with self._lock:
            self._urgent.started(target)

    async def _watch(self, target: Target, limit: asyncio.Semaphore) -> None:
        p = self._config.probe
        tracker = self.track(target)
        log.info("probing %s (%s mode, every %gs, timeout %gs)", target, p.mode, p.interval,
                 p.timeout)
        wakeup = self._wakeups[target] = asyncio.Event()
        while True:
            self.begin(target)
            async with limit:
                result = await self.probe_once(target)
            try:
                self.record(tracker, result)
            except Exception:  # never let one bad result end the watch
                log.exception("recording a probe of %s failed", target)
            wakeup.clear()
            p = self._config.probe  # a reload applies from the next probe on
            # The next probe on schedule, or at once when a bypass asks (request_probe).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), tracker.delay(p.interval,
                                                                    p.down_interval))

    def record(self, tracker: Hysteresis, result: ProbeResult) -> None:
        """Take one probe's result: state, metrics, the publisher, transition hooks."""
        with self._lock:
            self._urgent.finished(tracker.target)
        metrics.PROBES.labels(str(result.result)).inc()
        with self._lock:
            transition = tracker.record(result, self._clock())
            obs = tracker.observation()
        log.debug("probe %s: %s %s (%.0f ms)", tracker.target, result.result, result.detail,
                  result.elapsed * 1000)
        if self._publisher is not None and obs is not None:
            self._publisher.offer(obs, transition)
        if transition is not None:
            self._on_transition(transition)
            log.info("target %s is %s (was %s): %s", tracker.target, transition.new,
                     transition.old, transition.detail)
