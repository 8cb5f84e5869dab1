"""What a verdict becomes at the MTA, for any front end (the milter, a policy server).

The decision (``guard.policy``) says what to do; this module says how it is worded:
the SMTP reply of a tempfail or reject, the one header that explains a message whose
recipients got different verdicts, and the decision log line with its metric. A
front end translates these into its protocol and nothing more.

Contracts: one log line and one ``mxguard_decisions_total`` count per recipient
decision; everything the client sent is escaped (``printable``) before it reaches the
line; the header names the verdict that explains the message best.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from guard import metrics
from guard.config import Action, PolicyConfig, SmtpReply
from guard.logsafe import printable
from guard.policy import Reason, Verdict

log = logging.getLogger("guard.decision")

NO_QUEUE_ID = "NOQUEUE"  # what Postfix itself logs before a queue id exists

# Which verdict explains a message best when its recipients got different ones: the
# strongest signal first.
HEADER_PRECEDENCE = (
    Reason.BYPASS, Reason.SEEN_AT_PRIMARY, Reason.RELEASED, Reason.HEALTH_UNKNOWN,
    Reason.MX_UNKNOWN, Reason.RECENTLY_DOWN, Reason.PRIMARY_DOWN, Reason.UNREACHABLE,
)


def refusal(verdict: Verdict, policy: PolicyConfig) -> SmtpReply | None:
    """The reply that refuses this recipient, or None when the verdict lets it in."""
    if verdict.action is Action.TEMPFAIL:
        return policy.reply.for_domain(verdict.domain)
    if verdict.action is Action.REJECT:
        return policy.reject_reply.for_domain(verdict.domain)
    return None


def _rank(verdict: Verdict) -> int:
    try:
        return HEADER_PRECEDENCE.index(verdict.reason)
    except ValueError:
        return len(HEADER_PRECEDENCE)


def header_value(verdicts: Sequence[Verdict], node: str) -> str | None:
    """The one header value for a message, or None when no verdict asks for one."""
    flagged = sorted((v for v in verdicts if v.adds_header), key=_rank)
    if not flagged:
        return None
    value = flagged[0].header_value(node)
    others = sorted({v.domain for v in flagged} - {flagged[0].domain})
    if others:
        value += f"; also={','.join(others)}"
    return value


@dataclass(frozen=True)
class Envelope:
    """The untrusted facts a decision line names, as the client or the MTA sent them."""

    conn_id: int | str
    client: str | None
    helo: str
    sender: str


@functools.cache  # one child per (action, reason): a label lookup costs a lock and a hash
def _decision_count(action: Action, reason: Reason) -> Counter:
    return metrics.DECISIONS.labels(str(action), str(reason))


def log_decision(queue_id: str, envelope: Envelope, recipient: str, verdict: Verdict,
                 note: str = "") -> None:
    """One line and one count per recipient decision."""
    _decision_count(verdict.action, verdict.reason).inc()
    log.info(
        "%s: conn=%s client=%s helo=%s from=<%s> rcpt=<%s> domain=%s action=%s "
        "reason=%s%s detail=%s",
        printable(queue_id, 32), envelope.conn_id, printable(envelope.client, 64),
        printable(envelope.helo, 80), printable(envelope.sender.strip("<>"), 120),
        printable(recipient.strip("<>"), 120), printable(verdict.domain, 80),
        verdict.action, verdict.reason, f" note={note}" if note else "",
        printable(verdict.detail, 400),
    )
