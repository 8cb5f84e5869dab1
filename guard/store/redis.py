"""The Redis store: observations, history and change notices shared between nodes.

Key layout, all under the configured prefix ``P`` (default ``mxguard:``):

- ``P obs:<hour>``: a hash per hour of the epoch (``int(time / 3600)``); field
  ``<target> <node>``, value a compact JSON of that node's newest observation of the
  target with its own expiry time (``exp``). A node writes into the hash of the hour it
  publishes in; a reader reads the two or three hashes that can hold unexpired entries
  (their names follow from the clock, so no index and no SCAN) in one pipelined round
  trip, drops entries past ``exp`` and keeps the newest write per (target, node). Each
  hash expires ``observation_ttl`` after its hour ends, so what a node stopped writing
  disappears with its hour: no garbage collection, no race with a writer.
- ``P history``: a stream of transitions, ``XADD MAXLEN ~ history_max``; its TTL
  (``HISTORY_TTL_SECONDS``) is refreshed by every publish, so it outlives quiet weeks
  but not the last node.
- ``P changes``: a pub/sub channel; every publish carrying transitions sends a notice.
- Evidence (``guard.evidence``), all written by one script per bypass try, so that
  several secondaries counting the same identity at once count right:
  ``P rel:<hash>``, a hash per retry identity (``t`` tries, ``f`` first try), expiring
  ``[release] ttl`` after its last try; ``P wit:<network>``, when a witness last saw
  a client network, expiring after ``[witness] ttl``; ``P wit:hb``, a hash of witness
  node -> newest heartbeat; ``P trap:<address>``, a hash (``n`` count, ``l`` last),
  expiring ``[traps] ttl`` after its last count, with ``P traps``, a sorted set of the
  trapped addresses by last count, for ``mx-guard traps`` (trimmed by the script).

Contracts: ``publish``, ``observations``, ``record_bypass`` and ``record_witness``
are one round trip each (the script is sent by its SHA; after a restart or SCRIPT
FLUSH the server answers NOSCRIPT and the text goes once with EVAL: a second trip for
that one call). ``record_bypass`` runs inside a milter callback and is never retried. Every call is
bounded: socket and connect timeouts are the store timeout, redis-py's own retries are
off, and a call is retried at most once, only after a connection error that came fast
(a socket the server closed, a master demoted by a failover), never after a timeout, so
no call waits much longer than twice the timeout. Behind Sentinel a new connection
first asks the sentinels, one after another, for the master: with N sentinels frozen
that adds up to N timeouts per try. Any fault becomes ``StoreError``.
URLs: ``redis://``, ``rediss://`` (TLS; ``ssl_*`` query options as in redis-py),
``unix:///path/redis.sock?db=0`` and
``redis+sentinel://[user:password@]host:port[,host:port]/service[/db]``.
Clocks: expiry uses epoch time of the writer, so nodes need synchronised clocks (they
need them anyway, observations are compared by time); ``CLOCK_SKEW_SECONDS`` of skew
is tolerated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel
from redis.typing import EncodableT, FieldT

from guard.config import Config
from guard.evidence import (
    BypassTry,
    Evidence,
    EvidenceRules,
    IdentityCount,
    Trap,
    counts_as_trap,
    is_released,
)
from guard.health import Observation, State, Target, Transition
from guard.store.base import HISTORY_MAX, StoreError

log = logging.getLogger("guard.store.redis")

BUCKET_SECONDS = 3600  # width of one observation hash; part of the key layout, fixed
CLOCK_SKEW_SECONDS = 60.0  # tolerated difference between the clocks of two nodes
HISTORY_TTL_SECONDS = 30 * 86400  # history survives a month without any publish
# PING a connection idle this long before using it, and PING the change subscription
# this often: keeps it alive through firewalls and proxies that drop idle connections.
HEALTH_CHECK_SECONDS = 30
RETRY_BACKOFF_SECONDS = 0.005  # before the single retry: let a restarted socket settle
WAIT_SLICE_SECONDS = 0.1  # wait_for_change notices close() within this
SENTINEL_PORT = 26379

# Query options a URL may carry. Timeouts, retries and the protocol are deliberately
# not among them: store.timeout is the one place for those.
_QUERY_ALLOWED = frozenset({"db", "password", "username", "client_name"})
# Behind Sentinel the master's credentials come from the URL's user:password@ only.
_SENTINEL_QUERY = frozenset({"db", "client_name", "sentinel_username", "sentinel_password", "ssl"})

# Everything a Redis call can fail with. OSError and ValueError cover what redis-py
# lets through from sockets and TLS; UnicodeError a foreign value under our prefix.
_FAULTS = (redis.RedisError, OSError, ValueError)

T = TypeVar("T")
_QUERY_PASSWORD = re.compile(r"([?&][a-z_]*password=)[^&#]*")


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<netloc>[^/?#]*)"
                  r"(?P<path>[^?#]*)(?:\?(?P<query>[^#]*))?")


@dataclass(frozen=True)
class _UrlParts:
    scheme: str
    netloc: str
    path: str
    query: str


def _split(url: str) -> _UrlParts:
    """urlsplit() without its netloc checks: a Sentinel URL lists several hosts, IPv6
    ones in brackets, which newer Pythons' urlsplit refuses ("Invalid IPv6 URL")."""
    m = _URL.match(url)
    if m is None:
        return _UrlParts("", "", "", "")
    return _UrlParts(m["scheme"].lower(), m["netloc"], m["path"], m["query"] or "")


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log."""
    netloc = _split(url).netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            url = url.replace(netloc, f"{user}:***@{hosts}", 1)
    # password=, sentinel_password= in the query (unix:// URLs carry it there)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def _check_query(url: str, allowed: Iterable[str], tls: bool) -> None:
    known = set(allowed)
    for key, _ in parse_qsl(_split(url).query, keep_blank_values=True):
        if key.startswith("ssl_") and tls:
            continue
        if key not in known:
            hint = "ssl options need rediss:// or ssl=true" if key.startswith("ssl_") else (
                "timeouts come from store.timeout"
            )
            raise ValueError(
                f"store url {mask_password(url)}: unsupported option {key!r} ({hint})"
            )


def _connection_options(timeout: float) -> dict[str, Any]:
    """Connection settings that bound every call; see the module header."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # redis-py retries 10 times by default, and nests the connect retry inside the
        # command retry; we retry once ourselves, with a deadline in view.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": HEALTH_CHECK_SECONDS,
        # RESP2 and no CLIENT SETINFO: a new connection costs no extra round trip
        # (RESP3 would add HELLO), which keeps reconnects inside the timeout budget.
        "protocol": 2,
        "driver_info": None,
        "decode_responses": True,
    }


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    options: Mapping[str, str]

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        parts = _split(url)
        if parts.scheme != "redis+sentinel":
            raise ValueError(f"not a redis+sentinel:// url: {mask_password(url)}")
        username = password = None
        hosts = parts.netloc
        if "@" in hosts:
            userinfo, _, hosts = hosts.rpartition("@")
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        sentinels = tuple(_host_port(h, url) for h in hosts.split(",") if h)
        if not sentinels:
            raise ValueError(f"store url {mask_password(url)}: no sentinel host")
        service, _, db = parts.path.lstrip("/").partition("/")
        if not service:
            raise ValueError(f"store url {mask_password(url)}: no service name in the path")
        options = dict(parse_qsl(parts.query))
        try:
            db_number = int(options.pop("db", db.strip("/") or "0"))
        except ValueError:
            raise ValueError(f"store url {mask_password(url)}: db must be a number") from None
        return cls(sentinels, unquote(service), db_number, username, password, options)


def _host_port(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = text, ""
    try:
        return unquote(host), int(port) if port else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"store url {mask_password(url)}: bad port in {text!r}") from None


def _typed_options(options: Mapping[str, str]) -> dict[str, Any]:
    """URL query values converted as redis-py's ``from_url`` converts them."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        parse = cast("Callable[[str], Any] | None", URL_QUERY_ARGUMENT_PARSERS.get(key))
        out[key] = parse(value) if parse else value
    if "ssl" in out:
        out["ssl"] = str(out["ssl"]).lower() in ("1", "true", "yes", "on")
    return out


# One bypass try (guard.evidence): count every identity, read the witness record and
# heartbeats, count a trap unless released or seen. The rules are those of
# guard/evidence.py (is_released, counts_as_trap); the contract suite holds the memory
# store and this script to the same cases. Times travel as strings: Redis turns a Lua
# number into an integer on the way out.
# KEYS: identity hashes..., wit:<network>, wit:hb, trap:<address>, traps
# ARGV: at, attempts, min_age, release_ttl_ms, witness_fresh, trap_ttl_ms, address
_RECORD_BYPASS = """
local at = tonumber(ARGV[1])
local attempts, min_age = tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS - 4
local out, released = {}, false
for i = 1, n do
  local tries = redis.call('HINCRBY', KEYS[i], 't', 1)
  redis.call('HSETNX', KEYS[i], 'f', ARGV[1])
  local first = redis.call('HGET', KEYS[i], 'f')
  redis.call('PEXPIRE', KEYS[i], ARGV[4])
  if tries >= attempts and at - tonumber(first) >= min_age then released = true end
  out[#out + 1] = tostring(tries)
  out[#out + 1] = first
end
local seen = redis.call('GET', KEYS[n + 1])
local heartbeat = false
for _, v in ipairs(redis.call('HVALS', KEYS[n + 2])) do
  if heartbeat == false or tonumber(v) > tonumber(heartbeat) then heartbeat = v end
end
local fresh = heartbeat ~= false and at - tonumber(heartbeat) <= tonumber(ARGV[5])
local trap
if not released and not (fresh and seen) then
  trap = redis.call('HINCRBY', KEYS[n + 3], 'n', 1)
  redis.call('HSET', KEYS[n + 3], 'l', ARGV[1])
  redis.call('PEXPIRE', KEYS[n + 3], ARGV[6])
  redis.call('ZADD', KEYS[n + 4], at, ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[n + 4], '-inf', at - tonumber(ARGV[6]) / 1000)
  redis.call('PEXPIRE', KEYS[n + 4], ARGV[6])
else
  trap = tonumber(redis.call('HGET', KEYS[n + 3], 'n') or '0')
end
out[#out + 1] = seen
out[#out + 1] = heartbeat
out[#out + 1] = tostring(trap)
return out
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _encode(obs: Observation, expires: float) -> str:
    return json.dumps(
        {
            "s": obs.state.value,
            "since": obs.since,
            "at": obs.observed_at,
            "ok": obs.last_ok,
            "fail": obs.last_fail,
            "d": obs.detail,
            "exp": expires,
        },
        separators=(",", ":"),
    )


def _decode(field: str, value: str) -> tuple[Observation, float]:
    target, _, node = field.partition(" ")
    d = json.loads(value)
    obs = Observation(
        target=Target.parse(target),
        node=node,
        state=State(d["s"]),
        since=float(d["since"]),
        observed_at=float(d["at"]),
        last_ok=None if d["ok"] is None else float(d["ok"]),
        last_fail=None if d["fail"] is None else float(d["fail"]),
        detail=str(d["d"]),
    )
    return obs, float(d["exp"])


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    text = text[:160]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RedisStore:
    """The Store protocol on Redis, standalone or behind Sentinel."""

    def __init__(
        self,
        url: str,
        prefix: str = "mxguard:",
        timeout: float = 0.1,
        observation_ttl: float = 120.0,
        history_max: int = HISTORY_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._timeout = timeout
        self._ttl = observation_ttl
        self._history_max = history_max
        self._clock = clock
        self._history_key = f"{prefix}history"
        self._channel = f"{prefix}changes"
        self._sentinel: Sentinel | None = None
        self._redis = self._connect(url, timeout)
        self._pubsub: PubSub | None = None
        # (field, raw value) -> decoded, from the last read
        self._decoded: dict[tuple[str, str], tuple[Observation, float]] = {}
        self._wait_lock = threading.Lock()
        self._closed = False
        self._record_bypass_sha = hashlib.sha1(_RECORD_BYPASS.encode()).hexdigest()

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        from guard.store import observation_ttl  # the package imports us lazily

        return cls(
            config.store.url,
            prefix=config.store.prefix,
            timeout=config.store.timeout,
            observation_ttl=observation_ttl(config),
        )

    def _connect(self, url: str, timeout: float) -> redis.Redis:
        options = _connection_options(timeout)
        if url.startswith("redis+sentinel://"):
            parsed = SentinelUrl.parse(url)
            extra = _typed_options(parsed.options)
            _check_query(url, _SENTINEL_QUERY, tls=bool(extra.get("ssl")))
            sentinel_auth = {
                "username": extra.pop("sentinel_username", None),
                "password": extra.pop("sentinel_password", None),
            }
            # Sentinel would otherwise build its own clients with redis-py's defaults.
            sentinel_options = {
                k: v for k, v in options.items() if k != "decode_responses"
            } | sentinel_auth
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(parsed.sentinels), sentinel_kwargs=sentinel_options
            )
            # master_for asks the sentinels for the master on every new connection, so
            # after a failover the next connection goes to the new master.
            master: redis.Redis = self._sentinel.master_for(  # type: ignore[no-untyped-call]
                parsed.service,
                db=parsed.db,
                username=parsed.username,
                password=parsed.password,
                **options,
                **extra,
            )
            return master
        _check_query(url, _QUERY_ALLOWED, tls=url.startswith("rediss://"))
        url_options = parse_url(url)  # type: ignore[no-untyped-call]  # ValueError: bad scheme
        pool = redis.ConnectionPool(**(url_options | options))
        return redis.Redis.from_pool(pool)

    @property
    def description(self) -> str:
        return mask_password(self._url)

    # -- bounded calls ------------------------------------------------------------

    def _call(self, what: str, operation: Callable[[], T], retry: bool = True) -> T:
        if self._closed:
            raise StoreError(f"redis {what}: store is closed")
        started = time.monotonic()
        try:
            return operation()
        except redis.ConnectionError as e:
            # Fast failures are worth one more try on a fresh connection: a pooled
            # socket the server closed (restart, idle timeout), a master that a
            # failover demoted. A timeout is not: the server is frozen or paused, and
            # waiting again would only double the time the caller waits.
            if not retry or time.monotonic() - started >= self._timeout:
                raise StoreError(f"redis {what}: {_short(e)}") from e
            log.debug("redis %s: %s; retrying once", what, _short(e))
        except _FAULTS as e:
            raise StoreError(f"redis {what}: {_short(e)}") from e
        time.sleep(RETRY_BACKOFF_SECONDS)
        try:
            return operation()
        except _FAULTS as e:
            raise StoreError(f"redis {what}: {_short(e)}") from e

    # -- observations ---------------------------------------------------------------

    def _bucket_key(self, bucket: int) -> str:
        return f"{self._prefix}obs:{bucket}"

    def _live_buckets(self, now: float) -> range:
        """The hours that can hold an entry still unexpired at ``now``."""
        first = math.floor((now - self._ttl - CLOCK_SKEW_SECONDS) / BUCKET_SECONDS)
        last = math.floor((now + CLOCK_SKEW_SECONDS) / BUCKET_SECONDS)
        return range(first, last + 1)

    def publish(
        self, observations: Sequence[Observation], transitions: Sequence[Transition]
    ) -> None:
        if not observations and not transitions:
            return
        now = self._clock()
        bucket = math.floor(now / BUCKET_SECONDS)
        key = self._bucket_key(bucket)
        # Relative TTL computed here, so the Redis server's clock does not matter.
        bucket_ttl_ms = math.ceil(
            ((bucket + 1) * BUCKET_SECONDS + self._ttl + CLOCK_SKEW_SECONDS - now) * 1000
        )
        expires = now + self._ttl
        entries: dict[FieldT, EncodableT] = {
            f"{o.target} {o.node}": _encode(o, expires) for o in observations
        }

        def run() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                if entries:
                    pipe.hset(key, mapping=entries)
                    pipe.pexpire(key, bucket_ttl_ms)
                for t in transitions:
                    pipe.xadd(
                        self._history_key,
                        {
                            "target": str(t.target),
                            "node": t.node,
                            "old": t.old.value,
                            "new": t.new.value,
                            "at": repr(t.at),
                            "detail": t.detail,
                        },
                        maxlen=self._history_max,
                        approximate=True,
                    )
                # Refreshed on every publish: history lives as long as some node does.
                pipe.pexpire(self._history_key, HISTORY_TTL_SECONDS * 1000)
                if transitions:
                    pipe.publish(self._channel, str(len(transitions)))
                pipe.execute()

        # A retry after a dropped reply may append the transitions twice; a duplicate
        # line in an audit log is better than a lost one.
        self._call("publish", run)

    def observations(self) -> list[Observation]:
        now = self._clock()
        keys = [self._bucket_key(b) for b in self._live_buckets(now)]

        def run() -> list[Any]:
            with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                return pipe.execute()

        hashes = self._call("read observations", run)
        newest: dict[str, Observation] = {}
        # Most entries are unchanged since the last read: decoding JSON for thousands
        # of them every second would compete with the milter threads for the GIL.
        known, decoded = self._decoded, {}
        # Oldest hour first, so a later write of the same (target, node) wins, as a
        # later HSET does within one hour.
        for entries in hashes:
            for field, value in entries.items():
                key = (field, value)  # the value alone does not name target and node
                cached = known.get(key)
                if cached is None:
                    try:
                        cached = _decode(field, value)
                    except (ValueError, KeyError, TypeError) as e:
                        log.debug("skipping a malformed observation %r: %s", field, e)
                        continue
                decoded[key] = cached
                obs, expires = cached
                if expires > now:
                    newest[field] = obs
        self._decoded = decoded
        return list(newest.values())

    # -- history ----------------------------------------------------------------------

    def history(self, limit: int = 50) -> list[Transition]:
        # MAXLEN ~ trims in whole stream nodes, so the stream may hold a few more
        # entries than history_max; the API never shows more.
        count = max(0, min(limit, self._history_max))
        if count == 0:
            return []
        entries = cast(
            "list[tuple[str, dict[str, str]]]",
            self._call(
                "read history", lambda: self._redis.xrevrange(self._history_key, count=count)
            ),
        )
        out: list[Transition] = []
        for _id, fields in reversed(entries):
            try:
                out.append(
                    Transition(
                        target=Target.parse(fields["target"]),
                        node=fields["node"],
                        old=State(fields["old"]),
                        new=State(fields["new"]),
                        at=float(fields["at"]),
                        detail=fields.get("detail", ""),
                    )
                )
            except (ValueError, KeyError) as e:
                log.debug("skipping a malformed history entry %s: %s", _id, e)
        return out

    # -- evidence -----------------------------------------------------------------------

    def record_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        p = self._prefix
        keys = [f"{p}rel:{k}" for k in bypass.store_keys()]
        keys += [f"{p}wit:{bypass.network}", f"{p}wit:hb", f"{p}trap:{bypass.client}",
                 f"{p}traps"]
        args: list[EncodableT] = [
            repr(bypass.at), rules.attempts, repr(rules.min_age), _ms(rules.release_ttl),
            repr(rules.witness_fresh), _ms(rules.trap_ttl), bypass.client,
        ]
        def run() -> Any:
            try:
                return self._redis.evalsha(self._record_bypass_sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                # A restarted or flushed server: the text, once (EVAL caches it there).
                return self._redis.eval(_RECORD_BYPASS, len(keys), *keys, *args)

        # No retry: this runs inside a milter callback, whose budget a reconnect and a
        # second try could overrun; the plain action is the price of one lost lookup.
        raw = cast("list[str | None]", self._call("record bypass", run, retry=False))
        n = len(bypass.identities)
        try:
            counts = tuple(IdentityCount(identity, int(cast(str, raw[2 * i])),
                                         float(cast(str, raw[2 * i + 1])))
                           for i, identity in enumerate(bypass.identities))
            seen, heartbeat, trap = raw[2 * n], raw[2 * n + 1], raw[2 * n + 2]
            return Evidence(bypass.at, counts, None if heartbeat is None else float(heartbeat),
                            None if seen is None else float(seen), int(cast(str, trap)))
        except (IndexError, TypeError, ValueError) as e:
            raise StoreError(f"redis record bypass: unexpected reply: {_short(e)}") from e

    def peek_bypass(self, bypass: BypassTry, rules: EvidenceRules) -> Evidence:
        p = self._prefix

        def run() -> list[Any]:
            with self._redis.pipeline(transaction=False) as pipe:
                for k in bypass.store_keys():
                    pipe.hmget(f"{p}rel:{k}", ["t", "f"])
                pipe.get(f"{p}wit:{bypass.network}")
                pipe.hvals(f"{p}wit:hb")
                pipe.hget(f"{p}trap:{bypass.client}", "n")
                return pipe.execute()

        raw = self._call("peek bypass", run)
        n = len(bypass.identities)
        try:
            counts = []
            released = False
            for identity, (tries, first) in zip(bypass.identities, raw[:n], strict=True):
                count = IdentityCount(identity, int(tries or 0) + 1,
                                      float(first) if first is not None else bypass.at)
                released = released or is_released(count.tries, count.first_at, bypass.at,
                                                   rules)
                counts.append(count)
            seen = None if raw[n] is None else float(raw[n])
            heartbeat = max((float(v) for v in raw[n + 1]), default=None)
            fresh = heartbeat is not None and bypass.at - heartbeat <= rules.witness_fresh
            trap = int(raw[n + 2] or 0) + counts_as_trap(released, fresh, seen is not None)
        except (TypeError, ValueError) as e:
            raise StoreError(f"redis peek bypass: unexpected reply: {_short(e)}") from e
        return Evidence(bypass.at, tuple(counts), heartbeat, seen, trap)

    def heartbeats(self) -> dict[str, float]:
        raw = cast("dict[str, str]",
                   self._call("read heartbeats", lambda: self._redis.hgetall(
                       f"{self._prefix}wit:hb")))
        out = {}
        for node, value in raw.items():
            with contextlib.suppress(ValueError):
                out[node] = float(value)
        return out

    def record_witness(self, node: str, networks: Sequence[str], at: float,
                       ttl: float) -> None:
        p, stamp, ttl_ms = self._prefix, repr(at), _ms(ttl)

        def run() -> None:
            with self._redis.pipeline(transaction=False) as pipe:
                for network in networks:
                    pipe.set(f"{p}wit:{network}", stamp, px=ttl_ms)
                pipe.hset(f"{p}wit:hb", node, stamp)
                # Secondaries read the newest heartbeat; the hash goes with the last witness.
                pipe.pexpire(f"{p}wit:hb", ttl_ms)
                pipe.execute()

        self._call("record witness", run)

    def traps(self, now: float, ttl: float) -> list[Trap]:
        p = self._prefix

        def run() -> list[Trap]:
            addresses = cast("list[str]", self._redis.zrangebyscore(f"{p}traps", now - ttl,
                                                                     "+inf"))
            with self._redis.pipeline(transaction=False) as pipe:
                for a in addresses:
                    pipe.hmget(f"{p}trap:{a}", ["n", "l"])
                rows = cast("list[list[str | None]]", pipe.execute())
            out = []
            for a, (count, last) in zip(addresses, rows, strict=True):
                if count is not None and last is not None:
                    out.append(Trap(a, int(count), float(last)))
            return sorted(out, key=lambda t: (-t.count, t.address))

        return self._call("read traps", run)

    # -- change notices -----------------------------------------------------------------

    def wait_for_change(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._wait_lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            return self._wait(deadline)
        finally:
            self._wait_lock.release()

    def _wait(self, deadline: float) -> bool:
        try:
            pubsub = self._subscription(deadline)
            if pubsub is None:
                self._sleep_until(deadline)
                return False
            while not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                message = pubsub.get_message(timeout=min(remaining, WAIT_SLICE_SECONDS))
                if message is not None and message.get("type") == "message":
                    # A burst of notices needs one refresh, not one per notice.
                    while pubsub.get_message(timeout=0) is not None:
                        pass
                    return True
            return False
        except Exception as e:  # a background wait must never raise, whatever broke
            # Drop the subscription and build a fresh one next time.
            if not self._closed:
                log.debug("redis change subscription failed: %s", _short(e))
            self._drop_subscription()
            self._sleep_until(deadline)
            return False

    def _subscription(self, deadline: float) -> PubSub | None:
        if self._pubsub is not None or self._closed:
            return self._pubsub
        # Subscribing may connect and authenticate, one timeout each; with less time
        # left than that, skip this round rather than overrun the caller's timeout.
        if deadline - time.monotonic() < 2 * self._timeout:
            return None
        pubsub: PubSub = self._redis.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        try:
            pubsub.subscribe(self._channel)
        except BaseException:
            pubsub.close()
            raise
        self._pubsub = pubsub
        return pubsub

    def _drop_subscription(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(*_FAULTS):
                pubsub.close()

    def _sleep_until(self, deadline: float) -> None:
        # In slices, so that close() is noticed.
        while not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, WAIT_SLICE_SECONDS))

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        # A waiter notices _closed within one slice and lets go of the lock.
        with self._wait_lock:
            self._drop_subscription()
        self._redis.close()
        if self._sentinel is not None:
            self._sentinel.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.description!r}, prefix={self._prefix!r})"
