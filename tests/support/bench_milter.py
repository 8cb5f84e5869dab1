"""Bench, direct milter protocol: whole sessions per second, guard against a no-op.

The no-op is a pymilter milter with the guard's callbacks (connect, helo, envfrom,
envrcpt, header, eom adding one header; DATA skipped, as the guard skips it on a Unix
socket) and the same reply/no-reply choices, so
the ratio is what the guard's own work costs over libmilter and pymilter. The guard
runs as ``mx-guard run`` with the memory store and with a private Redis; the bypass
path (untrusted client, healthy primary, flag) and the trusted path (a client in
trusted_networks) are timed. Every milter listens on a Unix socket; rounds rotate the
order so machine noise spreads over all of them. Store round trips per session are
counted on the Redis guard from the server's own command counters.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.milterload import Session, run_session, sessions_per_second
from tests.support.redis_server import RedisServer
from tests.support.smtp import GuardedDomain, MilterProcess, guard_config, wait_until
from tests.support.smtpserver import free_port

CLIENTS = (1, 8, 32)
ROUNDS = 3
SECONDS = 1.5  # per measurement
BYPASS = Session("203.0.113.7")  # untrusted; flagged.example's primary is up: flag
TRUSTED = Session("127.0.0.1")  # in trusted_networks
UNGUARDED = Session("203.0.113.7", "<user@unguarded.example>")
PRIMARY_DOWN = Session("203.0.113.7", "<user@down.example>")  # its primary refuses

NOOP_MILTER = """
import sys, Milter

class Noop(Milter.Base):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, name):
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender, *params):
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        return Milter.CONTINUE

    def eom(self):
        self.addheader("X-MX-Guard", "bypass; node=noop")
        return Milter.CONTINUE

Milter.factory = Noop
Milter.runmilter("noop", sys.argv[1], 10)
"""


@dataclass(frozen=True)
class Setup:
    name: str
    socket: str
    session: Session


class RoundTrips:
    """Commands clients send to Redis, from MONITOR: one line per command a client sent,
    and the commands a Lua script runs marked "lua", which are no round trip."""

    def __init__(self, redis: RedisServer) -> None:
        self.count = 0
        self._monitor = redis.client().monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                if self._monitor.next_command().get("client_type") != "lua":
                    self.count += 1
        except Exception:  # closed at the end
            return

    def close(self) -> None:
        self._monitor.__exit__(None, None, None)


def round_trips(counter: RoundTrips, address: str, session: Session, n: int = 200) -> float:
    """Store round trips per session on one path, the background's rate subtracted."""
    steps = session.steps()
    run_session(address, steps)
    time.sleep(0.2)
    before, started = counter.count, time.perf_counter()
    time.sleep(1.0)
    idle_rate = (counter.count - before) / (time.perf_counter() - started)
    before, started = counter.count, time.perf_counter()
    for _ in range(n):
        run_session(address, steps)
    time.sleep(0.2)  # MONITOR lines arrive after the commands
    busy = counter.count - before
    elapsed = time.perf_counter() - started
    return max(0.0, (busy - idle_rate * elapsed) / n)


def run(work: Path, sockets: Path) -> dict[str, Any]:
    script = work / "noop_same_callbacks.py"
    script.write_text(NOOP_MILTER)
    with contextlib.ExitStack() as stack:
        mx1 = stack.enter_context(FakePrimary())
        redis = stack.enter_context(RedisServer())
        domain = [GuardedDomain("flagged.example", mx1.address, action="flag"),
                  GuardedDomain("down.example", ("127.0.0.1", free_port()), action="flag")]
        stack.enter_context(MilterProcess(script, f"unix:{sockets}/noop-direct.sock"))
        guards = {}
        for name, sock, store in (("memory", "guard-mem", "memory://"),
                                  ("redis", "guard-redis", redis.url)):
            guard = GuardProcess(guard_config(f"unix:{sockets}/{sock}.sock", domain,
                                              store=store), work, f"guard-direct-{name}")
            stack.callback(guard.stop)
            guards[name] = guard.start()
        for g in guards.values():
            g.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
            g.wait_for_log(r"target 127\.0\.0\.1:\d+ is down")
            g.wait_for_log(r"milter listening")
        wait_until(lambda: Path(f"{sockets}/guard-redis.sock").exists()
                   and Path(f"{sockets}/guard-mem.sock").exists(), 10)
        setups = [
            Setup("noop", f"{sockets}/noop-direct.sock", BYPASS),
            Setup("guard memory bypass", f"{sockets}/guard-mem.sock", BYPASS),
            Setup("guard memory trusted", f"{sockets}/guard-mem.sock", TRUSTED),
            Setup("guard redis bypass", f"{sockets}/guard-redis.sock", BYPASS),
            Setup("guard redis trusted", f"{sockets}/guard-redis.sock", TRUSTED),
        ]
        rates: dict[str, dict[int, list[float]]] = {
            s.name: {c: [] for c in CLIENTS} for s in setups}
        for r in range(ROUNDS):
            order = setups[r % len(setups):] + setups[:r % len(setups)]
            for clients in CLIENTS:
                for s in order:
                    rates[s.name][clients].append(
                        sessions_per_second(s.socket, s.session, clients, SECONDS))
        counter = RoundTrips(redis)
        try:
            trips = {name: round_trips(counter, f"{sockets}/guard-redis.sock", session)
                     for name, session in (("bypass", BYPASS), ("trusted", TRUSTED),
                                           ("unguarded", UNGUARDED),
                                           ("primary-down", PRIMARY_DOWN))}
        finally:
            counter.close()
    medians = {name: {c: statistics.median(v) for c, v in by.items()}
               for name, by in rates.items()}
    return {"sessions_per_s": medians, "samples": rates, "redis_round_trips": trips}
