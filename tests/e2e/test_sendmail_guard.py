"""MX Guard end to end behind a real Sendmail secondary MX.

The core scenarios of test_postfix_guard.py with Sendmail as the MTA: the real guard
probes real SMTP listeners on loopback standing in for the primary MX; Sendmail,
backup MX for the test domains (RELAY_DOMAIN), relays what it accepts to a sink.

The .mc lines under test (the README quotes them; the rest is the harness's
private-instance plumbing, see sendmail.py):

    define(`confMILTER_MACROS_CONNECT', `j, _, {daemon_name}, {if_name}, {if_addr},
        {client_addr}, {client_name}, {client_resolve}')dnl
    define(`confMILTER_MACROS_EOM', `{msg_id}, i')dnl
    INPUT_MAIL_FILTER(`mx-guard', `S=local:/.../guard.sock, T=C:5s;S:5s;R:5s;E:10s')dnl

(confMILTER_MACROS_CONNECT on one line; every other confMILTER_MACROS_* at Sendmail's
default; inet: ``S=inet:PORT@127.0.0.1``). No ``F=`` flag: with ``F=T``
Sendmail tempfails every message while the guard is not running, with ``F=R`` it
rejects; without a flag it carries on without the filter, which is what SPEC section 8
asks of a dead guard ("a dead guard must not stop mail", the Postfix side's
milter_default_action = accept). Sendmail wants the socket outside world-writable
directories: the guard's socket directory is root:postfix 2750 under /run.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess
from tests.support.sendmail import SendmailMTA, sendmail_paths
from tests.support.smtp import GuardSocket, SendResult, send
from tests.support.smtpserver import SmtpSink

from . import scenarios
from .scenarios import (
    FLAGGED,
    PLAIN,
    SENDER,
    TEMPFAIL,
    UNTRUSTED,
    Secondary,
    delivered,
    rcpt,
    reply_451,
)

# Sendmail's default (cf/m4/cfhead.m4) plus {client_addr}, {client_name} and
# {client_resolve} at connect. The other
# confMILTER_MACROS_* are sendmail.py's DEFAULT_MILTER_MACROS: Sendmail's defaults, plus i
# at end of message (Sendmail also sends i there when the guard asks for it in its
# negotiation).
SENDMAIL_MACROS = {
    "confMILTER_MACROS_CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}, "
                                 "{client_name}, {client_resolve}",
}
MILTER_NAME = "mx-guard"
MILTER_FLAGS = ""  # no F=T: a dead guard lets mail through
MILTER_TIMEOUTS = "C:5s;S:5s;R:5s;E:10s"
QUEUED = r"2\.0\.0 (\w+) Message accepted for delivery"  # Sendmail's reply to DATA


def queue_id(result: SendResult) -> str:
    return scenarios.queue_id_in(result, QUEUED)


@dataclass
class Site:
    sink: SmtpSink
    failover_mx1: FakePrimary  # primary of FAILOVER
    sendmail: SendmailMTA  # milter: unix_guard
    inet_sendmail: SendmailMTA  # milter: inet_guard
    crash_sendmail: SendmailMTA  # milter: crash_guard, which a test kills
    unix_guard: GuardProcess
    inet_guard: GuardProcess
    crash_guard: GuardProcess

    def mta(self, kind: str = "unix") -> SendmailMTA:
        return self.sendmail if kind == "unix" else self.inet_sendmail

    def via(self, kind: str = "unix") -> Secondary:
        guard = self.unix_guard if kind == "unix" else self.inet_guard
        return Secondary(self.mta(kind).address, guard, self.sink, QUEUED)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    scenarios.require_harness(sendmail_paths)
    with contextlib.ExitStack() as stack:
        st = scenarios.stage(stack, tmp_path_factory.mktemp("sendmail-guard"))
        socks = {"unix": GuardSocket.unix(st.sockets, "guard"), "inet": GuardSocket.inet(),
                 "crash": GuardSocket.unix(st.sockets, "crash")}
        guards = {name: st.fleet.launch(name, sock, st.domains) for name, sock in socks.items()}
        st.fleet.ready()  # before Sendmail: its first session (the start check) finds the guard
        mtas = {}
        for name, sock in socks.items():
            # "local:" is Sendmail's own name for a Unix socket (unix: works too).
            spec = sock.postfix.replace("unix:", "local:", 1)
            mta = SendmailMTA(spec, milter_name=MILTER_NAME, milter_flags=MILTER_FLAGS,
                              milter_timeouts=MILTER_TIMEOUTS, milter_macros=SENDMAIL_MACROS,
                              relay_domains=[TEMPFAIL, FLAGGED, scenarios.FAILOVER, PLAIN],
                              next_hop=st.sink.address)
            stack.callback(mta.stop)
            mtas[name] = mta.start()
        yield Site(st.sink, st.failover_mx1, mtas["unix"], mtas["inet"], mtas["crash"],
                   guards["unix"], guards["inet"], guards["crash"])


@pytest.mark.parametrize("kind", ["unix", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_tempfailed_at_rcpt(site: Site, kind: str) -> None:
    to = scenarios.bypass_is_tempfailed_at_rcpt(site.via(kind), f"bypass-{kind}")
    site.mta(kind).wait_for_log(rf"Milter: to=<{re.escape(to)}>, reject=451 4\.7\.1 Please "
                                rf"deliver mail for {TEMPFAIL} to its primary MX")


@pytest.mark.parametrize("kind", ["unix", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_flagged_with_a_header(site: Site, kind: str) -> None:
    scenarios.bypass_is_flagged_with_a_header(site.via(kind), f"flag-{kind}")


def test_primary_down_then_back_within_down_grace(site: Site) -> None:
    scenarios.fallback_while_the_primary_is_down(site.via(), site.failover_mx1)
    scenarios.primary_back_within_down_grace(site.via(), site.failover_mx1)


def test_trusted_network_client_is_accepted(site: Site) -> None:
    scenarios.trusted_network_client_is_accepted(site.via())


def test_each_recipient_is_decided_on_its_own(site: Site) -> None:
    scenarios.each_recipient_is_decided_on_its_own(site.via())


@pytest.mark.parametrize("client", [UNTRUSTED, "127.0.0.1"], ids=["untrusted", "trusted"])
def test_forged_headers_are_removed(site: Site, client: str) -> None:
    scenarios.forged_headers_are_removed(site.via(), client)


def test_a_flagged_message_keeps_only_the_guards_header(site: Site) -> None:
    scenarios.a_flagged_message_keeps_only_the_guards_header(site.via())


def test_crashed_guard_lets_mail_through(site: Site) -> None:
    """No F= flag: with the guard killed (SIGKILL, its socket file left behind)
    Sendmail cannot connect, logs it, and takes the mail unfiltered. (With F=T the
    same message would get 451 4.3.2; test_harness.py shows that.)"""
    address = site.crash_sendmail.address
    before = rcpt(TEMPFAIL, "before-crash")
    assert send(*address, SENDER, [before], source=UNTRUSTED).rcpts[before] == \
        reply_451(TEMPFAIL)
    site.crash_guard.signal(signal.SIGKILL)
    assert site.crash_guard.stop() == -signal.SIGKILL
    to = rcpt(TEMPFAIL, "guard-crashed")
    result = send(*address, SENDER, [to], source=UNTRUSTED)
    assert result.code(to) == 250, result
    queue_id(result)
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    path = str(site.crash_sendmail.milter).removeprefix("local:")
    site.crash_sendmail.wait_for_log(rf"Milter \({MILTER_NAME}\): error connecting to filter: "
                                     rf"Connection refused by {re.escape(path)}")


def test_inet_milter_socket_has_tcp_nodelay(site: Site) -> None:
    scenarios.inet_milter_sockets_have_nodelay(site.via("inet"))
