"""The decision: did mail for this recipient bypass a healthy primary MX?

``decide()`` is a pure function of plain values (connection facts, recipient domain,
the domain's MX set, a health snapshot, the config) and returns a ``Verdict``. It does
no I/O and reads no clock, so the milter, ``mx-guard explain`` and any future front end
share it, and tests can drive it from tables. This module imports no Milter, redis or
dns.

Rules, in order (SPEC section 2):
1. trusted client (network, or authenticated)     -> accept   trusted
2. domain not guarded / we are not a secondary    -> accept   not-secondary
3. a higher-priority host down                    -> accept   primary-down
   ... or only recently down (failed within down_grace, no node sees it down now)
                                                  -> on_recently_down  recently-down
4. no higher-priority host with fresh health      -> on_unknown  health-unknown
5. a higher-priority host fully up for the client -> action   bypass
Health is judged for the client's address family: a host with no address of that
family could not have been reached by the client, so it never counts as up.

A bypass may then be changed by the evidence the store holds (``guard.evidence``),
which is handed in as a plain value, looked up only for a bypass:
   released (a retry identity earned its release)  -> flag      released
   seen at the primary (fresh witness)             -> on_seen_at_primary  seen-at-primary
   trap count at or over [traps] threshold         -> reject    trapped
   otherwise                                       -> action    bypass
``dry-run`` stays ``dry-run`` whatever the evidence says: it decides and logs only.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, replace
from enum import StrEnum

from guard.config import Action, Config
from guard.evidence import Evidence, EvidenceRules
from guard.health import AggregationRules, HealthSnapshot, State, TargetHealth
from guard.mxset import (
    MxHost,
    MxSet,
    MxSource,
    normalize_host,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Reason(StrEnum):
    TRUSTED = "trusted"
    NOT_SECONDARY = "not-secondary"
    PRIMARY_DOWN = "primary-down"
    RECENTLY_DOWN = "recently-down"  # down only by down_grace: back up, or being earned
    HEALTH_UNKNOWN = "health-unknown"
    MX_UNKNOWN = "mx-unknown"
    UNREACHABLE = "unreachable"  # no higher-priority host has an address of C's family
    CLIENT_UNKNOWN = "client-unknown"
    BYPASS = "bypass"
    RELEASED = "released"  # a retry identity earned its release
    SEEN_AT_PRIMARY = "seen-at-primary"  # a witness saw the client at the primary
    TRAPPED = "trapped"  # the client bypassed the primary too often


@dataclass(frozen=True)
class Connection:
    """What the MTA told us about the SMTP client.

    ``connected_at`` has no default: health is judged at that moment, and a made-up
    one (0.0) would make every observation fresh and every failure recent.
    """

    client: IPAddress | None
    connected_at: float
    helo: str = ""
    authenticated: bool = False
    client_name: str | None = None  # forward-confirmed by the MTA, else None


@dataclass(frozen=True)
class HostHealth:
    """One higher-priority host judged for one address family."""

    host: MxHost
    state: State | None  # None: the host has no address of the client's family
    since: float | None
    targets: tuple[TargetHealth, ...]
    grace: bool = False  # down only by down_grace (see TargetHealth.grace)

    def describe(self) -> str:
        if self.state is None:
            return f"{self.host.host} ({self.host.preference}) has no address of that family"
        parts = ", ".join(f"{t.target} {t.state} ({t.detail})" for t in self.targets)
        return f"{self.host.host} ({self.host.preference}) {self.state}: {parts}"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: Reason
    detail: str
    domain: str
    client: str = ""
    primary: HostHealth | None = None  # the higher-priority host the decision hinged on
    hosts: tuple[HostHealth, ...] = ()
    evidence: Evidence | None = None  # what the store knew, for a bypass

    @property
    def adds_header(self) -> bool:
        return self.action is Action.FLAG

    def header_value(self, node: str) -> str:
        """The flag header: reason first so filters can match it cheaply."""
        parts = [str(self.reason), f"domain={self.domain}"]
        if self.primary is not None:
            p = self.primary
            parts.append(f"primary={p.host.host} {p.state} since {iso_time(p.since)}")
        if self.client:
            parts.append(f"client={self.client}")
        parts.append(f"node={node}")
        return "; ".join(parts)


def iso_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def client_address(text: str | None) -> IPAddress | None:
    """Parse the client address the MTA gave; IPv4-mapped IPv6 becomes IPv4."""
    if not text:
        return None
    text = text.strip().removeprefix("[").removesuffix("]").removeprefix("IPv6:")
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def recipient_domain(recipient: str) -> str | None:
    """The domain of an envelope recipient (``<user@Example.ORG>`` -> ``example.org``)."""
    addr = recipient.strip().removeprefix("<").removesuffix(">")
    if ":" in addr and addr.startswith("@"):
        addr = addr.split(":", 1)[1]  # RFC 5321 source route: @relay:user@domain
    local, at, domain = addr.rpartition("@")
    if not at or not local:
        return None
    return normalize_host(domain) or None


def is_trusted(conn: Connection, config: Config) -> bool:
    if conn.authenticated and config.policy.trust_authenticated:
        return True
    if conn.client is None:
        return False
    return any(conn.client in net for net in config.policy.trusted_networks)


def judge_host(
    host: MxHost, family: int, snapshot: HealthSnapshot, now: float, rules: AggregationRules
) -> HostHealth:
    targets = tuple(snapshot.health(t, now, rules) for t in host.targets(family))
    if not targets:
        return HostHealth(host, None, None, ())
    states = [t.state for t in targets]
    if State.DOWN in states:
        # Any dead address: a client that picked it may legitimately have moved on to us.
        dead = [t for t in targets if t.state is State.DOWN]
        since = max(t.since or 0.0 for t in dead)
        return HostHealth(host, State.DOWN, since, targets, grace=all(t.grace for t in dead))
    if all(s is State.UP for s in states):
        since = max(t.since or 0.0 for t in targets)
        return HostHealth(host, State.UP, since, targets)
    return HostHealth(host, State.UNKNOWN, None, targets)


def accept_or_flag(config: Config, action: Action = Action.ACCEPT) -> Action:
    """Mail accepted for want of a bypass still gets the header when flag_all is on."""
    if action is Action.ACCEPT and config.policy.flag_all:
        return Action.FLAG
    return action


_STRICTNESS = (Action.ACCEPT, Action.FLAG, Action.TEMPFAIL, Action.REJECT)


def no_stricter(action: Action, limit: Action) -> Action:
    """``action``, or ``limit`` if that is milder (dry-run stays dry-run)."""
    if Action.DRY_RUN in (action, limit):
        return Action.DRY_RUN
    return min(action, limit, key=_STRICTNESS.index)


def with_evidence(verdict: Verdict, evidence: Evidence | None, config: Config) -> Verdict:
    """A bypass verdict changed by what the store knew (no evidence: unchanged)."""
    if verdict.reason is not Reason.BYPASS or evidence is None:
        return verdict
    rules = EvidenceRules.of(config)
    base = verdict.action
    summary = evidence.describe(rules)
    released = evidence.released_by(rules)
    if released is not None:
        action, reason = no_stricter(Action.FLAG, base), Reason.RELEASED
        detail = f"released by {released.identity} (try {released.tries}); {verdict.detail}"
    elif evidence.seen_at_primary(rules):
        action = no_stricter(config.policy.on_seen_at_primary, base)
        reason, detail = Reason.SEEN_AT_PRIMARY, f"{summary}; {verdict.detail}"
    elif 0 < config.traps.threshold <= evidence.trap_count:
        action = Action.DRY_RUN if base is Action.DRY_RUN else Action.REJECT
        reason, detail = Reason.TRAPPED, f"{summary}; {verdict.detail}"
    else:
        action, reason, detail = base, Reason.BYPASS, f"{summary}; {verdict.detail}"
    return replace(verdict, action=action, reason=reason, detail=detail, evidence=evidence)


def decide(
    conn: Connection,
    domain: str,
    mxset: MxSet | None,
    snapshot: HealthSnapshot,
    config: Config,
    evidence: Evidence | None = None,
) -> Verdict:
    """The verdict for one recipient; ``evidence`` applies only to a bypass."""
    return with_evidence(_decide(conn, domain, mxset, snapshot, config), evidence, config)


def _decide(
    conn: Connection,
    domain: str,
    mxset: MxSet | None,
    snapshot: HealthSnapshot,
    config: Config,
) -> Verdict:
    client = str(conn.client) if conn.client is not None else ""

    def verdict(action: Action, reason: Reason, detail: str,
                primary: HostHealth | None = None, hosts: tuple[HostHealth, ...] = ()
                ) -> Verdict:
        return Verdict(action, reason, detail, domain, client, primary, hosts)

    if is_trusted(conn, config):
        why = "authenticated" if conn.authenticated and config.policy.trust_authenticated \
            else "client in trusted_networks"
        return verdict(Action.ACCEPT, Reason.TRUSTED, why)
    dom = config.domain(domain)
    if dom is None:
        return verdict(Action.ACCEPT, Reason.NOT_SECONDARY, "domain not configured")
    if mxset is None:
        return verdict(accept_or_flag(config, config.policy.on_unknown), Reason.MX_UNKNOWN,
                       "MX set not known yet")
    if mxset.source is MxSource.NULL:
        return verdict(Action.ACCEPT, Reason.NOT_SECONDARY, "domain has a null MX")
    rank = mxset.rank(config.me.identity)
    if rank.preference is None:
        return verdict(Action.ACCEPT, Reason.NOT_SECONDARY, "this host is not in the MX set")
    higher = rank.higher
    if not higher:
        return verdict(Action.ACCEPT, Reason.NOT_SECONDARY, "this host is a primary MX")
    if conn.client is None:
        # Without an address we cannot tell the family nor whom to blame: let it pass.
        return verdict(Action.ACCEPT, Reason.CLIENT_UNKNOWN, "MTA sent no client address")

    rules = config.aggregation
    family = conn.client.version
    judged = tuple(judge_host(h, family, snapshot, conn.connected_at, rules) for h in higher)
    detail = "; ".join(h.describe() for h in judged)

    down = [h for h in judged if h.state is State.DOWN]
    hard_down = [h for h in down if not h.grace]
    if hard_down:
        return verdict(accept_or_flag(config), Reason.PRIMARY_DOWN, detail,
                       primary=hard_down[0], hosts=judged)
    if down:
        # A legitimate sender may still avoid a primary that just came back (Exim's
        # retry time, Sendmail's host status): let it in, but spam that bypasses a
        # primary that is up again gets the header for downstream filters.
        return verdict(accept_or_flag(config, config.policy.on_recently_down),
                       Reason.RECENTLY_DOWN, detail, primary=down[0], hosts=judged)
    up = [h for h in judged if h.state is State.UP]
    if up:
        return verdict(config.action_for(dom), Reason.BYPASS, detail, primary=up[0], hosts=judged)
    if all(h.state is None for h in judged):
        return verdict(accept_or_flag(config), Reason.UNREACHABLE,
                       f"no higher-priority host has an IPv{family} address", hosts=judged)
    return verdict(accept_or_flag(config, config.policy.on_unknown), Reason.HEALTH_UNKNOWN,
                   detail, hosts=judged)
