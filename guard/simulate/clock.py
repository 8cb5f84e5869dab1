"""The simulator's discrete-event loop on a virtual clock.

Time is a float of seconds since the epoch, like the guard's own clocks, so the guard's
code reads ``EventLoop.now`` where it would read ``time.time``. Events run in time
order; events at the same time run in the order they were scheduled, which together
with seeded random streams makes a run reproducible.

Processes (a sender delivering one message) are generators that yield how many
seconds they wait; the loop resumes them when that time has come.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Generator
from typing import Any

Process = Generator[float, None, None]


class EventLoop:
    def __init__(self, start: float) -> None:
        self._now = start
        self._queue: list[tuple[float, int, Callable[[], Any]]] = []
        self._order = itertools.count()
        self.processes = 0  # processes still running: the run ends when none is left
        self.events = 0

    def now(self) -> float:
        """The virtual time; pass this method wherever the guard takes a clock."""
        return self._now

    def at(self, when: float, action: Callable[[], Any]) -> None:
        heapq.heappush(self._queue, (max(when, self._now), next(self._order), action))

    def after(self, delay: float, action: Callable[[], Any]) -> None:
        self.at(self._now + delay, action)

    def spawn(self, process: Process, delay: float = 0.0) -> None:
        self.processes += 1
        self.after(delay, lambda: self._resume(process))

    def _resume(self, process: Process) -> None:
        try:
            wait = next(process)
        except StopIteration:
            self.processes -= 1
            return
        self.after(wait, lambda: self._resume(process))

    def run(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        """Run events up to ``until``, or until ``done()`` says the world has finished."""
        while self._queue and not done():
            when, _, action = self._queue[0]
            if when > until:
                break
            heapq.heappop(self._queue)
            self._now = when
            self.events += 1
            action()
