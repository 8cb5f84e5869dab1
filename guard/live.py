"""What a running guard answers on its control socket, and how the CLI shows it.

``status``, ``explain`` and ``traps`` here read the running node's own state: the health
snapshot its milter decides from (with any store, ``memory://`` included), the
prober's hysteresis for every target (state, successes and failures against rise and
fall, last probe, last ok, last fail) and the down_grace memory (until when a past
failure keeps a target down). ``explain`` runs the milter's own ``decide()`` on that
snapshot, with the bypass evidence peeked from the guard's own store (never counted
as a try). The text is rendered by the same functions the CLI uses without a guard
(guard/status.py), plus the part only a running guard knows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from guard.control import BadRequest, CommandFailed, CommandTable
from guard.evidence import Evidence, EvidenceRules, Trap, bypass_try, verified_name
from guard.health import Target
from guard.mxset import higher_priority_hosts
from guard.policy import (
    Connection,
    Reason,
    client_address,
    decide,
    iso_time,
    recipient_domain,
    with_evidence,
)
from guard.status import HealthView, render_verdict, status_data, verdict_data
from guard.store.base import StoreError

if TYPE_CHECKING:
    from guard.prober import Hysteresis
    from guard.service import Guard

HISTORY_SHOWN = 20


def commands_for(guard: Guard) -> CommandTable:
    """The control commands of a running guard; a feature adds its own to the table."""
    table = CommandTable()
    table.add("status", lambda args: status(guard, args),
              "domains, MX tiers, the running node's health, hysteresis and down_grace")
    table.add("explain", lambda args: explain(guard, args),
              "the verdict the milter would give now, and why")
    table.add("traps", lambda args: traps(guard, args),
              "the trap list as the guard's own store has it")
    return table


def traps(guard: Guard, args: Mapping[str, Any]) -> dict[str, Any]:
    """The trap list from the guard's store: with memory://, the only way to read it."""
    _no_args(args, "traps")
    now = time.time()
    try:
        listed = guard.store.traps(now, guard.config.traps.ttl)
    except StoreError as e:
        raise CommandFailed(f"store {guard.store.description} unreachable: {e}") from None
    return {"time": now, "ttl": guard.config.traps.ttl,
            "traps": [{"address": t.address, "count": t.count, "last_at": t.last_at}
                      for t in listed]}


def traps_of(answer: Mapping[str, Any]) -> list[Trap]:
    """The ``traps`` answer back as Trap values, for the renderers of guard/traplist.py."""
    return [Trap(t["address"], int(t["count"]), float(t["last_at"])) for t in answer["traps"]]


def _source(guard: Guard) -> str:
    snap = guard.snapshot
    return (f"the running guard (node {guard.config.me.node}, pid {os.getpid()}): the "
            f"snapshot its milter decides from ({snap.source}, taken "
            f"{iso_time(snap.taken_at)})")


def _view(guard: Guard) -> HealthView:
    heartbeats: dict[str, float] | None
    try:
        history = tuple(guard.store.history(HISTORY_SHOWN))
        heartbeats = guard.store.heartbeats()
    except StoreError:
        history, heartbeats = (), None
    return HealthView(guard.snapshot, _source(guard), history, guard.store.description,
                      heartbeats)


def _no_args(args: Mapping[str, Any], command: str) -> None:
    if args:
        raise BadRequest(f"{command} takes no arguments, got {', '.join(sorted(args))}")


def status(guard: Guard, args: Mapping[str, Any]) -> dict[str, Any]:
    _no_args(args, "status")
    config = guard.config
    data = status_data(config, guard.directory, _view(guard))
    data["prober"] = prober_data(guard, time.time())
    data["config"] = config.path
    return data


def prober_data(guard: Guard, now: float) -> list[dict[str, Any]]:
    """Each target's hysteresis and down_grace memory, as this node's prober has it."""
    if guard.prober is None:
        return []
    down_grace = guard.config.policy.down_grace
    out = []
    for h in sorted(guard.prober.hysteresis(), key=lambda h: h.target):
        out.append(_hysteresis(h, now, down_grace))
    return out


def _hysteresis(h: Hysteresis, now: float, down_grace: float) -> dict[str, Any]:
    until = h.last_fail + down_grace if h.last_fail is not None else None
    return {
        "target": str(h.target), "state": str(h.state), "since": h.since or None,
        "successes": h.successes, "rise": h.rise, "failures": h.failures, "fall": h.fall,
        "last_probe": h.last_probe, "last_ok": h.last_ok, "last_fail": h.last_fail,
        "detail": h.detail,
        "down_grace_until": until if until is not None and until > now else None,
    }


EXPLAIN_ARGS = ("authenticated", "client", "client_name", "from", "helo", "rcpt")


def explain(guard: Guard, args: Mapping[str, Any]) -> dict[str, Any]:
    """The milter's decision now, with the evidence as the next try would find it
    (peeked, not counted: explaining must not move a sender towards its release)."""
    unknown = set(args) - set(EXPLAIN_ARGS)
    if unknown:
        raise BadRequest(f"explain: unknown argument {sorted(unknown)[0]!r} "
                         f"(known: {', '.join(EXPLAIN_ARGS)})")
    client_text, rcpt = args.get("client"), args.get("rcpt")
    client = client_address(client_text) if isinstance(client_text, str) else None
    if client is None:
        raise BadRequest(f"explain: client {client_text!r} is not an IP address")
    domain = recipient_domain(rcpt) if isinstance(rcpt, str) else None
    if domain is None:
        raise BadRequest(f"explain: rcpt {rcpt!r} has no domain")
    helo, authenticated = args.get("helo", ""), args.get("authenticated", False)
    sender, client_name = args.get("from", ""), args.get("client_name")
    if not (isinstance(helo, str) and isinstance(sender, str)
            and isinstance(authenticated, bool)
            and (client_name is None or isinstance(client_name, str))):
        raise BadRequest("explain: helo, from and client_name must be strings, "
                         "authenticated true or false")
    now = time.time()
    config, source = guard.config, _source(guard)
    conn = Connection(client, now, helo, authenticated, verified_name(client_name, None))
    verdict = decide(conn, domain, guard.directory.get(domain), guard.snapshot, config)
    evidence_source = "none needed (not a bypass)"
    if verdict.reason is Reason.BYPASS:
        bypass = bypass_try(client, conn.client_name, sender, str(rcpt), now, config.release)
        evidence: Evidence | None
        try:
            evidence = guard.store.peek_bypass(bypass, EvidenceRules.of(config))
            evidence_source = (f"the running guard's store {guard.store.description}, as if "
                               "this were the next try (not counted)")
        except StoreError as e:
            evidence = None
            evidence_source = (f"store {guard.store.description} unreachable ({e}): the "
                               "plain action applies")
        verdict = with_evidence(verdict, evidence, config)
    mxset = guard.directory.get(domain)
    targets: set[Target] = set()
    if mxset is not None:
        for host in higher_priority_hosts(mxset, config.me.identity):
            targets.update(host.targets())
    prober = [p for p in prober_data(guard, now) if Target.parse(p["target"]) in targets]
    text = (render_verdict(verdict, config.me.node, source)
            + f"evidence: {evidence_source}\n" + render_prober(prober, now))
    return {"verdict": {**verdict_data(verdict, config.me.node, source), "prober": prober,
                        "evidence_source": evidence_source},
            "text": text}


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    seconds = max(0, int(now - then))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def render_prober(prober: list[dict[str, Any]], now: float) -> str:
    """This node's hysteresis and down_grace memory, one line per target."""
    if not prober:
        return ""
    lines = ["", "this node's prober (hysteresis, down_grace):"]
    for p in prober:
        until = p["down_grace_until"]
        grace = (f"down_grace until {iso_time(until)} (failed {_ago(now, p['last_fail'])})"
                 if until is not None else "no failure within down_grace")
        lines.append(
            f"  {p['target']:<24} {p['state'].upper():<8} {p['successes']} ok in a row "
            f"(rise {p['rise']}), {p['failures']} failed in a row (fall {p['fall']});  last ok "
            f"{_ago(now, p['last_ok'])}, last fail {_ago(now, p['last_fail'])}; {grace}")
        lines.append(f"  {'':<24} last probe {_ago(now, p['last_probe'])}: {p['detail']}")
    return "\n".join(lines) + "\n"
