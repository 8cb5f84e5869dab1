"""MX discovery: each guarded domain's MX set, from the config or from DNS.

``MxResolver`` asks DNS (dnspython) for a domain's MX records and its hosts' A and
AAAA records, and tells the outcomes apart: an MX set, an implicit MX (no MX records:
the domain's own addresses, RFC 5321 5.1), a null MX (RFC 7505), or one of the
``LookupFailed`` errors below. ``MxDirectory`` keeps the current MX set of every
domain, refreshes it in the background when its TTL runs out, and keeps the last good
set when a lookup fails: a DNS fault never makes a domain look bypassed, and no
lookup ever runs on the milter's hot path.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import dns.exception
import dns.resolver

from guard.config import Config, DnsConfig, DomainConfig
from guard.health import Target
from guard.mxset import (
    MxHost,
    MxSet,
    MxSource,
    normalize_address,
    normalize_host,
    self_preference,
)

log = logging.getLogger("guard.discovery")

LOOKUP_WORKERS = 8  # domains resolved at once in the background


class LookupFailed(Exception):
    """The lookup failed; the last good MX set stays in use."""


class NoSuchDomain(LookupFailed):
    """The domain does not exist (NXDOMAIN)."""


class ServerFailure(LookupFailed):
    """No name server gave a usable answer (SERVFAIL, REFUSED); transient."""


class LookupTimeout(LookupFailed):
    """No name server answered within the lookup lifetime; transient."""


@dataclass(frozen=True)
class _Answer:
    values: tuple[str, ...]
    ttl: float


class MxResolver:
    def __init__(self, config: DnsConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        if config.nameservers:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = list(config.nameservers)
            self._resolver.port = config.port
        else:
            self._resolver = dns.resolver.Resolver()
        # One lookup, all servers included, fits in `lifetime`; each server gets its
        # share, so a dead first server does not use up the whole lifetime.
        self._resolver.lifetime = config.lifetime
        self._resolver.timeout = config.lifetime / max(1, len(self._resolver.nameservers))

    def _query(self, name: str, rdtype: str) -> _Answer | None:
        """None means "no such records" (NOERROR, no answer)."""
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as e:
            raise ServerFailure(f"{name} {rdtype}: no server answered well ({e})") from None
        except dns.exception.Timeout:
            raise LookupTimeout(
                f"{name} {rdtype}: no answer within {self._config.lifetime:g}s"
            ) from None
        except dns.exception.DNSException as e:
            raise ServerFailure(f"{name} {rdtype}: {e}") from None
        rrset = answer.rrset
        if rrset is None:
            return None
        if rdtype == "MX":
            # "preference exchange", the exchange as an absolute name; "0 ." is null MX.
            values = tuple(f"{r.preference} {r.exchange.to_text()}" for r in rrset)
        else:
            values = tuple(normalize_address(r.to_text()) for r in rrset)
        # Through a CNAME chain the answer lives as long as its shortest link.
        return _Answer(values, float(answer.chaining_result.minimum_ttl))

    def addresses(self, host: str) -> tuple[tuple[str, ...], float]:
        """A and AAAA of a host, with the smaller TTL; a missing family is no error."""
        found: list[str] = []
        ttl = self._config.max_ttl
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._query(host, rdtype)
            except NoSuchDomain:
                return (), self._config.min_ttl
            if answer is not None:
                found.extend(answer.values)
                ttl = min(ttl, answer.ttl)
        return tuple(found), ttl

    def lookup(self, domain: str) -> MxSet:
        now = self._clock()
        answer = self._query(domain, "MX")
        if answer is None:
            addrs, ttl = self.addresses(domain)
            hosts: tuple[MxHost, ...] = (MxHost(domain, 0, addrs),)
            return self._mxset(domain, hosts, MxSource.IMPLICIT, ttl, now)
        records = []
        for text in answer.values:
            preference, _, exchange = text.partition(" ")
            records.append((int(preference), normalize_host(exchange)))
        if len(records) == 1 and records[0][1] == "":
            return self._mxset(domain, (), MxSource.NULL, answer.ttl, now)
        ttl = answer.ttl
        resolved = []
        for pref, host in records:
            addrs, host_ttl = self.addresses(host)
            ttl = min(ttl, host_ttl)
            resolved.append(MxHost(host, pref, addrs))
        return self._mxset(domain, tuple(resolved), MxSource.DNS, ttl, now)

    def complete(
        self, domain: str, hosts: tuple[MxHost, ...], is_me: Callable[[MxHost], bool]
    ) -> MxSet:
        """A configured MX list, with DNS addresses for hosts that were given none.

        Our own entry is left as it is: we never probe ourselves.
        """
        now = self._clock()
        ttl = self._config.max_ttl
        done = []
        for h in hosts:
            if h.addresses or is_me(h):
                done.append(h)
                continue
            addrs, host_ttl = self.addresses(h.host)
            ttl = min(ttl, host_ttl)
            done.append(replace(h, addresses=addrs))
        return self._mxset(domain, tuple(done), MxSource.CONFIG, ttl, now)

    def _mxset(
        self, domain: str, hosts: tuple[MxHost, ...], source: MxSource, ttl: float, now: float
    ) -> MxSet:
        ttl = max(self._config.min_ttl, min(self._config.max_ttl, ttl))
        return MxSet(domain, hosts, source, now, now + ttl)


def _needs_dns(domain: DomainConfig, me_is: Callable[[MxHost], bool]) -> bool:
    if domain.mx is None:
        return True
    # Our own entry needs no addresses: we never probe ourselves.
    return any(not h.addresses and not me_is(h) for h in domain.mx)


class MxDirectory:
    """The current MX set of every configured domain; reads are plain dict lookups."""

    def __init__(
        self,
        config: Config,
        resolver: MxResolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock
        self._resolver = resolver
        self._me = config.me.identity
        self._sets: dict[str, MxSet] = {}
        self._next_try: dict[str, float] = {}
        self._failing: dict[str, str] = {}
        for d in config.domains:
            if _needs_dns(d, self._me.is_me):
                self._next_try[d.name] = 0.0
            else:
                assert d.mx is not None
                self._sets[d.name] = MxSet(d.name, d.mx, MxSource.CONFIG)
        # Held by lookups and by reconfigure(), never by get() or targets().
        self._changing = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config. Domains whose entry and resolver settings are
        unchanged keep their MX set and lookup schedule; a changed or new domain from
        DNS is looked up on the next pass (keeping the last good set meanwhile); a
        removed domain is forgotten. Each table is replaced whole, so readers on other
        threads see the old one or the new one."""
        with self._changing:
            old, me = self._config, config.me.identity
            same_dns = old.dns == config.dns and me == self._me
            sets: dict[str, MxSet] = {}
            next_try: dict[str, float] = {}
            for d in config.domains:
                if not _needs_dns(d, me.is_me):
                    assert d.mx is not None
                    sets[d.name] = MxSet(d.name, d.mx, MxSource.CONFIG)
                    continue
                before = old.domain(d.name)
                if before is not None and before.mx == d.mx and d.name in self._sets:
                    sets[d.name] = self._sets[d.name]  # last good, while looked up again
                unchanged = before == d and same_dns and d.name in self._next_try
                next_try[d.name] = self._next_try[d.name] if unchanged else 0.0
            if next_try and (self._resolver is None or old.dns != config.dns):
                self._resolver = MxResolver(config.dns)
            self._config, self._me = config, me
            self._sets, self._next_try = sets, next_try
            self._failing = {k: v for k, v in self._failing.items() if k in next_try}

    def get(self, domain: str) -> MxSet | None:
        return self._sets.get(domain)

    def targets(self) -> set[Target]:
        """Every target of every higher-priority host of every known MX set."""
        out: set[Target] = set()
        for mxset in list(self._sets.values()):
            for host in mxset.rank(self._me).higher:
                out.update(host.targets())
        return out

    def refresh_due(self) -> None:
        """Look up every domain whose MX set expired or was never found."""
        with self._changing:
            self._refresh_due()

    def _refresh_due(self) -> None:
        if self._resolver is None:
            return
        now = self._clock()
        due = [d for d, at in self._next_try.items() if at <= now]
        if not due:
            return
        with concurrent.futures.ThreadPoolExecutor(LOOKUP_WORKERS) as pool:
            for name, outcome in zip(due, pool.map(self._lookup, due), strict=True):
                self._apply(name, outcome)

    def _lookup(self, name: str) -> MxSet | LookupFailed:
        assert self._resolver is not None
        domain = self._config.domain(name)
        assert domain is not None
        try:
            if domain.mx is not None:
                return self._resolver.complete(name, domain.mx, self._me.is_me)
            return self._resolver.lookup(name)
        except LookupFailed as e:
            return e

    def _apply(self, name: str, outcome: MxSet | LookupFailed) -> None:
        now = self._clock()
        if isinstance(outcome, LookupFailed):
            self._next_try[name] = now + self._config.dns.retry
            if self._failing.get(name) != str(outcome):
                self._failing[name] = str(outcome)
                kept = "keeping the last good MX set" if name in self._sets else "no MX set yet"
                log.warning("MX lookup for %s failed: %s; %s", name, outcome, kept)
            return
        if name in self._failing:
            del self._failing[name]
            log.info("MX lookup for %s works again", name)
        old = self._sets.get(name)
        if old is None or old.hosts != outcome.hosts or old.source != outcome.source:
            hosts = ", ".join(f"{h.host}({h.preference})" for h in outcome.sorted_hosts())
            log.info("MX set of %s (%s): %s", name, outcome.source, hosts or "none")
            if outcome.source is not MxSource.NULL and self_preference(outcome, self._me) is None:
                log.warning("this host is not in the MX set of %s (check [self] names and "
                            "addresses): its mail is not guarded", name)
        self._sets[name] = outcome
        self._next_try[name] = outcome.expires_at

    def start(self) -> None:
        self.refresh_due()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.wait(1.0):
            try:
                self.refresh_due()
            except Exception:  # a bug here must not stop refreshes for good
                log.exception("MX refresh failed")


def directory_for(config: Config) -> MxDirectory:
    needs = any(_needs_dns(d, config.me.identity.is_me) for d in config.domains)
    return MxDirectory(config, MxResolver(config.dns) if needs else None)

