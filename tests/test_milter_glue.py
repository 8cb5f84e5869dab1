"""The milter glue under pymilter's own test context (Milter.testctx.TestCtx).

The guard behind the glue is real: a memory store holding observations, the refresher
building the snapshot, the decision core. Only the MTA is played by TestCtx.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import Milter
import pytest
from Milter.testctx import TestCtx as MilterTestCtx

from guard.config import Config, parse_config
from guard.health import Observation, State, Target
from guard.milter import GuardMilter
from guard.service import Guard

MX1 = Target("192.0.2.1", 25)
MX1_V6 = Target("2001:db8::1", 25)
SPAMMER = "203.0.113.7"


def guard_config() -> Config:
    mx = [
        {"host": "mx1.example.org", "preference": 10,
         "addresses": [MX1.address, MX1_V6.address]},
        {"host": "mx2.example.org", "preference": 20},
    ]
    return parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "domain": [
            {"name": "example.org", "mx": mx},
            {"name": "flagged.example", "mx": mx, "action": "flag"},
        ],
    })


NO_REPLY_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
                 | Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY
                 | Milter.P_NR_HDR)


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    # TestCtx treats NOREPLY as a failure, so it plays an MTA that offers no
    # "no reply" steps (the wire tests cover the MTAs that do). negotiate() writes
    # into the option list, hence a fresh one per test.
    monkeypatch.setattr(MilterTestCtx, "default_opts",
                        [Milter.CURR_ACTS, 0x1FFFFF & ~NO_REPLY_BITS, 0, 0])
    g = Guard(guard_config(), probing=False)
    now = time.time()
    g.store.publish([
        Observation(MX1, "mx2", State.UP, now - 3600, now, now, None, "greeted 220"),
        Observation(MX1_V6, "mx2", State.UP, now - 3600, now, now, None, "greeted 220"),
    ], [])
    g.refresher.refresh_once()
    Milter.factory = lambda: GuardMilter(g)
    yield g
    g.store.close()


def message(*headers: str) -> io.BytesIO:
    text = "".join(h + "\n" for h in headers) + "Subject: hi\n\nbody\n"
    return io.BytesIO(text.encode())


def connected(client: str = SPAMMER, helo: str = "spam.example") -> MilterTestCtx:
    ctx = MilterTestCtx()
    assert ctx._connect(host="spam.example", helo=helo, ip=client) == Milter.CONTINUE
    return ctx


def decisions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "guard.decision"
            and "action=" in r.getMessage()]


def test_bypass_is_tempfailed_at_rcpt_with_the_configured_reply(
        guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ctx = connected()
    assert ctx._envfrom("<spam@spam.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<user@example.org>") == Milter.TEMPFAIL
    assert ctx._reply == ("451", "4.7.1", "Please deliver mail for example.org to its primary MX")
    [line] = decisions(caplog)
    assert "NOQUEUE: " in line and "action=tempfail reason=bypass" in line
    assert f"client={SPAMMER}" in line and "rcpt=<user@example.org>" in line


def test_unguarded_domain_and_trusted_client_continue(guard: Guard) -> None:
    ctx = connected()
    ctx._envfrom("<a@b.example>")
    assert ctx._envrcpt("<user@unguarded.example>") == Milter.CONTINUE
    trusted = connected(client="127.0.0.1")
    trusted._envfrom("<a@b.example>")
    assert trusted._envrcpt("<user@example.org>") == Milter.CONTINUE


def test_flag_adds_one_header_at_eom(guard: Guard) -> None:
    ctx = connected()
    rc = ctx._feedFile(message(), "spam@spam.example", "user@flagged.example")
    assert rc == Milter.CONTINUE
    value = ctx._msg["X-MX-Guard"]
    assert value.startswith("bypass; domain=flagged.example; primary=mx1.example.org up since ")
    assert value.endswith(f"; client={SPAMMER}; node=mx2")


def test_forged_guard_header_is_removed(guard: Guard) -> None:
    ctx = connected(client="127.0.0.1")  # trusted: nothing of ours to add
    rc = ctx._feedFile(message("X-MX-Guard: bypass; forged=yes"), "a@b.example",
                       "user@example.org")
    assert rc == Milter.CONTINUE
    assert ctx._msg["X-MX-Guard"] is None
    assert ctx._headerschanged


def test_recipients_are_decided_one_by_one(guard: Guard) -> None:
    ctx = connected()
    ctx._envfrom("<spam@spam.example>")
    assert ctx._envrcpt("<a@example.org>") == Milter.TEMPFAIL
    assert ctx._envrcpt("<b@unguarded.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<c@flagged.example>") == Milter.CONTINUE


def test_ipv6_client_and_ipv4_mapped_client(guard: Guard) -> None:
    v6 = connected(client="2001:db8:ffff::7")
    v6._envfrom("<a@b.example>")
    assert v6._envrcpt("<user@example.org>") == Milter.TEMPFAIL
    mapped = connected(client="::ffff:127.0.0.1")  # trusted once unmapped
    mapped._envfrom("<a@b.example>")
    assert mapped._envrcpt("<user@example.org>") == Milter.CONTINUE


HOSTILE = [
    "evil\r\nFAKE: log line",
    "nul\x00byte",
    "bad utf8 \udcff\udcfe",
    "x" * 65536,
]


@pytest.mark.parametrize("junk", HOSTILE, ids=["crlf", "nul", "bad-utf8", "64k"])
def test_hostile_input_gives_a_sane_decision_and_one_escaped_log_line(
        guard: Guard, caplog: pytest.LogCaptureFixture, junk: str) -> None:
    caplog.set_level(logging.INFO)
    ctx = connected(helo=junk)
    assert ctx._envfrom(f"<{junk}@spam.example>") == Milter.CONTINUE
    assert ctx._envrcpt(f"<{junk}@example.org>") == Milter.TEMPFAIL
    assert ctx._envrcpt(f"<user@{junk}>") == Milter.CONTINUE  # not a guarded domain
    ctx._header("Subject", junk)
    assert ctx._eom() == Milter.CONTINUE
    lines = decisions(caplog)
    assert len(lines) == 2
    for line in lines:
        assert not any(c in line for c in "\r\n\x00"), repr(line[:200])
        assert all(c.isprintable() for c in line), repr(line[:200])
        assert len(line) < 3000


def test_missing_client_address_is_accepted(guard: Guard) -> None:
    ctx = MilterTestCtx()
    ctx._negotiate()
    ctx._stage = Milter.M_CONNECT
    # A Unix-socket client: no address in the connect packet and no {client_addr}.
    assert Milter.connect_callback(ctx, "localhost", 1, "/dev/null") == Milter.CONTINUE
    ctx._envfrom("<a@b.example>")
    assert ctx._envrcpt("<user@example.org>") == Milter.CONTINUE


def test_a_fault_inside_a_callback_lets_the_mail_through(
        guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    ctx = connected()
    ctx._envfrom("<a@b.example>")
    guard.directory = None  # type: ignore[assignment]  # provoke a real AttributeError
    assert ctx._envrcpt("<user@example.org>") == Milter.CONTINUE
    assert any("envrcpt callback failed; letting the mail through" in r.getMessage()
               for r in caplog.records)


def test_data_only_callbacks_ask_for_no_reply() -> None:
    mask = GuardMilter.protocol_mask()
    for no_reply in (Milter.P_NR_CONN, Milter.P_NR_HELO, Milter.P_NR_MAIL, Milter.P_NR_HDR):
        assert not mask & no_reply, hex(no_reply)  # cleared bit: noreply negotiated
    assert mask & Milter.P_NR_RCPT  # RCPT answers: that is where we tempfail
    for skipped in (Milter.P_NOBODY, Milter.P_NOEOH):
        assert not mask & skipped
