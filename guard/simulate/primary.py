"""The modelled primary MX: what a sender's connection and a secondary's probe meet.

The primary's history is a list of *episodes*: from ``start`` to ``end`` it is in a
``Condition`` for one address family or both, as seen by senders, by the secondaries'
probes, or by both (a partition on one side). Outside every episode it is up.

Conditions and what they cost (the numbers a sender model pays are its own timeouts):
- ``refused``: host up, port closed; a connect fails at once (TCP RST).
- ``blackhole``: packets dropped (host down, route gone); a connect waits out the
  sender's connect timeout, a probe its ``[probe] timeout``.
- ``tarpit``: accepts the connection and never greets; a sender waits out its greeting
  timeout, a ``banner``/``ehlo`` probe times out, a ``tcp`` probe sees it up.
- ``busy``: greets ``421``; senders move on (Postfix skips 4xx-greeting servers), a
  ``banner``/``ehlo`` probe counts it down, a ``tcp`` probe up.

Greylisting at RCPT (a property of the primary, not an episode) follows postgrey's
defaults: the triplet is (client /24, sender, recipient), the first try of a triplet is
answered 450, a retry at least ``greylist_delay`` later (postgrey ``--delay=300``)
passes, and a client network that passed ``greylist_auto_whitelist`` times is
whitelisted (postgrey ``--auto-whitelist-clients=5``). Probes never meet it: they stop
before RCPT.

A witness on the primary sees every client that completed a TCP connection to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from guard.config import ProbeMode
from guard.health import Target
from guard.mxset import ip_version
from guard.probes import ProbeClass, ProbeResult

SMALL_RTT = 0.05  # seconds: a refused connect or an SMTP exchange on a healthy path


class Condition(StrEnum):
    UP = "up"
    REFUSED = "refused"
    BLACKHOLE = "blackhole"
    TARPIT = "tarpit"
    BUSY = "busy"


class Side(StrEnum):
    """Who meets an episode: everyone, only senders, or only the secondaries' probes."""

    ALL = "all"
    SENDERS = "senders"
    SECONDARIES = "secondaries"


@dataclass(frozen=True)
class Episode:
    start: float
    end: float
    condition: Condition
    family: int | None = None  # 4 or 6; None: both
    side: Side = Side.ALL

    def applies(self, now: float, family: int, probe: bool) -> bool:
        if not self.start <= now < self.end:
            return False
        if self.family is not None and self.family != family:
            return False
        if self.side is Side.SENDERS:
            return not probe
        if self.side is Side.SECONDARIES:
            return probe
        return True


class Reply(StrEnum):
    """What one SMTP connection of a sender ended with."""

    CONNECT_FAILED = "connect-failed"  # refused, timed out or never greeted: host failed
    GREETING_4XX = "greeting-4xx"  # host failed, at SMTP level
    RCPT_4XX = "rcpt-4xx"  # greylisted at the primary, or tempfailed by the guard
    RCPT_5XX = "rcpt-5xx"  # rejected by the guard
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class Outcome:
    reply: Reply
    elapsed: float  # seconds the sender spent on this connection
    flagged: bool = False
    reason: str = ""  # the guard's reason code at a secondary


@dataclass(frozen=True)
class SenderTimeouts:
    connect: float  # seconds a sender waits for a TCP connect
    greeting: float  # seconds it waits for the 220 greeting


def network_of(address: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    prefix = ipv6_prefix if ip_version(address) == 6 else ipv4_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass
class Primary:
    episodes: Sequence[Episode] = ()
    greylist: bool = False
    greylist_delay: float = 300.0  # postgrey --delay default, seconds
    greylist_auto_whitelist: int = 5  # postgrey --auto-whitelist-clients default
    witness: Callable[[str, float], None] | None = None  # (client address, time)
    _triplets: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _passed: dict[str, int] = field(default_factory=dict)

    def condition(self, now: float, family: int, probe: bool) -> Condition:
        for e in self.episodes:
            if e.applies(now, family, probe):
                return e.condition
        return Condition.UP

    def up_for_senders(self, now: float, family: int) -> bool:
        """Ground truth for the report: would a sender's connection get to RCPT now?"""
        return self.condition(now, family, probe=False) is Condition.UP

    # -- what a secondary's probe meets ------------------------------------------------

    def probe(self, target: Target, mode: ProbeMode, timeout: float, now: float) -> ProbeResult:
        c = self.condition(now, ip_version(target.address), probe=True)
        if c is Condition.UP:
            return ProbeResult(target, ProbeClass.OK, "greeted 220", SMALL_RTT)
        if c is Condition.REFUSED:
            return ProbeResult(target, ProbeClass.REFUSED, "Connection refused", SMALL_RTT)
        if c is Condition.BLACKHOLE:
            return ProbeResult(target, ProbeClass.TIMEOUT, f"no answer within {timeout:g}s",
                               timeout)
        if mode is ProbeMode.TCP:
            return ProbeResult(target, ProbeClass.OK, "connected", SMALL_RTT)
        if c is Condition.TARPIT:
            return ProbeResult(target, ProbeClass.TIMEOUT, f"no answer within {timeout:g}s",
                               timeout)
        return ProbeResult(target, ProbeClass.BAD_GREETING, "greeting '421 busy'", SMALL_RTT)

    # -- what a sender's connection meets ----------------------------------------------

    def deliver(self, family: int, client: str, sender: str, recipient: str,
                timeouts: SenderTimeouts, now: float) -> Outcome:
        c = self.condition(now, family, probe=False)
        if c is Condition.REFUSED:
            return Outcome(Reply.CONNECT_FAILED, SMALL_RTT)
        if c is Condition.BLACKHOLE:
            return Outcome(Reply.CONNECT_FAILED, timeouts.connect)
        if self.witness is not None:
            self.witness(client, now)  # the TCP connection was made: the witness saw it
        if c is Condition.TARPIT:
            return Outcome(Reply.CONNECT_FAILED, timeouts.greeting)
        if c is Condition.BUSY:
            return Outcome(Reply.GREETING_4XX, SMALL_RTT)
        if self.greylist and not self._greylist_passes(client, sender, recipient, now):
            return Outcome(Reply.RCPT_4XX, SMALL_RTT)
        return Outcome(Reply.ACCEPTED, SMALL_RTT)

    def _greylist_passes(self, client: str, sender: str, recipient: str, now: float) -> bool:
        net = network_of(client)
        if self._passed.get(net, 0) >= self.greylist_auto_whitelist:
            return True
        triplet = (net, sender, recipient)
        first = self._triplets.setdefault(triplet, now)
        if now - first < self.greylist_delay:
            return False
        self._passed[net] = self._passed.get(net, 0) + 1
        return True
