"""Evidence about a bypass: retry identities, witness records and trap counts.

A bypass alone says a client reached this secondary while the primary was up. What
the shared store remembers says more (SPEC section 5):

- **Retry release.** Every bypass try is counted under two *retry identities*:
  (a) the client network (/24, /64), envelope sender and recipient, greylisting's
  triplet; (b) the client's *verified* host name reduced to its registrable domain
  (Public Suffix List), the sender's domain and the recipient, which is what pools
  that retry from a new address, and a new VERP sender, each time have in common. A
  try is released when it is at least the ``attempts``-th try of either identity and
  comes ``min_age`` or more after that identity's first. Tries only grow and the first
  try's time never moves, so once released an identity stays released for as long as
  it lives (``ttl`` after its last try): no "released" mark is stored.
- **Witness.** A guard on the primary records each client network it sees, and a
  heartbeat. While the heartbeat is fresh, a bypass by a client seen there tried the
  primary first (it was greylisted, say); one not seen skipped it.
- **Traps.** A bypass that was neither released nor seen at the primary counts
  against the client address.

Everything here is pure: the store does the counting (``Store.record_bypass``, one
round trip) and hands back an ``Evidence`` value; ``guard.policy`` turns it into a
verdict. The store's own rule for counting a trap is ``counts_as_trap`` below (the
Redis store's script follows it line by line; the contract suite holds both to it).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass

from guard.config import Config, ReleaseConfig
from guard.mxset import normalize_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNVERIFIED_NAMES = frozenset({"", "unknown"})  # Postfix's {client_name} when unverified
RESOLVE_OK = "OK"  # Sendmail's {client_resolve} for a forward-confirmed name


def client_network(client: IPAddress, release: ReleaseConfig) -> str:
    prefix = release.ipv4_prefix if client.version == 4 else release.ipv6_prefix
    return str(ipaddress.ip_network(f"{client}/{prefix}", strict=False))


def verified_name(client_name: str | None, client_resolve: str | None) -> str | None:
    """The client's host name if the MTA vouches for it, else None.

    Postfix sends ``{client_name}`` = ``unknown`` unless the name is forward-confirmed;
    Sendmail sends the reverse name and says in ``{client_resolve}`` whether it is.
    An address literal (``[192.0.2.1]``) is no name.
    """
    if client_name is None:
        return None
    name = client_name.strip()
    if name.lower() in UNVERIFIED_NAMES or name.startswith("["):
        return None
    if client_resolve is not None and client_resolve.strip() != RESOLVE_OK:
        return None
    return normalize_host(name) or None


@functools.cache
def _suffix_list() -> object:
    # Loaded once, on the first bypass with a verified name (it takes a moment).
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable_domain(name: str) -> str | None:
    """``mail-sor-f41.google.com`` -> ``google.com``; None for a public suffix."""
    psl = _suffix_list()
    result = psl.privatesuffix(name)  # type: ignore[attr-defined]
    return str(result) if result else None


def _address(text: str) -> str:
    """An envelope address as identities compare it: no brackets, lower case."""
    return text.strip().removeprefix("<").removesuffix(">").lower()


def address_domain(address: str) -> str:
    local, at, domain = _address(address).rpartition("@")
    return normalize_host(domain) if at and local else ""


@dataclass(frozen=True)
class BypassTry:
    """One bypass try, as the store counts it."""

    client: str  # the address traps count against
    network: str  # the client network, as the witness records it
    identities: tuple[str, ...]  # the retry identities, readable; the network one first
    at: float

    def store_keys(self) -> tuple[str, ...]:
        """Store keys of the identities: fixed length, whatever the client sent."""
        return tuple(hashlib.blake2b(i.encode("utf-8", "surrogateescape"),
                                     digest_size=16).hexdigest() for i in self.identities)


def bypass_try(client: IPAddress, client_name: str | None, sender: str, recipient: str,
               at: float, release: ReleaseConfig) -> BypassTry:
    """The try of a bypass; ``client_name`` must already be verified (``verified_name``)."""
    network = client_network(client, release)
    rcpt = _address(recipient)
    identities = [f"net {network} from=<{_address(sender)}> rcpt=<{rcpt}>"]
    pool = registrable_domain(client_name) if client_name else None
    if pool is not None:
        identities.append(f"pool {pool} from-domain={address_domain(sender) or '-'} "
                          f"rcpt=<{rcpt}>")
    return BypassTry(str(client), network, tuple(identities), at)


@dataclass(frozen=True)
class IdentityCount:
    identity: str
    tries: int  # this try included
    first_at: float


@dataclass(frozen=True)
class EvidenceRules:
    """What decides a release and a fresh witness, for the store and the decision."""

    attempts: int
    min_age: float
    release_ttl: float
    witness_fresh: float  # a heartbeat younger than this is fresh ([policy] stale_after)
    trap_ttl: float

    @classmethod
    def of(cls, config: Config) -> EvidenceRules:
        return cls(config.release.attempts, config.release.min_age, config.release.ttl,
                   config.policy.stale_after, config.traps.ttl)


@dataclass(frozen=True)
class Evidence:
    """What the store knew about one bypass try, this try counted."""

    at: float
    identities: tuple[IdentityCount, ...]
    heartbeat_at: float | None  # the newest witness heartbeat; None: no witness
    seen_at: float | None  # when a witness last saw the client's network
    trap_count: int  # bypasses counted against the client address, this one included

    def released_by(self, rules: EvidenceRules) -> IdentityCount | None:
        for c in self.identities:
            if is_released(c.tries, c.first_at, self.at, rules):
                return c
        return None

    def witness_fresh(self, rules: EvidenceRules) -> bool:
        return self.heartbeat_at is not None and self.at - self.heartbeat_at <= rules.witness_fresh

    def seen_at_primary(self, rules: EvidenceRules) -> bool:
        return self.witness_fresh(rules) and self.seen_at is not None

    def describe(self, rules: EvidenceRules) -> str:
        parts = [f"{c.identity}: try {c.tries}, first {self.at - c.first_at:.0f}s ago"
                 for c in self.identities]
        if self.heartbeat_at is None:
            parts.append("no witness")
        elif not self.witness_fresh(rules):
            parts.append(f"witness stale ({self.at - self.heartbeat_at:.0f}s)")
        elif self.seen_at is None:
            parts.append("not seen at the primary")
        else:
            parts.append(f"seen at the primary {self.at - self.seen_at:.0f}s ago")
        parts.append(f"trap count {self.trap_count}")
        return "; ".join(parts)


def is_released(tries: int, first_at: float, at: float, rules: EvidenceRules) -> bool:
    return tries >= rules.attempts and at - first_at >= rules.min_age


def counts_as_trap(released: bool, witness_fresh: bool, seen: bool) -> bool:
    """A bypass counts against its client unless released or seen at the primary."""
    return not released and not (witness_fresh and seen)


@dataclass(frozen=True)
class Trap:
    """One client address on the trap list."""

    address: str
    count: int
    last_at: float
