"""The scenario file: one TOML file describing a day of mail (format in README.md,
"Simulating a day of mail", and in the comment header of every conf/scenarios file).

    [scenario]   name, description, duration ("24h"), warmup ("10m"), seed
    [topology]   secondaries = ["mx2"] (guard nodes at preference 20, one shared
                 store), ipv6 = true (every MX host also has an IPv6 address)
    [primary]    greylist, greylist_delay, greylist_auto_whitelist, witness
    [[primary.episode]]  at, for, condition (refused|blackhole|tarpit|busy),
                 family (4|6, default both), side (all|senders|secondaries)
    [[primary.flap]]     from, until, every, down, condition, family, side
    [guard.SECTION]      any guard.toml section but [self], [store], [milter] and
                 [[domain]] (the simulator owns the topology): [probe], [policy], ...
    [[population]]       name, model, messages, hosts, senders, family (4|6|dual)
Without [[population]] tables the standard mix of every sender model is used.
Times of episodes count from the start of the run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.config import ConfigError, parse_duration
from guard.simulate.primary import Condition, Episode, Side
from guard.simulate.senders import MODELS


class ScenarioError(ConfigError):
    """The scenario file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Population:
    name: str
    model: str
    messages: int
    hosts: int = 5
    senders: int = 20
    family: str = "4"


# The standard mix: every legitimate model and both kinds of bot, sized so a day runs
# in a few seconds while a rare bad outcome still shows (1 message in 200).
STANDARD_MIX = (
    Population("postfix", "postfix", 400, family="dual"),
    Population("exim", "exim", 300),
    Population("sendmail", "sendmail", 200),
    Population("qmail", "qmail", 100),
    Population("exchange", "exchange", 200, family="dual"),
    Population("gmail", "gmail", 300),
    Population("ses", "ses", 200),
    Population("random-mx", "random-mx", 100),
    Population("broken-route", "broken-route", 100, hosts=2),
    Population("bot-lowest", "bot-lowest", 4000),
    Population("bot-ordered", "bot-ordered", 2000),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    duration: float = 86400.0
    warmup: float = 600.0
    seed: int = 1
    secondaries: tuple[str, ...] = ("mx2",)
    ipv6: bool = True
    greylist: bool = False
    greylist_delay: float = 300.0
    greylist_auto_whitelist: int = 5
    witness: bool = False
    episodes: tuple[Episode, ...] = ()
    guard: dict[str, Any] = field(default_factory=dict)
    populations: tuple[Population, ...] = STANDARD_MIX
    path: str = "<scenario>"


OWNED_SECTIONS = ("self", "store", "milter", "domain", "metrics")


class _Table:
    """Reads one TOML table, naming file and key in every error, refusing unknown keys."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: must be a table")
        self.raw = dict(raw)
        self.where = where

    def _take(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in self.raw:
            return default
        value = self.raw.pop(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ScenarioError(f"{self.where} {key}: wrong type {type(value).__name__}")
        return value

    def string(self, key: str, default: str) -> str:
        return str(self._take(key, str, default))

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        n = int(self._take(key, int, default))
        if n < minimum:
            raise ScenarioError(f"{self.where} {key}: must be at least {minimum}, got {n}")
        return n

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._take(key, bool, default))

    def duration(self, key: str, default: float | None) -> float:
        text = self._take(key, str, None)
        if text is None:
            if default is None:
                raise ScenarioError(f"{self.where}: missing key {key!r}")
            return default
        try:
            return parse_duration(text)
        except ValueError as e:
            raise ScenarioError(f"{self.where} {key}: {e}") from None

    def choice(self, key: str, allowed: tuple[str, ...], default: str | None) -> str:
        value = self._take(key, (str, int), default)
        if value is None:
            raise ScenarioError(f"{self.where}: missing key {key!r}")
        if str(value) not in allowed:
            raise ScenarioError(f"{self.where} {key}: must be one of {', '.join(allowed)}; "
                                f"got {value!r}")
        return str(value)

    def done(self) -> None:
        if self.raw:
            raise ScenarioError(f"{self.where}: unknown key {sorted(self.raw)[0]!r}")


def _episode_fields(t: _Table) -> tuple[Condition, int | None, Side]:
    condition = Condition(t.choice("condition", tuple(c for c in Condition if c != "up"),
                                   "blackhole"))
    family_text = t.choice("family", ("4", "6", "both"), "both")
    side = Side(t.choice("side", tuple(Side), "all"))
    return condition, None if family_text == "both" else int(family_text), side


def _episodes(raw: Any, where: str) -> list[Episode]:
    out = []
    for i, item in enumerate(_list(raw, where)):
        t = _Table(item, f"{where}[{i + 1}]")
        at = t.duration("at", None)
        length = t.duration("for", None)
        condition, family, side = _episode_fields(t)
        t.done()
        out.append(Episode(at, at + length, condition, family, side))
    return out


def _flaps(raw: Any, where: str) -> list[Episode]:
    out = []
    for i, item in enumerate(_list(raw, where)):
        t = _Table(item, f"{where}[{i + 1}]")
        start, until = t.duration("from", None), t.duration("until", None)
        every, down = t.duration("every", None), t.duration("down", None)
        condition, family, side = _episode_fields(t)
        t.done()
        if down >= every:
            raise ScenarioError(f"{where}[{i + 1}]: down must be shorter than every")
        at = start
        while at < until:
            out.append(Episode(at, at + down, condition, family, side))
            at += every
    return out


def _list(raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise ScenarioError(f"{where}: use [[...]] tables")
    return raw


def parse_scenario(data: dict[str, Any], path: str = "<scenario>") -> Scenario:
    data = dict(data)
    s = _Table(data.pop("scenario", {}), f"{path}: [scenario]")
    name = s.string("name", Path(path).stem)
    description = s.string("description", "")
    duration = s.duration("duration", 86400.0)
    warmup = s.duration("warmup", 600.0)
    seed = s.integer("seed", 1)
    s.done()

    topo = _Table(data.pop("topology", {}), f"{path}: [topology]")
    secondaries = topo._take("secondaries", list, ["mx2"])
    if not secondaries or not all(isinstance(n, str) and n.isalnum() for n in secondaries) \
            or len(set(secondaries)) != len(secondaries):
        raise ScenarioError(f"{path}: [topology] secondaries: a list of distinct node "
                            "names like \"mx2\"")
    ipv6 = topo.boolean("ipv6", True)
    topo.done()

    prim = _Table(data.pop("primary", {}), f"{path}: [primary]")
    episodes = _episodes(prim._take("episode", list, []), f"{path}: [[primary.episode]]")
    episodes += _flaps(prim._take("flap", list, []), f"{path}: [[primary.flap]]")
    greylist = prim.boolean("greylist", False)
    greylist_delay = prim.duration("greylist_delay", 300.0)
    auto_whitelist = prim.integer("greylist_auto_whitelist", 5, 1)
    witness = prim.boolean("witness", False)
    prim.done()

    guard = data.pop("guard", {})
    if not isinstance(guard, dict):
        raise ScenarioError(f"{path}: [guard]: must be a table of guard.toml sections")
    for owned in OWNED_SECTIONS:
        if owned in guard:
            raise ScenarioError(f"{path}: [guard.{owned}]: set by the simulator's topology")

    populations = []
    for i, item in enumerate(_list(data.pop("population", []), f"{path}: [[population]]")):
        t = _Table(item, f"{path}: [[population]] #{i + 1}")
        model = t.choice("model", tuple(MODELS), None)
        populations.append(Population(
            name=t.string("name", model),
            model=model,
            messages=t.integer("messages", 100, 0),
            hosts=t.integer("hosts", 5, 1),
            senders=t.integer("senders", 20, 1),
            family=t.choice("family", ("4", "6", "dual"), "4"),
        ))
        t.done()
    names = [p.name for p in populations]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{path}: [[population]]: two populations share a name")
    if data:
        raise ScenarioError(f"{path}: unknown section [{sorted(data)[0]}]")
    return Scenario(
        name=name, description=description, duration=duration, warmup=warmup, seed=seed,
        secondaries=tuple(secondaries), ipv6=ipv6, greylist=greylist,
        greylist_delay=greylist_delay, greylist_auto_whitelist=auto_whitelist,
        witness=witness, episodes=tuple(sorted(episodes, key=lambda e: e.start)),
        guard=guard, populations=tuple(populations) or STANDARD_MIX, path=path,
    )


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioError(f"{p}: no such file") from None
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{p}: not valid TOML: {e}") from None
    return parse_scenario(data, str(p))
