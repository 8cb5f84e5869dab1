"""The evidence core (guard/evidence.py) and how decide() applies it (guard/policy.py).

Table rows: a bypass with evidence in, the action and reason out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from guard.config import Action, Config, ConfigError, parse_config
from guard.evidence import (
    Evidence,
    EvidenceRules,
    IdentityCount,
    bypass_try,
    counts_as_trap,
    registrable_domain,
    verified_name,
)
from guard.health import HealthSnapshot, Observation, State, Target
from guard.mxset import MxSet
from guard.policy import Connection, Reason, client_address, decide

NOW = 1_800_000_000.0
MINUTE = 60.0


def config(**sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "domain": [
            {"name": "example.org", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": ["192.0.2.1"]},
                {"host": "mx2.example.org", "preference": 20}]},
            {"name": "flagged.example", "action": "flag", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": ["192.0.2.1"]},
                {"host": "mx2.example.org", "preference": 20}]},
        ],
    }
    data.update(sections)
    return parse_config(data)


def evidence(*counts: tuple[int, float], heartbeat_ago: float | None = None,
             seen_ago: float | None = None, traps: int = 1) -> Evidence:
    """Evidence at NOW: per identity (tries, first try minutes ago)."""
    return Evidence(
        NOW,
        tuple(IdentityCount(f"identity {i}", tries, NOW - ago * MINUTE)
              for i, (tries, ago) in enumerate(counts)),
        None if heartbeat_ago is None else NOW - heartbeat_ago,
        None if seen_ago is None else NOW - seen_ago,
        traps,
    )


@dataclass(frozen=True)
class Row:
    label: str
    evidence: Evidence | None
    want_action: Action
    want_reason: Reason
    domain: str = "example.org"
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


ROWS = [
    Row("no evidence (store fault): plain action", None, Action.TEMPFAIL, Reason.BYPASS),
    Row("first try", evidence((1, 0)), Action.TEMPFAIL, Reason.BYPASS),
    Row("second try after 4 min: too soon", evidence((2, 4)), Action.TEMPFAIL, Reason.BYPASS),
    Row("second try after 5 min: released", evidence((2, 5)), Action.FLAG, Reason.RELEASED),
    Row("attempts 3: second try after 20 min too few", evidence((2, 20)), Action.TEMPFAIL,
        Reason.BYPASS, sections={"release": {"attempts": 3, "min_age": "15m"}}),
    Row("min_age 15m: third try after 14 min too soon", evidence((3, 14)), Action.TEMPFAIL,
        Reason.BYPASS, sections={"release": {"attempts": 3, "min_age": "15m"}}),
    Row("min_age 15m: third try after 15 min released", evidence((3, 15)), Action.FLAG,
        Reason.RELEASED, sections={"release": {"attempts": 3, "min_age": "15m"}}),
    Row("network identity new, pool identity ripe", evidence((1, 0), (5, 40)),
        Action.FLAG, Reason.RELEASED),
    Row("released identity stays released", evidence((40, 600)), Action.FLAG,
        Reason.RELEASED),
    Row("released on a flag domain: flag", evidence((3, 15)), Action.FLAG, Reason.RELEASED,
        domain="flagged.example"),
    Row("released in dry-run: dry-run", evidence((3, 15)), Action.DRY_RUN, Reason.RELEASED,
        sections={"policy": {"action": "dry-run"}}),
    Row("attempts 1, min_age 1s: second-old first try passes", evidence((1, 1 / 60)),
        Action.FLAG, Reason.RELEASED,
        sections={"release": {"attempts": 1, "min_age": "1s"}}),
    Row("seen at the primary, fresh witness", evidence((1, 0), heartbeat_ago=3, seen_ago=30),
        Action.TEMPFAIL, Reason.SEEN_AT_PRIMARY),
    Row("seen at the primary: on_seen_at_primary flag",
        evidence((1, 0), heartbeat_ago=3, seen_ago=30), Action.FLAG, Reason.SEEN_AT_PRIMARY,
        sections={"policy": {"on_seen_at_primary": "flag"}}),
    Row("seen at the primary never stricter than a flag domain",
        evidence((1, 0), heartbeat_ago=3, seen_ago=30), Action.FLAG, Reason.SEEN_AT_PRIMARY,
        domain="flagged.example"),
    Row("seen, but the witness is stale: plain action",
        evidence((1, 0), heartbeat_ago=120, seen_ago=130), Action.TEMPFAIL, Reason.BYPASS),
    Row("fresh witness, not seen: a skip, plain action", evidence((1, 0), heartbeat_ago=3),
        Action.TEMPFAIL, Reason.BYPASS),
    Row("released beats seen", evidence((3, 15), heartbeat_ago=3, seen_ago=30),
        Action.FLAG, Reason.RELEASED),
    Row("trap count over threshold: reject", evidence((1, 0), traps=12), Action.REJECT,
        Reason.TRAPPED, sections={"traps": {"threshold": 10}}),
    Row("trap count under threshold: plain action", evidence((1, 0), traps=9),
        Action.TEMPFAIL, Reason.BYPASS, sections={"traps": {"threshold": 10}}),
    Row("threshold 0 (default): never trapped", evidence((1, 0), traps=10_000),
        Action.TEMPFAIL, Reason.BYPASS),
    Row("released beats trapped", evidence((3, 15), traps=50), Action.FLAG, Reason.RELEASED,
        sections={"traps": {"threshold": 10}}),
    Row("trapped in dry-run: dry-run", evidence((1, 0), traps=50), Action.DRY_RUN,
        Reason.TRAPPED, sections={"traps": {"threshold": 10}, "policy": {"action": "dry-run"}}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_decide_with_evidence(row: Row) -> None:
    cfg = config(**row.sections)
    dom = cfg.domain(row.domain)
    assert dom is not None and dom.mx is not None
    snapshot = HealthSnapshot.build(
        [Observation(Target("192.0.2.1"), "mx2", State.UP, NOW - 3600, NOW - 1, NOW - 1)],
        NOW, "test")
    conn = Connection(client_address("203.0.113.7"), NOW)
    verdict = decide(conn, row.domain, MxSet(row.domain, dom.mx), snapshot, cfg, row.evidence)
    assert (verdict.action, verdict.reason) == (row.want_action, row.want_reason), \
        verdict.detail
    assert verdict.evidence is row.evidence


def test_evidence_changes_only_a_bypass() -> None:
    cfg = config()
    dom = cfg.domain("example.org")
    assert dom is not None and dom.mx is not None
    down = HealthSnapshot.build(
        [Observation(Target("192.0.2.1"), "mx2", State.DOWN, NOW - 60, NOW - 1, None, NOW - 1)],
        NOW, "test")
    conn = Connection(client_address("203.0.113.7"), NOW)
    verdict = decide(conn, "example.org", MxSet("example.org", dom.mx), down, cfg,
                     evidence((1, 0), traps=99))
    assert verdict.reason is Reason.PRIMARY_DOWN and verdict.evidence is None


def test_released_header_says_released() -> None:
    cfg = config()
    dom = cfg.domain("example.org")
    assert dom is not None and dom.mx is not None
    snapshot = HealthSnapshot.build(
        [Observation(Target("192.0.2.1"), "mx2", State.UP, NOW - 3600, NOW - 1, NOW - 1)],
        NOW, "test")
    conn = Connection(client_address("203.0.113.7"), NOW)
    verdict = decide(conn, "example.org", MxSet("example.org", dom.mx), snapshot, cfg,
                     evidence((3, 20)))
    assert verdict.header_value("mx2").startswith("released; domain=example.org; primary=")
    assert "try 3" in verdict.detail


@pytest.mark.parametrize(("name", "resolve", "want"), [
    ("mail-sor-f41.google.com", None, "mail-sor-f41.google.com"),  # Postfix: verified
    ("unknown", None, None),  # Postfix: not verified
    ("Mail.Example.ORG.", "OK", "mail.example.org"),  # Sendmail: forward-confirmed
    ("mail.example.org", "FORGED", None),
    ("mail.example.org", "FAIL", None),
    ("[192.0.2.7]", None, None),
    ("", None, None),
    (None, "OK", None),
])
def test_verified_name(name: str | None, resolve: str | None, want: str | None) -> None:
    assert verified_name(name, resolve) == want


@pytest.mark.parametrize(("name", "want"), [
    ("mail-sor-f41.google.com", "google.com"),
    ("a27-1.smtp-out.us-west-2.amazonses.com", "amazonses.com"),
    ("mx.example.co.uk", "example.co.uk"),
    ("co.uk", None),
    ("com", None),
])
def test_registrable_domain(name: str, want: str | None) -> None:
    assert registrable_domain(name) == want


def test_identities_of_a_try() -> None:
    cfg = config()
    ipv4 = bypass_try(client_address("203.0.113.77"), "o1.ptr1234.bounce.example.co.uk",
                      "<Bounce+ABC@Bounce.Example.co.uk>", "<User@Example.ORG>", NOW,
                      cfg.release)
    assert ipv4.client == "203.0.113.77" and ipv4.network == "203.0.113.0/24"
    assert ipv4.identities == (
        "net 203.0.113.0/24 from=<bounce+abc@bounce.example.co.uk> rcpt=<user@example.org>",
        "pool example.co.uk from-domain=bounce.example.co.uk rcpt=<user@example.org>",
    )
    ipv6 = bypass_try(client_address("2001:db8:1:2:3::9"), None, "<>", "<u@example.org>", NOW,
                      cfg.release)
    assert ipv6.network == "2001:db8:1:2::/64"
    assert ipv6.identities == ("net 2001:db8:1:2::/64 from=<> rcpt=<u@example.org>",)
    keys = ipv4.store_keys()
    assert len(keys) == 2 and all(len(k) == 32 for k in keys) and keys[0] != keys[1]


def test_pool_identity_is_shared_by_a_pool_with_new_addresses_and_verp_senders() -> None:
    cfg = config()
    tries = [bypass_try(client_address(f"54.240.{n}.{n}"),
                        f"a{n}-{n}.smtp-out.eu-west-1.amazonses.com",
                        f"<0102018c{n:04x}-bounce@eu-west-1.amazonses.com>",
                        "<user@example.org>", NOW, cfg.release) for n in range(1, 6)]
    assert len({t.identities[0] for t in tries}) == 5  # every network identity is new
    assert len({t.identities[1] for t in tries}) == 1  # the pool identity is one


def test_counts_as_trap() -> None:
    assert counts_as_trap(released=False, witness_fresh=False, seen=False)
    assert counts_as_trap(released=False, witness_fresh=False, seen=True)  # stale witness
    assert not counts_as_trap(released=True, witness_fresh=False, seen=False)
    assert not counts_as_trap(released=False, witness_fresh=True, seen=True)


def test_rules_follow_the_config() -> None:
    rules = EvidenceRules.of(config(release={"attempts": 4, "min_age": "5m", "ttl": "2h"},
                                    traps={"ttl": "3h"}))
    assert rules == EvidenceRules(4, 300.0, 7200.0, 60.0, 10800.0)


@pytest.mark.parametrize(("sections", "message"), [
    ({"traps": {"threshold": 2}}, "[traps] threshold (2) must be 0 (off) or more than"),
    ({"witness": {"role": "witness", "heartbeat": "60s"}},
     "[witness] heartbeat (60s) must be shorter than"),
    ({"witness": {"role": "primary"}}, "must be one of secondary, witness"),
    ({"release": {"ipv4_prefix": 33}}, "[release] ipv4_prefix: must be between 8 and 32"),
    ({"policy": {"on_seen_at_primary": "reject"}}, "on_seen_at_primary: must be one of"),
])
def test_evidence_config_errors(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config(**sections)
    assert message in str(e.value)
