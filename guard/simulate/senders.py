"""Who sends mail to the guarded domain: legitimate MTAs and spam bots.

Each model walks the MX list and retries the way the real software does; the numbers
it rests on are written beside it with their source. A model is stateless; what a
sending machine remembers (Exim's per-IP host retry records, Sendmail's host status)
lives in its ``SenderHost``, and a message's progress in its ``Message``.

Time a connection takes comes from the primary model (a black hole costs the sender's
connect timeout, a tarpit its greeting timeout); a try walks the MX hosts in one
*attempt*, and between attempts the model's retry schedule applies, until the queue
lifetime runs out (the message is then *lost*).
"""

from __future__ import annotations

import random
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guard.mxset import MxHost, ip_version
from guard.simulate.primary import Outcome, Reply, SenderTimeouts

if TYPE_CHECKING:
    from guard.simulate.world import World

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
LINUX_SYN_GIVE_UP = 127.0  # seconds: net.ipv4.tcp_syn_retries = 6, 1+2+4+...+64

Attempt = Generator[float, None, Outcome]


@dataclass
class SenderHost:
    """One sending machine: its addresses, its verified name, what it remembers."""

    v4: str
    v6: str
    name: str | None  # forward-confirmed client name, None when it has none
    phase: float = 0.0  # in [0, 1): where in its cycle this machine's queue runner is
    retry_at: dict[str, float] = field(default_factory=dict)  # MX address -> skip until
    failing_since: dict[str, float] = field(default_factory=dict)  # MX address -> first fail
    failures: dict[str, int] = field(default_factory=dict)  # MX address -> failed tries


@dataclass
class Message:
    population: str
    number: int
    sender: str
    recipient: str
    submitted: float
    host: SenderHost
    family: str  # "4", "6" or "dual"
    tries: int = 0
    delivered_at: float | None = None
    at_secondary: bool = False
    flagged: bool = False
    lost: bool = False
    out_of_order: bool = False  # reached a secondary while the primary would have taken it
    reasons: list[str] = field(default_factory=list)  # the guard's reason for each try there

    @property
    def delay(self) -> float | None:
        return None if self.delivered_at is None else self.delivered_at - self.submitted


@dataclass(frozen=True)
class Route:
    """One address of one MX host, as a sender would connect to it."""

    host: MxHost
    address: str

    @property
    def family(self) -> int:
        return ip_version(self.address)


class Model:
    """A legitimate MTA: RFC 5321 MX order, a retry schedule, a queue lifetime.

    Unless a model says otherwise: Postfix's smtp_connect_timeout (30 s) and
    smtp_helo_timeout (300 s)."""

    name = "mta"
    legit = True
    timeouts = SenderTimeouts(connect=30.0, greeting=300.0)
    next_mx_after_rcpt_4xx = False  # a 4xx at RCPT ends the attempt (the safe assumption)
    next_mx_after_greeting_4xx = True
    ignores_mx_order = False
    primary_route_broken = False
    lifetime = 5 * DAY
    retry_interval = 300.0  # "one retry interval" of the delay goal: the first retry gap

    # -- the schedule ------------------------------------------------------------------

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        """Seconds from the end of try ``msg.tries`` to the next one; None: give up."""
        raise NotImplementedError

    # -- what each try looks like ------------------------------------------------------

    def client(self, msg: Message, rng: random.Random) -> tuple[SenderHost, str]:
        """The machine that makes this try, and the envelope sender it uses."""
        return msg.host, msg.sender

    def routes(self, world: World, msg: Message, rng: random.Random) -> list[Route]:
        hosts = world.mx_order(rng, shuffle_all=self.ignores_mx_order)
        families = {"4": (4,), "6": (6,), "dual": (6, 4)}[msg.family]
        # Addresses of one host in the client's order of preference (RFC 6724: IPv6 first).
        return [Route(h, a) for h in hosts for f in families for a in h.addresses
                if ip_version(a) == f]

    def skips(self, host: SenderHost, route: Route, now: float) -> bool:
        return False

    def learn(self, host: SenderHost, route: Route, outcome: Outcome, now: float) -> None:
        """What the machine remembers of a connection (nothing, for most MTAs)."""

    def attempt(self, world: World, msg: Message, rng: random.Random) -> Attempt:
        machine, sender = self.client(msg, rng)
        routes = [r for r in self.routes(world, msg, rng)
                  if not self.skips(machine, r, world.now())]
        outcome = Outcome(Reply.CONNECT_FAILED, 0.0)
        for i, route in enumerate(routes):
            final = i == len(routes) - 1
            started = world.now()
            outcome = world.connect(self, msg, machine, sender, route)
            yield outcome.elapsed
            self.learn(machine, route, outcome, started)
            if outcome.reply in (Reply.ACCEPTED, Reply.RCPT_5XX):
                return outcome
            if outcome.reply is Reply.RCPT_4XX and (final or not self.next_mx_after_rcpt_4xx):
                return outcome
            if outcome.reply is Reply.GREETING_4XX and not self.next_mx_after_greeting_4xx:
                return outcome
        return outcome

    def deliver(self, world: World, msg: Message, rng: random.Random
                ) -> Generator[float, None, None]:
        while True:
            msg.tries += 1
            outcome = yield from self.attempt(world, msg, rng)
            now = world.now()
            if outcome.reply is Reply.ACCEPTED:
                msg.delivered_at = now
                return
            if outcome.reply is Reply.RCPT_5XX:
                msg.lost = True  # bounced: lost as surely as by an expired lifetime
                return
            gap = self.retry_gap(msg, now, rng)
            if gap is None or now + gap - msg.submitted > self.lifetime:
                msg.lost = True
                return
            yield gap


class Postfix(Model):
    """Postfix 3.x defaults (postconf(5)): smtp_connect_timeout 30s, smtp_helo_timeout
    300s; a 4xx from a non-final MX sends it to the next MX in the same attempt
    (smtp(8): "try the next MX host"); a deferred message waits its time in the queue,
    bounded by minimal_backoff_time 300s and maximal_backoff_time 4000s (qmgr_active.c:
    "we look at actual time in queue, not time since last delivery attempt"), which
    doubles the gaps; maximal_queue_lifetime 5d. Dead hosts are forgotten between
    attempts; the deferred queue scan (queue_run_delay 300s) is not modelled."""

    name = "postfix"
    next_mx_after_rcpt_4xx = True
    retry_interval = 300.0

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        return min(max(now - msg.submitted, 300.0), 4000.0)


class Exim(Model):
    """Exim 4 default retry rule ``* * F,2h,15m; G,16h,1h,1.5; F,4d,6h`` (the Exim
    specification, chapter "Retry configuration"), applied to the message and, per
    IP, to a host that failed: until its retry time the failed IP is skipped and the
    next MX tried at once. The smtp transport's connect_timeout is 5m, so a black hole
    costs what Linux gives a SYN (tcp_syn_retries 6: 127 s); command_timeout 5m. A 4xx
    at RCPT defers the address (an address error, not a host error): no next MX."""

    name = "exim"
    timeouts = SenderTimeouts(connect=LINUX_SYN_GIVE_UP, greeting=300.0)
    retry_interval = 15 * MINUTE
    lifetime = 4 * DAY

    @staticmethod
    def rule_gap(since_first_failure: float, tries: int) -> float | None:
        if since_first_failure < 2 * HOUR:
            return 15 * MINUTE
        if since_first_failure < 16 * HOUR:
            f_tries = 8  # 15-minute retries fill the first 2 h
            return HOUR * 1.5 ** max(0, tries - f_tries - 1)
        if since_first_failure < 4 * DAY:
            return 6 * HOUR
        return None

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        return self.rule_gap(now - msg.submitted, msg.tries)

    def skips(self, host: SenderHost, route: Route, now: float) -> bool:
        return now < host.retry_at.get(route.address, 0.0)

    def learn(self, host: SenderHost, route: Route, outcome: Outcome, now: float) -> None:
        if outcome.reply in (Reply.CONNECT_FAILED, Reply.GREETING_4XX):
            first = host.failing_since.setdefault(route.address, now)
            failures = host.failures[route.address] = host.failures.get(route.address, 0) + 1
            gap = self.rule_gap(now - first, failures) or 6 * HOUR
            host.retry_at[route.address] = now + gap
        else:
            host.failing_since.pop(route.address, None)
            host.failures.pop(route.address, None)
            host.retry_at.pop(route.address, None)


class Sendmail(Model):
    """Sendmail 8: a host that failed is remembered as down for Timeout.hoststatus
    (30m) and skipped; deferred mail waits for the next queue run (``-q30m``, the
    interval of the Sendmail Installation and Operation Guide's example);
    Timeout.queuereturn 5d; Timeout.connect 0 (the kernel's 127 s), Timeout.initial 5m.
    A 4xx at RCPT defers the recipient."""

    name = "sendmail"
    timeouts = SenderTimeouts(connect=LINUX_SYN_GIVE_UP, greeting=300.0)
    queue_interval = 30 * MINUTE
    host_status = 30 * MINUTE
    retry_interval = 30 * MINUTE

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        # The queue runner of this machine has its own phase; the next run takes it.
        phase = msg.host.phase * self.queue_interval
        return self.queue_interval - ((now - phase) % self.queue_interval) or 1.0

    def skips(self, host: SenderHost, route: Route, now: float) -> bool:
        return now < host.retry_at.get(route.address, 0.0)

    def learn(self, host: SenderHost, route: Route, outcome: Outcome, now: float) -> None:
        if outcome.reply in (Reply.CONNECT_FAILED, Reply.GREETING_4XX):
            host.retry_at[route.address] = now + self.host_status
        else:
            host.retry_at.pop(route.address, None)


class Qmail(Model):
    """qmail 1.03: qmail-remote moves to the next MX only when the TCP connection
    fails; any SMTP answer, 4xx included, ends the try (it stays on a 4xx primary).
    qmail-send retries remote mail at birth + 400 n^2 seconds (qmail-send(8),
    "chanskip"); queuelifetime 604800 s (7 d); control/timeoutconnect 60 s,
    timeoutremote 1200 s."""

    name = "qmail"
    timeouts = SenderTimeouts(connect=60.0, greeting=1200.0)
    next_mx_after_greeting_4xx = False
    retry_interval = 400.0
    lifetime = 7 * DAY

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        return max(1.0, msg.submitted + 400.0 * msg.tries ** 2 - now)


class Exchange(Model):
    """Microsoft Exchange (Transport): retries a transient failure after 1, 5, 10,
    then every 15 minutes (TransientFailureRetryInterval, MessageRetryInterval);
    MessageExpirationTimeout 2 d. Connect and greeting timeouts: Postfix's (assumed)."""

    name = "exchange"
    gaps = (1 * MINUTE, 5 * MINUTE, 10 * MINUTE)
    retry_interval = 1 * MINUTE
    lifetime = 2 * DAY

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        return self.gaps[msg.tries - 1] if msg.tries <= len(self.gaps) else 15 * MINUTE


class GmailPool(Model):
    """A Gmail-like pool: every try from another machine of a large pool (Gmail
    retried one message from 7 addresses in 9 tries), with a forward-confirmed name
    under google.com; tries after 6, 29, 57, 99, 162 minutes (observed), then gaps
    growing by half each time up to 4 h; given up after 2 d (assumed). A 4xx at
    RCPT from the primary sends it to the next MX (assumed, the harder case)."""

    name = "gmail"
    next_mx_after_rcpt_4xx = True
    schedule = (6 * MINUTE, 29 * MINUTE, 57 * MINUTE, 99 * MINUTE, 162 * MINUTE)
    retry_interval = 6 * MINUTE
    lifetime = 2 * DAY
    networks = 32  # /24 networks in the pool

    def client(self, msg: Message, rng: random.Random) -> tuple[SenderHost, str]:
        net, host = rng.randrange(self.networks), rng.randrange(1, 255)
        return SenderHost(f"209.85.{128 + net}.{host}", f"2a00:1450:{4000 + net:x}::{host:x}",
                          f"mail-{net}-{host}.google.com"), msg.sender

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        age = now - msg.submitted
        for at in self.schedule:
            if at > age:
                return at - age
        last = self.schedule[-1] - self.schedule[-2]
        return min(4 * HOUR, last * 1.5 ** (msg.tries - len(self.schedule)))


class SesPool(Model):
    """An SES-like pool: every try from another machine and with a new VERP envelope
    sender (Amazon SES retries "from a new IP and a new envelope sender"), under a
    forward-confirmed amazonses.com name. Retry schedule assumed: gaps doubling from
    5 min to 1 h; given up after 14 h (assumed). Like the Gmail-like pool, a 4xx at
    RCPT sends it to the next MX (assumed, the harder case): a pool that never repeats
    a greylisting triplet would otherwise never pass a greylisting primary at all."""

    name = "ses"
    next_mx_after_rcpt_4xx = True
    retry_interval = 5 * MINUTE
    lifetime = 14 * HOUR
    networks = 16

    def client(self, msg: Message, rng: random.Random) -> tuple[SenderHost, str]:
        net, host = rng.randrange(self.networks), rng.randrange(1, 255)
        local, _, domain = msg.sender.partition("@")
        verp = f"{local}-{rng.getrandbits(48):012x}@{domain}"
        return SenderHost(f"54.240.{net}.{host}", f"2600:1f14:{net:x}::{host:x}",
                          f"a{net}-{host}.smtp-out.amazonses.com"), verp

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        return min(HOUR, 5 * MINUTE * 2.0 ** (msg.tries - 1))


class RandomMx(Postfix):
    """A broken MTA that ignores MX order: each try picks the MX hosts in random order
    and, unlike Postfix, ends the try on a 4xx (so a tempfail costs it a retry).
    Postfix's schedule otherwise."""

    name = "random-mx"
    ignores_mx_order = True
    next_mx_after_rcpt_4xx = False


class BrokenRoute(Postfix):
    """A Postfix whose route to the primary is broken (packets dropped somewhere on its
    side): every connection to the primary waits out the 30 s connect timeout, so
    every try reaches the secondary while the primary is healthy for everyone else."""

    name = "broken-route"
    primary_route_broken = True


class Bot(Model):
    """A spam bot: a fresh address per message, no verified name, a throw-away sender.
    About two thirds never retry, about a third retry once within a minute (SPEC
    section 5, from greylisting studies). ``lowest`` bots connect only to the
    lowest-priority MX; ``ordered`` ones walk the MX list, giving up on a host after
    10 s, and take the next MX after any failure."""

    name = "bot"
    legit = False
    timeouts = SenderTimeouts(connect=10.0, greeting=10.0)
    next_mx_after_rcpt_4xx = True
    lifetime = 2 * MINUTE
    retry_share = 1 / 3
    lowest = True

    def routes(self, world: World, msg: Message, rng: random.Random) -> list[Route]:
        routes = super().routes(world, msg, rng)
        if not self.lowest:
            return routes
        worst = max(r.host.preference for r in routes)
        lowest = [r for r in routes if r.host.preference == worst]
        return [rng.choice(lowest)]

    def retry_gap(self, msg: Message, now: float, rng: random.Random) -> float | None:
        if msg.tries > 1 or rng.random() >= self.retry_share:
            return None
        return rng.uniform(5.0, 60.0)


class BotLowest(Bot):
    name = "bot-lowest"


class BotOrdered(Bot):
    name = "bot-ordered"
    lowest = False


MODELS: dict[str, type[Model]] = {
    m.name: m for m in (Postfix, Exim, Sendmail, Qmail, Exchange, GmailPool, SesPool, RandomMx,
                        BrokenRoute, BotLowest, BotOrdered)
}


def models(names: Sequence[str]) -> list[Model]:
    return [MODELS[n]() for n in names]
