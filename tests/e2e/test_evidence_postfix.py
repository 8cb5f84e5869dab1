"""Evidence end to end through real Postfix: no mail lost to tempfail, and a witness.

1. A *sending* Postfix whose transport ignores MX order (it only knows the secondary,
   like an MTA with a broken route to the primary) and retries every few seconds. The
   secondary's guard tempfails its message until ``[release] attempts`` tries and
   ``min_age`` have passed, then lets it through flagged, reason ``released``: the
   message reaches the sink, none is lost.
2. A Postfix acting as the primary runs a witness guard; a client that talked to it
   first is handled per ``on_seen_at_primary`` at the secondary (reason
   ``seen-at-primary``), one that did not gets the plain action, and with the witness
   stopped (heartbeat stale) every bypass falls back to the plain action.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, witness_toml
from tests.support.postfix import PostfixMTA
from tests.support.redis_server import RedisServer, redis_server_available
from tests.support.smtp import (
    GuardedDomain,
    GuardFleet,
    GuardSocket,
    guard_socket_dir,
    send,
    smtp_session,
    wait_until,
)
from tests.support.smtpserver import SmtpSink

from .scenarios import SENDER, UNTRUSTED, decision, rcpt, reply_451
from .test_postfix_guard import POSTFIX_MACROS, require_postfix

DOMAIN = "evidence.example"
MIN_AGE_SECONDS = 6


def test_a_sender_ignoring_mx_order_is_released_and_nothing_is_lost(tmp_path: Path) -> None:
    require_postfix()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(SmtpSink())
        mx1 = stack.enter_context(FakePrimary())
        sockets = guard_socket_dir()
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        fleet = GuardFleet(tmp_path)
        stack.callback(fleet.stop_all)
        sock = GuardSocket.unix(sockets, "secondary")
        guard = fleet.launch("secondary", sock, [GuardedDomain(DOMAIN, mx1.address)],
                             extra=f'[release]\nattempts = 3\nmin_age = "{MIN_AGE_SECONDS}s"\n')
        secondary = PostfixMTA(sock.postfix, relay_domains=[DOMAIN], next_hop=sink.address,
                               myhostname="mx2.test.example", milter_macros=POSTFIX_MACROS)
        stack.callback(secondary.stop)
        fleet.ready()
        secondary.start()
        # The sender: no milter, relays everything to the secondary only, from
        # UNTRUSTED, and retries deferred mail every second or two (the harness's
        # minimal_backoff_time 1s, maximal_backoff_time 2s, queue_run_delay 2s).
        sender = PostfixMTA(None, relay_domains=[], next_hop=secondary.address,
                            myhostname="sender.test.example", port=None,
                            main_cf={"smtp_bind_address": UNTRUSTED})
        stack.callback(sender.stop)
        sender.start()

        to = rcpt(DOMAIN, "ignores-mx-order")
        queued = time.monotonic()
        result = send(*sender.address, SENDER, [to], source="127.0.0.1")
        assert result.data is not None and result.data[0] == 250, result

        message = sink.wait_for_message(to, timeout=MIN_AGE_SECONDS + 30)
        took = time.monotonic() - queued
        assert took >= MIN_AGE_SECONDS, took  # not before min_age: it was held back
        [header] = message.headers("X-MX-Guard")
        assert header.startswith(f"released; domain={DOMAIN}; primary=mx1.example.org up")
        assert f"client={UNTRUSTED}" in header
        tempfailed = [d for d in guard.log().splitlines() if f"rcpt=<{to}>" in d
                      and "action=tempfail reason=bypass" in d]
        assert len(tempfailed) >= 2, guard.log()[-3000:]
        guard.wait_for_log(rf"rcpt=<{re.escape(to)}> domain={re.escape(DOMAIN)} "
                           r"action=flag reason=released detail=released by net "
                           rf"127\.0\.0\.0/24 from=<{re.escape(SENDER)}>", timeout=5)
        sender.wait_for_log(rf"to=<{to}>.*status=deferred .*451 4\.7\.1")
        sender.wait_for_log(rf"to=<{to}>.*status=sent")
        assert len(sink.messages_for(to)) == 1  # delivered once, lost never


def test_a_witness_on_a_postfix_primary(tmp_path: Path) -> None:
    require_postfix()
    if not redis_server_available():
        pytest.fail("redis-server is not installed: run `make test-deps`", pytrace=False)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(unix_socket=False))
        sink = stack.enter_context(SmtpSink())
        sockets = guard_socket_dir()
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        witness_sock = GuardSocket.unix(sockets, "witness")
        witness = stack.enter_context(GuardProcess(
            witness_toml(witness_sock.guard, redis.url), tmp_path, "witness"))
        witness.start()
        witness.wait_for_log("as a witness")
        # The primary: a real Postfix with the witness guard, relaying to the sink.
        primary = PostfixMTA(witness_sock.postfix, relay_domains=[DOMAIN],
                             next_hop=sink.address, myhostname="mx1.test.example",
                             milter_macros=POSTFIX_MACROS)
        stack.callback(primary.stop)
        primary.start()

        fleet = GuardFleet(tmp_path)
        stack.callback(fleet.stop_all)
        sock = GuardSocket.unix(sockets, "secondary")
        # tcp probes: while the witness stops, the primary's smtpd waits on its dying
        # milter before it greets, and a banner probe would see the primary fail.
        guard = fleet.launch("secondary", sock, [GuardedDomain(DOMAIN, primary.address)],
                             store=redis.url, stale_after="3s", probe_mode="tcp",
                             extra="[release]\nipv4_prefix = 32\n")
        secondary = PostfixMTA(sock.postfix, relay_domains=[DOMAIN], next_hop=sink.address,
                               myhostname="mx2.test.example", milter_macros=POSTFIX_MACROS)
        stack.callback(secondary.stop)
        fleet.ready()
        secondary.start()

        # A client greylisted at the primary would have talked to it first: it does.
        tried = "127.0.0.3"
        session = smtp_session(*primary.address, source=tried)
        session.quit()
        wait_until(lambda: redis.admin.exists(f"mxguard:wit:{tried}/32"), 5,
                   message="the witness's record of the client")
        to = rcpt(DOMAIN, "tried-primary")
        result = send(*secondary.address, SENDER, [to], source=tried)
        assert result.rcpts[to] == reply_451(DOMAIN), result
        assert decision(guard, to)["reason"] == "seen-at-primary"

        # A client that went straight to the secondary skipped the primary.
        skipped = rcpt(DOMAIN, "skipped-primary")
        result = send(*secondary.address, SENDER, [skipped], source=UNTRUSTED)
        assert result.rcpts[skipped] == reply_451(DOMAIN), result
        line = decision(guard, skipped)
        assert line["reason"] == "bypass" and "not seen at the primary" in line["detail"]

        # The witness stops: its heartbeat goes stale and its records count for nothing.
        assert witness.stop() == 0
        time.sleep(3.5)  # [policy] stale_after of the secondary
        stale = rcpt(DOMAIN, "stale-witness")
        result = send(*secondary.address, SENDER, [stale], source=tried)
        assert result.rcpts[stale] == reply_451(DOMAIN), result
        line = decision(guard, stale)
        assert line["reason"] == "bypass" and "witness stale" in line["detail"], line[0]
