"""``mx-guard run`` as a process, driven over real sockets by an independent
milter-protocol client (tests/support/milterclient.py), with a real SMTP listener as primary.

Every reply is timed: no callback may take longer than the SPEC's 250 ms budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.milterclient import AddHeader, ChangeHeader, MilterClient, MilterClosed, Reply
from tests.support.smtpserver import free_port

BUDGET = 0.25  # seconds a callback may take (SPEC section 4)
SPAMMER = "203.0.113.7"
DOWN_GRACE_LINE = 'down_grace = "30m"'


@dataclass
class Running:
    guard: GuardProcess
    primary: FakePrimary
    socket: str


def start(tmp_path: Path, socket: str, extra: str = "",
          primary_host: str = "127.0.0.1") -> Iterator[Running]:
    primary = FakePrimary(host=primary_host).start()
    guard = GuardProcess(guard_toml(socket, primary.port, extra, primary=primary_host),
                         tmp_path)
    guard.start()
    try:
        guard.wait_for_log(r"target \S+:\d+ is up")
        yield Running(guard, primary, socket)
    finally:
        code = guard.stop()
        primary.stop()
        assert "callback failed" not in guard.log(), guard.log()[-3000:]
        assert "Traceback" not in guard.log(), guard.log()[-3000:]
        assert code == 0, f"mx-guard exited {code} on SIGTERM"


# One guard per socket kind for the whole module: libmilter takes up to 5 s to
# notice a stop signal, so a guard per test would make the suite crawl.
@pytest.fixture(scope="module", params=["unix", "inet"])
def running(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp_path = tmp_path_factory.mktemp(request.param)
    if request.param == "unix":
        socket = f"unix:{tmp_path}/guard.sock"
    else:
        socket = f"inet:{free_port()}@127.0.0.1"
    yield from start(tmp_path, socket)


def within_budget(*replies: Reply) -> None:
    for r in replies:
        assert r.elapsed < BUDGET, f"{r.step} took {r.elapsed * 1000:.0f} ms"


def rcpt_once(socket: str, rcpt: str, client: str = SPAMMER) -> Reply:
    with MilterClient(socket, timeout=2) as c:
        c.connect("client.example", client, 40000)
        c.helo("client.example")
        c.mail("<sender@client.example>")
        reply = c.rcpt(f"<{rcpt}>")
        within_budget(reply)
        c.abort()
        return reply


def test_negotiates_no_reply_skips_and_only_the_macros_used(running: Running) -> None:
    with MilterClient(running.socket, timeout=2) as c:
        n = c.negotiate()
    assert all(n.no_reply(step) for step in ("connect", "helo", "mail", "header"))
    assert not n.no_reply("rcpt")
    # Over TCP DATA is answered: the answer acknowledges the DATA macros at once, so the
    # MTA's next write does not wait 40 ms behind Nagle. A Unix socket skips the step.
    if running.socket.startswith("inet:"):
        assert not n.no_reply("data") and not n.skips("data")
    else:
        assert n.skips("data")
    assert all(n.skips(step) for step in ("eoh", "body"))
    assert n.macros == {"connect": ("{client_addr}", "{client_name}", "{client_resolve}"),
                        "mail": ("{auth_authen}",), "rcpt": ("i",), "eom": ("i",)}


def test_bypass_unguarded_trusted_and_flag(running: Running) -> None:
    reply = rcpt_once(running.socket, "user@example.org")
    assert reply.command == "y"
    assert reply.text == "451 4.7.1 Please deliver mail for example.org to its primary MX"
    assert rcpt_once(running.socket, "user@unguarded.example").name == "continue"
    assert rcpt_once(running.socket, "user@example.org", client="127.0.0.1").name == "continue"

    with MilterClient(running.socket, timeout=2) as c:
        tx = c.send_message(
            "sender@client.example", ["user@flagged.example"],
            [("Subject", "hi"), ("X-MX-Guard", "forged")], b"body\r\n",
            client_address=SPAMMER, macros={"eom": {"i": "4XyZ123"}})
    assert tx.eom is not None and tx.outcome == "continue"
    within_budget(*(r for _, r in tx.steps), tx.eom.reply)
    mods = tx.eom.modifications
    assert ChangeHeader(1, "X-MX-Guard", "") in mods
    [added] = [m for m in mods if isinstance(m, AddHeader)]
    assert added.name == "X-MX-Guard"
    assert re.match(r"bypass; domain=flagged\.example; primary=mx1\.example\.org up since "
                    rf"\S+Z; client={SPAMMER}; node=mx2$", added.value)
    running.guard.wait_for_log(r"4XyZ123: conn=\d+ client=203\.0\.113\.7 .* "
                               r"domain=flagged\.example action=flag reason=bypass")


def test_primary_down_then_back_within_down_grace(tmp_path: Path) -> None:
    for run in start(tmp_path, f"unix:{tmp_path}/guard.sock"):
        assert rcpt_once(run.socket, "user@example.org").command == "y"
        mark = len(run.guard.log())
        run.primary.stop()
        run.guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is down", after=mark)
        assert rcpt_once(run.socket, "user@example.org").name == "continue"
        run.guard.wait_for_log(r"action=accept reason=primary-down", after=mark)

        mark = len(run.guard.log())
        run.primary.start()  # same port: the primary is back
        run.guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up", after=mark)
        assert rcpt_once(run.socket, "user@example.org").name == "continue"
        # Let in, with the header: the primary is up again, only recently down.
        run.guard.wait_for_log(r"action=flag reason=recently-down .*failed a probe within "
                               r"down_grace", after=mark)


JUNK = [
    b"evil\r\nFAKE-LOG: injected",
    b"nul\x00inside",
    b"bad utf8 \xff\xfe\xc3",
    b"x" * 60000,  # libmilter takes commands up to 64 KiB
]


@pytest.mark.parametrize("junk", JUNK, ids=["crlf", "nul", "bad-utf8", "60k"])
def test_hostile_input(running: Running, junk: bytes) -> None:
    mark = len(running.guard.log())
    with MilterClient(running.socket, timeout=2) as c:
        c.connect("client.example", SPAMMER, 40000)  # the MTA's verified name
        within_budget(c.helo(junk), c.mail(b"<" + junk + b"@spam.example>"))
        tempfail = c.rcpt(b"<" + junk + b"@example.org>")
        unguarded = c.rcpt(b"<user@" + junk + b">")
        within_budget(tempfail, unguarded, c.header(b"Subject", junk))
        eom = c.eom(macros={"i": junk[:50]})
        within_budget(eom.reply)
    if b"\x00" in junk:
        # The protocol's strings end at NUL: the guard saw "<nul", no domain at all.
        assert tempfail.name == "continue"
    else:
        assert tempfail.text.startswith("451 4.7.1")
    assert unguarded.name == "continue"
    assert eom.name == "continue"
    # The end-of-message decision line is the last one this connection writes.
    running.guard.wait_for_log(r"conn=\d+ [^\n]*rcpt=<user@[^\n]*reason=not-secondary",
                               after=mark)
    written = running.guard.log()[mark:]
    assert "\r" not in written and "\x00" not in written
    for line in written.splitlines():
        # pymilter itself prints this when a HELO is not UTF-8, before we are called;
        # it names a byte position, never the client's text.
        if re.fullmatch(r"UnicodeDecodeError: 'utf-8' codec can't decode byte 0x[0-9a-f]{2} "
                        r"in position \d+: [a-z ]+", line):
            continue
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line), f"forged line: {line!r}"
        assert len(line) < 3000


def test_missing_macros_ipv6_and_mapped_addresses(running: Running) -> None:
    # The primary has no IPv6 address: an IPv6 client could not have reached it.
    mark = len(running.guard.log())
    assert rcpt_once(running.socket, "user@example.org", client="2001:db8::7").name == \
        "continue"
    running.guard.wait_for_log(r"client=2001:db8::7 .*action=accept reason=unreachable",
                               after=mark)
    # Trusted 127.0.0.1 arriving as an IPv4-mapped IPv6 address.
    assert rcpt_once(running.socket, "user@example.org",
                     client="::ffff:127.0.0.1").name == "continue"
    with MilterClient(running.socket, timeout=2) as c:  # unknown family, no macros
        c.connect("unknown", None, 0, family="U")
        c.mail("<a@b.example>")
        reply = c.rcpt("<user@example.org>")
        within_budget(reply)
    assert reply.name == "continue"


def test_ipv6_client_bypassing_an_ipv6_primary(tmp_path: Path) -> None:
    for run in start(tmp_path, f"unix:{tmp_path}/guard.sock", primary_host="::1"):
        assert rcpt_once(run.socket, "user@example.org", client="2001:db8::7").command == "y"
        # An IPv4 client could not have reached an IPv6-only primary.
        assert rcpt_once(run.socket, "user@example.org").name == "continue"


def test_an_undecodable_client_name_fails_open(running: Running) -> None:
    """pymilter decodes the connect name as strict UTF-8 before calling us; when that
    fails the guard never learns the client's address and lets the mail through.
    (MTAs send a validated host name or "unknown" there, never raw client bytes.)"""
    mark = len(running.guard.log())
    with MilterClient(running.socket, timeout=2) as c:
        c.connect(b"bad \xff name", SPAMMER, 40000)
        c.mail("<a@b.example>")
        reply = c.rcpt("<user@example.org>")
    assert reply.name == "continue"
    running.guard.wait_for_log(r"action=accept reason=client-unknown", after=mark)


def test_a_command_over_libmilters_limit_fails_open(running: Running) -> None:
    """libmilter drops a connection whose command exceeds 64 KiB; the MTA then applies
    milter_default_action (accept). The guard itself keeps serving."""
    with MilterClient(running.socket, timeout=2) as c:
        c.connect("client.example", SPAMMER, 40000)
        with pytest.raises(MilterClosed):
            c.helo(b"h" * 70000)
            c.mail("<a@b.example>")
            c.rcpt("<user@example.org>")
    assert rcpt_once(running.socket, "user@example.org").command == "y"
