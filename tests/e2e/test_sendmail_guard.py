"""MX Guard end to end behind a real Sendmail secondary MX.

The core scenarios of test_postfix_guard.py with Sendmail as the MTA: the real guard
probes real SMTP listeners on loopback standing in for the primary MX; Sendmail,
backup MX for the test domains (RELAY_DOMAIN), relays what it accepts to a sink.

The .mc lines under test (the README quotes them; the rest is the harness's
private-instance plumbing, see sendmail.py):

    define(`confMILTER_MACROS_CONNECT', `j, _, {daemon_name}, {if_name}, {if_addr},
        {client_addr}')dnl
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
import itertools
import re
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.guardproc import GuardProcess

from .sendmail import SendmailMTA, sendmail_paths
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
)

SENDER = "sender@client.test.example"
UNTRUSTED = "127.0.0.2"  # the guard trusts 127.0.0.1/32 only

TEMPFAIL = "example.org"  # guarded, action tempfail (the default)
FLAGGED = "flagged.example"  # guarded, action flag
FAILOVER = "failover.example"  # guarded, its own primary: the tests stop that one
PLAIN = "plain.example"  # relayed by Sendmail, not guarded

# Sendmail's defaults (cf/m4/cfhead.m4), plus {client_addr} at connect and i at end of
# message (Sendmail also sends i there when the guard asks for it in its negotiation).
SENDMAIL_MACROS = {
    "confMILTER_MACROS_CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}",
    "confMILTER_MACROS_HELO": "{tls_version}, {cipher}, {cipher_bits}, {cert_subject}, "
                              "{cert_issuer}",
    "confMILTER_MACROS_ENVFROM": "i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, "
                                 "{mail_mailer}, {mail_host}, {mail_addr}",
    "confMILTER_MACROS_ENVRCPT": "{rcpt_mailer}, {rcpt_host}, {rcpt_addr}",
    "confMILTER_MACROS_EOM": "{msg_id}, i",
}
MILTER_NAME = "mx-guard"
MILTER_FLAGS = ""  # no F=T: a dead guard lets mail through
MILTER_TIMEOUTS = "C:5s;S:5s;R:5s;E:10s"

_serial = itertools.count(1)


def rcpt(domain: str, tag: str) -> str:
    """A recipient no other test uses, to find its decision in the logs."""
    return f"{tag}-{next(_serial)}@{domain}"


def reply_451(domain: str) -> tuple[int, str]:
    return 451, f"4.7.1 Please deliver mail for {domain} to its primary MX"


def flag_header(domain: str, client: str) -> str:
    return (rf"bypass; domain={re.escape(domain)}; primary=mx1\.example\.org up since "
            rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ; client={re.escape(client)}; node=mx2")


def decision(guard: GuardProcess, recipient: str, after: int = 0) -> re.Match[str]:
    """The guard's log line for *recipient*: groups qid, client, action, reason, detail."""
    return guard.wait_for_log(
        r"guard\.milter: (?P<qid>\S+): conn=\d+ client=(?P<client>\S+) [^\n]*"
        rf"rcpt=<{re.escape(recipient)}> domain=\S+ action=(?P<action>\S+) "
        r"reason=(?P<reason>\S+)(?: note=\S+)? detail=(?P<detail>[^\n]*)",
        10, after)


def queue_id(result: SendResult) -> str:
    assert result.data is not None and result.data[0] == 250, result
    found = re.search(r"2\.0\.0 (\w+) Message accepted for delivery", result.data[1])
    assert found, result
    return found.group(1)


def delivered(sink: SmtpSink, recipient: str) -> ReceivedMessage:
    msg = sink.wait_for_message(recipient, timeout=10)
    assert msg.rcpt_tos == [recipient], msg.rcpt_tos
    return msg


@dataclass
class Site:
    sink: SmtpSink
    failover_mx1: FakePrimaryMX  # primary of FAILOVER
    sendmail: SendmailMTA  # milter: unix_guard
    inet_sendmail: SendmailMTA  # milter: inet_guard
    crash_sendmail: SendmailMTA  # milter: crash_guard, which a test kills
    unix_guard: GuardProcess
    inet_guard: GuardProcess
    crash_guard: GuardProcess


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    try:
        sendmail_paths()
    except HarnessError as exc:
        pytest.fail(f"e2e MTA harness unavailable: {exc}", pytrace=False)
    workdir = tmp_path_factory.mktemp("sendmail-guard")
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
        socks = {"unix": GuardSocket.unix(sockets, "guard"), "inet": GuardSocket.inet(),
                 "crash": GuardSocket.unix(sockets, "crash")}
        guards = {name: fleet.launch(name, sock, domains) for name, sock in socks.items()}
        fleet.ready()  # before Sendmail: its first session (the start check) finds the guard
        mtas = {}
        for name, sock in socks.items():
            # "local:" is Sendmail's own name for a Unix socket (unix: works too).
            spec = sock.postfix.replace("unix:", "local:", 1)
            mta = SendmailMTA(spec, milter_name=MILTER_NAME, milter_flags=MILTER_FLAGS,
                              milter_timeouts=MILTER_TIMEOUTS, milter_macros=SENDMAIL_MACROS,
                              relay_domains=[TEMPFAIL, FLAGGED, FAILOVER, PLAIN],
                              next_hop=sink.address)
            stack.callback(mta.stop)
            mtas[name] = mta.start()
        yield Site(sink, failover_mx1, mtas["unix"], mtas["inet"], mtas["crash"],
                   guards["unix"], guards["inet"], guards["crash"])


def via(site: Site, kind: str) -> tuple[SendmailMTA, GuardProcess]:
    return (site.sendmail, site.unix_guard) if kind == "unix" else \
        (site.inet_sendmail, site.inet_guard)


@pytest.mark.parametrize("kind", ["unix", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_tempfailed_at_rcpt(site: Site, kind: str) -> None:
    sendmail, guard = via(site, kind)
    to = rcpt(TEMPFAIL, f"bypass-{kind}")
    result = send(*sendmail.address, SENDER, [to], source=UNTRUSTED)
    assert result.rcpts[to] == reply_451(TEMPFAIL), result
    assert result.data is None
    line = decision(guard, to)
    assert (line["client"], line["action"], line["reason"]) == (UNTRUSTED, "tempfail",
                                                                 "bypass"), line[0]
    sendmail.wait_for_log(rf"Milter: to=<{re.escape(to)}>, reject=451 4\.7\.1 Please "
                          rf"deliver mail for {TEMPFAIL} to its primary MX")


@pytest.mark.parametrize("kind", ["unix", "inet"], ids=["unix-socket", "inet-socket"])
def test_bypass_is_flagged_with_a_header(site: Site, kind: str) -> None:
    sendmail, guard = via(site, kind)
    to = rcpt(FLAGGED, f"flag-{kind}")
    qid = queue_id(send(*sendmail.address, SENDER, [to], source=UNTRUSTED))
    [header] = delivered(site.sink, to).headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header
    line = decision(guard, to)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "flag", "bypass"), line[0]


def test_primary_down_then_back_within_down_grace(site: Site) -> None:
    guard, address = site.unix_guard, site.sendmail.address
    to = rcpt(FAILOVER, "while-up")
    assert send(*address, SENDER, [to], source=UNTRUSTED).rcpts[to] == reply_451(FAILOVER)

    mark = len(guard.log())
    host, port = site.failover_mx1.address
    site.failover_mx1.stop()
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is down", after=mark)
    to = rcpt(FAILOVER, "while-down")
    qid = queue_id(send(*address, SENDER, [to], source=UNTRUSTED))
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    line = decision(guard, to, mark)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "primary-down")

    mark = len(guard.log())
    site.failover_mx1.start()
    guard.wait_for_log(rf"target {re.escape(host)}:{port} is up", after=mark)
    to = rcpt(FAILOVER, "back-in-grace")
    queue_id(send(*address, SENDER, [to], source=UNTRUSTED))
    delivered(site.sink, to)
    line = decision(guard, to, mark)
    assert (line["action"], line["reason"]) == ("accept", "primary-down"), line[0]
    assert "failed a probe within down_grace" in line["detail"], line[0]


def test_trusted_network_client_is_accepted(site: Site) -> None:
    to = rcpt(TEMPFAIL, "trusted-net")
    queue_id(send(*site.sendmail.address, SENDER, [to], source="127.0.0.1"))
    assert delivered(site.sink, to).headers("X-MX-Guard") == []
    line = decision(site.unix_guard, to)
    assert (line["client"], line["action"], line["reason"]) == ("127.0.0.1", "accept",
                                                                 "trusted"), line[0]


def test_each_recipient_is_decided_on_its_own(site: Site) -> None:
    guarded, plain = rcpt(TEMPFAIL, "mixed"), rcpt(PLAIN, "mixed")
    result = send(*site.sendmail.address, SENDER, [guarded, plain], source=UNTRUSTED)
    assert result.rcpts[guarded] == reply_451(TEMPFAIL), result
    assert result.rcpts[plain][0] == 250, result
    qid = queue_id(result)
    assert delivered(site.sink, plain).headers("X-MX-Guard") == []
    assert site.sink.messages_for(guarded) == []
    line = decision(site.unix_guard, plain)
    assert (line["qid"], line["action"], line["reason"]) == (qid, "accept", "not-secondary")


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
    queue_id(send(*site.sendmail.address, SENDER, [to], message_with(to, *FORGED),
                  source=client))
    msg = delivered(site.sink, to)
    assert msg.headers("X-MX-Guard") == [], msg.data.decode(errors="replace")
    assert msg.header("Subject") == "forged guard header"
    site.unix_guard.wait_for_log(r"removed 2 forged X-MX-Guard header\(s\)", after=mark)


def test_a_flagged_message_keeps_only_the_guards_header(site: Site) -> None:
    to = rcpt(FLAGGED, "forged-flag")
    forged = f"X-MX-Guard: bypass; domain={FLAGGED}; client=192.0.2.1; node=evil"
    queue_id(send(*site.sendmail.address, SENDER, [to], message_with(to, forged),
                  source=UNTRUSTED))
    [header] = delivered(site.sink, to).headers("X-MX-Guard")
    assert re.fullmatch(flag_header(FLAGGED, UNTRUSTED), header), header


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
