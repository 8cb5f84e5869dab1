"""The simulated world: one guarded domain, its primary, its secondaries, its senders.

``simulate(scenario)`` builds the world the scenario describes, runs it on the virtual
clock until every message is delivered or lost, and returns every message's fate.

The domain is ``example.org``: ``mx1`` (preference 10, the modelled primary) and one
or more guard nodes (``mx2``, ``mx3``: preference 20, equal, sharing one memory store).
Each node's configuration is read by the guard's own ``parse_config`` from the
scenario's ``[guard]`` tables plus the topology, so every default is the guard's.
"""

from __future__ import annotations

import calendar
import dataclasses
import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from guard.config import Config, parse_config
from guard.mxset import MxHost, MxSet, MxSource
from guard.policy import client_address
from guard.simulate.clock import EventLoop
from guard.simulate.primary import Outcome, Primary, Reply
from guard.simulate.scenario import Population, Scenario
from guard.simulate.secondary import SecondaryNode
from guard.simulate.senders import MODELS, Message, Model, Route, SenderHost
from guard.store import observation_ttl
from guard.store.memory import MemoryStore
from guard.witness import WitnessRecorder

DOMAIN = "example.org"
RECIPIENTS = 50
# Virtual time starts here (a Thursday), so header times read like real ones.
EPOCH = float(calendar.timegm((2026, 11, 26, 0, 0, 0)))


def _primary_host(ipv6: bool) -> MxHost:
    addresses = ("192.0.2.10", "2001:db8::10") if ipv6 else ("192.0.2.10",)
    return MxHost("mx1.example.org", 10, addresses)


def _secondary_host(index: int, name: str, ipv6: bool) -> MxHost:
    v4, v6 = f"192.0.2.{20 + index}", f"2001:db8::{20 + index:x}"
    return MxHost(f"{name}.example.org", 20, (v4, v6) if ipv6 else (v4,))


def node_config(scenario: Scenario, node: str, hosts: tuple[MxHost, ...],
                witness: bool = False) -> Config:
    data: dict[str, Any] = {section: dict(table) for section, table in scenario.guard.items()}
    data["self"] = {"node": node, "names": [f"{node}.example.org"]}
    if witness:
        data["witness"] = {**data.get("witness", {}), "role": "witness"}
    data["domain"] = [{
        "name": DOMAIN,
        "mx": [{"host": h.host, "preference": h.preference, "addresses": list(h.addresses)}
               for h in hosts],
    }]
    return parse_config(data, f"{scenario.path} [guard]")


@dataclass
class Results:
    scenario: Scenario
    seed: int
    messages: dict[str, list[Message]]
    legit: dict[str, bool]
    models: dict[str, Model]
    nodes: list[SecondaryNode]
    events: int
    ended_at: float = 0.0
    decisions: dict[str, int] = field(default_factory=dict)


class World:
    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.seed = seed
        self.loop = EventLoop(EPOCH)
        self.primary_host = _primary_host(scenario.ipv6)
        self.secondary_hosts = tuple(_secondary_host(i, n, scenario.ipv6)
                                     for i, n in enumerate(scenario.secondaries))
        hosts = (self.primary_host, *self.secondary_hosts)
        self.mxset = MxSet(DOMAIN, hosts, MxSource.CONFIG)
        self.primary = Primary(
            episodes=[dataclasses.replace(e, start=EPOCH + e.start, end=EPOCH + e.end)
                      for e in scenario.episodes],
            greylist=scenario.greylist,
            greylist_delay=scenario.greylist_delay,
            greylist_auto_whitelist=scenario.greylist_auto_whitelist,
        )
        configs = [node_config(scenario, n, hosts) for n in scenario.secondaries]
        self.store = MemoryStore(observation_ttl(configs[0]), clock=self.loop.now)
        self.nodes = {
            h.host: SecondaryNode(c, DOMAIN, self.store, self.loop, self.primary,
                                  self.rng(f"node/{c.me.node}"))
            for h, c in zip(self.secondary_hosts, configs, strict=True)
        }
        # A guard in the witness role on the primary: its recorder, on the virtual clock.
        self.witness_config = node_config(scenario, "mx1", hosts, witness=True)
        self.witness: WitnessRecorder | None = None
        if scenario.witness:
            self.witness = WitnessRecorder(self.store, self.witness_config, self.loop.now)
            self.primary.witness = self._witnessed

    def _witnessed(self, client: str, now: float) -> None:
        address = client_address(client)
        if self.witness is not None and address is not None:
            self.witness.saw(address)
            self.witness.flush()  # the real writer takes well under 100 ms

    def _heartbeat(self) -> None:
        assert self.witness is not None
        self.witness.flush()
        self.loop.after(self.witness_config.witness.heartbeat, self._heartbeat)

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        if self.witness is not None:
            self._heartbeat()

    def rng(self, stream: str) -> random.Random:
        """An independent seeded stream per component: adding a population leaves the
        others' draws alone."""
        return random.Random(f"{self.seed}/{stream}")

    def now(self) -> float:
        return self.loop.now()

    def mx_order(self, rng: random.Random, shuffle_all: bool = False) -> list[MxHost]:
        hosts = list(self.mxset.hosts)
        rng.shuffle(hosts)  # RFC 5321 5.1: randomise among equal preferences
        if shuffle_all:
            return hosts
        return sorted(hosts, key=lambda h: h.preference)

    def connect(self, model: Model, msg: Message, machine: SenderHost, sender: str,
                route: Route) -> Outcome:
        now = self.now()
        client = machine.v6 if route.family == 6 else machine.v4
        if route.host is self.primary_host:
            if model.primary_route_broken:
                return Outcome(Reply.CONNECT_FAILED, model.timeouts.connect)
            return self.primary.deliver(route.family, client, sender, msg.recipient,
                                        model.timeouts, now)
        if self.primary.up_for_senders(now, route.family) and not model.primary_route_broken:
            msg.out_of_order = True
        node = self.nodes[route.host.host]
        outcome = node.deliver(client, sender, msg.recipient, machine.name, now)
        msg.reasons.append(outcome.reason)
        if outcome.reply is Reply.ACCEPTED:
            msg.at_secondary = True
            msg.flagged = outcome.flagged
        return outcome

    # -- the mail ----------------------------------------------------------------------

    def _machines(self, index: int, pop: Population, rng: random.Random) -> list[SenderHost]:
        out = []
        for h in range(pop.hosts):
            v4 = ipaddress.IPv4Address("198.18.0.25") + ((index * 32 + h) << 8)
            v6 = f"2001:db8:{0x100 + index:x}:{h:x}::25"
            out.append(SenderHost(str(v4), v6, f"mta{h}.{pop.name}-mail.net", rng.random()))
        return out

    def _bot(self, rng: random.Random) -> SenderHost:
        a, b, c = rng.randrange(1, 255), rng.randrange(256), rng.randrange(1, 255)
        return SenderHost(f"185.{a}.{b}.{c}", f"2a02:{a:x}{b:02x}::{c:x}", None)

    def add_population(self, index: int, pop: Population) -> tuple[list[Message], Model]:
        model = MODELS[pop.model]()
        rng = self.rng(f"population/{pop.name}")
        machines = self._machines(index, pop, rng)
        window = max(self.scenario.duration - self.scenario.warmup, 1.0)
        messages = []
        for n in range(pop.messages):
            at = self.scenario.warmup + rng.uniform(0.0, window)
            rcpt = f"user{rng.randrange(RECIPIENTS)}@{DOMAIN}"
            if model.legit:
                machine = rng.choice(machines)
                sender = f"sender{rng.randrange(pop.senders)}@{pop.name}-mail.net"
            else:
                machine = self._bot(rng)
                sender = f"{rng.getrandbits(32):08x}@{rng.choice(('mail.ru', 'gmail.com'))}"
            msg = Message(pop.name, n, sender, rcpt, EPOCH + at, machine, pop.family)
            messages.append(msg)
            self.loop.spawn(model.deliver(self, msg, rng), delay=at)
        return messages, model


def simulate(scenario: Scenario, seed: int | None = None) -> Results:
    seed = scenario.seed if seed is None else seed
    world = World(scenario, seed)
    world.start()
    messages: dict[str, list[Message]] = {}
    models: dict[str, Model] = {}
    for i, pop in enumerate(scenario.populations):
        messages[pop.name], models[pop.name] = world.add_population(i, pop)
    longest = max((m.lifetime for m in models.values()), default=0.0)
    world.loop.run(EPOCH + scenario.duration + longest + 3600.0,
                   done=lambda: world.loop.processes == 0)
    decisions: dict[str, int] = {}
    for node in world.nodes.values():
        for reason, n in node.decisions.items():
            decisions[reason] = decisions.get(reason, 0) + n
    return Results(scenario, seed, messages, {n: m.legit for n, m in models.items()}, models,
                   list(world.nodes.values()), world.loop.events, world.now(), decisions)
