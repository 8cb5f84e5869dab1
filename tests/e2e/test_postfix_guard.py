"""MX Guard end to end behind a real Postfix secondary MX.

The real guard (``python -m guard run``) probes real SMTP listeners on loopback that
stand in for the primary MX; a private Postfix, backup MX for the test domains, relays
what it accepts to a sink. Every scenario is judged by what the SMTP client and the
sink see, and by the guard's decision log.

The Postfix settings under test (the README quotes them; the rest of main.cf is the
harness's private-instance plumbing, see postfix.py):

    smtpd_milters = unix:/.../guard.sock          (or inet:127.0.0.1:PORT)
    milter_default_action = accept
    milter_protocol = 6
    milter_connect_macros = j {daemon_name} {daemon_addr} v _ {client_addr}
    milter_connect_timeout = 5s
    milter_command_timeout = 5s
    milter_content_timeout = 10s

(every other milter_*_macros at Postfix's default). The guard's socket directory is
group postfix, mode 2750 (setgid), so the socket the guard creates is root:postfix 0770.

Clients connect from 127.0.0.2 and up: outside Postfix's mynetworks (127.0.0.1/32) and
the guard's trusted_networks, yet allowed to relay to relay_domains, like any Internet
client reaching a backup MX. One Postfix serves the module: its main listener uses the
Unix-socket guard and extra listeners (master.cf ``-o`` overrides) reach the other
guards, so one start (about 2.5 s) covers every single-node scenario.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.guardproc import GuardProcess
from tests.redis_server import RedisServer, redis_server_available

from .postfix import PostfixMTA, check_postfix_tools
from .smtp import (
    FakePrimaryMX,
    GuardedDomain,
    GuardFleet,
    GuardSocket,
    HarnessError,
    ReceivedMessage,
    SendResult,
    SmtpSink,
    guard_socket_dir,
    send,
    smtp_session,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
SENDER = "sender@client.test.example"
UNTRUSTED = "127.0.0.2"  # not in mynetworks, not in the guard's trusted_networks
SASL_USER, SASL_PASSWORD = "alice@mx2.test.example", "s3cret-alice"

TEMPFAIL = "example.org"  # guarded, action tempfail (the default)
FLAGGED = "flagged.example"  # guarded, action flag
FAILOVER = "failover.example"  # guarded, its own primary: the tests stop that one
PLAIN = "plain.example"  # relayed by Postfix, not guarded

# Postfix 3.7's defaults, plus {client_addr} at connect (not sent by default).
POSTFIX_MACROS = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {client_addr}",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                          "{mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_end_of_data_macros": "i",
}
# For the frozen-guard scenario: how long Postfix waits on a milter that never answers.
SHORT_MILTER_TIMEOUTS = {"milter_connect_timeout": "2s", "milter_command_timeout": "2s",
                         "milter_content_timeout": "2s"}
SHORT_TIMEOUT_SECONDS = 2.0

_serial = itertools.count(1)


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
        r"guard\.milter: (?P<qid>\S+): conn=\d+ client=(?P<client>\S+) [^\n]*"
        rf"rcpt=<{re.escape(recipient)}> domain=\S+ action=(?P<action>\S+) "
        r"reason=(?P<reason>\S+)(?: note=\S+)? detail=(?P<detail>[^\n]*)",
        timeout, after)


def queue_id(result: SendResult) -> str:
    assert result.data is not None and result.data[0] == 250, result
    found = re.search(r"queued as (\w+)", result.data[1])
    assert found, result
    return found.group(1)


def delivered(sink: SmtpSink, recipient: str) -> ReceivedMessage:
    msg = sink.wait_for_message(recipient, timeout=10)
    assert msg.rcpt_tos == [recipient], msg.rcpt_tos
    return msg


def require_postfix() -> None:
    try:
        check_postfix_tools()
    except HarnessError as exc:
        pytest.fail(f"e2e MTA harness unavailable: {exc}", pytrace=False)


@dataclass
class Site:
    sink: SmtpSink
    mx1: FakePrimaryMX  # primary of TEMPFAIL and FLAGGED: always up
    failover_mx1: FakePrimaryMX  # primary of FAILOVER
    postfix: PostfixMTA
    unix_guard: GuardProcess  # the main listener's guard
    inet_guard: GuardProcess  # listener "inet"
    frozen_guard: GuardProcess  # listener "frozen" (short milter timeouts)
    stopped_guard: GuardProcess  # listener "stopped"
    stopped_socket: GuardSocket

    def address(self, listener: str = "main") -> tuple[str, int]:
        return self.postfix.address if listener == "main" else self.postfix.listener(listener)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_postfix()
    workdir = tmp_path_factory.mktemp("postfix-guard")
    with contextlib.ExitStack() as stack:
        sockets = guard_socket_dir()
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        sink = stack.enter_context(SmtpSink())
        mx1 = stack.enter_context(FakePrimaryMX())
        failover_mx1 = stack.enter_context(FakePrimaryMX())
        domains = [GuardedDomain(TEMPFAIL, mx1.address),
                   GuardedDomain(FLAGGED, mx1.address, action="flag"),
                   GuardedDomain(FAILOVER, failover_mx1.address)]
        fleet = GuardFleet(workdir)
        stack.callback(fleet.stop_all)
        unix, inet = GuardSocket.unix(sockets, "guard"), GuardSocket.inet()
        frozen, stopped = GuardSocket.unix(sockets, "frozen"), GuardSocket.unix(sockets, "stopped")
        guards = {name: fleet.launch(name, sock, domains)
                  for name, sock in [("unix", unix), ("inet", inet), ("frozen", frozen),
                                     ("stopped", stopped)]}
        postfix = PostfixMTA(
            unix.postfix, relay_domains=[TEMPFAIL, FLAGGED, FAILOVER, PLAIN],
            next_hop=sink.address, mynetworks=["127.0.0.1/32"],
            sasl_users={SASL_USER: SASL_PASSWORD}, milter_macros=POSTFIX_MACROS,
            listeners={"inet": {"smtpd_milters": inet.postfix},
                       "frozen": {"smtpd_milters": frozen.postfix, **SHORT_MILTER_TIMEOUTS},
                       "stopped": {"smtpd_milters": stopped.postfix}})
        stack.callback(postfix.stop)
        fleet.ready()  # before Postfix: its first session (the start check) finds the guard
        postfix.start()
        yield Site(sink, mx1, failover_mx1, postfix, guards["unix"], guards["inet"],
                   guards["frozen"], guards["stopped"], stopped)


# ---------------------------------------------------------------------------------
# bypass: a client came to the secondary while the primary was up


@pytest.mark.parametrize("listener", ["main", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_tempfailed_at_rcpt(site: Site, listener: str) -> None:
    guard = site.unix_guard if listener == "main" else site.inet_guard
    to = rcpt(TEMPFAIL, f"bypass-{listener}")
    result = send(*site.address(listener), SENDER, [to], source=UNTRUSTED)
    assert result.rcpts[to] == reply_451(TEMPFAIL), result
    assert result.data is None, "no recipient left, so no DATA"
    line = decision(guard, to)
    assert (line["client"], line["action"], line["reason"]) == (UNTRUSTED, "tempfail",
                                                                 "bypass"), line[0]
    site.postfix.wait_for_log(rf"milter-reject: RCPT from [^\n]*\[{re.escape(UNTRUSTED)}\]: "
                              rf"451 4\.7\.1 Please deliver mail for {TEMPFAIL} to its "
                              rf"primary MX; [^\n]*to=<{re.escape(to)}>")


@pytest.mark.parametrize("listener", ["main", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_flagged_with_a_header(site: Site, listener: str) -> None:
    guard = site.unix_guard if listener == "main" else site.inet_guard
    to = rcpt(FLAGGED, f"flag-{listener}")
    result = send(*site.address(listener), SENDER, [to], source=UNTRUSTED)
    qid = queue_id(result)
    msg = delivered(site.sink, to)
    [header] = msg.headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header
    # The queue id reaches the guard at end of message: its log line names it.
    line = decision(guard, to)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "flag", "bypass"), line[0]


# ---------------------------------------------------------------------------------
# legitimate fallback: the primary is down, or was down within down_grace


def test_primary_down_then_back_within_down_grace(site: Site) -> None:
    guard = site.unix_guard
    to = rcpt(FAILOVER, "while-up")
    assert send(*site.address(), SENDER, [to], source=UNTRUSTED).rcpts[to] == \
        reply_451(FAILOVER)

    mark = len(guard.log())
    host, port = site.failover_mx1.address
    site.failover_mx1.stop()
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is down", after=mark)
    to = rcpt(FAILOVER, "while-down")
    qid = queue_id(send(*site.address(), SENDER, [to], source=UNTRUSTED))
    msg = delivered(site.sink, to)
    assert msg.headers("X-MX-Guard") == [], "flag_all = false: no header on fallback mail"
    line = decision(guard, to, mark)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "primary-down")
    assert "refused" in line["detail"], line[0]

    mark = len(guard.log())
    site.failover_mx1.start()  # same port: the primary is back
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is up", after=mark)
    to = rcpt(FAILOVER, "back-in-grace")
    queue_id(send(*site.address(), SENDER, [to], source=UNTRUSTED))
    delivered(site.sink, to)
    line = decision(guard, to, mark)
    assert (line["action"], line["reason"]) == ("accept", "primary-down"), line[0]
    assert "failed a probe within down_grace" in line["detail"], line[0]


# ---------------------------------------------------------------------------------
# trusted clients


def test_trusted_network_client_is_accepted(site: Site) -> None:
    to = rcpt(TEMPFAIL, "trusted-net")
    result = send(*site.address(), SENDER, [to], source="127.0.0.1")
    queue_id(result)
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    line = decision(site.unix_guard, to)
    assert (line["client"], line["action"], line["reason"]) == ("127.0.0.1", "accept",
                                                                 "trusted"), line[0]
    assert line["detail"] == "client in trusted_networks", line[0]


def test_authenticated_client_is_accepted(site: Site) -> None:
    client = "127.0.0.5"
    # Without AUTH the same client is an ordinary bypasser ...
    anonymous = rcpt(TEMPFAIL, "no-auth")
    assert send(*site.address(), SENDER, [anonymous], source=client).rcpts[anonymous] == \
        reply_451(TEMPFAIL)
    # ... with SMTP AUTH (Cyrus SASL) it is trusted.
    to = rcpt(TEMPFAIL, "sasl")
    result = send(*site.address(), SENDER, [to], source=client,
                  auth=(SASL_USER, SASL_PASSWORD))
    queue_id(result)
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    line = decision(site.unix_guard, to)
    assert (line["client"], line["action"], line["reason"]) == (client, "accept",
                                                                 "trusted"), line[0]
    assert line["detail"] == "authenticated", line[0]
    site.postfix.wait_for_log(rf"client=\S+\[{re.escape(client)}\], sasl_method=\w+, "
                              rf"sasl_username={re.escape(SASL_USER)}")


# ---------------------------------------------------------------------------------
# one transaction, several domains


def test_each_recipient_is_decided_on_its_own(site: Site) -> None:
    guarded, plain = rcpt(TEMPFAIL, "mixed"), rcpt(PLAIN, "mixed")
    result = send(*site.address(), SENDER, [guarded, plain], source=UNTRUSTED)
    assert result.rcpts[guarded] == reply_451(TEMPFAIL), result
    assert result.rcpts[plain][0] == 250, result
    qid = queue_id(result)
    msg = delivered(site.sink, plain)  # only the recipient that was accepted
    assert msg.headers("X-MX-Guard") == []
    assert site.sink.messages_for(guarded) == []
    assert decision(site.unix_guard, guarded)["action"] == "tempfail"
    line = decision(site.unix_guard, plain)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "not-secondary")


# ---------------------------------------------------------------------------------
# forged headers


def message_with(to: str, *headers: str) -> bytes:
    lines = [f"From: <{SENDER}>", f"To: <{to}>", "Subject: forged guard header",
             f"Message-ID: <forged-{next(_serial)}@client.test.example>", *headers, "",
             "hello"]
    return ("\r\n".join(lines) + "\r\n").encode()


FORGED = ("X-MX-Guard: primary-down; domain=whatever; node=mx2",
          "x-mx-guard: trusted; forged in lower case")


@pytest.mark.parametrize("client", [UNTRUSTED, "127.0.0.1"], ids=["untrusted", "trusted"])
def test_forged_headers_are_removed(site: Site, client: str) -> None:
    to = rcpt(PLAIN if client == UNTRUSTED else TEMPFAIL, "forged")
    mark = len(site.unix_guard.log())
    queue_id(send(*site.address(), SENDER, [to], message_with(to, *FORGED), source=client))
    msg = delivered(site.sink, to)
    assert msg.headers("X-MX-Guard") == [], msg.data.decode(errors="replace")
    assert msg.header("Subject") == "forged guard header"
    site.unix_guard.wait_for_log(r"removed 2 forged X-MX-Guard header\(s\)", after=mark)


def test_a_flagged_message_keeps_only_the_guards_header(site: Site) -> None:
    to = rcpt(FLAGGED, "forged-flag")
    forged = f"X-MX-Guard: bypass; domain={FLAGGED}; client=192.0.2.1; node=evil"
    queue_id(send(*site.address(), SENDER, [to], message_with(to, forged), source=UNTRUSTED))
    [header] = delivered(site.sink, to).headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header


# ---------------------------------------------------------------------------------
# a guard that is gone or frozen must not stop mail


def test_stopped_guard_lets_mail_through(site: Site) -> None:
    """milter_default_action = accept: with the guard stopped (SIGTERM, as systemd
    does) Postfix cannot connect to its socket and takes the mail unfiltered."""
    listener = site.address("stopped")
    before = rcpt(TEMPFAIL, "before-stop")
    assert send(*listener, SENDER, [before], source=UNTRUSTED).rcpts[before] == \
        reply_451(TEMPFAIL)
    assert site.stopped_guard.stop() == 0
    to, flagged = rcpt(TEMPFAIL, "guard-stopped"), rcpt(FLAGGED, "guard-stopped")
    result = send(*listener, SENDER, [to, flagged], source=UNTRUSTED)
    assert result.code(to) == 250 and result.code(flagged) == 250, result
    queue_id(result)
    msg = delivered_to_all(site.sink, [to, flagged])
    assert msg.headers("X-MX-Guard") == []
    path = site.stopped_socket.guard.removeprefix("unix:")
    site.postfix.wait_for_log(rf"warning: connect to Milter service unix:{re.escape(path)}: "
                              r"(Connection refused|No such file or directory)")


def delivered_to_all(sink: SmtpSink, recipients: list[str]) -> ReceivedMessage:
    msg = sink.wait_for_message(recipients[0], timeout=10)
    assert sorted(msg.rcpt_tos) == sorted(recipients), msg.rcpt_tos
    return msg


def test_frozen_guard_costs_one_milter_timeout_then_mail_flows(site: Site) -> None:
    """A guard stopped with SIGSTOP keeps its socket: the kernel accepts Postfix's
    connections and nobody answers. Observed with milter_connect_timeout =
    milter_command_timeout = milter_content_timeout = 2s and
    milter_default_action = accept:

    - frozen before the session: the connect succeeds at once, then Postfix waits one
      milter_command_timeout for the reply to its option negotiation, logs "can't read
      SMFIC_OPTNEG reply packet header: Connection timed out", drops the milter for
      the session and greets about 2 s late. Every new session pays those 2 s again.
      Mail for a bypassed domain is accepted and delivered unfiltered, no header.
    - frozen mid-session (negotiated, then SIGSTOP): MAIL FROM is not delayed (the
      guard asked for no reply to it); RCPT TO waits one milter_command_timeout
      ("can't read SMFIC_RCPT reply packet header"), then Postfix answers 250 and
      delivers the mail unfiltered.
    - after SIGCONT the guard answers the next session at once.
    """
    guard, listener = site.frozen_guard, site.address("frozen")
    to = rcpt(TEMPFAIL, "frozen")
    guard.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        smtp_session(*listener, source=UNTRUSTED, timeout=30).quit()
        greeted = time.monotonic() - started
        started = time.monotonic()
        result = send(*listener, SENDER, [to], source=UNTRUSTED)
        session = time.monotonic() - started
    finally:
        guard.signal(signal.SIGCONT)
    assert SHORT_TIMEOUT_SECONDS - 0.2 <= greeted < SHORT_TIMEOUT_SECONDS + 1.5, greeted
    assert SHORT_TIMEOUT_SECONDS - 0.2 <= session < SHORT_TIMEOUT_SECONDS + 1.5, session
    assert result.code(to) == 250, result
    queue_id(result)
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    site.postfix.wait_for_log(r"warning: milter unix:\S+/frozen\.sock: can't read "
                              r"SMFIC_OPTNEG reply packet header: Connection timed out")

    # Thawed, it decides again, at once (a trusted client: no health involved).
    thawed = rcpt(TEMPFAIL, "thawed")
    started = time.monotonic()
    queue_id(send(*listener, SENDER, [thawed], source="127.0.0.1"))
    assert time.monotonic() - started < 1.0
    assert decision(guard, thawed)["reason"] == "trusted"

    # Frozen in the middle of a session it has already negotiated.
    to = rcpt(TEMPFAIL, "frozen-mid-session")
    client = smtp_session(*listener, source=UNTRUSTED, timeout=30)
    try:
        guard.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert client.mail(SENDER)[0] == 250
            mail_took = time.monotonic() - started
            started = time.monotonic()
            code, _ = client.rcpt(to)
            rcpt_took = time.monotonic() - started
            data_code, _ = client.data(message_with(to))
        finally:
            guard.signal(signal.SIGCONT)
    finally:
        client.quit()
    assert mail_took < 1.0, mail_took
    assert SHORT_TIMEOUT_SECONDS - 0.2 <= rcpt_took < SHORT_TIMEOUT_SECONDS + 1.5, rcpt_took
    assert (code, data_code) == (250, 250)
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    site.postfix.wait_for_log(r"warning: milter unix:\S+/frozen\.sock: can't read "
                              r"SMFIC_RCPT reply packet header: Connection timed out")


# ---------------------------------------------------------------------------------
# two secondaries sharing health through one Redis


def guard_status(guard: GuardProcess) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "guard", "status", "-c", str(guard.config),
                        "--json"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def observations(status: dict[str, Any], domain: str) -> dict[str, str]:
    """node -> state of the one target of the domain's higher-priority host."""
    [dom] = [d for d in status["domains"] if d["name"] == domain]
    [host] = [h for h in dom["hosts"] if h["role"] == "higher-priority"]
    [target] = host["targets"]
    return {o["node"]: o["state"] for o in target["observations"]}


def send_until_accepted(address: tuple[str, int], domain: str, tag: str,
                        timeout: float = 10.0) -> tuple[str, SendResult]:
    """Send (from UNTRUSTED, a new recipient each time) until one is accepted: a node
    acts on what another node published once its snapshot refresher has read it."""
    def attempt() -> tuple[str, SendResult] | None:
        to = rcpt(domain, tag)
        result = send(*address, SENDER, [to], source=UNTRUSTED)
        if result.code(to) == 250:
            return to, result
        time.sleep(0.1)
        return None
    return wait_until(attempt, timeout, 0, f"a recipient of {domain} accepted at {address}")


SHARED = "shared.example"


def test_two_secondaries_share_health_through_redis(tmp_path: Path) -> None:
    """Two secondaries (mx2a, mx2b: two Postfix instances, two guards) share one Redis,
    and both probe the same primary target (127.0.0.1:PORT) over real sockets in
    ``ehlo`` mode. To give the nodes different views of that one target, the fake
    primary refuses the EHLO of mx2b only (554), as a primary would refuse a host it
    blocks: node mx2b sees the target down, node mx2a still sees it up. The
    aggregated health is then down for both nodes (SPEC section 4: any fresh down
    observation), so mx2a, whose own probes succeed, accepts as primary-down on the
    strength of mx2b's observation, read from Redis.
    """
    require_postfix()
    if not redis_server_available():
        pytest.fail("redis-server is not installed: run `make test-deps`", pytrace=False)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(unix_socket=False))
        sink = stack.enter_context(SmtpSink())
        mx1 = stack.enter_context(FakePrimaryMX())
        sockets = guard_socket_dir()
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        secondaries = ("mx2a.example.org", "mx2b.example.org")
        domains = [GuardedDomain(SHARED, mx1.address, secondaries=secondaries)]
        fleet = GuardFleet(tmp_path)
        stack.callback(fleet.stop_all)
        nodes = {}
        for node, name in zip(("mx2a", "mx2b"), secondaries, strict=True):
            sock = GuardSocket.unix(sockets, node)
            guard = fleet.launch(node, sock, domains, node=node, self_name=name,
                                 store=redis.url, probe_mode="ehlo")
            postfix = PostfixMTA(sock.postfix, relay_domains=[SHARED], next_hop=sink.address,
                                 mynetworks=["127.0.0.1/32"], myhostname=f"{node}.test.example",
                                 milter_macros=POSTFIX_MACROS)
            stack.callback(postfix.stop)
            nodes[node] = (guard, postfix)
        fleet.ready()
        with ThreadPoolExecutor(2) as pool:  # two Postfix starts at once: about 2.5 s
            list(pool.map(lambda n: n[1].start(), nodes.values()))
        guard_a, guard_b = nodes["mx2a"][0], nodes["mx2b"][0]

        # Both nodes see the primary up, and so does the store.
        wait_until(lambda: observations(guard_status(guard_b), SHARED) ==
                   {"mx2a": "up", "mx2b": "up"}, 10, 0.2, "both observations up in Redis")
        for node, (guard, postfix) in nodes.items():
            to = rcpt(SHARED, f"up-{node}")
            result = send(*postfix.address, SENDER, [to], source=UNTRUSTED)
            assert result.rcpts[to] == reply_451(SHARED), (node, result)
            assert decision(guard, to)["reason"] == "bypass"

        # mx2b loses the primary; mx2a does not.
        mark_a, mark_b = len(guard_a.log()), len(guard_b.log())
        mx1.ehlo_reply = lambda helo: ("554 5.7.1 no service for you"
                                       if helo.lower().startswith("mx2b.") else None)
        guard_b.wait_for_log(r"target 127\.0\.0\.1:\d+ is down \(was up\): bad-reply: "
                             r"EHLO answered '554", after=mark_b)
        for node, (guard, postfix) in nodes.items():
            to, result = send_until_accepted(postfix.address, SHARED, f"down-at-b-{node}")
            queue_id(result)
            assert delivered(sink, to).headers("X-MX-Guard") == []
            line = decision(guard, to, mark_a if node == "mx2a" else mark_b)
            assert (line["action"], line["reason"]) == ("accept", "primary-down"), line[0]
            assert "at mx2b:" in line["detail"], line[0]
        # mx2a's own prober never saw the primary fail: the verdict came through Redis.
        assert " is down" not in guard_a.log()[mark_a:], guard_a.log()[mark_a:]
        status = guard_status(guard_b)
        assert observations(status, SHARED) == {"mx2a": "up", "mx2b": "down"}, status
        assert {(t["node"], t["new"]) for t in status["history"]} >= \
            {("mx2a", "up"), ("mx2b", "up"), ("mx2b", "down")}, status["history"]

        # The primary stops: now each node sees it down with its own probes.
        mx1.stop()
        guard_a.wait_for_log(r"target 127\.0\.0\.1:\d+ is down \(was up\): refused",
                             after=mark_a)
        wait_until(lambda: observations(guard_status(guard_a), SHARED) ==
                   {"mx2a": "down", "mx2b": "down"}, 10, 0.2, "both observations down")
