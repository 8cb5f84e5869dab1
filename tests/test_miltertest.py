"""Debian's miltertest (libmilter's own client, scripted in Lua) against mx-guard run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml

SCRIPT = Path(__file__).resolve().parent / "miltertest" / "bypass.lua"


def test_miltertest_scenario(tmp_path: Path) -> None:
    miltertest = shutil.which("miltertest")
    assert miltertest, "miltertest is missing: run tests/install-test-deps.sh (apt: miltertest)"
    socket = tmp_path / "guard.sock"
    with FakePrimary() as mx1, GuardProcess(guard_toml(f"unix:{socket}", mx1.port),
                                            tmp_path) as guard:
        guard.start()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        done = subprocess.run([miltertest, "-s", str(SCRIPT)], capture_output=True,
                              text=True, timeout=60, check=False,
                              env={**os.environ, "MX_GUARD_SOCKET": f"unix:{socket}"})
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{guard.log()[-3000:]}"
        assert "header: bypass; domain=flagged.example" in done.stdout
        assert done.stdout.rstrip().endswith("ok")
        guard.wait_for_log(r"rcpt=<user@example\.org> domain=example\.org "
                           r"action=tempfail reason=bypass")
        # Logged when the connection closes, which the guard may see a moment later.
        guard.wait_for_log(r"client=127\.0\.0\.1 .* action=accept reason=trusted")
