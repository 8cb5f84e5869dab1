"""``make bench``: what the guard costs a real Postfix, as ratios measured in one run.

One private Postfix relays mail for a guarded domain (action flag, primary up, so
every message is decided and gets the header) to a sink. The same SMTP transaction
(EHLO, MAIL, RCPT, DATA, QUIT from an untrusted loopback address) is timed with:
  none   no milter at all
  noop   a no-op pymilter milter (libmilter's own cost, the floor for any milter)
  guard  mx-guard run
switching ``smtpd_milters`` between rounds and rotating the order, so machine noise
spreads over all three. Both milters listen on Unix sockets. Reported: medians and
95th percentiles per message, and the ratios guard/noop and guard/none; plus the
decision function alone, against a dict lookup measured in the same process.
Machines here are shared and noisy: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import grp
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from guard.config import parse_config
from guard.health import HealthSnapshot, Observation, State, Target
from guard.mxset import MxSet
from guard.policy import Connection, client_address, decide
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.postfix import PostfixMTA
from tests.support.smtp import MilterProcess, make_socket_dir, send
from tests.support.smtpserver import SmtpSink

ROUNDS = 6
PER_ROUND = 25
CLIENT = "127.0.0.2"  # untrusted: the guard decides every message

NOOP_MILTER = """
import sys, Milter
class Noop(Milter.Base):
    pass
Milter.factory = Noop
Milter.runmilter("noop", sys.argv[1], 10)
"""


def shareable_socket_dir() -> Path:
    """A setgid directory of group postfix: sockets made in it are Postfix's to use."""
    d = make_socket_dir()
    os.chown(d, 0, grp.getgrnam("postfix").gr_gid)
    os.chmod(d, 0o2770)
    return d


def mta_bench(work: Path) -> dict[str, list[float]]:
    sockets = shareable_socket_dir()
    try:
        with SmtpSink() as sink, FakePrimary() as mx1:
            guard_sock = sockets / "guard.sock"
            noop_sock = sockets / "noop.sock"
            script = work / "noop.py"
            script.write_text(NOOP_MILTER)
            noop = MilterProcess(script, f"unix:{noop_sock}").start()
            guard = GuardProcess(guard_toml(f"unix:{guard_sock}", mx1.port), work).start()
            try:
                guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
                milters = {"none": "", "noop": f"unix:{noop_sock}",
                           "guard": f"unix:{guard_sock}"}
                with PostfixMTA(relay_domains=["flagged.example"],
                                next_hop=("127.0.0.1", sink.port),
                                workdir=work / "postfix") as mta:
                    return _rounds(mta, milters)
            finally:
                guard.stop()
                noop.stop()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _rounds(mta: PostfixMTA, milters: dict[str, str]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in milters}
    names = list(milters)
    for r in range(ROUNDS):
        order = names[r % 3:] + names[:r % 3]
        for name in order:
            mta.set_main(smtpd_milters=milters[name])
            send(mta.host, mta.port, "a@client.example", "user@flagged.example",
                 source=CLIENT)  # warm the new smtpd and the milter connection path
            for _ in range(PER_ROUND):
                started = time.perf_counter()
                result = send(mta.host, mta.port, "a@client.example", "user@flagged.example",
                              source=CLIENT)
                samples[name].append(time.perf_counter() - started)
                if not result.data or result.data[0] != 250:
                    raise SystemExit(f"{name}: message not accepted: {result}")
    return samples


def decide_bench() -> tuple[float, float]:
    config = parse_config({
        "self": {"names": ["mx2.example.org"]},
        "domain": [{"name": "example.org", "mx": [
            {"host": "mx1.example.org", "preference": 10, "addresses": ["192.0.2.1"]},
            {"host": "mx2.example.org", "preference": 20}]}],
    })
    now = time.time()
    snapshot = HealthSnapshot.build(
        [Observation(Target("192.0.2.1"), "mx2", State.UP, now - 600, now)], now, "bench")
    dom = config.domain("example.org")
    assert dom is not None and dom.mx is not None
    mxset = MxSet("example.org", dom.mx)
    conn = Connection(client_address("203.0.113.7"), now)
    table = {"example.org": mxset}

    def per_call(fn: Callable[[], object], n: int = 20000) -> float:
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - started) / n)
        return statistics.median(runs)

    return (per_call(lambda: decide(conn, "example.org", mxset, snapshot, config)),
            per_call(lambda: table.get("example.org")))


def p95(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.95) - 1]


def main() -> int:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"mx-guard-bench-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        samples = mta_bench(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in samples.items()}
    print(f"Postfix, one message per SMTP session, {ROUNDS}x{PER_ROUND} per setup:")
    for name, values in samples.items():
        print(f"  {name:<6} median {med[name] * 1000:7.2f} ms   p95 {p95(values) * 1000:7.2f} ms")
    print(f"  ratio guard/noop {med['guard'] / med['noop']:.2f}   "
          f"guard/none {med['guard'] / med['none']:.2f}   "
          f"noop/none {med['noop'] / med['none']:.2f}")
    decision, lookup = decide_bench()
    print(f"decide(): {decision * 1e6:.1f} us per call, {decision / lookup:.0f}x a dict lookup "
          f"({lookup * 1e9:.0f} ns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
