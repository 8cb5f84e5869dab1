"""MX discovery against a real DNS server on loopback (tests/fakedns.py), no mocked resolver."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from guard.config import Action, Config, DnsConfig, parse_config
from guard.discovery import (
    LookupTimeout,
    MxDirectory,
    MxResolver,
    NoSuchDomain,
    ServerFailure,
)
from guard.health import HealthSnapshot, Observation, State, Target
from guard.mxset import MxSource
from guard.policy import Connection, Reason, Verdict, client_address, decide
from tests.support.fakedns import Behaviour, FakeDNS

ZONE = [
    ("example.org", "MX", 600, "10 mx1.example.org."),
    ("example.org", "MX", 600, "20 mx2.example.org."),
    ("mx1.example.org", "A", 300, "192.0.2.1"),
    ("mx1.example.org", "AAAA", 120, "2001:db8::1"),
    ("mx2.example.org", "A", 300, "198.51.100.2"),
    ("implicit.example", "A", 300, "192.0.2.50"),
    ("gone.example", "MX", 300, "0 ."),
]


@pytest.fixture
def dns_server() -> Iterator[FakeDNS]:
    with FakeDNS(ZONE) as server:
        yield server


def dns_config(server: FakeDNS, **extra: object) -> DnsConfig:
    return DnsConfig(nameservers=("127.0.0.1",), port=server.port, lifetime=0.3,
                     min_ttl=1.0, **extra)  # type: ignore[arg-type]


def test_mx_set_with_addresses_and_smallest_ttl(dns_server: FakeDNS) -> None:
    mxset = MxResolver(dns_config(dns_server)).lookup("example.org")
    assert mxset.source is MxSource.DNS
    assert [(h.host, h.preference, h.addresses) for h in mxset.sorted_hosts()] == [
        ("mx1.example.org", 10, ("192.0.2.1", "2001:db8::1")),
        ("mx2.example.org", 20, ("198.51.100.2",)),
    ]
    assert mxset.expires_at - mxset.fetched_at == pytest.approx(120)


def test_no_mx_means_the_domain_itself(dns_server: FakeDNS) -> None:
    mxset = MxResolver(dns_config(dns_server)).lookup("implicit.example")
    assert mxset.source is MxSource.IMPLICIT
    assert [(h.host, h.addresses) for h in mxset.hosts] == [("implicit.example",
                                                              ("192.0.2.50",))]


def test_null_mx(dns_server: FakeDNS) -> None:
    mxset = MxResolver(dns_config(dns_server)).lookup("gone.example")
    assert mxset.source is MxSource.NULL and mxset.hosts == ()


@pytest.mark.parametrize(("behaviour", "error"), [
    (Behaviour.NXDOMAIN, NoSuchDomain),
    (Behaviour.SERVFAIL, ServerFailure),
    (Behaviour.SILENT, LookupTimeout),
])
def test_failures_are_told_apart(dns_server: FakeDNS, behaviour: Behaviour,
                                 error: type[Exception]) -> None:
    dns_server.set_behaviour("example.org", behaviour)
    started = time.monotonic()
    with pytest.raises(error):
        MxResolver(dns_config(dns_server)).lookup("example.org")
    assert time.monotonic() - started < 1.0  # bounded by the 300 ms lifetime


def config_with(server: FakeDNS, mx: object = "dns") -> Config:
    return parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "dns": {"nameservers": ["127.0.0.1"], "port": server.port, "lifetime": "300ms",
                "min_ttl": "1s", "retry": "5s"},
        "domain": [{"name": "example.org", "mx": mx}],
    })


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_directory_caches_by_ttl_and_keeps_the_last_good_set(
        dns_server: FakeDNS, caplog: pytest.LogCaptureFixture) -> None:
    config = config_with(dns_server)
    clock = Clock()
    directory = MxDirectory(config, MxResolver(config.dns, clock), clock)
    assert directory.get("example.org") is None
    directory.refresh_due()
    good = directory.get("example.org")
    assert good is not None and good.source is MxSource.DNS
    assert directory.targets() == {Target("192.0.2.1"), Target("2001:db8::1")}

    directory.refresh_due()  # not expired: no new query
    assert dns_server.queries("example.org", "MX") == 1

    dns_server.set_behaviour("example.org", Behaviour.SERVFAIL)
    clock.now += 121  # past the smallest TTL
    with caplog.at_level(logging.WARNING, "guard.discovery"):
        directory.refresh_due()
        clock.now += 6  # past dns.retry: tried again, still failing, logged once
        directory.refresh_due()
    assert directory.get("example.org") == good
    assert dns_server.queries("example.org", "MX") == 3
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "keeping the last good MX set" in warnings[0]

    dns_server.clear_behaviour("example.org")
    dns_server.set_records("example.org", "MX", 600, ["10 mx1.example.org.",
                                                     "30 mx2.example.org."])
    clock.now += 6
    directory.refresh_due()
    new = directory.get("example.org")
    assert new is not None and [h.preference for h in new.sorted_hosts()] == [10, 30]


def decide_for_a_stranger(config: Config) -> Verdict:
    """The decision for an untrusted client's recipient at example.org, with mx1
    (192.0.2.1) up, on the MX set a fresh MxDirectory finds in DNS."""
    directory = MxDirectory(config, MxResolver(config.dns))
    directory.refresh_due()
    now = time.time()
    snapshot = HealthSnapshot.build(
        [Observation(Target("192.0.2.1"), "mx2", State.UP, now - 60, now)], now, "test")
    conn = Connection(client_address("203.0.113.7"), now)
    return decide(conn, "example.org", directory.get("example.org"), snapshot, config)


def test_a_failed_first_lookup_never_looks_like_a_bypass(dns_server: FakeDNS) -> None:
    dns_server.set_behaviour("example.org", Behaviour.SILENT)
    verdict = decide_for_a_stranger(config_with(dns_server))
    assert verdict.reason is Reason.MX_UNKNOWN
    assert verdict.action is Action.FLAG  # on_unknown, never the bypass action


def test_dns_mx_set_drives_the_decision(dns_server: FakeDNS) -> None:
    verdict = decide_for_a_stranger(config_with(dns_server))
    assert (verdict.action, verdict.reason) == (Action.TEMPFAIL, Reason.BYPASS)


def test_configured_hosts_without_addresses_are_resolved(dns_server: FakeDNS) -> None:
    config = config_with(dns_server, mx=[
        {"host": "mx1.example.org", "preference": 10},
        {"host": "mx2.example.org", "preference": 20},
    ])
    directory = MxDirectory(config, MxResolver(config.dns))
    directory.refresh_due()
    mxset = directory.get("example.org")
    assert mxset is not None and mxset.source is MxSource.CONFIG
    assert directory.targets() == {Target("192.0.2.1"), Target("2001:db8::1")}
    # Our own entry is never looked up: we do not probe ourselves.
    assert dns_server.queries("mx2.example.org", "A") == 0


def test_a_dead_first_nameserver_leaves_time_for_the_next(dns_server: FakeDNS) -> None:
    """Each server gets its share of the lifetime: a silent first one costs half."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.2", dns_server.port))  # receives, never answers
        config = DnsConfig(nameservers=("127.0.0.2", "127.0.0.1"), port=dns_server.port,
                           lifetime=0.4, min_ttl=1.0)
        mxset = MxResolver(config).lookup("example.org")
    assert mxset.source is MxSource.DNS
