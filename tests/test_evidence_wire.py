"""Evidence through ``mx-guard run`` over the milter protocol (an independent client):
a sender pool is released, bots never are, a witness on the primary tells a client that
tried the primary from one that skipped it, and a stale witness counts for nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml, witness_toml
from tests.support.milterclient import AddHeader, MilterClient
from tests.support.redis_server import RedisServer

BUDGET = 0.25  # seconds a callback may take (SPEC section 4)
MIN_AGE = 2.0  # seconds: [release] min_age in these tests
RELEASE = f'[release]\nattempts = 3\nmin_age = "{MIN_AGE:g}s"\n'


def try_once(socket: str, client: str, sender: str, name: str = "unknown",
             rcpt: str = "<user@flagged.example>") -> tuple[str, list[str]]:
    """One delivery try: 'tempfail' or 'accept', and the X-MX-Guard headers added."""
    with MilterClient(socket, timeout=2) as c:
        c.connect(name, client, 40000, macros={"{client_name}": name})
        c.helo("client.example")
        c.mail(sender)
        reply = c.rcpt(rcpt)
        assert reply.elapsed < BUDGET, f"rcpt took {reply.elapsed * 1000:.0f} ms"
        if reply.is_tempfail:
            c.abort()
            return "tempfail", []
        assert reply.proceeds, reply
        c.header("Subject", "hi")
        c.eoh()
        c.body(b"hello\r\n")
        eom = c.eom()
        return "accept", [m.value for m in eom.modifications
                          if isinstance(m, AddHeader) and m.name == "X-MX-Guard"]


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[tuple[GuardProcess, str]]:
    with FakePrimary() as primary:
        socket = f"unix:{tmp_path}/guard.sock"
        # flagged.example is a flag domain in guard_toml; tempfail here, like example.org.
        text = guard_toml(socket, primary.port, RELEASE).replace('action = "flag"\n', "")
        with GuardProcess(text, tmp_path) as g:
            g.start()
            g.wait_for_log(r"target \S+:\d+ is up")
            yield g, socket
            assert "Traceback" not in g.log(), g.log()[-3000:]


def test_a_pool_with_new_addresses_and_verp_senders_is_released(
        guard: tuple[GuardProcess, str]) -> None:
    process, socket = guard
    started = time.monotonic()
    outcomes = []
    for n in range(4):
        if n == 2:  # the third try comes min_age after the first
            time.sleep(max(0.0, started + MIN_AGE + 0.2 - time.monotonic()))
        outcomes.append(try_once(socket, f"54.240.{n}.{n + 10}", f"<0102018c{n:04x}@ses.example>",
                                 name=f"a{n}-{n}.smtp-out.eu-west-1.amazonses.com"))
    assert [o for o, _ in outcomes] == ["tempfail", "tempfail", "accept", "accept"]
    for _, headers in outcomes[2:]:
        assert len(headers) == 1 and headers[0].startswith("released; domain=flagged.example")
    process.wait_for_log(r"action=flag reason=released detail=released by pool amazonses\.com "
                         r"from-domain=ses\.example rcpt=<user@flagged\.example> \(try 3\)")


def test_bots_with_unverified_names_and_new_senders_are_never_released(
        guard: tuple[GuardProcess, str]) -> None:
    _, socket = guard
    outcomes = []
    for n in range(6):
        if n == 3:
            time.sleep(MIN_AGE + 0.2)
        outcomes.append(try_once(socket, f"198.{51 + n}.100.{n + 1}", f"<bot{n}@spam.example>",
                                 name="unknown")[0])
    assert outcomes == ["tempfail"] * 6


def test_the_same_sender_retrying_from_its_network_is_released(
        guard: tuple[GuardProcess, str]) -> None:
    _, socket = guard
    first = try_once(socket, "192.0.2.10", "<a@legit.example>")
    second = try_once(socket, "192.0.2.11", "<a@legit.example>")  # same /24
    time.sleep(MIN_AGE + 0.2)
    third = try_once(socket, "192.0.2.12", "<a@legit.example>")
    assert (first[0], second[0], third[0]) == ("tempfail", "tempfail", "accept")
    # Released for the identity's ttl: the next message of that sender passes at once.
    assert try_once(socket, "192.0.2.10", "<a@legit.example>")[0] == "accept"
    # Another recipient is another identity.
    assert try_once(socket, "192.0.2.10", "<a@legit.example>",
                    rcpt="<other@flagged.example>")[0] == "tempfail"


def test_a_witness_on_the_primary_tells_tried_from_skipped(tmp_path: Path,
                                                          redis_server: RedisServer) -> None:
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(FakePrimary())
        witness_socket = f"unix:{tmp_path}/witness.sock"
        witness = stack.enter_context(GuardProcess(
            witness_toml(witness_socket, redis_server.url), tmp_path, "witness"))
        witness.start()
        witness.wait_for_log(r"as a witness")
        socket = f"unix:{tmp_path}/guard.sock"
        text = guard_toml(socket, primary.port, "[release]\nipv4_prefix = 32\n",
                          store=redis_server.url)
        assert 'stale_after = "10s"' in text
        text = text.replace('stale_after = "10s"', 'stale_after = "3s"')
        secondary = stack.enter_context(GuardProcess(text, tmp_path, "secondary"))
        secondary.start()
        secondary.wait_for_log(r"target \S+:\d+ is up")

        # A client greylisted at the primary: it connected there first.
        with MilterClient(witness_socket, timeout=2) as c:
            reply = c.connect("tried.example", "192.0.2.77", 40000)
            assert reply.elapsed < BUDGET
            c.helo("tried.example")  # the rest of the session is skipped by the witness
            c.quit()
        key = "mxguard:wit:192.0.2.77/32"
        deadline = time.monotonic() + 5
        while not redis_server.admin.exists(key) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert redis_server.admin.exists(key), "the witness did not record the client"

        assert try_once(socket, "192.0.2.77", "<a@tried.example>",
                        rcpt="<user@example.org>")[0] == "tempfail"
        secondary.wait_for_log(r"client=192\.0\.2\.77 .* action=tempfail "
                               r"reason=seen-at-primary")
        # One that never went to the primary skipped it: the plain action.
        assert try_once(socket, "192.0.2.78", "<b@skipped.example>",
                        rcpt="<user@example.org>")[0] == "tempfail"
        secondary.wait_for_log(r"client=192\.0\.2\.78 .* action=tempfail reason=bypass "
                               r"detail=[^\n]*not seen at the primary")

        # The witness stops: once its heartbeat is stale, its records count for nothing.
        assert witness.stop() == 0
        time.sleep(3.5)
        assert try_once(socket, "192.0.2.77", "<c@tried.example>",
                        rcpt="<user@example.org>")[0] == "tempfail"
        secondary.wait_for_log(r"client=192\.0\.2\.77 .* action=tempfail reason=bypass "
                               r"detail=[^\n]*witness stale")


def test_two_guards_on_one_redis_count_one_identity_right_and_survive_a_freeze(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Two secondaries (two mx-guard processes) count the same retry identity at the
    same moment; every try is counted once. Then Redis freezes mid-traffic: each RCPT
    still answers within the budget, with the plain action."""
    per_thread, threads_per_guard = 20, 2
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(FakePrimary())
        sockets = []
        for node in ("mx2a", "mx2b"):
            socket = f"unix:{tmp_path}/{node}.sock"
            # attempts far above the tries: nothing is released, every try is counted.
            text = guard_toml(socket, primary.port, '[release]\nattempts = 1000\n',
                              node=node, store=redis_server.url)
            g = stack.enter_context(GuardProcess(text, tmp_path, node))
            g.start()
            sockets.append((g, socket))
        for g, _ in sockets:
            g.wait_for_log(r"target \S+:\d+ is up")
            g.wait_for_log("milter listening")
        start = threading.Barrier(len(sockets) * threads_per_guard)
        outcomes: list[str] = []
        lock = threading.Lock()

        def hammer(socket: str) -> None:
            start.wait()
            for _ in range(per_thread):
                outcome = try_once(socket, "192.0.2.44", "<same@sender.example>",
                                   rcpt="<user@example.org>")[0]
                with lock:
                    outcomes.append(outcome)

        workers = [threading.Thread(target=hammer, args=(s,))
                   for _, s in sockets for _ in range(threads_per_guard)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        total = per_thread * threads_per_guard * len(sockets)
        assert outcomes == ["tempfail"] * total
        [key] = redis_server.admin.keys("mxguard:rel:*")
        assert int(redis_server.admin.hget(key, "t")) == total
        assert int(redis_server.admin.hget("mxguard:trap:192.0.2.44", "n")) == total

        redis_server.pause()
        try:
            frozen = [try_once(s, f"198.51.100.{n}", "<x@sender.example>",
                               rcpt="<user@example.org>")[0]  # asserts the budget itself
                      for _, s in sockets for n in range(5)]
        finally:
            redis_server.resume()
        assert frozen == ["tempfail"] * 10
        for g, _ in sockets:
            g.wait_for_log(r"bypass evidence\) failing: redis record bypass")
            assert g.log().count("(bypass evidence) failing") == 1  # once per episode
            assert "Traceback" not in g.log()
