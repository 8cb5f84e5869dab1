"""Configuration: one TOML file into frozen dataclasses.

Every key and its default is declared once, in the dataclasses below; the TOML reader
is driven by them. Unknown keys, wrong types and bad values raise ``ConfigError`` naming
the file and the key, never a warning that is logged and forgotten. Durations are
strings such as ``"100ms"``, ``"10s"``, ``"30m"``; they become float seconds.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from guard.health import AggregationRules
from guard.mxset import (
    SMTP_PORT,
    MxHost,
    MxSet,
    SelfIdentity,
    normalize_host,
    self_preference,
)

DEFAULT_CONFIG_PATH = "/etc/mx-guard/guard.toml"
CONFIG_ENV = "MX_GUARD_CONFIG"


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the key."""


class Action(StrEnum):
    """What the policy may do with a recipient. ``DRY_RUN`` decides and logs only."""

    ACCEPT = "accept"
    FLAG = "flag"
    TEMPFAIL = "tempfail"
    REJECT = "reject"
    DRY_RUN = "dry-run"


class LogTarget(StrEnum):
    STDERR = "stderr"  # journald, or whatever the service manager does with stderr
    SYSLOG = "syslog"  # a syslog socket, for hosts that read /var/log/mail.log


class ProbeMode(StrEnum):
    TCP = "tcp"
    BANNER = "banner"
    EHLO = "ehlo"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_REPLY = re.compile(r"^([45]\d\d) ([45]\.\d{1,3}\.\d{1,3}) (\S.*)$")


def parse_duration(text: str) -> float:
    """``"250ms"`` -> 0.25; raises ValueError on anything else."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use a number and ms, s, m, h or d)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


@dataclass(frozen=True)
class SmtpReply:
    code: str
    enhanced: str
    text: str

    @classmethod
    def parse(cls, line: str) -> SmtpReply:
        m = _REPLY.match(line)
        if not m:
            raise ValueError(f"not an SMTP reply like '451 4.7.1 text': {line!r}")
        if m.group(1)[0] != m.group(2)[0]:
            raise ValueError(f"reply code and enhanced code disagree: {line!r}")
        return cls(m.group(1), m.group(2), m.group(3))

    def for_domain(self, domain: str) -> SmtpReply:
        # libmilter drops replies with a lone '%', and a domain is never allowed one.
        text = self.text.replace("{domain}", domain).replace("%", "")
        return SmtpReply(self.code, self.enhanced, text)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


# ---------------------------------------------------------------------------
# Value parsers. Each takes the raw TOML value and returns the typed value, or raises
# ValueError with a message that the reader prefixes with the file and key.

T = TypeVar("T")
Parser = Callable[[Any], Any]


def _wrong(expected: str, value: Any) -> ValueError:
    return ValueError(f"must be {expected}, got {type(value).__name__} {value!r}")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong("a string", value)
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong("true or false", value)
    return value


def _integer(minimum: int, maximum: int = 2**31) -> Parser:
    def parse(value: Any) -> int:
        # bool is an int in Python; TOML keeps them apart and so do we.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong("an integer", value)
        n = value
        if not minimum <= n <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {n}")
        return n

    return parse


def _duration(value: Any) -> float:
    seconds = parse_duration(_string(value))
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def _choice(enum: type[StrEnum], *allowed: StrEnum) -> Parser:
    names = [str(a) for a in (allowed or tuple(enum))]

    def parse(value: Any) -> StrEnum:
        text = _string(value)
        if text not in names:
            raise ValueError(f"must be one of {', '.join(names)}; got {text!r}")
        return enum(text)

    return parse


def _list_of(item: Parser) -> Parser:
    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {type(value).__name__} {value!r}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as e:
                raise ValueError(f"item {i + 1}: {e}") from None
        return tuple(out)

    return parse


def _address(value: Any) -> str:
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"not a network like 192.0.2.0/24 or 2001:db8::/32: {text!r}") from None


def _milter_socket(value: Any) -> str:
    text = _string(value)
    kind, _, rest = text.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return text
    port = re.match(r"^(\d+)(@.+)?$", rest)
    if kind in ("inet", "inet6") and port and 0 < int(port.group(1)) < 65536:
        return text
    raise ValueError(f"must be unix:/path or inet:PORT@ADDRESS, got {text!r}")


_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def _node(value: Any) -> str:
    # It goes into header values, log lines and store keys: keep it a plain token.
    text = _string(value)
    if not _NODE.match(text):
        raise ValueError(f"must be 1-63 letters, digits, '.', '_' or '-', got {text!r}")
    return text


def _hostname(value: Any) -> str:
    text = _string(value)
    if text and not _HOSTNAME.match(text):
        raise ValueError(f"not a host name, got {text!r}")
    return text


def _whole_seconds(value: Any) -> float:
    seconds = _duration(value)
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"must be whole seconds (libmilter counts in seconds), got {value!r}")
    return seconds


def _store_url(value: Any) -> str:
    text = _string(value)
    schemes = ("memory://", "redis://", "rediss://", "unix://", "redis+sentinel://")
    if not text.startswith(schemes):
        raise ValueError(f"must start with one of {', '.join(schemes)}; got {text!r}")
    return text


def _listen(value: Any) -> str:
    text = _string(value)
    if text == "":
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be ADDRESS:PORT (e.g. 127.0.0.1:9901) or empty, got {text!r}")
    return text


def _reply(first_digit: str) -> Parser:
    def parse(value: Any) -> SmtpReply:
        reply = SmtpReply.parse(_string(value))
        if reply.code[0] != first_digit:
            raise ValueError(f"must be a {first_digit}xx reply, got {reply.code}")
        return reply

    return parse


def _header_name(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^[!-9;-~]+$", text):
        raise ValueError(f"not a valid header field name: {text!r}")
    return text


# The facilities syslog(3) knows, as SysLogHandler.facility_names spells them.
SYSLOG_FACILITIES = (
    "auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news", "syslog",
    "user", "uucp", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
)


def _facility(value: Any) -> str:
    text = _string(value)
    if text not in SYSLOG_FACILITIES:
        raise ValueError(f"must be a syslog facility ({', '.join(SYSLOG_FACILITIES)}); "
                         f"got {text!r}")
    return text


def _socket_path(empty_ok: bool) -> Parser:
    def parse(value: Any) -> str:
        text = _string(value)
        if (text or not empty_ok) and not text.startswith("/"):
            raise ValueError(f"must be an absolute path{' or empty' if empty_ok else ''}, "
                             f"got {text!r}")
        return text

    return parse


def _setting(default: Any, parse: Parser, doc: str = "") -> Any:
    """A config key: its default (the only one), how to read it, what it means."""
    if callable(default):
        return field(default_factory=default, metadata={"parse": parse, "doc": doc})
    return field(default=default, metadata={"parse": parse, "doc": doc})


# ---------------------------------------------------------------------------
# The schema. Field names are the TOML keys.


@dataclass(frozen=True)
class MilterConfig:
    socket: str = _setting("unix:/run/mx-guard/guard.sock", _milter_socket)
    timeout: float = _setting(parse_duration("10s"), _whole_seconds, "MTA I/O timeout")


@dataclass(frozen=True)
class SelfConfig:
    node: str = _setting(lambda: socket.gethostname().split(".")[0] or "mx-guard", _node)
    names: tuple[str, ...] = _setting((), _list_of(_string))
    addresses: tuple[str, ...] = _setting((), _list_of(_address))

    @functools.cached_property
    def identity(self) -> SelfIdentity:
        return SelfIdentity.of(self.names, self.addresses)


@dataclass(frozen=True)
class StoreConfig:
    url: str = _setting("memory://", _store_url)
    prefix: str = _setting("mxguard:", _string)
    timeout: float = _setting(0.1, _duration, "per store call")
    refresh: float = _setting(1.0, _duration, "snapshot refresh interval")


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = _setting((), _list_of(_address), "empty: resolv.conf")
    port: int = _setting(53, _integer(1, 65535))
    lifetime: float = _setting(0.2, _duration, "one lookup, all retries included")
    min_ttl: float = _setting(60.0, _duration)
    max_ttl: float = _setting(3600.0, _duration)
    retry: float = _setting(30.0, _duration, "after a failed lookup")


@dataclass(frozen=True)
class ProbeConfig:
    mode: ProbeMode = _setting(ProbeMode.BANNER, _choice(ProbeMode))
    interval: float = _setting(10.0, _duration)
    down_interval: float = _setting(3.0, _duration)
    timeout: float = _setting(5.0, _duration)
    rise: int = _setting(2, _integer(1, 100))
    fall: int = _setting(2, _integer(1, 100))
    quorum: int = _setting(1, _integer(1, 100))
    concurrency: int = _setting(256, _integer(1, 100000))
    helo: str = _setting("", _hostname, "EHLO name; empty: the first of self.names or node")


@dataclass(frozen=True)
class PolicyConfig:
    action: Action = _setting(
        Action.TEMPFAIL,
        _choice(Action, Action.FLAG, Action.TEMPFAIL, Action.REJECT, Action.DRY_RUN),
    )
    on_unknown: Action = _setting(
        Action.FLAG,
        _choice(Action, Action.ACCEPT, Action.FLAG, Action.TEMPFAIL, Action.DRY_RUN),
    )
    flag_all: bool = _setting(False, _boolean)
    down_grace: float = _setting(parse_duration("30m"), _duration)
    on_recently_down: Action = _setting(
        Action.FLAG, _choice(Action, Action.ACCEPT, Action.FLAG),
        "a primary that failed within down_grace but is seen up again",
    )
    stale_after: float = _setting(parse_duration("60s"), _duration)
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        _list_of(_network),
    )
    trust_authenticated: bool = _setting(True, _boolean)
    header: str = _setting("X-MX-Guard", _header_name)
    reply: SmtpReply = _setting(
        SmtpReply.parse("451 4.7.1 Please deliver mail for {domain} to its primary MX"),
        _reply("4"),
    )
    reject_reply: SmtpReply = _setting(
        SmtpReply.parse("550 5.7.1 Mail for {domain} must be delivered to its primary MX"),
        _reply("5"),
    )
    on_seen_at_primary: Action = _setting(
        Action.TEMPFAIL,
        _choice(Action, Action.ACCEPT, Action.FLAG, Action.TEMPFAIL, Action.DRY_RUN),
        "a bypass by a client the witness saw at the primary; never stricter than action",
    )


@dataclass(frozen=True)
class ReleaseConfig:
    # Defaults from `mx-guard simulate` (README "Why the defaults"): the second try 5 min
    # on releases an MTA that ignores MX order, or cannot reach the primary, after one
    # retry interval (Postfix 300 s, qmail 400 s, Gmail 6 min); bots retry within a
    # minute or never.
    attempts: int = _setting(2, _integer(1, 1000), "the try of one identity that is released")
    min_age: float = _setting(parse_duration("5m"), _duration, "if this long after its first try")
    ttl: float = _setting(parse_duration("36h"), _duration, "a retry identity lives this long")
    ipv4_prefix: int = _setting(24, _integer(8, 32), "client network of an IPv4 identity")
    ipv6_prefix: int = _setting(64, _integer(16, 128), "client network of an IPv6 identity")


class WitnessRole(StrEnum):
    SECONDARY = "secondary"
    WITNESS = "witness"


@dataclass(frozen=True)
class WitnessConfig:
    role: WitnessRole = _setting(WitnessRole.SECONDARY, _choice(WitnessRole),
                                 "witness: on a primary MX, record clients, decide nothing")
    ttl: float = _setting(parse_duration("1h"), _duration, "a client network stays seen")
    heartbeat: float = _setting(parse_duration("5s"), _duration, "how often a witness says so")
    queue: int = _setting(10000, _integer(1, 1000000), "records waiting for the writer")


@dataclass(frozen=True)
class TrapsConfig:
    ttl: float = _setting(parse_duration("24h"), _duration, "a trap count lives this long")
    threshold: int = _setting(0, _integer(0, 1000000), "reject clients with this many; 0: off")


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = _setting("", _listen, "Prometheus exporter ADDRESS:PORT; empty: off")


@dataclass(frozen=True)
class LogConfig:
    target: LogTarget = _setting(LogTarget.STDERR, _choice(LogTarget))
    facility: str = _setting("mail", _facility, "syslog facility")
    syslog_socket: str = _setting("/dev/log", _socket_path(empty_ok=False))


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _setting("", _socket_path(empty_ok=True),
                           "Unix socket path; empty: NAME.control.sock beside NAME.sock")
    timeout: float = _setting(1.0, _duration, "a client's time to send and read")


@dataclass(frozen=True)
class DomainConfig:
    name: str
    mx: tuple[MxHost, ...] | None  # None: discover with DNS
    action: Action | None = None

    @property
    def from_dns(self) -> bool:
        return self.mx is None


@dataclass(frozen=True)
class Config:
    milter: MilterConfig = field(default_factory=MilterConfig)
    me: SelfConfig = field(default_factory=SelfConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    witness: WitnessConfig = field(default_factory=WitnessConfig)
    traps: TrapsConfig = field(default_factory=TrapsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    domains: tuple[DomainConfig, ...] = ()
    path: str = "<defaults>"

    def domain(self, name: str) -> DomainConfig | None:
        return self._by_name.get(name)

    @property
    def _by_name(self) -> Mapping[str, DomainConfig]:
        # Cached on first use; the dataclass is frozen, so write through object.
        cache: dict[str, DomainConfig] | None = self.__dict__.get("_domain_index")
        if cache is None:
            cache = {d.name: d for d in self.domains}
            object.__setattr__(self, "_domain_index", cache)
        return cache

    def action_for(self, domain: DomainConfig) -> Action:
        return domain.action or self.policy.action

    @functools.cached_property  # the instance dict, so a frozen dataclass allows it
    def aggregation(self) -> AggregationRules:
        return AggregationRules(self.policy.down_grace, self.policy.stale_after,
                                self.probe.quorum)

    @property
    def probe_helo(self) -> str:
        return self.probe.helo or (sorted(self.me.names)[0] if self.me.names else self.me.node)


# TOML table name -> Config attribute and section class.
_SECTIONS: dict[str, tuple[str, type]] = {
    "milter": ("milter", MilterConfig),
    "self": ("me", SelfConfig),
    "store": ("store", StoreConfig),
    "dns": ("dns", DnsConfig),
    "probe": ("probe", ProbeConfig),
    "policy": ("policy", PolicyConfig),
    "metrics": ("metrics", MetricsConfig),
    "release": ("release", ReleaseConfig),
    "witness": ("witness", WitnessConfig),
    "traps": ("traps", TrapsConfig),
    "log": ("log", LogConfig),
    "control": ("control", ControlConfig),
}


def _read_section(cls: type[T], table: Any, where: str) -> T:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, raw in table.items():
        spec = known.get(key)
        if spec is None:
            raise ConfigError(
                f"{where} {key}: unknown key (known keys: {', '.join(sorted(known))})"
            )
        try:
            values[key] = spec.metadata["parse"](raw)
        except ValueError as e:
            raise ConfigError(f"{where} {key}: {e}") from None
    return cls(**values)


def _read_mx_host(raw: Any, where: str) -> MxHost:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table {{host, preference, addresses, port}}")
    unknown = set(raw) - {"host", "preference", "addresses", "port"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (known keys: "
                          "addresses, host, port, preference)")
    for key in ("host", "preference"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r}")
    try:
        return MxHost(
            host=normalize_host(_string(raw["host"])),
            preference=_integer(0, 65535)(raw["preference"]),
            addresses=_list_of(_address)(raw.get("addresses", [])),
            port=_integer(1, 65535)(raw.get("port", SMTP_PORT)),
        )
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_domain(raw: Any, where: str, me: SelfIdentity) -> DomainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(raw) - {"name", "mx", "action"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          "(known keys: action, mx, name)")
    if "name" not in raw:
        raise ConfigError(f"{where}: missing key 'name'")
    try:
        name = normalize_host(_string(raw["name"]))
    except ValueError as e:
        raise ConfigError(f"{where} name: {e}") from None
    if not name:
        raise ConfigError(f"{where} name: must not be empty")
    where = f"{where} ({name})"
    action = None
    if "action" in raw:
        try:
            action = _choice(
                Action, Action.FLAG, Action.TEMPFAIL, Action.REJECT, Action.DRY_RUN
            )(raw["action"])
        except ValueError as e:
            raise ConfigError(f"{where} action: {e}") from None
    mx_raw = raw.get("mx", "dns")
    if mx_raw == "dns":
        return DomainConfig(name, None, action)
    if not isinstance(mx_raw, list) or not mx_raw:
        raise ConfigError(f"{where} mx: must be \"dns\" or a non-empty list of "
                          "{host, preference, addresses, port}")
    hosts = tuple(_read_mx_host(h, f"{where} mx[{i + 1}]") for i, h in enumerate(mx_raw))
    if self_preference(MxSet(name, hosts), me) is None:
        raise ConfigError(
            f"{where} mx: no MX host is this host (by [self] names or addresses); "
            "a secondary MX must appear in the MX list it guards"
        )
    return DomainConfig(name, hosts, action)


PROBE_JITTER = 0.1  # the prober spreads probes by up to this fraction of an interval


def _check_together(
    sections: Mapping[str, Any], domains: tuple[DomainConfig, ...], me: SelfConfig, path: str
) -> None:
    """Keys that are fine alone but wrong together."""
    probe = sections.get("probe", ProbeConfig())
    policy = sections.get("policy", PolicyConfig())
    store = sections.get("store", StoreConfig())
    dns = sections.get("dns", DnsConfig())
    # An observation must outlive the gap to the next one, or a node's "down" would
    # expire between two probes and the others would call the primary up.
    gap = max(probe.interval, probe.down_interval) * (1 + PROBE_JITTER) \
        + probe.timeout + store.refresh
    if policy.stale_after <= gap:
        raise ConfigError(
            f"{path}: [policy] stale_after ({policy.stale_after:g}s) must be longer than "
            f"the longest gap between two observations ({gap:g}s: the longer of [probe] "
            "interval and down_interval, plus 10% jitter, timeout and [store] refresh)"
        )
    release = sections.get("release", ReleaseConfig())
    traps = sections.get("traps", TrapsConfig())
    if 0 < traps.threshold <= release.attempts:
        raise ConfigError(
            f"{path}: [traps] threshold ({traps.threshold}) must be 0 (off) or more than "
            f"[release] attempts ({release.attempts}): a sender that ignores MX order "
            "would be rejected before its retries are released, and its mail bounced "
            "(and every recipient counts: keep it far above, e.g. 100)"
        )
    witness = sections.get("witness", WitnessConfig())
    if witness.role is WitnessRole.WITNESS and witness.heartbeat >= policy.stale_after:
        raise ConfigError(
            f"{path}: [witness] heartbeat ({witness.heartbeat:g}s) must be shorter than "
            f"[policy] stale_after ({policy.stale_after:g}s), or secondaries would find "
            "the witness stale between two heartbeats"
        )
    if dns.min_ttl > dns.max_ttl:
        raise ConfigError(f"{path}: [dns] min_ttl ({dns.min_ttl:g}s) is longer than "
                          f"max_ttl ({dns.max_ttl:g}s)")
    if any(d.from_dns for d in domains) and not (me.names or me.addresses):
        raise ConfigError(
            f"{path}: [self] names and addresses are both empty, so this host can never "
            "be found in an MX set from DNS and no domain would be guarded"
        )


def parse_config(data: Mapping[str, Any], path: str = "<string>") -> Config:
    sections: dict[str, Any] = {}
    for key, table in data.items():
        if key == "domain":
            continue
        if key not in _SECTIONS:
            known = ", ".join(sorted([*_SECTIONS, "domain"]))
            raise ConfigError(f"{path}: unknown section [{key}] (known: {known})")
        attr, cls = _SECTIONS[key]
        sections[attr] = _read_section(cls, table, f"{path}: [{key}]")
    me = sections.get("me", SelfConfig())
    raw_domains = data.get("domain", [])
    if not isinstance(raw_domains, list):
        raise ConfigError(f"{path}: domain: use [[domain]] tables")
    domains = tuple(
        _read_domain(d, f"{path}: [[domain]] #{i + 1}", me.identity)
        for i, d in enumerate(raw_domains)
    )
    _check_together(sections, domains, me, path)
    seen: set[str] = set()
    for d in domains:
        if d.name in seen:
            raise ConfigError(f"{path}: [[domain]] {d.name!r} is configured twice")
        seen.add(d.name)
    return Config(**sections, domains=domains, path=path)


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, str(p))


def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def defaults_documented() -> dict[str, dict[str, Any]]:
    """Every section's keys and defaults, for tests that keep conf/guard.toml honest."""
    out: dict[str, dict[str, Any]] = {}
    for table, (_, cls) in _SECTIONS.items():
        section = cls()
        out[table] = {
            f.name: getattr(section, f.name)
            for f in fields(cls)
            if f.default is not MISSING or f.default_factory is not MISSING
        }
    return out
