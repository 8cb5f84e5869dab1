"""The trap list as ``mx-guard traps`` prints it: plain, JSON, nftables, rbldnsd.

Addresses come from the store (``Store.traps``): already validated IP addresses that
the guard itself wrote, never text a client chose, so they go into the nftables
script and the rbldnsd zone as they are (``ipaddress`` re-checks each one anyway).

- ``nft``: a script for ``nft -f`` that refills two sets, ``inet mx_guard trapped4``
  and ``trapped6`` (create them once; the README shows how), e.g. to drop or
  rate-limit port 25 from trapped clients.
- ``rbldnsd``: a ``combined`` dataset (an ``ip4trie`` and an ``ip6trie`` section) for
  a DNS blocklist zone, ``rbldnsd ZONE:combined:FILE``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

from guard.evidence import Trap
from guard.policy import iso_time

NFT_TABLE = "inet mx_guard"
NFT_SETS = {4: "trapped4", 6: "trapped6"}
RBL_ANSWER = "127.0.0.2"


def _by_family(traps: Sequence[Trap]) -> dict[int, list[Trap]]:
    out: dict[int, list[Trap]] = {4: [], 6: []}
    for t in traps:
        out[ipaddress.ip_address(t.address).version].append(t)
    return out


def render_plain(traps: Sequence[Trap]) -> str:
    lines = [f"{'address':<40} {'bypasses':>8}  last seen"]
    lines += [f"{t.address:<40} {t.count:>8}  {iso_time(t.last_at)}" for t in traps]
    return "\n".join(lines) + "\n"


def render_json(traps: Sequence[Trap]) -> str:
    data = [{"address": t.address, "count": t.count, "last_seen": t.last_at} for t in traps]
    return json.dumps({"traps": data}, indent=2) + "\n"


def render_nft(traps: Sequence[Trap], header: str) -> str:
    lines = [f"# {header}"]
    for family, entries in _by_family(traps).items():
        name = f"{NFT_TABLE} {NFT_SETS[family]}"
        lines.append(f"flush set {name}")
        if entries:  # nft refuses an empty element list
            lines.append(f"add element {name} {{ {', '.join(t.address for t in entries)} }}")
    return "\n".join(lines) + "\n"


def render_rbldnsd(traps: Sequence[Trap], header: str) -> str:
    lines = [f"# {header}"]
    for family, entries in _by_family(traps).items():
        lines.append(f"$DATASET ip{family}trie @")
        lines.append(f":{RBL_ANSWER}:Bypassed a healthy primary MX")
        lines += [f"{t.address} :{RBL_ANSWER}:{t.address} bypassed a healthy primary MX "
                  f"{t.count} time(s), last {iso_time(t.last_at)}" for t in entries]
    return "\n".join(lines) + "\n"
