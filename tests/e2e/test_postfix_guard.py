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
    milter_connect_macros = j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}
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

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.postfix import PostfixMTA, check_postfix_tools
from tests.support.redis_server import RedisServer, redis_server_available
from tests.support.smtp import (
    GuardedDomain,
    GuardFleet,
    GuardSocket,
    SendResult,
    guard_socket_dir,
    send,
    smtp_session,
    wait_until,
)
from tests.support.smtpserver import ReceivedMessage, SmtpSink

from . import scenarios
from .scenarios import (
    FLAGGED,
    PLAIN,
    SENDER,
    TEMPFAIL,
    UNTRUSTED,
    Secondary,
    decision,
    delivered,
    message_with,
    rcpt,
    reply_451,
)

ROOT = Path(__file__).resolve().parents[2]
SASL_USER, SASL_PASSWORD = "alice@mx2.test.example", "s3cret-alice"

# Postfix's defaults (every other milter_*_macros of postfix.py's DEFAULT_MILTER_MACROS),
# plus {client_addr} and {client_name} at connect (not sent by default).
POSTFIX_MACROS = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}",
}
# For the frozen-guard scenario: how long Postfix waits on a milter that never answers.
SHORT_MILTER_TIMEOUTS = {"milter_connect_timeout": "2s", "milter_command_timeout": "2s",
                         "milter_content_timeout": "2s"}
SHORT_TIMEOUT_SECONDS = 2.0
QUEUED = r"queued as (\w+)"  # Postfix's reply to DATA


def queue_id(result: SendResult) -> str:
    return scenarios.queue_id_in(result, QUEUED)


def require_postfix() -> None:
    scenarios.require_harness(check_postfix_tools)


@dataclass
class Site:
    sink: SmtpSink
    mx1: FakePrimary  # primary of TEMPFAIL and FLAGGED: always up
    failover_mx1: FakePrimary  # primary of FAILOVER
    postfix: PostfixMTA
    unix_guard: GuardProcess  # the main listener's guard
    inet_guard: GuardProcess  # listener "inet"
    frozen_guard: GuardProcess  # listener "frozen" (short milter timeouts)
    stopped_guard: GuardProcess  # listener "stopped"
    stopped_socket: GuardSocket

    def address(self, listener: str = "main") -> tuple[str, int]:
        return self.postfix.address if listener == "main" else self.postfix.listener(listener)

    def via(self, listener: str = "main") -> Secondary:
        """Listener "main" (the Unix-socket guard) or "inet"."""
        guard = self.unix_guard if listener == "main" else self.inet_guard
        return Secondary(self.address(listener), guard, self.sink, QUEUED)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_postfix()
    with contextlib.ExitStack() as stack:
        st = scenarios.stage(stack, tmp_path_factory.mktemp("postfix-guard"))
        unix, inet = GuardSocket.unix(st.sockets, "guard"), GuardSocket.inet()
        frozen = GuardSocket.unix(st.sockets, "frozen")
        stopped = GuardSocket.unix(st.sockets, "stopped")
        guards = {name: st.fleet.launch(name, sock, st.domains)
                  for name, sock in [("unix", unix), ("inet", inet), ("frozen", frozen),
                                     ("stopped", stopped)]}
        postfix = PostfixMTA(
            unix.postfix, relay_domains=[TEMPFAIL, FLAGGED, scenarios.FAILOVER, PLAIN],
            next_hop=st.sink.address, mynetworks=["127.0.0.1/32"],
            sasl_users={SASL_USER: SASL_PASSWORD}, milter_macros=POSTFIX_MACROS,
            listeners={"inet": {"smtpd_milters": inet.postfix},
                       "frozen": {"smtpd_milters": frozen.postfix, **SHORT_MILTER_TIMEOUTS},
                       "stopped": {"smtpd_milters": stopped.postfix}})
        stack.callback(postfix.stop)
        st.fleet.ready()  # before Postfix: its first session (the start check) finds the guard
        postfix.start()
        yield Site(st.sink, st.mx1, st.failover_mx1, postfix, guards["unix"], guards["inet"],
                   guards["frozen"], guards["stopped"], stopped)


# ---------------------------------------------------------------------------------
# bypass: a client came to the secondary while the primary was up


@pytest.mark.parametrize("listener", ["main", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_tempfailed_at_rcpt(site: Site, listener: str) -> None:
    to = scenarios.bypass_is_tempfailed_at_rcpt(site.via(listener), f"bypass-{listener}")
    site.postfix.wait_for_log(rf"milter-reject: RCPT from [^\n]*\[{re.escape(UNTRUSTED)}\]: "
                              rf"451 4\.7\.1 Please deliver mail for {TEMPFAIL} to its "
                              rf"primary MX; [^\n]*to=<{re.escape(to)}>")


@pytest.mark.parametrize("listener", ["main", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_flagged_with_a_header(site: Site, listener: str) -> None:
    scenarios.bypass_is_flagged_with_a_header(site.via(listener), f"flag-{listener}")


# ---------------------------------------------------------------------------------
# legitimate fallback: the primary is down, or was down within down_grace


def test_primary_down_then_back_within_down_grace(site: Site) -> None:
    line = scenarios.fallback_while_the_primary_is_down(site.via(), site.failover_mx1)
    assert "refused" in line["detail"], line[0]
    scenarios.primary_back_within_down_grace(site.via(), site.failover_mx1)


# ---------------------------------------------------------------------------------
# trusted clients


def test_trusted_network_client_is_accepted(site: Site) -> None:
    line = scenarios.trusted_network_client_is_accepted(site.via())
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
    guarded = scenarios.each_recipient_is_decided_on_its_own(site.via())
    assert decision(site.unix_guard, guarded)["action"] == "tempfail"


# ---------------------------------------------------------------------------------
# forged headers


@pytest.mark.parametrize("client", [UNTRUSTED, "127.0.0.1"], ids=["untrusted", "trusted"])
def test_forged_headers_are_removed(site: Site, client: str) -> None:
    scenarios.forged_headers_are_removed(site.via(), client)


def test_a_flagged_message_keeps_only_the_guards_header(site: Site) -> None:
    scenarios.a_flagged_message_keeps_only_the_guards_header(site.via())


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
            code, text = client.rcpt(to)
            rcpt_took = time.monotonic() - started
            assert code == 250, (code, text, rcpt_took, site.postfix.log_text()[-2000:])
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
        mx1 = stack.enter_context(FakePrimary())
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


def test_inet_milter_socket_has_tcp_nodelay(site: Site) -> None:
    scenarios.inet_milter_sockets_have_nodelay(site.via("inet"))
