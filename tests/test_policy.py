"""Table-driven tests of the decision core (guard/policy.py): every rule and edge."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from guard.config import Action, Config, parse_config
from guard.health import HealthSnapshot, Observation, State, Target
from guard.mxset import MxHost, MxSet, MxSource
from guard.policy import (
    Connection,
    Reason,
    client_address,
    decide,
    recipient_domain,
)

NOW = 1_800_000_000.0
MX1_V4, MX1_V6 = "192.0.2.1", "2001:db8::1"
MX1B_V4 = "192.0.2.2"  # mx1's second IPv4 address
MX0_V4 = "192.0.2.10"  # tier 10 of the three-tier domain


def config(policy: dict[str, Any] | None = None, probe: dict[str, Any] | None = None) -> Config:
    return parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"], "addresses": ["198.51.100.2"]},
        "policy": policy or {},
        "probe": probe or {},
        "domain": [
            {"name": "example.org", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4, MX1_V6]},
                {"host": "mx2.example.org", "preference": 20},
            ]},
            {"name": "flagged.example", "action": "flag", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
                {"host": "mx2.example.org", "preference": 20},
            ]},
            {"name": "twoaddr.example", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4, MX1B_V4]},
                {"host": "mx2.example.org", "preference": 20},
            ]},
            {"name": "v4only.example", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
                {"host": "mx2.example.org", "preference": 20},
            ]},
            {"name": "peers.example", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
                {"host": "mx2.example.org", "preference": 10},
            ]},
            {"name": "primary.example", "mx": [
                {"host": "mx2.example.org", "preference": 5},
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
            ]},
            {"name": "tier30.example", "mx": [
                {"host": "mx0.example.org", "preference": 10, "addresses": [MX0_V4]},
                {"host": "mx1.example.org", "preference": 20, "addresses": [MX1_V4]},
                {"host": "mx2.example.org", "preference": 30},
            ]},
            {"name": "bücher.example", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
                {"host": "mx2.example.org", "preference": 20},
            ]},
            {"name": "byaddress.example", "mx": [
                {"host": "mx1.example.org", "preference": 10, "addresses": [MX1_V4]},
                {"host": "backup.example.net", "preference": 20, "addresses": ["198.51.100.2"]},
            ]},
        ],
    })


def obs(address: str, state: State, node: str = "mx2", age: float = 1.0,
        last_fail_ago: float | None = None, since_ago: float = 600.0,
        last_ok_ago: float | None = None) -> Observation:
    if last_ok_ago is None and state is State.UP:
        last_ok_ago = age
    return Observation(
        Target(address, 25), node, state, NOW - since_ago, NOW - age,
        last_ok=None if last_ok_ago is None else NOW - last_ok_ago,
        last_fail=None if last_fail_ago is None else NOW - last_fail_ago,
        detail="test",
    )


UP, DOWN, UNKNOWN = State.UP, State.DOWN, State.UNKNOWN
ALL_UP = [obs(MX1_V4, UP), obs(MX1_V6, UP), obs(MX1B_V4, UP), obs(MX0_V4, UP)]


@dataclass
class Row:
    label: str
    want_action: Action
    want_reason: Reason
    client: str | None = "203.0.113.7"
    domain: str = "example.org"
    observations: list[Observation] = field(default_factory=lambda: list(ALL_UP))
    policy: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    authenticated: bool = False
    mxset: MxSet | str | None = "config"


ROWS = [
    # Rule 1: trusted
    Row("trusted network", Action.ACCEPT, Reason.TRUSTED, client="127.0.0.1"),
    Row("trusted network ipv6 loopback", Action.ACCEPT, Reason.TRUSTED, client="::1"),
    Row("configured trusted network", Action.ACCEPT, Reason.TRUSTED, client="192.0.2.99",
        policy={"trusted_networks": ["192.0.2.0/24"]}),
    Row("authenticated client", Action.ACCEPT, Reason.TRUSTED, authenticated=True),
    Row("authenticated but trust_authenticated off", Action.TEMPFAIL, Reason.BYPASS,
        authenticated=True, policy={"trust_authenticated": False}),
    Row("ipv4-mapped trusted address", Action.ACCEPT, Reason.TRUSTED,
        client="::ffff:127.0.0.1"),
    # Rule 2: not a secondary for this domain
    Row("domain not configured", Action.ACCEPT, Reason.NOT_SECONDARY, domain="other.example"),
    Row("equal preference peer is never bypassed", Action.ACCEPT, Reason.NOT_SECONDARY,
        domain="peers.example"),
    Row("self is primary", Action.ACCEPT, Reason.NOT_SECONDARY, domain="primary.example"),
    Row("self missing from DNS MX set", Action.ACCEPT, Reason.NOT_SECONDARY,
        mxset=MxSet("example.org", (MxHost("mx1.example.org", 10, (MX1_V4,)),),
                    MxSource.DNS)),
    Row("null MX", Action.ACCEPT, Reason.NOT_SECONDARY,
        mxset=MxSet("example.org", (), MxSource.NULL)),
    Row("MX set not known yet follows on_unknown", Action.FLAG, Reason.MX_UNKNOWN,
        mxset=None),
    Row("self recognised by address", Action.TEMPFAIL, Reason.BYPASS,
        domain="byaddress.example"),
    # Rule 3: primary down
    Row("primary down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        observations=[obs(MX1_V4, DOWN)]),
    Row("primary up again but failed within down_grace: flagged", Action.FLAG,
        Reason.RECENTLY_DOWN, observations=[obs(MX1_V4, UP, last_fail_ago=600)]),
    Row("failing now, fall not reached yet: down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        observations=[obs(MX1_V4, UP, last_fail_ago=1, last_ok_ago=11)]),
    Row("failed, never succeeded since (a restart): down", Action.ACCEPT,
        Reason.PRIMARY_DOWN, observations=[obs(MX1_V4, UNKNOWN, last_fail_ago=60)]),
    Row("recently down, on_recently_down = accept", Action.ACCEPT, Reason.RECENTLY_DOWN,
        observations=[obs(MX1_V4, UP, last_fail_ago=600)],
        policy={"on_recently_down": "accept"}),
    Row("one address down, the other only recently: down", Action.ACCEPT,
        Reason.PRIMARY_DOWN, domain="twoaddr.example",
        observations=[obs(MX1_V4, UP, last_fail_ago=60), obs(MX1B_V4, DOWN)]),
    Row("one node down, another recently down: down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        observations=[obs(MX1_V4, UP, node="mx3", last_fail_ago=60),
                      obs(MX1_V4, DOWN, node="mx2")]),
    Row("primary failed longer ago than down_grace", Action.TEMPFAIL, Reason.BYPASS,
        observations=[obs(MX1_V4, UP, last_fail_ago=3600)]),
    Row("down_grace configurable", Action.FLAG, Reason.RECENTLY_DOWN,
        observations=[obs(MX1_V4, UP, last_fail_ago=3600)], policy={"down_grace": "2h"}),
    Row("one address of two down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        domain="twoaddr.example", observations=[obs(MX1_V4, UP), obs(MX1B_V4, DOWN)]),
    Row("primary down, flag_all adds the header", Action.FLAG, Reason.PRIMARY_DOWN,
        observations=[obs(MX1_V4, DOWN)], policy={"flag_all": True}),
    Row("one node says down, another up: down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        observations=[obs(MX1_V4, UP, node="mx3"), obs(MX1_V4, DOWN, node="mx2")]),
    Row("three tiers: tier 10 down, tier 20 up, self 30", Action.ACCEPT,
        Reason.PRIMARY_DOWN, domain="tier30.example",
        observations=[obs(MX0_V4, DOWN), obs(MX1_V4, UP)]),
    # Rule 4: unknown
    Row("no observation at all", Action.FLAG, Reason.HEALTH_UNKNOWN, observations=[]),
    Row("only stale observations", Action.FLAG, Reason.HEALTH_UNKNOWN,
        observations=[obs(MX1_V4, UP, age=120)]),
    Row("stale down does not count either", Action.FLAG, Reason.HEALTH_UNKNOWN,
        observations=[obs(MX1_V4, DOWN, age=120)]),
    Row("prober still undecided", Action.FLAG, Reason.HEALTH_UNKNOWN,
        observations=[obs(MX1_V4, UNKNOWN)]),
    Row("on_unknown tempfail", Action.TEMPFAIL, Reason.HEALTH_UNKNOWN, observations=[],
        policy={"on_unknown": "tempfail"}),
    Row("on_unknown accept", Action.ACCEPT, Reason.HEALTH_UNKNOWN, observations=[],
        policy={"on_unknown": "accept"}),
    Row("quorum 2 with one up", Action.FLAG, Reason.HEALTH_UNKNOWN,
        observations=[obs(MX1_V4, UP)], probe={"quorum": 2}),
    Row("quorum 2 with two nodes up", Action.TEMPFAIL, Reason.BYPASS,
        observations=[obs(MX1_V4, UP), obs(MX1_V4, UP, node="mx3")], probe={"quorum": 2}),
    Row("one address up, other unknown: not fully up", Action.FLAG, Reason.HEALTH_UNKNOWN,
        domain="twoaddr.example", observations=[obs(MX1_V4, UP)]),
    # Rule 5: bypass
    Row("bypass, default tempfail", Action.TEMPFAIL, Reason.BYPASS),
    Row("bypass, per-domain flag", Action.FLAG, Reason.BYPASS, domain="flagged.example"),
    Row("bypass, global reject", Action.REJECT, Reason.BYPASS, policy={"action": "reject"}),
    Row("bypass, dry-run", Action.DRY_RUN, Reason.BYPASS, policy={"action": "dry-run"}),
    Row("bypass over IPv6", Action.TEMPFAIL, Reason.BYPASS, client="2001:db8:ffff::7"),
    Row("ipv4-mapped client judged as IPv4", Action.TEMPFAIL, Reason.BYPASS,
        client="::ffff:203.0.113.7", observations=[obs(MX1_V4, UP)]),
    Row("IPv6 client, primary up only over IPv4: not bypass", Action.FLAG,
        Reason.HEALTH_UNKNOWN, client="2001:db8:ffff::7",
        observations=[obs(MX1_V4, UP)]),
    Row("IPv6 client, primary has no IPv6 address", Action.ACCEPT, Reason.UNREACHABLE,
        client="2001:db8:ffff::7", domain="v4only.example"),
    Row("IPv6 client, primary IPv6 down", Action.ACCEPT, Reason.PRIMARY_DOWN,
        client="2001:db8:ffff::7", observations=[obs(MX1_V4, UP), obs(MX1_V6, DOWN)]),
    Row("IPv4 client ignores IPv6 address down", Action.TEMPFAIL, Reason.BYPASS,
        observations=[obs(MX1_V4, UP), obs(MX1_V6, DOWN)]),
    Row("three tiers: self at 30, all up", Action.TEMPFAIL, Reason.BYPASS,
        domain="tier30.example"),
    Row("three tiers: tier 10 unknown, tier 20 up", Action.TEMPFAIL, Reason.BYPASS,
        domain="tier30.example", observations=[obs(MX1_V4, UP)]),
    Row("two addresses both up", Action.TEMPFAIL, Reason.BYPASS, domain="twoaddr.example"),
    Row("IDN domain, ASCII form in RCPT", Action.TEMPFAIL, Reason.BYPASS,
        domain="xn--bcher-kva.example"),
    Row("on_unknown accept with flag_all flags", Action.FLAG, Reason.HEALTH_UNKNOWN,
        observations=[], policy={"on_unknown": "accept", "flag_all": True}),
    Row("client address missing", Action.ACCEPT, Reason.CLIENT_UNKNOWN, client=None),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_decide(row: Row) -> None:
    cfg = config(row.policy, row.probe)
    snapshot = HealthSnapshot.build(row.observations, NOW, "test")
    mxset = row.mxset
    if mxset == "config":
        dom = cfg.domain(row.domain)
        mxset = MxSet(row.domain, dom.mx or ()) if dom else None
    conn = Connection(client_address(row.client), NOW, "helo.example", row.authenticated)
    assert not isinstance(mxset, str)
    verdict = decide(conn, row.domain, mxset, snapshot, cfg)
    assert (verdict.action, verdict.reason) == (row.want_action, row.want_reason), \
        verdict.detail
    assert verdict.domain == row.domain
    assert verdict.detail


def test_header_value_names_reason_domain_primary_client_and_node() -> None:
    cfg = config()
    snapshot = HealthSnapshot.build([obs(MX1_V4, UP, since_ago=3600)], NOW, "test")
    dom = cfg.domain("flagged.example")
    assert dom is not None and dom.mx is not None
    conn = Connection(client_address("192.0.2.7"), NOW)
    verdict = decide(conn, "flagged.example", MxSet("flagged.example", dom.mx), snapshot, cfg)
    assert verdict.header_value("mx2") == (
        "bypass; domain=flagged.example; primary=mx1.example.org up since "
        "2027-01-15T07:00:00Z; client=192.0.2.7; node=mx2"
    )


@pytest.mark.parametrize(("raw", "want"), [
    ("<user@Example.ORG>", "example.org"),
    ("user@example.org.", "example.org"),
    ("<@relay.example:user@example.org>", "example.org"),
    ('<"odd@local"@example.org>', "example.org"),
    ("<postmaster>", None),
    ("<>", None),
    ("<@example.org>", None),
    ("<user@Bücher.Example>", "xn--bcher-kva.example"),
    ("<user@" + "ü" * 70 + ".example>", "ü" * 70 + ".example"),  # not IDNA: kept, unguarded
])
def test_recipient_domain(raw: str, want: str | None) -> None:
    assert recipient_domain(raw) == want


@pytest.mark.parametrize(("raw", "want"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("IPv6:2001:db8::7", "2001:db8::7"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("fe80::1%eth0", "fe80::1"),
    ("not an address", None),
    ("", None),
    (None, None),
])
def test_client_address(raw: str | None, want: str | None) -> None:
    got = client_address(raw)
    assert (str(got) if got is not None else None) == want


def test_policy_module_is_pure() -> None:
    """The decision core imports no milter, Redis or DNS library (STYLE: pure core)."""
    code = (
        "import sys, guard.policy; "
        "bad = [m for m in ('Milter', 'milter', 'redis', 'dns') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, f"guard.policy pulled in: {done.stdout}{done.stderr}"


def test_the_rank_in_an_mx_set_is_computed_once_per_set() -> None:
    from guard.mxset import MxHost, MxSet, SelfIdentity

    me = SelfIdentity.of(["mx2.example.org"], [])
    mxset = MxSet("example.org", (MxHost("mx3.example.org", 30), MxHost("mx2.example.org", 20),
                                  MxHost("mx1.example.org", 10), MxHost("mx1b.example.org", 20)))
    rank = mxset.rank(me)
    assert rank.preference == 20
    assert [h.host for h in rank.higher] == ["mx1.example.org"]  # equal preference: not higher
    assert mxset.rank(me) is rank
    assert mxset == MxSet("example.org", mxset.hosts)  # the cache is not part of the value
    assert MxSet("x", (MxHost("mx1.x", 10),)).rank(me).preference is None
