"""``mx-guard run`` as a real process for the tests, with its log to read.

Tests start the guard exactly as an administrator would (``python -m guard run -c``),
wait for lines in its log (a target going up, the milter listening), and stop it with
SIGTERM as systemd would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from types import TracebackType

from guard.config import ConfigError, parse_config
from guard.control import control_socket_path

ROOT = Path(__file__).resolve().parents[2]


SYSTEM_RUN_DIR = "/run/mx-guard/"


def _control_socket(config_text: str) -> str:
    """Where a guard with this config would serve its control socket ("" if invalid)."""
    try:
        return control_socket_path(parse_config(tomllib.loads(config_text)))
    except (ConfigError, tomllib.TOMLDecodeError):
        return ""


class GuardProcess:
    def __init__(self, config_text: str, workdir: Path, name: str = "guard") -> None:
        self.config = workdir / f"{name}.toml"
        if _control_socket(config_text).startswith(SYSTEM_RUN_DIR):
            # Never the default in /run/mx-guard: a mail host's own guard lives there,
            # and so would every other test guard with an inet milter socket.
            control = workdir / f"{name}.control.sock"
            if len(str(control)) > 100:  # a Unix socket path has 108 bytes at most
                control = Path(tempfile.mkdtemp(prefix="mxg-")) / f"{name}.control.sock"
            config_text += f'\n[control]\nsocket = "{control}"\n'
        self.config.write_text(config_text)
        self.logfile = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> GuardProcess:
        log = self.logfile.open("ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "run", "-c", str(self.config), *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
        )
        log.close()
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 15.0, after: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` appears in the log past character ``after``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = regex.search(self.log(), after)
            if found:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"mx-guard exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the guard's log within {timeout}s:\n"
                             f"{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test froze it
            self.proc.terminate()
            try:
                self.proc.wait(20)  # libmilter notices a stop within 5 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> GuardProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def guard_toml(socket: str, primary_port: int, extra: str = "", node: str = "mx2",
               store: str = "memory://", primary: str = "127.0.0.1",
               stale_after: str = "10s") -> str:
    """A config guarding example.org (tempfail) and flagged.example (flag), whose
    primary mx1 is ``primary``:``primary_port``; fast probes so tests run quickly.
    Clients from 127.0.0.1 are trusted; tests send from other loopback addresses."""
    mx1 = (f'{{ host = "mx1.example.org", preference = 10, addresses = ["{primary}"], '
           f"port = {primary_port} }}")
    return f"""
[milter]
socket = "{socket}"
[self]
node = "{node}"
names = ["mx2.example.org"]
[store]
url = "{store}"
timeout = "100ms"
refresh = "200ms"
[probe]
mode = "banner"
interval = "200ms"
down_interval = "200ms"
timeout = "1s"
rise = 2
fall = 2
[policy]
trusted_networks = ["127.0.0.1/32", "::1/128"]
stale_after = "{stale_after}"
{extra}
[[domain]]
name = "example.org"
mx = [{mx1},
      {{ host = "mx2.example.org", preference = 20 }}]
[[domain]]
name = "flagged.example"
action = "flag"
mx = [{mx1},
      {{ host = "mx2.example.org", preference = 20 }}]
"""


def witness_toml(socket: str, store: str) -> str:
    """A witness (node mx1, on the primary) writing to ``store``: heartbeat every 500 ms,
    client networks as /32, so that each loopback test client is a network of its own."""
    return f"""
[milter]
socket = "{socket}"
[self]
node = "mx1"
[store]
url = "{store}"
[probe]
interval = "200ms"
down_interval = "200ms"
timeout = "1s"
[policy]
stale_after = "3s"
[witness]
role = "witness"
heartbeat = "500ms"
[release]
ipv4_prefix = 32
"""
