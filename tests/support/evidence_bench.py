"""Measurements of the evidence paths, for ``make bench``:

- ``witness_latency``: from the moment an MTA sends a connect to a witness guard until
  the client's record is readable in Redis by a secondary (SPEC: p99 within 100 ms);
- ``bypass_latency``: the RCPT callback of a secondary whose bypasses look up their
  evidence in Redis, under N concurrent milter clients (median and p99).

Both run the real ``mx-guard run`` against a private redis-server; the clients are the
independent milter-protocol client. Run alone: ``python -m tests.support.evidence_bench``.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.milterclient import MilterClient
from tests.support.redis_server import RedisServer


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def witness_latency(samples: int = 400) -> dict[str, Any]:
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis = stack.enter_context(RedisServer(unix_socket=False))
        socket = f"unix:{tmp}/witness.sock"
        config = (f'[milter]\nsocket = "{socket}"\n[self]\nnode = "mx1"\n'
                  f'[store]\nurl = "{redis.url}"\n[witness]\nrole = "witness"\n'
                  '[release]\nipv4_prefix = 32\n')
        witness = stack.enter_context(GuardProcess(config, Path(tmp), "witness"))
        witness.start()
        witness.wait_for_log("milter listening")
        reader = redis.client()
        delays = []
        for n in range(samples):
            client = f"10.{n // 250}.{n % 250}.1"
            key = f"mxguard:wit:{client}/32"
            with MilterClient(socket, timeout=2) as c:
                started = time.perf_counter()
                c.connect("client.example", client, 40000)
                while not reader.exists(key):
                    if time.perf_counter() - started > 2:
                        raise AssertionError(f"no witness record for {client} within 2 s")
                delays.append(time.perf_counter() - started)
                c.quit()
        return {"samples": samples, "p50_ms": statistics.median(delays) * 1000,
                "p99_ms": percentile(delays, 99) * 1000, "max_ms": max(delays) * 1000}


def bypass_latency(clients: int = 8, per_client: int = 150) -> dict[str, Any]:
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis = stack.enter_context(RedisServer(unix_socket=False))
        primary = stack.enter_context(FakePrimary())
        socket = f"unix:{tmp}/guard.sock"
        guard = stack.enter_context(GuardProcess(
            guard_toml(socket, primary.port, store=redis.url), Path(tmp), "guard"))
        guard.start()
        guard.wait_for_log(r"target \S+:\d+ is up")
        guard.wait_for_log("milter listening")
        elapsed: list[float] = []
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run(worker: int) -> None:
            try:
                for n in range(per_client):
                    with MilterClient(socket, timeout=2) as c:
                        c.connect("client.example", f"203.0.{worker}.{n % 250 + 1}", 40000)
                        c.helo("client.example")
                        c.mail(f"<s{n}@sender.example>")
                        reply = c.rcpt("<user@example.org>")
                        assert reply.is_tempfail, reply
                        c.abort()
                    with lock:
                        elapsed.append(reply.elapsed)
            except BaseException as e:  # reported by the caller
                errors.append(e)

        threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        stats = redis.admin.info("commandstats")
        scripts = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        return {"clients": clients, "rcpts": len(elapsed),
                "p50_ms": statistics.median(elapsed) * 1000,
                "p99_ms": percentile(elapsed, 99) * 1000, "max_ms": max(elapsed) * 1000,
                "evidence_scripts": scripts}


def run(work: Path, sockets: Path) -> dict[str, Any]:
    """The bench section: its own Redis, guards and sockets (work and sockets unused)."""
    return {"witness": witness_latency(),
            "bypass": {str(n): bypass_latency(clients=n) for n in (1, 8)}}


def main() -> None:
    w = witness_latency()
    print(f"witness connect -> record readable: p50 {w['p50_ms']:.2f} ms, "
          f"p99 {w['p99_ms']:.2f} ms, max {w['max_ms']:.2f} ms ({w['samples']} samples)")
    for n in (1, 8):
        b = bypass_latency(clients=n)
        print(f"bypass RCPT with Redis evidence, {n} client(s): p50 {b['p50_ms']:.2f} ms, "
              f"p99 {b['p99_ms']:.2f} ms, max {b['max_ms']:.2f} ms ({b['rcpts']} RCPTs, "
              f"{b['evidence_scripts']} evidence round trips)")


if __name__ == "__main__":
    main()
