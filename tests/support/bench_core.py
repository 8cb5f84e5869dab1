"""Bench, the guard's parts alone: the decision, a probe cycle, start-up with many domains.

- ``decide()`` per call with 100 and 10,000 configured domains (one MX set each, the
  primary up: the bypass path, the longest), against a dict lookup in the same process.
- One probe cycle (``interval`` 10 s) of 2,000 targets by the real ``Prober``: local
  listeners in another process answer most with a banner, a share accept and stay
  silent (each costs a probe timeout), a share refuse. Wall time until every target was
  probed once; then, in the steady state, the probes and the CPU seconds of the
  prober's thread in one 10 s window (down targets are probed every down_interval).
- ``mx-guard run`` with 10,000 domains: seconds until its milter socket accepts, and
  its resident memory once it is up.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guard import metrics
from guard.config import parse_config
from guard.health import HealthSnapshot, Observation, State, Target
from guard.mxset import MxSet
from guard.policy import Connection, client_address, decide
from guard.prober import Prober
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.smtp import GuardedDomain, GuardSocket, guard_config, wait_until

TARGETS = 2000
SILENT, REFUSING = 100, 100  # of TARGETS; the rest answer with a banner
CYCLE = 10.0  # seconds: the default probe interval


def _domains_config(n: int) -> dict[str, Any]:
    return {
        "self": {"names": ["mx2.example.org"]},
        "domain": [{"name": f"d{i}.example", "mx": [
            {"host": f"mx1.d{i}.example", "preference": 10,
             "addresses": [f"192.0.{(i >> 8) & 255}.{i & 255}"]},
            {"host": "mx2.example.org", "preference": 20}]} for i in range(n)],
    }


def per_call(fn: Callable[[], object], n: int = 20000) -> float:
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - started) / n)
    return statistics.median(runs)


def decide_bench(domains: int) -> dict[str, float]:
    config = parse_config(_domains_config(domains))
    now = time.time()
    sets: dict[str, MxSet] = {}
    observations = []
    for d in config.domains:
        assert d.mx is not None
        sets[d.name] = MxSet(d.name, d.mx)
        observations += [Observation(t, "mx2", State.UP, now - 600, now)
                         for t in d.mx[0].targets()]
    snapshot = HealthSnapshot.build(observations, now, "bench")
    conn = Connection(client_address("203.0.113.7"), now)
    names = itertools.cycle(list(sets)[:: max(1, domains // 100)])
    verdict = decide(conn, next(names), sets.get(next(names)), snapshot, config)
    assert verdict.reason == "bypass", verdict

    def one() -> object:
        name = next(names)
        return decide(conn, name, sets.get(name), snapshot, config)

    return {"decide_us": per_call(one) * 1e6,
            "dict_lookup_us": per_call(lambda: sets.get("d1.example")) * 1e6}


LISTENERS = """
import asyncio, resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
banner, silent = int(sys.argv[1]), int(sys.argv[2])

async def greet(reader, writer):
    writer.write(b"220 mx1.example ESMTP\\r\\n")
    try:
        await reader.readline()
    finally:
        writer.close()

async def hold(reader, writer):
    await reader.read()
    writer.close()

async def main():
    servers = []
    for handler, n in ((greet, banner), (hold, silent)):
        for _ in range(n):
            s = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=64)
            servers.append((handler, s.sockets[0].getsockname()[1]))
    print(" ".join(f"{'b' if h is greet else 's'}{p}" for h, p in servers), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _probes() -> float:
    """Probes done so far in this process, from the guard's own counter."""
    return sum(s.value for m in metrics.PROBES.collect() for s in m.samples
               if s.name.endswith("_total"))


def _closed_ports(n: int) -> list[int]:
    """Ports on 127.0.0.1 where nothing listens (bound once, then released)."""
    import socket

    ports = []
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        ports.append(s.getsockname()[1])
    for s in held:
        s.close()
    return ports


def probe_cycle() -> dict[str, float]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    banner = TARGETS - SILENT - REFUSING
    proc = subprocess.Popen([sys.executable, "-c", LISTENERS, str(banner), str(SILENT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ports = proc.stdout.readline().split()
        targets = [Target("127.0.0.1", int(p[1:])) for p in ports]
        targets += [Target("127.0.0.1", p) for p in _closed_ports(REFUSING)]
        assert len(targets) == TARGETS, len(targets)
        config = parse_config({
            "self": {"names": ["mx2.example.org"]},
            "probe": {"mode": "banner", "interval": "10s", "timeout": "2s"},
        })
        prober = Prober(config, lambda: targets, None)
        started = time.perf_counter()
        prober.start()
        assert prober._thread.ident is not None
        # The prober thread's own CPU clock: the bench's polling below is not counted.
        clock = time.pthread_getcpuclockid(prober._thread.ident)

        def probed() -> bool:
            seen = prober.own_observations()
            return len(seen) == TARGETS  # an observation exists once probed

        wait_until(probed, 30, interval=0.1, message="every target probed once")
        first = time.perf_counter() - started
        # Then one whole cycle in the steady state, when each target's probes have
        # spread over its interval (up: 10 s, down: down_interval).
        time.sleep(max(0.0, CYCLE - (time.perf_counter() - started)))
        cpu0, probes0, window0 = time.clock_gettime(clock), _probes(), time.perf_counter()
        time.sleep(CYCLE)
        cpu = time.clock_gettime(clock) - cpu0
        probes = _probes() - probes0
        wall = time.perf_counter() - window0
        prober.stop()
        states = [o.state for o in prober.own_observations()]
    finally:
        proc.kill()
        proc.wait()
    return {"targets": TARGETS, "first_round_s": first, "window_s": wall,
            "probes_per_cycle": probes * CYCLE / wall,
            "cpu_s_per_cycle": cpu * CYCLE / wall,
            "down_or_unknown": sum(1 for s in states if s is not State.UP)}


def startup(work: Path, sockets: Path, domains: int = 10000) -> dict[str, float]:
    with FakePrimary() as mx1:
        sock = GuardSocket.unix(sockets, "guard-start")
        text = guard_config(sock.guard, [GuardedDomain(f"d{i}.example", mx1.address)
                                         for i in range(domains)])
        guard = GuardProcess(text, work, "guard-start")
        started = time.perf_counter()
        guard.start()
        try:
            wait_until(sock.accepts, 60, interval=0.01, message="the guard's socket")
            ready = time.perf_counter() - started
            guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up", 30)
            time.sleep(1.0)
            assert guard.proc is not None
            status = Path(f"/proc/{guard.proc.pid}/status").read_text()
            rss_kb = int(next(line.split()[1] for line in status.splitlines()
                              if line.startswith("VmRSS:")))
        finally:
            guard.stop()
    return {"domains": domains, "start_s": ready, "rss_mb": rss_kb / 1024}


def run(work: Path, sockets: Path) -> dict[str, Any]:
    return {
        "decide": {str(n): decide_bench(n) for n in (100, 10000)},
        "probe_cycle": probe_cycle(),
        "startup": startup(work, sockets),
    }


if __name__ == "__main__":  # a quick look at the decision alone
    print(textwrap.indent(str(decide_bench(100)), "  "))
