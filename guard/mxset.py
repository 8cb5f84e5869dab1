"""MX sets: a domain's MX hosts with their preferences and addresses.

Pure values and the rank arithmetic of RFC 5321 section 5.1: a client tries MX hosts in
order of preference and randomises among equal preferences, so only hosts with a
preference number strictly lower than ours can be bypassed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from guard.health import Target

SMTP_PORT = 25


def normalize_host(name: str) -> str:
    """Lower case, no trailing dot, internationalised labels in their ASCII (xn--) form,
    the form DNS answers and non-SMTPUTF8 senders use."""
    name = name.strip().rstrip(".").lower()
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name  # not a valid name: it matches nothing we guard


def ip_version(address: str) -> int:
    """4 or 6 for an address already known to be valid (cheap: on the hot path)."""
    return 6 if ":" in address else 4


def normalize_address(address: str) -> str:
    return str(ipaddress.ip_address(address))


@dataclass(frozen=True)
class MxHost:
    host: str
    preference: int
    addresses: tuple[str, ...] = ()
    port: int = SMTP_PORT

    # Targets per family, filled on first use (decide() asks on every RCPT).
    _targets: dict[int | None, tuple[Target, ...]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def targets(self, family: int | None = None) -> tuple[Target, ...]:
        """The host's targets, optionally only those of IP version ``family`` (4 or 6)."""
        found = self._targets.get(family)
        if found is None:
            found = self._targets[family] = tuple(
                Target(a, self.port)
                for a in self.addresses
                if family is None or ip_version(a) == family
            )
        return found


class MxSource(StrEnum):
    CONFIG = "config"
    DNS = "dns"
    IMPLICIT = "implicit"  # no MX records: the domain itself is the MX (RFC 5321 5.1)
    NULL = "null"  # RFC 7505 null MX: the domain accepts no mail


@dataclass(frozen=True)
class MxSet:
    domain: str
    hosts: tuple[MxHost, ...]
    source: MxSource = MxSource.CONFIG
    fetched_at: float = 0.0
    expires_at: float = float("inf")

    # Rank per identity, filled on first use: an MxSet never changes, so the arithmetic
    # is done once per set (a refresh makes a new set), not once per RCPT.
    _ranks: dict[SelfIdentity, Rank] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def sorted_hosts(self) -> tuple[MxHost, ...]:
        return tuple(sorted(self.hosts, key=lambda h: (h.preference, h.host)))

    def rank(self, me: SelfIdentity) -> Rank:
        """Where ``me`` stands in this set, computed once."""
        found = self._ranks.get(me)
        if found is None:  # two threads may both compute it: same value, no harm
            found = self._ranks[me] = Rank(self_preference(self, me),
                                           higher_priority_hosts(self, me))
        return found


@dataclass(frozen=True)
class Rank:
    """This host's place in one MX set."""

    preference: int | None  # our best preference; None when we are not in the set
    higher: tuple[MxHost, ...]  # hosts a compliant client must have tried before us


@dataclass(frozen=True)
class SelfIdentity:
    """How this host appears in MX sets: by name or by address."""

    names: frozenset[str]
    addresses: frozenset[str]

    @classmethod
    def of(cls, names: Iterable[str], addresses: Iterable[str]) -> SelfIdentity:
        return cls(
            frozenset(normalize_host(n) for n in names),
            frozenset(normalize_address(a) for a in addresses),
        )

    def is_me(self, host: MxHost) -> bool:
        # Host names and addresses are normalised where MX sets are made (config, DNS).
        if host.host in self.names:
            return True
        return any(a in self.addresses for a in host.addresses)


def self_preference(mxset: MxSet, me: SelfIdentity) -> int | None:
    """Our best (lowest) preference in the set, or None when we are not in it."""
    mine = [h.preference for h in mxset.hosts if me.is_me(h)]
    return min(mine) if mine else None


def higher_priority_hosts(mxset: MxSet, me: SelfIdentity) -> tuple[MxHost, ...]:
    """Hosts a compliant client must have tried before us; empty if we are not secondary."""
    mine = self_preference(mxset, me)
    if mine is None:
        return ()
    return tuple(h for h in mxset.sorted_hosts() if h.preference < mine and not me.is_me(h))
