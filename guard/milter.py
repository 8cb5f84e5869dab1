"""Milter glue: translates libmilter callbacks into decisions and decisions into replies.

Contracts:
- Every callback catches its own exceptions, logs them and answers CONTINUE: a broken
  guard lets mail through (``Milter.set_exception_policy`` is set to match).
- Callbacks that only collect data are ``@noreply``; only the macros used are
  requested (see ``negotiate``).
- Nothing here waits on the store or DNS: ``Guard.decide`` reads in-memory state.
- A recipient is decided at RCPT: tempfail/reject there, per recipient; a flag becomes
  one header at end of message. Incoming headers with our name are always removed.
- One log line per decision, with the queue id where the MTA has given it (Postfix
  sends ``i`` only at end of message); everything the client sent is escaped.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import Milter

from guard import metrics
from guard.config import Action
from guard.logsafe import printable
from guard.milter_socket import nodelay_on_open
from guard.policy import Connection, Reason, Verdict, client_address, recipient_domain
from guard.service import Guard

log = logging.getLogger("guard.milter")

NO_QUEUE_ID = "NOQUEUE"
MILTER_NAME = "mx-guard"

F = TypeVar("F", bound=Callable[..., Any])

# pymilter is untyped; these typed aliases keep mypy --strict meaningful here.
CONTINUE: int = Milter.CONTINUE
TEMPFAIL: int = Milter.TEMPFAIL
REJECT: int = Milter.REJECT


def noreply(func: F) -> F:
    return cast(F, Milter.noreply(func))


def nocallback(func: F) -> F:
    return cast(F, Milter.nocallback(func))


# The macros each stage needs; nothing else is requested. pymilter 1.0.5's @symlist
# hands libmilter bytes where it wants str, which fails and silently drops the whole
# negotiation (no macro lists, no "no reply" steps); negotiate() below asks directly.
MACROS_WANTED = {
    Milter.M_CONNECT: "{client_addr}",
    Milter.M_ENVFROM: "{auth_authen}",
    Milter.M_ENVRCPT: "i",
    Milter.M_EOM: "i",
}

# Which verdict explains a message best when recipients got different ones.
_HEADER_PRECEDENCE = [Reason.BYPASS, Reason.HEALTH_UNKNOWN, Reason.MX_UNKNOWN,
                      Reason.PRIMARY_DOWN, Reason.UNREACHABLE]


def fail_open(callback: F) -> F:
    """Run a callback; on any exception log it and answer CONTINUE."""

    name = callback.__name__
    latency = metrics.CALLBACK_SECONDS.labels(name)
    failures = metrics.CALLBACK_FAILURES.labels(name)

    @functools.wraps(callback)
    def guarded(self: GuardMilter, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return callback(self, *args)
        except Exception:
            failures.inc()
            log.exception("conn=%s %s callback failed; letting the mail through",
                          self.conn_id, name)
            return CONTINUE
        finally:
            latency.observe(time.perf_counter() - started)

    return guarded  # type: ignore[return-value]


@dataclass(frozen=True)
class _Decision:
    recipient: str
    verdict: Verdict


class GuardMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (libmilter calls us from its own threads)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.conn_id = Milter.uniqueID()
        self.client_raw: str | None = None
        self.helo = ""
        self.connected_at = time.time()
        self._reset()

    def _reset(self) -> None:
        self.sender = ""
        self.authenticated = False
        self.decisions: list[_Decision] = []
        self.forged_headers = 0

    # -- callbacks -----------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        if opts[0] & Milter.SETSYMLIST:
            for stage, macros in MACROS_WANTED.items():
                self._ctx.setsymlist(stage, macros)
        return cast(int, super().negotiate(opts))

    @noreply
    @fail_open
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.connected_at = time.time()
        # libmilter gives (address, port, ...) for TCP clients; Unix-socket and
        # unknown clients carry no address, and then {client_addr} is all we have.
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_raw = str(hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr)
        else:
            self.client_raw = self._macro("{client_addr}")
        return CONTINUE

    @noreply
    @fail_open
    def hello(self, hostname: str) -> int:
        self.helo = hostname
        return CONTINUE

    @noreply
    @fail_open
    def envfrom(self, sender: str, *params: str) -> int:
        self._flush_pending("transaction reset")
        self._reset()
        self.sender = sender
        self.authenticated = bool(self._macro("{auth_authen}"))
        return CONTINUE

    @fail_open
    def envrcpt(self, recipient: str, *params: str) -> int:
        domain = recipient_domain(recipient)
        if domain is None:
            return CONTINUE  # the MTA judges the syntax; nothing for us to guard
        conn = Connection(client_address(self.client_raw), self.helo, self.authenticated,
                          self.connected_at)
        verdict = self.guard.decide(conn, domain)
        if verdict.action in (Action.TEMPFAIL, Action.REJECT):
            policy = self.guard.config.policy
            template = policy.reply if verdict.action is Action.TEMPFAIL else policy.reject_reply
            reply = template.for_domain(domain)
            self.setreply(reply.code, reply.enhanced, reply.text)
            self._log(self._macro("i") or NO_QUEUE_ID, recipient, verdict)
            return TEMPFAIL if verdict.action is Action.TEMPFAIL else REJECT
        self.decisions.append(_Decision(recipient, verdict))
        return CONTINUE

    @fail_open
    def data(self) -> int:
        # Answered on purpose: Postfix sends the DATA macros even for a skipped step and
        # flushes them before the headers; over TCP, with nothing to answer, our delayed
        # ACK holds its next write behind Nagle for 40 ms. One small reply is cheaper.
        return CONTINUE

    @noreply
    @fail_open
    def header(self, name: str, value: str) -> int:
        if name.lower() == self.guard.config.policy.header.lower():
            self.forged_headers += 1
        return CONTINUE

    @nocallback
    def eoh(self) -> int:
        return CONTINUE

    @nocallback
    def body(self, chunk: bytes) -> int:
        return CONTINUE

    @fail_open
    def eom(self) -> int:
        try:
            # Decisions are logged first: a header change the MTA refuses must not
            # cost the log its record of what was decided.
            queue_id = self._macro("i") or NO_QUEUE_ID
            for d in self.decisions:
                self._log(queue_id, d.recipient, d.verdict)
            name = self.guard.config.policy.header
            # Highest index first, so the indexes still to delete do not shift.
            for index in range(self.forged_headers, 0, -1):
                self.chgheader(name, index, "")
            if self.forged_headers:
                log.info("%s: conn=%s removed %d forged %s header(s)", printable(queue_id, 32),
                         self.conn_id, self.forged_headers, name)
            flagged = [d.verdict for d in self.decisions if d.verdict.adds_header]
            if flagged:
                self.addheader(name, self._header_value(flagged))
        finally:
            self._reset()
        return CONTINUE

    @fail_open
    def abort(self) -> int:
        self._flush_pending("transaction aborted")
        self._reset()
        return CONTINUE

    @fail_open
    def close(self) -> int:
        self._flush_pending("connection closed")
        return CONTINUE

    # -- helpers ---------------------------------------------------------------------

    def _macro(self, name: str) -> str | None:
        """A macro's value; pymilter raises on one that is not UTF-8, we escape it."""
        try:
            value = self.getsymval(name)
        except UnicodeDecodeError as e:
            return printable(e.object, 64)
        return None if value is None else str(value)

    def _header_value(self, flagged: list[Verdict]) -> str:
        flagged.sort(key=lambda v: _HEADER_PRECEDENCE.index(v.reason)
                     if v.reason in _HEADER_PRECEDENCE else len(_HEADER_PRECEDENCE))
        value = flagged[0].header_value(self.guard.config.me.node)
        others = sorted({v.domain for v in flagged} - {flagged[0].domain})
        if others:
            value += f"; also={','.join(others)}"
        return value

    def _flush_pending(self, why: str) -> None:
        for d in self.decisions:
            self._log(NO_QUEUE_ID, d.recipient, d.verdict, note=why)
        self.decisions = []

    def _log(self, queue_id: str, recipient: str, verdict: Verdict, note: str = "") -> None:
        metrics.DECISIONS.labels(str(verdict.action), str(verdict.reason)).inc()
        log.info(
            "%s: conn=%s client=%s helo=%s from=<%s> rcpt=<%s> domain=%s action=%s "
            "reason=%s%s detail=%s",
            printable(queue_id, 32), self.conn_id, printable(self.client_raw, 64),
            printable(self.helo, 80), printable(self.sender.strip("<>"), 120),
            printable(recipient.strip("<>"), 120), printable(verdict.domain, 80),
            verdict.action, verdict.reason, f" note={note}" if note else "",
            printable(verdict.detail, 400),
        )


def serve(guard: Guard) -> None:
    """Run the milter until libmilter stops (SIGTERM, SIGINT or SIGHUP)."""
    socket_spec = guard.config.milter.socket
    # The MTA's group must reach a Unix socket (and a directory we make); nobody else.
    os.umask(0o007)
    kind, _, path = socket_spec.partition(":")
    if kind in ("unix", "local"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    Milter.factory = lambda: GuardMilter(guard)
    Milter.set_exception_policy(Milter.CONTINUE)
    log.info("milter listening on %s", socket_spec)
    with nodelay_on_open(socket_spec):
        Milter.runmilter(MILTER_NAME, socket_spec, int(guard.config.milter.timeout))
    log.info("milter stopped")
