"""Reload under continuous milter traffic, against a real ``mx-guard run``.

Two domains: example.org, whose primary was down and came back (so down_grace keeps
it "recently-down": accepted and flagged), and other.example, whose primary never
failed (so a bypass is tempfailed). Traffic threads run sessions for both all along; ten reloads
(through ``mx-guard reload`` and SIGUSR1, alternating) change domains, policy, probe
settings and trusted networks without changing what that traffic deserves. Every
session must succeed and be judged right, probing must not restart, and down_grace
must not be forgotten. Bad files are refused with one log line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.config import Config, parse_config
from guard.discovery import MxDirectory
from guard.health import Target
from guard.reload import changed_sections, keep_restart_only
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, GuardProcess
from tests.support.milterclient import MilterClient, MilterError

TRAFFIC_THREADS = 3
RELOADS = 10


# -- what a reload keeps and what it applies (no guard needed) -------------------------

MX = [{"host": "mx1.example.org", "preference": 10, "addresses": ["192.0.2.1"]},
      {"host": "mx2.example.org", "preference": 20}]


def parsed(**sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"self": {"node": "mx2", "names": ["mx2.example.org"]},
                            "domain": [{"name": "example.org", "mx": MX}]}
    data.update(sections)
    return parse_config(data, "guard.toml")


def test_restart_only_settings_keep_their_running_values() -> None:
    running = parsed()
    new = parsed(milter={"socket": "unix:/run/x/other.sock"},
                 store={"url": "redis://127.0.0.1:6390/0", "refresh": "2s"},
                 probe={"concurrency": 5, "rise": 4},
                 policy={"trusted_networks": ["192.0.2.0/24"]})
    effective, kept = keep_restart_only(running, new)
    assert kept == ("[milter] socket", "[store] url", "[probe] concurrency")
    assert effective.milter == running.milter
    assert effective.store.url == running.store.url and effective.store.refresh == 2.0
    assert effective.probe.concurrency == running.probe.concurrency
    assert effective.probe.rise == 4
    assert effective.policy == new.policy
    assert changed_sections(running, effective) == ("[store]", "[probe]", "[policy]")


def test_domains_change_live_and_unchanged_sets_are_kept() -> None:
    running = parsed()
    directory = MxDirectory(running)
    kept_set = directory.get("example.org")
    other = [{"host": "mx1.other.example", "preference": 5, "addresses": ["192.0.2.9"]},
             {"host": "mx2.example.org", "preference": 50}]
    directory.reconfigure(parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "domain": [{"name": "example.org", "mx": MX}, {"name": "other.example", "mx": other}],
    }))
    assert directory.get("example.org") == kept_set
    other_set = directory.get("other.example")
    assert other_set is not None and other_set.hosts[0].host == "mx1.other.example"
    assert directory.targets() == {Target("192.0.2.1", 25), Target("192.0.2.9", 25)}
    directory.reconfigure(parse_config({
        "self": {"node": "mx2", "names": ["mx2.example.org"]},
        "domain": [{"name": "other.example", "mx": other}]}))
    assert directory.get("example.org") is None
    assert directory.targets() == {Target("192.0.2.9", 25)}


def config(sock: str, port_a: int, port_b: int, *, interval: str = "200ms", rise: int = 2,
           trusted: str = "", flagged_action: str = "flag", down_grace: str = "30m",
           extra_domain: bool = False, milter_socket: str | None = None) -> str:
    def mx(port: int) -> str:
        return (f'[{{ host = "mx1.example.org", preference = 10, addresses = ["127.0.0.1"], '
                f'port = {port} }}, {{ host = "mx2.example.org", preference = 20 }}]')

    text = f"""
[milter]
socket = "{milter_socket or sock}"
[self]
node = "mx2"
names = ["mx2.example.org"]
[store]
refresh = "200ms"
[probe]
interval = "{interval}"
down_interval = "200ms"
timeout = "1s"
rise = {rise}
fall = 2
[policy]
trusted_networks = ["127.0.0.1/32", "::1/128"{trusted}]
stale_after = "10s"
down_grace = "{down_grace}"
[[domain]]
name = "example.org"
mx = {mx(port_a)}
[[domain]]
name = "other.example"
mx = {mx(port_b)}
[[domain]]
name = "flagged.example"
action = "{flagged_action}"
mx = {mx(port_b)}
"""
    if extra_domain:
        text += f'[[domain]]\nname = "new.example"\nmx = {mx(port_b)}\n'
    return text


@dataclass
class Traffic:
    """Sessions in a loop from one untrusted client; counts and what went wrong."""

    socket: str
    client: str
    sessions: int = 0
    failed: list[str] = field(default_factory=list)
    misjudged: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with MilterClient(self.socket, timeout=5) as c:
                    c.connect("client.example", self.client, 40000)
                    c.mail("<s@client.example>")
                    down_grace = c.rcpt("<a@example.org>")
                    bypass = c.rcpt("<b@other.example>")
                    c.abort()
            except (MilterError, OSError) as e:
                with self.lock:
                    self.failed.append(repr(e))
                continue
            with self.lock:
                self.sessions += 1
                if not down_grace.proceeds:
                    self.misjudged.append(f"example.org (down_grace): {down_grace}")
                if not bypass.is_tempfail:
                    self.misjudged.append(f"other.example (bypass): {bypass}")


def cli(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args, "-c", str(config_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_ten_reloads_under_traffic(tmp_path: Path) -> None:
    sock = f"unix:{tmp_path}/guard.sock"
    with FakePrimary() as a, FakePrimary() as b:
        def write(**variant: object) -> str:
            return config(sock, a.port, b.port, **variant)  # type: ignore[arg-type]

        with GuardProcess(write(), tmp_path) as guard:
            guard.start()
            guard.wait_for_log(rf"target 127\.0\.0\.1:{a.port} is up")
            guard.wait_for_log(rf"target 127\.0\.0\.1:{b.port} is up")
            a.stop()  # an outage of example.org's primary, then it comes back
            guard.wait_for_log(rf"target 127\.0\.0\.1:{a.port} is down")
            a.start()
            guard.wait_for_log(rf"target 127\.0\.0\.1:{a.port} is up \(was down\)")
            failed_at = prober_entry(guard.config, a.port)["last_fail"]
            assert isinstance(failed_at, float)

            variants = [
                {"interval": "300ms", "rise": 3},
                {"extra_domain": True},
                {"trusted": ', "198.51.100.0/24"'},
                {"flagged_action": "tempfail"},
                {"down_grace": "20m"},
                {"milter_socket": f"unix:{tmp_path}/elsewhere.sock"},  # restart-only
                {"rise": 1, "extra_domain": True},
                {},
                {"interval": "250ms", "trusted": ', "203.0.113.0/24"'},
                {"down_grace": "40m"},
            ]
            assert len(variants) == RELOADS
            traffic = [Traffic(sock, f"192.0.2.{10 + i}") for i in range(TRAFFIC_THREADS)]
            threads = [threading.Thread(target=t.run) for t in traffic]
            for t in threads:
                t.start()
            try:
                wait_for_sessions(traffic, 5)
                for i, variant in enumerate(variants):
                    guard.config.write_text(write(**variant))
                    before = guard.log().count("config reloaded from")
                    if i % 2 == 0:
                        r = cli(guard.config, "reload")
                        assert r.returncode == 0, r.stderr
                        assert "reloaded" in r.stdout, r.stdout
                    else:
                        guard.signal(signal.SIGUSR1)
                    wait_until_log_count(guard, "config reloaded from", before + 1)
                    # Sessions after each reload, before the next: traffic never paused.
                    wait_for_sessions(traffic, total(traffic) + 5)

                # A file that fails validation, and one that is not even TOML.
                guard.config.write_text(write().replace("rise = 2", "rise = 0"))
                r = cli(guard.config, "reload")
                assert r.returncode == 1 and "[probe] rise" in r.stderr, r.stderr
                guard.config.write_text("[policy\n")
                r = cli(guard.config, "reload")
                assert r.returncode == 1 and "not valid TOML" in r.stderr, r.stderr
                guard.signal(signal.SIGUSR1)
                wait_until_log_count(guard, "reload refused", 2)
                wait_for_sessions(traffic, total(traffic) + 5)
            finally:
                for t in traffic:
                    t.stopping.set()
                for t in threads:
                    t.join(30)

            sessions = total(traffic)
            failed = [f for t in traffic for f in t.failed]
            misjudged = [m for t in traffic for m in t.misjudged]
            print(f"reload under load: {RELOADS} reloads, {sessions} sessions, "
                  f"{len(failed)} failed, {len(misjudged)} misjudged")
            assert not failed, failed[:5]
            assert not misjudged, misjudged[:5]

            log = guard.log()
            # Probing was never restarted, so hysteresis and down_grace carried over.
            for port in (a.port, b.port):
                assert log.count(f"probing 127.0.0.1:{port} ") == 1, log
                assert log.count(f"target 127.0.0.1:{port} is up (was unknown)") == 1
            guard.config.write_text(write(**variants[-1]))
            entry = prober_entry(guard.config, a.port)
            assert entry["last_fail"] == failed_at  # the outage is remembered, and
            assert entry["down_grace_until"] == failed_at + 40 * 60  # under the new grace
            assert re.search(r"reload: \[milter\] socket cannot change while running", log)
            refused = [line for line in log.splitlines() if "reload refused" in line]
            assert len(refused) == 2, refused  # one line per refusal
            assert "[probe] rise" in refused[0] and "not valid TOML" in refused[1], refused


def total(traffic: list[Traffic]) -> int:
    return sum(t.sessions for t in traffic)


def wait_for_sessions(traffic: list[Traffic], at_least: int, timeout: float = 30) -> None:
    done = threading.Event()

    def check() -> None:
        while not done.wait(0.02):
            if total(traffic) >= at_least or any(t.failed for t in traffic):
                done.set()

    checker = threading.Thread(target=check)
    checker.start()
    checker.join(timeout)
    done.set()
    assert total(traffic) >= at_least, f"traffic stalled: {total(traffic)} < {at_least}"


def wait_until_log_count(guard: GuardProcess, text: str, count: int) -> None:
    guard.wait_for_log(r"(?s)" + ("".join([f"{re.escape(text)}.*"] * count)), timeout=15)


def prober_entry(config_file: Path, port: int) -> dict[str, object]:
    r = cli(config_file, "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["health_source"].startswith("the running guard"), data["health_source"]
    [entry] = [p for p in data["prober"] if p["target"] == f"127.0.0.1:{port}"]
    return dict(entry)
