"""What a run comes to, per population: the table and the JSON of SPEC section 10.

Per population: messages, delivered, lost (queue lifetime expired, or bounced),
delay p50/p95/max in seconds (over delivered messages, from the first try),
at_secondary (accepted by a secondary), stopped (never delivered: the point, for spam)
and flagged (accepted with the header). For spam the text table adds *out of order*
(messages that reached a secondary while the primary would have taken them) and the
share of those stopped or flagged, the spam goal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from guard.simulate.senders import Message
from guard.simulate.world import EPOCH, Results


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    legit: bool
    messages: int
    delivered: int
    lost: int
    delay_p50_s: float
    delay_p95_s: float
    delay_max_s: float
    at_secondary: int
    stopped: int
    flagged: int
    out_of_order: int
    out_of_order_caught: int  # stopped, flagged, or in the end taken by the primary

    @classmethod
    def of(cls, legit: bool, messages: list[Message]) -> Summary:
        delays = [m.delay for m in messages if m.delay is not None]
        ooo = [m for m in messages if m.out_of_order]
        return cls(
            legit=legit,
            messages=len(messages),
            delivered=len(delays),
            lost=sum(1 for m in messages if m.lost),
            delay_p50_s=round(percentile(delays, 0.50), 1),
            delay_p95_s=round(percentile(delays, 0.95), 1),
            delay_max_s=round(max(delays, default=0.0), 1),
            at_secondary=sum(1 for m in messages if m.at_secondary),
            stopped=sum(1 for m in messages if m.delivered_at is None),
            flagged=sum(1 for m in messages if m.flagged),
            out_of_order=len(ooo),
            out_of_order_caught=sum(1 for m in ooo if m.delivered_at is None or m.flagged
                                    or not m.at_secondary),
        )

    @property
    def caught_share(self) -> float:
        return self.out_of_order_caught / self.out_of_order if self.out_of_order else 1.0

    def spec_fields(self, with_legit: bool = True) -> dict[str, Any]:
        fields = {
            "legit": self.legit, "messages": self.messages, "delivered": self.delivered,
            "lost": self.lost, "delay_p50_s": self.delay_p50_s,
            "delay_p95_s": self.delay_p95_s, "delay_max_s": self.delay_max_s,
            "at_secondary": self.at_secondary, "stopped": self.stopped,
            "flagged": self.flagged,
        }
        if not with_legit:
            del fields["legit"]
        return fields


def summarize(results: Results) -> dict[str, Summary]:
    return {name: Summary.of(results.legit[name], msgs)
            for name, msgs in results.messages.items()}


def totals(results: Results) -> dict[str, Summary]:
    """Legitimate and spam populations pooled, each on its own."""
    pooled: dict[str, list[Message]] = {"legit": [], "spam": []}
    for name, msgs in results.messages.items():
        pooled["legit" if results.legit[name] else "spam"].extend(msgs)
    return {k: Summary.of(k == "legit", v) for k, v in pooled.items()}


def to_json(results: Results) -> str:
    data = {
        "populations": {n: s.spec_fields() for n, s in summarize(results).items()},
        "totals": {k: s.spec_fields(with_legit=False) for k, s in totals(results).items()},
    }
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


HEADER = ("population", "legit", "msgs", "deliv", "lost", "p50", "p95", "max", "at_sec",
          "stopped", "flagged", "ooo", "caught")


def render(results: Results) -> str:
    s = results.scenario
    lines = [f"scenario {s.name} (seed {results.seed}): {s.description}".rstrip(": ")]
    rows = [HEADER]
    every = {**summarize(results), **{f"= {k}": v for k, v in totals(results).items()}}
    for name, v in every.items():
        caught = f"{100 * v.caught_share:.1f}%" if v.out_of_order else "-"
        rows.append((
            name, "yes" if v.legit else "no", str(v.messages), str(v.delivered), str(v.lost),
            _duration(v.delay_p50_s), _duration(v.delay_p95_s), _duration(v.delay_max_s),
            str(v.at_secondary), str(v.stopped), str(v.flagged),
            str(v.out_of_order) if not v.legit else "-", caught if not v.legit else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    for i, r in enumerate(rows):
        if i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(cells).rstrip())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(results.decisions.items()))
    lines.append(f"decisions at the secondaries: {reasons or 'none'}")
    probes = sum(n.probes for n in results.nodes)
    urgent = sum(n.urgent_probes for n in results.nodes)
    lines.append(f"{results.events} events, {probes} probes ({urgent} asked for by a bypass), "
                 f"{_duration(results.ended_at - EPOCH)} of virtual time")
    return "\n".join(lines) + "\n"
