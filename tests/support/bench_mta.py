"""Bench, through real MTAs: what the guard costs Postfix and Sendmail per message.

Postfix: one private instance with one smtpd listener per setup (master.cf ``-o``
overrides), relaying flagged.example to Postfix's own ``smtp-sink``:
  none        no milter
  noop        a no-op pymilter milter with the guard's callbacks (bench_milter.py),
              Unix socket: libmilter's and pymilter's own cost
  guard-unix  mx-guard run on a Unix socket
  guard-inet  mx-guard run on a TCP socket on loopback
Each message is decided on the bypass path (untrusted client, healthy primary, flag:
the header is added). Timed: one SMTP session at a time with a Python client (p50 and
p95 per message), and ``smtp-source`` (one message per session) at 1 and 20 sessions
at once, as messages per second. Sendmail: one instance per guard socket (Unix and
TCP), the same sequential session, p50 per message. Rounds rotate the order.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.bench_milter import NOOP_MILTER
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.postfix import PostfixMTA
from tests.support.sendmail import SendmailMTA
from tests.support.smtp import (
    GuardedDomain,
    GuardSocket,
    MilterProcess,
    guard_config,
    send,
    wait_for_port,
    wait_until,
)
from tests.support.smtpserver import free_port

ROUNDS = 4
PER_ROUND = 15  # sequential sessions per setup and round
SOURCE_MESSAGES = {1: 60, 20: 300}  # smtp-source messages per run, by sessions at once
CLIENT = "127.0.0.2"
SENDER, RCPT = "a@client.example", "user@flagged.example"



def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _one(host: str, port: int) -> float:
    started = time.perf_counter()
    result = send(host, port, SENDER, RCPT, source=CLIENT)
    elapsed = time.perf_counter() - started
    if not result.data or result.data[0] != 250:
        raise SystemExit(f"{host}:{port}: message not accepted: {result}")
    return elapsed


def _sequential(listeners: dict[str, tuple[str, int]]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in listeners}
    names = list(listeners)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            host, port = listeners[name]
            _one(host, port)  # warm this listener's smtpd and its milter connection
            samples[name] += [_one(host, port) for _ in range(PER_ROUND)]
    return samples


def _smtp_source(host: str, port: int, sessions: int, messages: int) -> float:
    """Messages per second that smtp-source gets accepted (one message per session)."""
    started = time.perf_counter()
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(messages),
                    "-f", SENDER, "-t", RCPT, "-l", "1024", f"{host}:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    return messages / (time.perf_counter() - started)


def _throughput(listeners: dict[str, tuple[str, int]]) -> dict[int, dict[str, list[float]]]:
    out: dict[int, dict[str, list[float]]] = {}
    names = list(listeners)
    for sessions, messages in SOURCE_MESSAGES.items():
        out[sessions] = {name: [] for name in names}
        for r in range(3):
            for name in names[r % len(names):] + names[:r % len(names)]:
                out[sessions][name].append(_smtp_source(*listeners[name], sessions, messages))
    return out


class SmtpSinkProcess:
    """Postfix's smtp-sink: accepts and drops mail, fast, in C."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSinkProcess:
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{self.port}",
                                      "256"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def _guards(stack: contextlib.ExitStack, work: Path, sockets: Path,
            domain: GuardedDomain) -> dict[str, tuple[GuardSocket, GuardProcess]]:
    """The guard on a Unix and on a TCP socket, each stopped when ``stack`` closes."""
    out = {}
    for name, sock in (("unix", GuardSocket.unix(sockets, "guard-mta")),
                       ("inet", GuardSocket.inet())):
        # No trusted network: smtp-source connects from 127.0.0.1, and every message
        # must take the bypass path.
        text = guard_config(sock.guard, [domain], trusted_networks=())
        guard = GuardProcess(text, work, f"guard-mta-{name}").start()
        stack.callback(guard.stop)
        out[name] = (sock, guard)
    for sock, guard in out.values():
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        wait_until(sock.accepts, 15, message=f"guard on {sock.guard}")
    return out


def run(work: Path, sockets: Path) -> dict[str, Any]:
    script = work / "noop_plain.py"
    script.write_text(NOOP_MILTER)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        mx1 = stack.enter_context(FakePrimary())
        sink = stack.enter_context(SmtpSinkProcess())
        domain = GuardedDomain("flagged.example", mx1.address, action="flag")
        stack.enter_context(MilterProcess(script, f"unix:{sockets}/noop-mta.sock"))
        guards = _guards(stack, work, sockets, domain)
        milters = {"none": "", "noop": f"unix:{sockets}/noop-mta.sock",
                   "guard-unix": guards["unix"][0].postfix,
                   "guard-inet": guards["inet"][0].postfix}
        with PostfixMTA(relay_domains=["flagged.example"],
                        next_hop=("127.0.0.1", sink.port),
                        mynetworks=["127.0.0.1/32"],
                        listeners={n: {"smtpd_milters": m} for n, m in milters.items()},
                        workdir=work / "postfix") as mta:
            listeners = {n: mta.listener(n) for n in milters}
            seq = _sequential(listeners)
            results["postfix_sequential"] = {
                n: {"p50_ms": p(v, 0.5) * 1000, "p95_ms": p(v, 0.95) * 1000}
                for n, v in seq.items()}
            tput = _throughput(listeners)
            results["postfix_msgs_per_s"] = {
                s: {n: statistics.median(v) for n, v in by.items()}
                for s, by in tput.items()}
        results["sendmail_sequential"] = _sendmail(work, guards, sink.port)
    return results


def _sendmail(work: Path, guards: dict[str, tuple[GuardSocket, GuardProcess]],
              sink_port: int) -> dict[str, dict[str, float]]:
    mtas = {name: SendmailMTA(sock.postfix, relay_domains=["flagged.example"],
                              next_hop=("127.0.0.1", sink_port), milter_flags="",
                              workdir=work / f"sendmail-{name}")
            for name, (sock, _) in guards.items()}
    try:
        for m in mtas.values():
            m.start()
        seq = _sequential({n: m.address for n, m in mtas.items()})
    finally:
        for m in mtas.values():
            m.stop()
    for name in mtas:
        shutil.rmtree(work / f"sendmail-{name}", ignore_errors=True)
    return {n: {"p50_ms": p(v, 0.5) * 1000, "p95_ms": p(v, 0.95) * 1000}
            for n, v in seq.items()}
