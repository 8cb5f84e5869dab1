"""``mx-guard explain`` and ``status`` as processes, against a real fake primary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, guard_toml
from tests.support.smtpserver import free_port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args], capture_output=True,
                          text=True, check=False, cwd=ROOT, timeout=60)


def write_config(tmp_path: Path, primary_port: int) -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(guard_toml(f"unix:{tmp_path}/guard.sock", primary_port))
    return path


def test_explain_bypass_with_the_primary_up(tmp_path: Path) -> None:
    with FakePrimary() as mx1:
        config = write_config(tmp_path, mx1.port)
        done = cli("explain", "-c", str(config), "--client", "203.0.113.7",
                   "--rcpt", "user@example.org")
        flagged = cli("explain", "-c", str(config), "--client", "203.0.113.7",
                      "--rcpt", "user@flagged.example", "--json")
    assert done.returncode == 0, done.stderr
    assert "action:  tempfail" in done.stdout
    assert "reason:  bypass" in done.stdout
    assert f"127.0.0.1:{mx1.port} up" in done.stdout
    assert "probed once now from this host" in done.stdout
    data = json.loads(flagged.stdout)
    assert (data["action"], data["reason"]) == ("flag", "bypass")
    assert data["header"].startswith("bypass; domain=flagged.example; primary=mx1.example.org")


def test_explain_primary_down_trusted_and_unguarded(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())  # nobody listens: refused
    down = cli("explain", "-c", str(config), "--client", "203.0.113.7",
               "--rcpt", "user@example.org", "--json")
    assert json.loads(down.stdout)["reason"] == "primary-down"
    trusted = cli("explain", "-c", str(config), "--client", "127.0.0.1",
                  "--rcpt", "user@example.org", "--json")
    assert json.loads(trusted.stdout)["reason"] == "trusted"
    other = cli("explain", "-c", str(config), "--client", "203.0.113.7",
                "--rcpt", "user@other.example", "--json")
    assert json.loads(other.stdout)["reason"] == "not-secondary"


def test_explain_rejects_bad_input(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    bad_ip = cli("explain", "-c", str(config), "--client", "not-an-ip", "--rcpt", "a@b.example")
    assert bad_ip.returncode == 1 and "not an IP address" in bad_ip.stderr
    bad_rcpt = cli("explain", "-c", str(config), "--client", "192.0.2.1", "--rcpt", "nodomain")
    assert bad_rcpt.returncode == 1 and "has no domain" in bad_rcpt.stderr
    usage = cli("explain", "-c", str(config))
    assert usage.returncode == 2


def test_status_text_and_json(tmp_path: Path) -> None:
    with FakePrimary() as mx1:
        config = write_config(tmp_path, mx1.port)
        text = cli("status", "-c", str(config))
        raw = cli("status", "-c", str(config), "--json")
    assert text.returncode == 0, text.stderr
    assert "example.org  action=tempfail  MX from config  self at preference 20" in text.stdout
    assert f"127.0.0.1:{mx1.port}" in text.stdout and "UP" in text.stdout
    data = json.loads(raw.stdout)
    assert data["node"] == "mx2"
    [domain] = [d for d in data["domains"] if d["name"] == "flagged.example"]
    assert domain["action"] == "flag"
    roles = {h["host"]: h["role"] for h in domain["hosts"]}
    assert roles == {"mx1.example.org": "higher-priority", "mx2.example.org": "self"}
    [mx1_entry] = [h for h in domain["hosts"] if h["host"] == "mx1.example.org"]
    assert mx1_entry["targets"][0]["state"] == "up"
