"""``mx-guard probe``: the prober alone, publishing to a real Redis, with no milter.

The command runs as a process, as an administrator would start it on a host that only
probes; the test reads what it wrote through the store and checks, from /proc, that it
listens on no socket at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from guard.health import State, Target
from guard.store.redis import RedisStore
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, guard_toml
from tests.support.redis_server import RedisServer

SIGTERM_EXIT_SECONDS = 3.0  # no libmilter here: the prober stops at once
TCP_LISTEN = "0A"  # st column of /proc/net/tcp
SO_ACCEPTCON = 0x10000  # Flags column of /proc/net/unix: a listening socket


def listening_inodes() -> set[str]:
    """Socket inodes of every listening TCP and Unix socket of this network namespace."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                found.add(fields[9])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & SO_ACCEPTCON:
            found.add(fields[6])
    return found


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            found.add(link[len("socket:["):-1])
    return found


def wait_for_state(store: RedisStore, node: str, target: Target, state: State,
                   proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(o.node == node and o.target == target and o.state is state
               for o in store.observations()):
            return
        assert proc.poll() is None, f"mx-guard probe exited {proc.returncode}:\n" \
            f"{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no {state} observation by {node} of {target} in Redis:\n"
                         f"{log.read_text()[-3000:]}")


def test_probe_command_publishes_without_a_milter_and_stops_on_sigterm(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    primary = FakePrimary().start()
    target = Target("127.0.0.1", primary.port)
    milter_socket = tmp_path / "guard.sock"
    config = tmp_path / "probe.toml"
    config.write_text(guard_toml(f"unix:{milter_socket}", primary.port, node="prober1",
                                 store=redis_server.url))
    log = tmp_path / "probe.log"
    store = RedisStore(redis_server.url, timeout=1.0)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "probe", "-c", str(config)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_for_state(store, "prober1", target, State.UP, proc, log)
        primary.stop()  # it keeps probing: the primary's fall reaches Redis too
        wait_for_state(store, "prober1", target, State.DOWN, proc, log)
        history = [(t.node, t.old, t.new) for t in store.history() if t.target == target]
        assert history == [("prober1", State.UNKNOWN, State.UP),
                           ("prober1", State.UP, State.DOWN)], history

        assert not milter_socket.exists()
        assert proc.poll() is None
        listening = socket_inodes(proc.pid) & listening_inodes()
        assert not listening, f"mx-guard probe listens on socket inode(s) {listening}"

        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(SIGTERM_EXIT_SECONDS + 5)
        took = time.monotonic() - stopping
        assert code == 0, f"mx-guard probe exited {code} on SIGTERM:\n{log.read_text()}"
        assert took < SIGTERM_EXIT_SECONDS, f"mx-guard probe took {took:.1f}s to stop"
        text = log.read_text()
        assert "probing only (no milter)" in text
        assert "milter listening" not in text and "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        store.close()
        primary.stop()
