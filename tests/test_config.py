"""The config reader: defaults, durations, and errors that name the file and key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from guard.config import (
    Action,
    ConfigError,
    ProbeMode,
    defaults_documented,
    load_config,
    parse_duration,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "guard.toml"

GOOD = """
[self]
node = "mx2"
names = ["mx2.example.org"]
[[domain]]
name = "example.org"
mx = [{host = "mx1.example.org", preference = 10, addresses = ["192.0.2.1"]},
      {host = "mx2.example.org", preference = 20}]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "guard.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "want"), [
    ("100ms", 0.1), ("10s", 10.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1.5s", 1.5),
])
def test_durations(text: str, want: float) -> None:
    assert parse_duration(text) == pytest.approx(want)


def test_defaults_and_a_good_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.policy.action is Action.TEMPFAIL
    assert config.policy.down_grace == 1800
    assert config.store.timeout == pytest.approx(0.1)
    assert config.probe.mode is ProbeMode.BANNER
    assert config.policy.reply.for_domain("example.org").text == \
        "Please deliver mail for example.org to its primary MX"
    assert config.domain("example.org") is not None


BAD = [
    ("unknown key", '[policy]\nactoin = "flag"', "[policy] actoin: unknown key"),
    ("unknown section", "[polcy]\n", "unknown section [polcy]"),
    ("bad action", '[policy]\naction = "drop"', "[policy] action: must be one of"),
    ("wrong type", "[probe]\nrise = \"2\"", "[probe] rise: must be an integer"),
    ("bool is not int", "[probe]\nrise = true", "[probe] rise: must be an integer"),
    ("zero rise", "[probe]\nrise = 0", "[probe] rise: must be between 1"),
    ("bad duration", '[policy]\ndown_grace = "30 minutes"', "[policy] down_grace: not a"),
    ("duration as number", "[probe]\ntimeout = 5", "[probe] timeout: must be a string"),
    ("zero duration", '[probe]\ntimeout = "0s"', "must be longer than zero"),
    ("bad network", '[policy]\ntrusted_networks = ["10.0.0.0/33"]',
     "trusted_networks: item 1: not a network"),
    ("bad self address", '[self]\naddresses = ["mx2"]', "[self] addresses: item 1: not an IP"),
    ("bad socket", '[milter]\nsocket = "/run/sock"', "[milter] socket: must be unix:"),
    ("bad store url", '[store]\nurl = "mysql://x"', "[store] url: must start with"),
    ("tempfail reply not 4xx", '[policy]\nreply = "550 5.7.1 no"', "must be a 4xx reply"),
    ("reply without enhanced code", '[policy]\nreply = "451 go away"', "not an SMTP reply"),
    ("bad header name", '[policy]\nheader = "X MX"', "not a valid header field name"),
    ("domain without name", '[[domain]]\nmx = "dns"', "[[domain]] #1: missing key 'name'"),
    ("domain unknown key", '[[domain]]\nname = "a.example"\nmxx = "dns"', "unknown key 'mxx'"),
    ("domain bad action", '[[domain]]\nname = "a.example"\naction = "drop"',
     "(a.example) action: must be one of"),
    ("mx list never names this host",
     '[self]\nnames = ["mx2.example.org"]\n[[domain]]\nname = "a.example"\n'
     'mx = [{host = "mx1.example.org", preference = 10}]', "no MX host is this host"),
    ("mx host without preference",
     '[[domain]]\nname = "a.example"\nmx = [{host = "mx1.example.org"}]',
     "mx[1]: missing key 'preference'"),
    ("mx bad address",
     '[[domain]]\nname = "a.example"\nmx = [{host = "h", preference = 1, addresses = ["x"]}]',
     "mx[1]: item 1: not an IP address"),
    ("domain twice", '[self]\nnames = ["mx2"]\n' + '[[domain]]\nname = "a.example"\n' * 2,
     "configured twice"),
    ("stale_after shorter than the probe interval",
     '[policy]\nstale_after = "5s"\n[probe]\ninterval = "10s"', "stale_after"),
    ("stale_after shorter than down_interval",
     '[policy]\nstale_after = "60s"\n[probe]\ndown_interval = "2m"', "longest gap"),
    ("node with a space", '[self]\nnode = "mx 2"', "[self] node: must be 1-63 letters"),
    ("helo with CRLF", '[probe]\nhelo = "a\\r\\nRSET"', "[probe] helo: not a host name"),
    ("sub-second milter timeout", '[milter]\ntimeout = "500ms"', "must be whole seconds"),
    ("milter port zero", '[milter]\nsocket = "inet:0@127.0.0.1"', "must be unix:/path"),
    ("min_ttl above max_ttl", '[dns]\nmin_ttl = "2h"', "min_ttl (7200s) is longer"),
    ("DNS domains without any self", '[self]\nnode = "mx2"\n[[domain]]\nname = "a.example"',
     "[self] names and addresses are both empty"),
    ("not toml", "[policy\n", "not valid TOML"),
]


@pytest.mark.parametrize(("label", "text", "want"), BAD, ids=[b[0] for b in BAD])
def test_errors_name_the_file_and_key(tmp_path: Path, label: str, text: str, want: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert want in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_example_config_documents_every_key_with_its_default() -> None:
    """conf/guard.toml shows every key at its default, so it cannot drift from the code."""
    raw = tomllib.loads(EXAMPLE.read_text())
    example = load_config(EXAMPLE)
    for table, defaults in defaults_documented().items():
        assert set(raw.get(table, {})) == set(defaults), f"[{table}] keys differ"
        if table in ("self", "milter"):
            continue  # these hold the example host's own values
        section = getattr(example, "me" if table == "self" else table)
        for key, default in defaults.items():
            assert getattr(section, key) == default, f"[{table}] {key} is not the default"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args], capture_output=True,
                          text=True, check=False, cwd=ROOT)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = cli("check-config", "-c", str(EXAMPLE))
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout
    bad = cli("check-config", "-c", str(write(tmp_path, '[policy]\naction = "drop"')))
    assert bad.returncode == 1
    assert "[policy] action" in bad.stderr
    usage = cli("check-config", "--no-such-flag")
    assert usage.returncode == 2


def test_check_config_parses_the_store_url(tmp_path: Path) -> None:
    bad = cli("check-config", "-c", str(write(
        tmp_path, '[store]\nurl = "redis+sentinel://s1:26379"')))
    assert bad.returncode == 1
    assert "[store] url: store url redis+sentinel://s1:26379: no service name" in bad.stderr
    good = cli("check-config", "-c", str(write(
        tmp_path, '[store]\nurl = "redis://user:secret@127.0.0.1:1/0"')))
    assert good.returncode == 0, good.stderr  # parsed, never contacted
    assert "secret" not in good.stdout


def test_config_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\naction = "drop"')
    env_run = subprocess.run([sys.executable, "-m", "guard", "check-config"],
                             capture_output=True, text=True, check=False, cwd=ROOT,
                             env={"MX_GUARD_CONFIG": str(path), "PATH": "/usr/bin:/bin"})
    assert env_run.returncode == 1
    assert str(path) in env_run.stderr


def test_run_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = cli("run", "-c", str(write(tmp_path, '[probe]\nmode = "ping"')))
    assert bad.returncode == 1
    assert "[probe] mode: must be one of tcp, banner, ehlo" in bad.stderr
