"""The guard scenarios test_postfix_guard.py and test_sendmail_guard.py both run.

Both modules build the same site (``stage``): a sink the MTA relays to, a fake
primary ``mx1`` for TEMPFAIL and FLAGGED that stays up, another for FAILOVER that
the tests stop, and guards (a ``GuardFleet``) with their sockets. A scenario gets
a ``Secondary``: where clients connect, the guard deciding there, the sink, and
how that MTA words the queue id. Each scenario makes the assertions both MTAs
share; a test module adds what only its MTA shows (its own log lines, say).

Clients connect from UNTRUSTED (127.0.0.2): outside the MTA's trusted clients and
the guard's trusted_networks (127.0.0.1/32), yet allowed to relay to the backup-MX
domains, like any Internet client reaching a backup MX.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.smtp import (
    GuardedDomain,
    GuardFleet,
    HarnessError,
    SendResult,
    guard_socket_dir,
    send,
)
from tests.support.smtpserver import ReceivedMessage, SmtpSink

SENDER = "sender@client.test.example"
UNTRUSTED = "127.0.0.2"  # not trusted by the MTA, not in the guard's trusted_networks

TEMPFAIL = "example.org"  # guarded, action tempfail (the default)
FLAGGED = "flagged.example"  # guarded, action flag
FAILOVER = "failover.example"  # guarded, its own primary: the tests stop that one
PLAIN = "plain.example"  # relayed by the MTA, not guarded

FORGED = ("X-MX-Guard: primary-down; domain=whatever; node=mx2",
          "x-mx-guard: trusted; forged in lower case")

_serial = itertools.count(1)


def require_harness(check: Callable[[], object]) -> None:
    """Fail (not skip) the test when *check* finds the MTA harness missing."""
    try:
        check()
    except HarnessError as exc:
        pytest.fail(f"e2e MTA harness unavailable: {exc}", pytrace=False)


def rcpt(domain: str, tag: str) -> str:
    """A recipient no other test uses, to find its decision in the logs."""
    return f"{tag}-{next(_serial)}@{domain}"


def reply_451(domain: str) -> tuple[int, str]:
    return 451, f"4.7.1 Please deliver mail for {domain} to its primary MX"


def flag_header(domain: str, client: str, node: str = "mx2") -> str:
    return (rf"bypass; domain={re.escape(domain)}; primary=mx1\.example\.org up since "
            rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ; client={re.escape(client)}; "
            rf"node={re.escape(node)}")


def decision(guard: GuardProcess, recipient: str, after: int = 0,
             timeout: float = 10.0) -> re.Match[str]:
    """The guard's log line for *recipient*: groups qid, client, action, reason, detail."""
    return guard.wait_for_log(
        r"guard\.decision: (?P<qid>\S+): conn=\d+ client=(?P<client>\S+) [^\n]*"
        rf"rcpt=<{re.escape(recipient)}> domain=\S+ action=(?P<action>\S+) "
        r"reason=(?P<reason>\S+)(?: note=\S+)? detail=(?P<detail>[^\n]*)",
        timeout, after)


def queue_id_in(result: SendResult, pattern: str) -> str:
    """The queue id (group 1 of *pattern*) in the MTA's 250 reply to DATA."""
    assert result.data is not None and result.data[0] == 250, result
    found = re.search(pattern, result.data[1])
    assert found, result
    return found.group(1)


def delivered(sink: SmtpSink, recipient: str) -> ReceivedMessage:
    msg = sink.wait_for_message(recipient, timeout=10)
    assert msg.rcpt_tos == [recipient], msg.rcpt_tos
    return msg


def message_with(to: str, *headers: str) -> bytes:
    lines = [f"From: <{SENDER}>", f"To: <{to}>", "Subject: forged guard header",
             f"Message-ID: <forged-{next(_serial)}@client.test.example>", *headers, "",
             "hello"]
    return ("\r\n".join(lines) + "\r\n").encode()


# ---------------------------------------------------------------------------------
# the site


@dataclass
class Stage:
    """What every site has before its MTA: see the module docstring."""

    sockets: Path  # the guards' socket directory (guard_socket_dir)
    sink: SmtpSink
    mx1: FakePrimary  # primary of TEMPFAIL and FLAGGED: always up
    failover_mx1: FakePrimary  # primary of FAILOVER
    fleet: GuardFleet
    domains: list[GuardedDomain]


def stage(stack: contextlib.ExitStack, workdir: Path) -> Stage:
    """Start the sink and both primaries; everything is undone when *stack* closes."""
    sockets = guard_socket_dir()
    stack.callback(shutil.rmtree, sockets, ignore_errors=True)
    sink = stack.enter_context(SmtpSink())
    mx1 = stack.enter_context(FakePrimary())
    failover_mx1 = stack.enter_context(FakePrimary())
    domains = [GuardedDomain(TEMPFAIL, mx1.address),
               GuardedDomain(FLAGGED, mx1.address, action="flag"),
               GuardedDomain(FAILOVER, failover_mx1.address)]
    fleet = GuardFleet(workdir)
    stack.callback(fleet.stop_all)
    return Stage(sockets, sink, mx1, failover_mx1, fleet, domains)


@dataclass(frozen=True)
class Secondary:
    """One way into the secondary MX under test."""

    address: tuple[str, int]  # where clients connect
    guard: GuardProcess  # the guard that decides there
    sink: SmtpSink  # where the MTA relays what it accepts
    queued: str  # a pattern whose group 1 is the queue id in the reply to DATA

    def send(self, to: list[str], message: bytes | None = None, *,
             source: str = UNTRUSTED) -> SendResult:
        return send(*self.address, SENDER, to, message, source=source)

    def queue_id(self, result: SendResult) -> str:
        return queue_id_in(result, self.queued)


# ---------------------------------------------------------------------------------
# the scenarios


def bypass_is_tempfailed_at_rcpt(mx: Secondary, tag: str) -> str:
    """A client that skipped the primary gets 451 at RCPT; returns the recipient."""
    to = rcpt(TEMPFAIL, tag)
    result = mx.send([to])
    assert result.rcpts[to] == reply_451(TEMPFAIL), result
    assert result.data is None, "no recipient left, so no DATA"
    line = decision(mx.guard, to)
    assert (line["client"], line["action"], line["reason"]) == (UNTRUSTED, "tempfail",
                                                                 "bypass"), line[0]
    return to


def bypass_is_flagged_with_a_header(mx: Secondary, tag: str) -> None:
    to = rcpt(FLAGGED, tag)
    qid = mx.queue_id(mx.send([to]))
    [header] = delivered(mx.sink, to).headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header
    # The queue id reaches the guard at end of message: its log line names it.
    line = decision(mx.guard, to)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "flag", "bypass"), line[0]


def fallback_while_the_primary_is_down(mx: Secondary, primary: FakePrimary) -> re.Match[str]:
    """Tempfailed while *primary* is up; stopped, it is down and mail is accepted
    (no header); returns that decision."""
    guard = mx.guard
    to = rcpt(FAILOVER, "while-up")
    assert mx.send([to]).rcpts[to] == reply_451(FAILOVER)

    mark = len(guard.log())
    host, port = primary.address
    primary.stop()
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is down", after=mark)
    to = rcpt(FAILOVER, "while-down")
    qid = mx.queue_id(mx.send([to]))
    msg = delivered(mx.sink, to)
    assert msg.headers("X-MX-Guard") == [], "flag_all = false: no header on fallback mail"
    line = decision(guard, to, mark)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "primary-down")
    return line


def primary_back_within_down_grace(mx: Secondary, primary: FakePrimary) -> None:
    """*primary* restarted on its port is up, and mail is still accepted, with the
    header: it failed a probe within down_grace (on_recently_down = "flag")."""
    guard = mx.guard
    mark = len(guard.log())
    host, port = primary.address
    primary.start()  # same port: the primary is back
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is up", after=mark)
    to = rcpt(FAILOVER, "back-in-grace")
    mx.queue_id(mx.send([to]))
    msg = delivered(mx.sink, to)
    assert [h.split(";")[0] for h in msg.headers("X-MX-Guard")] == ["recently-down"]
    line = decision(guard, to, mark)
    assert (line["action"], line["reason"]) == ("flag", "recently-down"), line[0]
    assert "failed a probe within down_grace" in line["detail"], line[0]


def trusted_network_client_is_accepted(mx: Secondary) -> re.Match[str]:
    """Returns the guard's decision."""
    to = rcpt(TEMPFAIL, "trusted-net")
    mx.queue_id(mx.send([to], source="127.0.0.1"))
    assert delivered(mx.sink, to).headers("X-MX-Guard") == []
    line = decision(mx.guard, to)
    assert (line["client"], line["action"], line["reason"]) == ("127.0.0.1", "accept",
                                                                 "trusted"), line[0]
    return line


def each_recipient_is_decided_on_its_own(mx: Secondary) -> str:
    """A guarded and a plain recipient in one transaction: only the plain one is
    accepted and delivered. Returns the guarded recipient."""
    guarded, plain = rcpt(TEMPFAIL, "mixed"), rcpt(PLAIN, "mixed")
    result = mx.send([guarded, plain])
    assert result.rcpts[guarded] == reply_451(TEMPFAIL), result
    assert result.rcpts[plain][0] == 250, result
    qid = mx.queue_id(result)
    assert delivered(mx.sink, plain).headers("X-MX-Guard") == []
    assert mx.sink.messages_for(guarded) == []
    line = decision(mx.guard, plain)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "not-secondary")
    return guarded


def forged_headers_are_removed(mx: Secondary, client: str) -> None:
    to = rcpt(PLAIN if client == UNTRUSTED else TEMPFAIL, "forged")
    mark = len(mx.guard.log())
    mx.queue_id(mx.send([to], message_with(to, *FORGED), source=client))
    msg = delivered(mx.sink, to)
    assert msg.headers("X-MX-Guard") == [], msg.data.decode(errors="replace")
    assert msg.header("Subject") == "forged guard header"
    mx.guard.wait_for_log(r"removed 2 forged X-MX-Guard header\(s\)", after=mark)


def a_flagged_message_keeps_only_the_guards_header(mx: Secondary) -> None:
    to = rcpt(FLAGGED, "forged-flag")
    forged = f"X-MX-Guard: bypass; domain={FLAGGED}; client=192.0.2.1; node=evil"
    mx.queue_id(mx.send([to], message_with(to, forged)))
    [header] = delivered(mx.sink, to).headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header


def inet_milter_sockets_have_nodelay(mx: Secondary) -> None:
    """The guard's TCP milter socket, and the connection the MTA opened to it for an
    SMTP session, both have TCP_NODELAY: no 40 ms Nagle stall per message."""
    import tomllib

    from tests.support.smtp import smtp_session, wait_until
    from tests.support.sockopts import tcp_sockets

    spec = tomllib.loads(mx.guard.config.read_text())["milter"]["socket"]
    kind, _, where = spec.partition(":")
    assert kind == "inet", spec
    port = int(where.partition("@")[0])
    assert mx.guard.proc is not None
    pid = mx.guard.proc.pid
    client = smtp_session(*mx.address, source=UNTRUSTED)  # the MTA connects to the milter
    try:
        accepted = wait_until(
            lambda: [s for s in tcp_sockets(pid, port) if not s.listening], 10,
            message="the MTA's connection to the guard")
        listening = [s for s in tcp_sockets(pid, port) if s.listening]
    finally:
        client.quit()
    assert listening and all(s.nodelay for s in listening), listening
    assert all(s.nodelay for s in accepted), accepted
