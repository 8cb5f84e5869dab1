"""Tests for tests/fakedns.py through dnspython's real resolver and query functions."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.fakedns import Behaviour, FakeDNS

RECORDS = [
    ("example.org", "MX", 600, "10 mx1.example.org."),
    ("example.org", "MX", 600, "20 mx2.example.org."),
    ("mx1.example.org", "A", 120, "192.0.2.1"),
    ("mx1.example.org", "AAAA", 90, "2001:db8::1"),
    ("only-a.example.org", "A", 30, "192.0.2.9"),
    ("deep.empty.example.org", "A", 30, "192.0.2.10"),
]


@pytest.fixture
def server() -> Iterator[FakeDNS]:
    with FakeDNS(RECORDS, {"gone.example.org": "nxdomain"}) as fake:
        yield fake


def test_answers_carry_configured_records_and_ttls(server: FakeDNS) -> None:
    resolver = server.resolver()
    mx = resolver.resolve("example.org", "MX")
    assert mx.rrset is not None and mx.rrset.ttl == 600
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.org."), (20, "mx2.example.org.")]
    a = resolver.resolve("MX1.Example.ORG", "A")  # names are case-insensitive
    assert a.rrset is not None and a.rrset.ttl == 120 and [r.address for r in a] == ["192.0.2.1"]
    aaaa = resolver.resolve("mx1.example.org", "AAAA")
    assert aaaa.rrset is not None and aaaa.rrset.ttl == 90
    assert [r.address for r in aaaa] == ["2001:db8::1"]
    assert server.queries("mx1.example.org", "A") == 1


def test_each_behaviour_maps_to_the_dnspython_exception(server: FakeDNS) -> None:
    resolver = server.resolver(timeout=0.2, lifetime=0.4)
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("gone.example.org", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("unknown.example.org", "A")
    # Names that own other records, or records below them, exist: no answer, no error.
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("only-a.example.org", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("empty.example.org", "A")
    server.set_behaviour("example.org", Behaviour.NODATA)
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.org", "MX")
    server.set_behaviour("example.org", "null_mx")
    null_mx = resolver.resolve("example.org", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in null_mx] == [(0, ".")]
    server.set_behaviour("example.org", "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("example.org", "MX")
    server.set_behaviour("example.org", "silent")
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("example.org", "MX")
    assert time.monotonic() - started < 1
    server.clear_behaviour("example.org")
    assert len(resolver.resolve("example.org", "MX")) == 2


def test_per_type_behaviour_and_runtime_changes(server: FakeDNS) -> None:
    resolver = server.resolver(timeout=0.2, lifetime=0.3)
    server.set_behaviour("mx1.example.org", "silent", rtype="AAAA")
    assert [r.address for r in resolver.resolve("mx1.example.org", "A")] == ["192.0.2.1"]
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("mx1.example.org", "AAAA")
    server.set_records("mx1.example.org", "A", 5, ["192.0.2.50", "192.0.2.51"])
    answer = resolver.resolve("mx1.example.org", "A")
    assert answer.rrset is not None and answer.rrset.ttl == 5
    assert sorted(r.address for r in answer) == ["192.0.2.50", "192.0.2.51"]
    server.add("new.example.org", "MX", 42, "5 mx1.example.org.")
    added = resolver.resolve("new.example.org", "MX")
    assert added.rrset is not None and added.rrset.ttl == 42
    server.remove("new.example.org")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("new.example.org", "MX")


def test_query_counter_shows_caching(server: FakeDNS) -> None:
    resolver = server.resolver()
    resolver.resolve("example.org", "MX")
    resolver.resolve("example.org", "MX")
    assert server.queries("example.org", "MX") == 2
    cached = server.resolver()
    cached.cache = dns.resolver.Cache()
    server.reset_queries()
    for _ in range(3):
        cached.resolve("example.org", "MX")
    with pytest.raises(dns.resolver.NXDOMAIN):
        cached.resolve("gone.example.org", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):  # negative answers are cached too (SOA)
        cached.resolve("gone.example.org", "A")
    assert server.queries("example.org", "MX") == 1
    assert server.queries("gone.example.org.", "A") == 1
    assert server.total_queries == 2
    assert server.query_log == [("example.org.", "MX", "udp"), ("gone.example.org.", "A", "udp")]


def test_negative_answers_carry_soa_and_big_answers_truncate_to_tcp() -> None:
    records = [("big.example.org", "TXT", 60, f'"{i:03d} {"x" * 60}"') for i in range(20)]
    with FakeDNS(records, {"gone.example.org": "nxdomain"}, negative_ttl=17) as fake:
        nx = dns.query.udp(dns.message.make_query("gone.example.org", "A"), fake.host,
                           timeout=1, port=fake.port)
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
        assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].ttl == 17
        query = dns.message.make_query("big.example.org", "TXT", use_edns=False)
        small = dns.query.udp(query, fake.host, timeout=1, port=fake.port)
        assert small.flags & dns.flags.TC and not small.answer
        full = dns.query.tcp(query, fake.host, timeout=1, port=fake.port)
        assert len(full.answer[0]) == 20
        # The resolver falls back to TCP by itself.
        assert len(fake.resolver().resolve("big.example.org", "TXT")) == 20
        assert ("big.example.org.", "TXT", "tcp") in fake.query_log
    assert not fake.running


def test_garbage_is_ignored_and_stop_is_clean() -> None:
    fake = FakeDNS(RECORDS).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x00garbage", (fake.host, fake.port))
        with socket.create_connection((fake.host, fake.port)) as conn:
            conn.sendall(b"\x00")  # half a length prefix, then hang up
        assert len(fake.resolver().resolve("example.org", "MX")) == 2
    finally:
        fake.stop()
    assert not fake.running
    fake.stop()  # idempotent
