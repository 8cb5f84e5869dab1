"""``mx-guard traps`` on a real Redis, in every format, loaded by the real consumers:
nftables (in a network namespace of its own) and rbldnsd (queried over DNS).
``mx-guard explain`` and ``status`` showing the evidence they used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import dns.reversename
import pytest

from guard.config import parse_config
from guard.evidence import EvidenceRules, bypass_try
from guard.health import Observation, State, Target
from guard.policy import client_address
from guard.store.redis import RedisStore
from tests.support.redis_server import RedisServer
from tests.support.smtpserver import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAPPED_V4, TRAPPED_V6, RELEASED = "203.0.113.7", "2001:db8::5", "198.51.100.9"


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(f"""
[self]
node = "mx2"
names = ["mx2.example.org"]
[store]
url = "{url}"
[release]
attempts = 2
min_age = "1s"
[[domain]]
name = "example.org"
mx = [{{ host = "mx1.example.org", preference = 10, addresses = ["127.0.0.1"], port = 9 }},
      {{ host = "mx2.example.org", preference = 20 }}]
""")
    return path


def mx_guard(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)


@pytest.fixture
def filled(redis_server: RedisServer, tmp_path: Path) -> Path:
    """Three bypasses from one IPv4 client, one from an IPv6 one, and a released sender."""
    config_path = write_config(tmp_path, redis_server.url)
    cfg = parse_config({"self": {"names": ["mx2.example.org"]},
                        "release": {"attempts": 2, "min_age": "1s"}})
    rules = EvidenceRules.of(cfg)
    store = RedisStore(redis_server.url)
    now = time.time()

    def bypass(client: str, sender: str, at: float) -> None:
        address = client_address(client)
        assert address is not None
        store.record_bypass(bypass_try(address, None, sender, "<u@example.org>", at,
                                       cfg.release), rules)

    try:
        for n in range(3):  # a bot: a new sender every time, never released
            bypass(TRAPPED_V4, f"<bot{n}@spam.example>", now - 30 + n)
        bypass(TRAPPED_V6, "<x@spam.example>", now - 10)
        bypass(RELEASED, "<a@legit.example>", now - 20)  # counted once...
        bypass(RELEASED, "<a@legit.example>", now - 5)  # ...then released: no trap
    finally:
        store.close()
    return config_path


def test_plain_json_and_min(filled: Path) -> None:
    plain = mx_guard(filled, "traps")
    assert plain.returncode == 0, plain.stderr
    rows = [line.split() for line in plain.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(TRAPPED_V4, "3"), (RELEASED, "1"),
                                            (TRAPPED_V6, "1")]
    data = json.loads(mx_guard(filled, "traps", "--json", "--min", "2").stdout)
    assert [(t["address"], t["count"]) for t in data["traps"]] == [(TRAPPED_V4, 3)]
    assert data["traps"][0]["last_seen"] > time.time() - 60


def test_nft_output_loads_into_nftables(filled: Path, tmp_path: Path) -> None:
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.fail("nft is not installed: run `make test-deps` (apt: nftables)")
    out = mx_guard(filled, "traps", "--format", "nft")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "traps.nft"
    script.write_text(out.stdout)
    # The sets an admin creates once; a private network namespace keeps the host's
    # own ruleset out of it.
    setup = ("nft add table inet mx_guard && "
             "nft add set inet mx_guard trapped4 '{ type ipv4_addr; }' && "
             "nft add set inet mx_guard trapped6 '{ type ipv6_addr; }' && "
             f"nft -f {script} && nft -f {script} && nft -j list table inet mx_guard")
    done = subprocess.run(["unshare", "--net", "sh", "-c", setup], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    sets = {entry["set"]["name"]: entry["set"].get("elem", [])
            for entry in json.loads(done.stdout)["nftables"] if "set" in entry}
    assert sorted(sets["trapped4"]) == sorted([TRAPPED_V4, RELEASED])
    assert sets["trapped6"] == [TRAPPED_V6]


def test_rbldnsd_zone_answers_for_trapped_clients(filled: Path, tmp_path: Path) -> None:
    rbldnsd = shutil.which("rbldnsd") or "/usr/sbin/rbldnsd"
    if not Path(rbldnsd).exists():
        pytest.fail("rbldnsd is not installed: run `make test-deps` (apt: rbldnsd)")
    out = mx_guard(filled, "traps", "--format", "rbldnsd", "--min", "1")
    assert out.returncode == 0, out.stderr
    zone_dir = tmp_path / "zone"
    zone_dir.mkdir()
    zone_dir.chmod(0o755)
    (zone_dir / "traps").write_text(out.stdout)
    (zone_dir / "traps").chmod(0o644)
    port = free_port()
    server = subprocess.Popen(
        [rbldnsd, "-n", "-b", f"127.0.0.1/{port}", "-w", str(zone_dir),
         "bl.test:combined:traps"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ask(address: str) -> list[str]:
            reverse = dns.reversename.from_address(address).to_text()
            name = reverse.removesuffix(".in-addr.arpa.").removesuffix(".ip6.arpa.")
            query = dns.message.make_query(f"{name}.bl.test.", dns.rdatatype.A)
            for _ in range(50):
                try:
                    reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
                    return [r.to_text() for rrset in reply.answer for r in rrset]
                except dns.exception.Timeout:
                    if server.poll() is not None:
                        break
            output = server.stdout.read().decode() if server.stdout else ""
            raise AssertionError(f"rbldnsd did not answer: {output}")

        assert ask(TRAPPED_V4) == ["127.0.0.2"]
        assert ask(TRAPPED_V6) == ["127.0.0.2"]
        assert ask("192.0.2.200") == []
    finally:
        server.terminate()
        server.communicate(timeout=10)


def test_memory_store_says_it_cannot_be_read(tmp_path: Path) -> None:
    out = mx_guard(write_config(tmp_path, "memory://"), "traps")
    assert out.returncode == 1 and "lives inside the running guard" in out.stderr


def test_explain_shows_the_evidence_and_counts_nothing(filled: Path,
                                                       redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    now = time.time()
    try:  # the primary up, as a node saw it
        store.publish([Observation(Target("127.0.0.1", 9), "mx2", State.UP, now - 600, now,
                                   now)], [])
        store.record_witness("mx1", [], now, ttl=3600)
    finally:
        store.close()

    def explain() -> dict[str, Any]:
        out = mx_guard(filled, "explain", "--client", TRAPPED_V4, "--rcpt", "u@example.org",
                       "--from", "bot9@spam.example", "--json")
        assert out.returncode == 0, out.stderr
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    first, again = explain(), explain()
    assert (first["action"], first["reason"]) == ("tempfail", "bypass"), first
    evidence = first["evidence"]
    assert [(i["identity"], i["tries"]) for i in evidence["identities"]] == [
        ("net 203.0.113.0/24 from=<bot9@spam.example> rcpt=<u@example.org>", 1)]
    assert evidence["trap_count"] == 4 and evidence["seen_at_primary_at"] is None
    assert "not counted" in first["evidence_source"]
    # explain counted nothing: the same try, the same trap count, again
    assert [i["tries"] for i in again["evidence"]["identities"]] == [1]
    assert again["evidence"]["trap_count"] == 4

    released = mx_guard(filled, "explain", "--client", RELEASED, "--rcpt", "u@example.org",
                        "--from", "a@legit.example")
    assert "action:  flag" in released.stdout and "reason:  released" in released.stdout
    assert "identity net 198.51.100.0/24 from=<a@legit.example>" in released.stdout

    status = mx_guard(filled, "status")
    assert status.returncode == 0, status.stderr
    assert "witness mx1: heartbeat" in status.stdout and "(fresh)" in status.stdout
