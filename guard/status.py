"""What ``mx-guard status`` and ``mx-guard explain`` show, gathered and rendered.

Health for these commands comes from the shared store. The ``memory://`` store lives
inside the running guard and cannot be read from outside, so with it the command
probes the targets once, now, from this host, and says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from guard.config import Config
from guard.discovery import MxDirectory
from guard.evidence import Evidence
from guard.health import HealthSnapshot, Observation, State, Target, Transition
from guard.mxset import higher_priority_hosts, self_preference
from guard.policy import Verdict, iso_time
from guard.probes import ProbeResult, probe
from guard.store.base import Store, StoreError

PROBED_NOW = ("probed once now from this host: the memory store is private to the running "
              "guard, so failures within down_grace and rise/fall are not known here")


@dataclass(frozen=True)
class HealthView:
    snapshot: HealthSnapshot
    source: str
    history: tuple[Transition, ...]
    store: str  # where the store is, password masked
    heartbeats: dict[str, float] | None = None  # witness node -> newest; None: unknown


def gather_health(config: Config, store: Store, directory: MxDirectory) -> HealthView:
    now = time.time()
    if config.store.url.startswith("memory://"):
        return HealthView(_probe_now(config, directory, now), PROBED_NOW, (),
                          store.description)
    try:
        observations = store.observations()
        history = tuple(store.history(20))
        heartbeats = store.heartbeats()
    except StoreError as e:
        return HealthView(HealthSnapshot(), f"store {store.description} unreachable: {e}", (),
                          store.description)
    return HealthView(
        HealthSnapshot.build(observations, now, "store"), f"store {store.description}",
        history, store.description, heartbeats,
    )


def _probe_now(config: Config, directory: MxDirectory, now: float) -> HealthSnapshot:
    p = config.probe

    async def probe_all() -> list[Observation]:
        targets = sorted(directory.targets())
        limit = asyncio.Semaphore(p.concurrency)

        async def one(t: Target) -> ProbeResult:
            async with limit:
                return await probe(t, p.mode, p.timeout, config.probe_helo)

        results = await asyncio.gather(*(one(t) for t in targets))
        return [
            Observation(r.target, config.me.node, State.UP if r.ok else State.DOWN, now, now,
                        now if r.ok else None, None if r.ok else now,
                        r.detail if r.ok else f"{r.result}: {r.detail}")
            for r in results
        ]

    return HealthSnapshot.build(asyncio.run(probe_all()), now, "probed")


def status_data(config: Config, directory: MxDirectory, view: HealthView) -> dict[str, Any]:
    now = time.time()
    rules = config.aggregation
    me = config.me.identity
    domains = []
    for d in config.domains:
        mxset = directory.get(d.name)
        entry: dict[str, Any] = {"name": d.name, "action": str(config.action_for(d)),
                                 "mx_source": "dns" if d.from_dns else "config"}
        if mxset is None:
            entry.update(known=False, tiers=[], self_preference=None)
            domains.append(entry)
            continue
        higher = {h.host for h in higher_priority_hosts(mxset, me)}
        hosts = []
        for h in mxset.sorted_hosts():
            targets = []
            if h.host in higher:
                for t in h.targets():
                    th = view.snapshot.health(t, now, rules)
                    targets.append({
                        "target": str(t), "state": str(th.state), "since": th.since,
                        "detail": th.detail,
                        "observations": [_observation(o) for o in view.snapshot.of(t)],
                    })
            hosts.append({"host": h.host, "preference": h.preference,
                          "addresses": list(h.addresses), "port": h.port,
                          "role": "self" if me.is_me(h) else
                          ("higher-priority" if h.host in higher else "peer-or-lower"),
                          "targets": targets})
        entry.update(known=True, source=str(mxset.source),
                     self_preference=self_preference(mxset, me), hosts=hosts)
        domains.append(entry)
    return {
        "node": config.me.node,
        "store": view.store,
        "health_source": view.source,
        "time": now,
        "domains": domains,
        "history": [_transition(t) for t in view.history],
        "witnesses": None if view.heartbeats is None else [
            {"node": node, "heartbeat_at": at,
             "fresh": now - at <= config.policy.stale_after}
            for node, at in sorted(view.heartbeats.items())],
    }


def _observation(o: Observation) -> dict[str, Any]:
    return {"node": o.node, "state": str(o.state), "since": o.since,
            "observed_at": o.observed_at, "last_ok": o.last_ok, "last_fail": o.last_fail,
            "detail": o.detail}


def _transition(t: Transition) -> dict[str, Any]:
    return {"target": str(t.target), "node": t.node, "old": str(t.old), "new": str(t.new),
            "at": t.at, "detail": t.detail}


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def render_status(data: dict[str, Any]) -> str:
    now = data["time"]
    lines = [f"node {data['node']}  store {data['store']}",
             f"health: {data['health_source']}", ""]
    for d in data["domains"]:
        if not d["known"]:
            lines.append(f"{d['name']}  action={d['action']}  MX set not known yet")
            continue
        lines.append(f"{d['name']}  action={d['action']}  MX from {d['source']}  "
                     f"self at preference {d['self_preference']}")
        for h in d["hosts"]:
            lines.append(f"  {h['preference']:>5}  {h['host']}  ({h['role']})")
            for t in h["targets"]:
                lines.append(f"         {t['target']:<24} {t['state'].upper():<8} "
                             f"since {_ago(now, t['since'])}: {t['detail']}")
                for o in t["observations"]:
                    lines.append(f"           node {o['node']:<12} {o['state']:<8} "
                                 f"seen {_ago(now, o['observed_at'])}, last fail "
                                 f"{_ago(now, o['last_fail'])}: {o['detail']}")
        lines.append("")
    witnesses = data.get("witnesses")
    if witnesses is None:
        lines.append("witness: not known here (memory store)")
    elif not witnesses:
        lines.append("witness: none (no heartbeat in the store)")
    for w in witnesses or ():
        state = "fresh" if w["fresh"] else "STALE: its records are not used"
        lines.append(f"witness {w['node']}: heartbeat {_ago(now, w['heartbeat_at'])} ({state})")
    lines.append("")
    if data["history"]:
        lines.append("last transitions:")
        for t in data["history"]:
            lines.append(f"  {iso_time(t['at'])}  {t['target']:<24} {t['node']:<12} "
                         f"{t['old']} -> {t['new']}  {t['detail']}")
    return "\n".join(lines).rstrip() + "\n"


def render_verdict(verdict: Verdict, node: str, source: str) -> str:
    lines = [
        f"action:  {verdict.action}",
        f"reason:  {verdict.reason}",
        f"domain:  {verdict.domain}",
        f"detail:  {verdict.detail}",
        f"health:  {source}",
    ]
    if verdict.adds_header:
        lines.append(f"header:  {verdict.header_value(node)}")
    for h in verdict.hosts:
        lines.append(f"  {h.describe()}")
    e = verdict.evidence
    if e is not None:
        for c in e.identities:
            lines.append(f"  identity {c.identity}: try {c.tries}, first try "
                         f"{iso_time(c.first_at)}")
        lines.append(f"  witness heartbeat {iso_time(e.heartbeat_at)}, client network seen "
                     f"{iso_time(e.seen_at)}; trap count {e.trap_count}")
    return "\n".join(lines) + "\n"


def verdict_data(verdict: Verdict, node: str, source: str) -> dict[str, Any]:
    return {
        "action": str(verdict.action), "reason": str(verdict.reason),
        "domain": verdict.domain, "client": verdict.client, "detail": verdict.detail,
        "health_source": source,
        "header": verdict.header_value(node) if verdict.adds_header else None,
        "hosts": [{"host": h.host.host, "preference": h.host.preference,
                   "state": str(h.state) if h.state else None} for h in verdict.hosts],
        "evidence": _evidence(verdict.evidence),
    }


def _evidence(e: Evidence | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"identities": [{"identity": c.identity, "tries": c.tries, "first_at": c.first_at}
                           for c in e.identities],
            "witness_heartbeat_at": e.heartbeat_at, "seen_at_primary_at": e.seen_at,
            "trap_count": e.trap_count}


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
