"""``make demo``: MX Guard on a real secondary MX, start to finish, in under a minute.

Everything runs on loopback and is thrown away at the end: a private Redis with the
guard's ACL user from deploy/redis/users.acl, a fake primary MX (mx1), the guard
(``mx-guard run``) storing its health in that Redis, and a private Postfix set up as
deploy/postfix/main.cf.snippet says, with smtpd chrooted into its queue directory and
reaching the guard at ``unix:/mx-guard/guard.sock``. Mail goes to a sink standing in
for the primary's delivery path.

The steps: a spammer-like client (127.0.0.2) sends to example.org while mx1 is up and
gets 451; a trusted client (127.0.0.1) is let through; mail for flagged.example (action
flag) is delivered with an X-MX-Guard header; mx1 goes down and the same spammer-like
mail is now accepted (reason primary-down); ``mx-guard status`` shows it all. On the
way the guard is killed, and Postfix lets mail through without it.

Needs root (Postfix) and what ``make test-deps`` installs. Exit 0 when every step
behaved as described, 1 otherwise. The pieces (``snippet_settings``,
``ChrootedPostfix``, ``acl_file``) are used by tests/test_deploy.py too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import GuardProcess, guard_toml
from tests.support.postfix import POSTCONF, PostfixMTA, check_postfix_tools
from tests.support.redis_server import RedisServer, redis_server_available
from tests.support.smtp import HarnessError, send
from tests.support.smtpserver import SmtpSink

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
POSTFIX_SNIPPET = DEPLOY / "postfix" / "main.cf.snippet"
ACL_FILE = DEPLOY / "redis" / "users.acl"
GUARD_USER, STATUS_USER = "mx-guard", "mx-guard-status"
PLACEHOLDER = re.compile(r"#REPLACE_WITH_SHA256_OF_THE_(GUARD|STATUS)_PASSWORD")

SPAMMER = "127.0.0.2"  # not in the guard's trusted_networks nor Postfix's mynetworks
TRUSTED = "127.0.0.1"
SENDER = "someone@sender.example"


# -- pieces shared with tests/test_deploy.py -----------------------------------------

def snippet_settings(path: Path = POSTFIX_SNIPPET) -> dict[str, str]:
    """The active ``name = value`` lines of a main.cf snippet (continuations joined)."""
    settings: dict[str, str] = {}
    last = ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():  # main.cf: a line starting with space continues the last
            settings[last] += " " + line.strip()
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path}: not a 'name = value' line: {line!r}"
        last = name.strip()
        settings[last] = value.strip()
    return settings


def acl_file(directory: Path, guard_password: str, status_password: str) -> Path:
    """deploy/redis/users.acl with its placeholders replaced by these passwords' hashes."""
    passwords = {"GUARD": guard_password, "STATUS": status_password}

    def hashed(m: re.Match[str]) -> str:
        return "#" + hashlib.sha256(passwords[m.group(1)].encode()).hexdigest()

    path = directory / "users.acl"
    path.write_text(PLACEHOLDER.sub(hashed, ACL_FILE.read_text()))
    return path


def make_socket_dir(queue_dir: Path) -> Path:
    """``<queue>/mx-guard``, 2750 root:postfix, as deploy/systemd/mx-guard.tmpfiles makes
    it (owner mx-guard there): the setgid bit gives the guard's socket the group postfix."""
    queue_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(queue_dir, 0o755)
    sock_dir = queue_dir / "mx-guard"
    sock_dir.mkdir(exist_ok=True)
    shutil.chown(sock_dir, "root", "postfix")
    os.chmod(sock_dir, 0o2750)
    return sock_dir


class ChrootedPostfix(PostfixMTA):
    """PostfixMTA whose SMTP server runs chrooted in the queue directory, as on Debian,
    so that milter socket paths are read relative to the queue directory."""

    def _write_config(self) -> None:
        super()._write_config()
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        subprocess.run([POSTCONF, "-c", str(self.config_dir), "-F", f"{listen}/inet/chroot = y"],
                       check=True, capture_output=True, timeout=30)
        # The chroot has no /etc: smtpd needs none of it with these settings.


def mta_settings() -> dict[str, str]:
    """The snippet's main.cf settings, for PostfixMTA's main_cf."""
    settings = snippet_settings()
    assert settings["smtpd_milters"] == "unix:/mx-guard/guard.sock", settings
    return settings


# -- the demo -----------------------------------------------------------------------------

class Demo:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def check(self, title: str, action: Callable[[], str]) -> None:
        """Run one step: ``action`` returns what happened, or raises AssertionError."""
        self.checks += 1
        self.say(title)
        try:
            outcome = action()
        except (AssertionError, TimeoutError, OSError) as e:
            self.failures.append(title)
            lines = str(e).splitlines() or [type(e).__name__]
            print(f"         FAILED: {lines[0]}", flush=True)
            for line in lines[1:][-6:]:  # the end of a log, if the error carries one
                print(f"           {line}", flush=True)
            return
        for line in outcome.splitlines():
            print(f"         ok: {line}", flush=True)


def run_demo() -> int:
    demo = Demo()
    if os.geteuid() != 0:
        print("make demo must run as root: it starts a real Postfix", file=sys.stderr)
        return 1
    if not redis_server_available():
        print("redis-server is missing: run make test-deps", file=sys.stderr)
        return 1
    try:
        check_postfix_tools()
    except HarnessError as e:
        print(f"Postfix is missing: {e}", file=sys.stderr)
        return 1

    print("MX Guard demo: this host is mx2, the secondary MX of example.org (action tempfail)\n"
          "and flagged.example (action flag); their primary is mx1.\n", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="mxguard-demo-"))
    os.chmod(workdir, 0o755)  # Postfix's daemons (user postfix) traverse it
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)

        guard_pw, status_pw = "demo-guard-secret", "demo-status-secret"
        redis = RedisServer(unix_socket=False,
                            extra_config=(f"aclfile {acl_file(workdir, guard_pw, status_pw)}",))
        redis.start()
        cleanup.callback(redis.close)
        store_url = f"redis://{GUARD_USER}:{guard_pw}@127.0.0.1:{redis.port}/0"
        demo.say(f"Redis on 127.0.0.1:{redis.port}, the guard logs in as ACL user {GUARD_USER} "
                 "(deploy/redis/users.acl)")

        primary = FakePrimary().start()
        cleanup.callback(primary.stop)
        demo.say(f"mx1 (fake primary MX) answers on 127.0.0.1:{primary.port}")

        sink = SmtpSink().start()
        cleanup.callback(sink.stop)

        queue_dir = workdir / "pf" / "spool"
        sock_dir = make_socket_dir(queue_dir)
        guard = GuardProcess(guard_toml(f"unix:{sock_dir}/guard.sock", primary.port,
                                        store=store_url), workdir)
        guard.start()
        cleanup.callback(guard.stop)
        guard.wait_for_log(r"milter listening")
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        demo.say(f"mx-guard runs (config {guard.config.name}), socket {sock_dir}/guard.sock, "
                 "and sees mx1 up")

        postfix = ChrootedPostfix(
            None, workdir=workdir / "pf", relay_domains=["example.org", "flagged.example"],
            next_hop=sink.address, mynetworks=[f"{TRUSTED}/32"], main_cf=mta_settings())
        postfix.start()
        cleanup.callback(postfix.stop)
        demo.say(f"Postfix (mx2) listens on 127.0.0.1:{postfix.port}, smtpd chrooted, "
                 "smtpd_milters = unix:/mx-guard/guard.sock\n")

        def deliver(rcpt: str, source: str, want_code: int) -> tuple[str, str]:
            sink.clear()
            result = send(postfix.host, postfix.port, SENDER, [rcpt], source=source)
            code, text = result.rcpts[rcpt]
            assert code == want_code, f"RCPT <{rcpt}> got {code} {text}, expected {want_code}"
            if want_code != 250:
                return f"{code} {text}", ""
            assert result.data and result.data[0] == 250, f"DATA got {result.data}"
            msg = sink.wait_for_message(rcpt, timeout=10)
            return f"{code} {text}", msg.header("X-MX-Guard") or ""

        def guard_said(rcpt: str, action: str, reason: str, after: int) -> str:
            found = guard.wait_for_log(
                rf"client=(\S+) .*rcpt=<{re.escape(rcpt)}> .*action={action} reason={reason}",
                timeout=10, after=after)
            return f"guard log: client={found.group(1)} rcpt=<{rcpt}> action={action} " \
                   f"reason={reason}"

        def bypass() -> str:
            mark = len(guard.log())
            reply, _ = deliver("user@example.org", SPAMMER, 451)
            return (f"refused for now: {reply}\n"
                    + guard_said("user@example.org", "tempfail", "bypass", mark))

        def trusted() -> str:
            mark = len(guard.log())
            reply, header = deliver("user@example.org", TRUSTED, 250)
            assert not header, f"unexpected X-MX-Guard: {header}"
            return (f"accepted ({reply}) and delivered, no header\n"
                    + guard_said("user@example.org", "accept", "trusted", mark))

        def flagged() -> str:
            reply, header = deliver("user@flagged.example", SPAMMER, 250)
            assert header.startswith("bypass;"), f"X-MX-Guard is {header!r}"
            return f"accepted ({reply}) and delivered with\nX-MX-Guard: {header}"

        def guard_dead() -> str:
            assert guard.proc is not None
            guard.proc.kill()  # SIGKILL: no goodbye to Postfix
            guard.stop()
            log_mark = len(postfix.log_text())
            reply, header = deliver("user@example.org", SPAMMER, 250)
            assert not header, f"unexpected X-MX-Guard: {header}"
            said = re.search(r"warning: connect to Milter service \S+: [^\n]*",
                             postfix.log_text()[log_mark:])
            assert said, "Postfix logged nothing about the dead milter"
            mark = len(guard.log())
            guard.start()
            guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up", after=mark)
            return (f"accepted ({reply}) and delivered unguarded (milter_default_action = accept)\n"
                    f"Postfix log: {said.group(0)}\nguard restarted")

        def primary_down() -> str:
            mark = len(guard.log())
            primary.stop()
            guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is down", timeout=15, after=mark)
            return "mx1 stopped; the guard's probes saw it go down"

        def fallback() -> str:
            mark = len(guard.log())
            reply, _ = deliver("user@example.org", SPAMMER, 250)
            return (f"accepted ({reply}) and delivered: this is what a secondary MX is for\n"
                    + guard_said("user@example.org", "accept", "primary-down", mark))

        demo.check(f"1. A client that skipped mx1 ({SPAMMER}) sends to user@example.org "
                   "while mx1 is up", bypass)
        demo.check(f"2. A trusted client ({TRUSTED}, e.g. mx1's own relay) sends to "
                   "user@example.org", trusted)
        demo.check(f"3. {SPAMMER} sends to user@flagged.example (action flag)", flagged)
        demo.check(f"4. The guard dies (SIGKILL); {SPAMMER} sends to user@example.org",
                   guard_dead)
        demo.check("5. mx1 goes down", primary_down)
        demo.check(f"6. {SPAMMER} sends to user@example.org again, now that mx1 is down",
                   fallback)

        status_config = workdir / "status.toml"
        status_config.write_text(guard.config.read_text().replace(
            f"{GUARD_USER}:{guard_pw}@", f"{STATUS_USER}:{status_pw}@"))

        def status() -> str:
            r = subprocess.run([sys.executable, "-m", "guard", "status", "-c", str(status_config)],
                               capture_output=True, text=True, timeout=30, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert r.returncode == 0, f"exit {r.returncode}: {r.stderr.strip()}"
            assert "unreachable" not in r.stdout, r.stdout
            print("         " + "\n         ".join(r.stdout.rstrip().splitlines()), flush=True)
            return "the shared view, read by the read-only ACL user " + STATUS_USER

        demo.check("7. mx-guard status (run by hand, reading Redis as " + STATUS_USER + ")",
                   status)

        demo.say("cleaning up (stopping the guard takes libmilter up to 5 s)")
    took = time.monotonic() - demo.started
    if demo.failures:
        print(f"\nDEMO FAILED: {len(demo.failures)} of {demo.checks} steps did not behave as "
              f"expected ({took:.0f}s):", file=sys.stderr)
        for title in demo.failures:
            print(f"  - {title}", file=sys.stderr)
        return 1
    print(f"\nAll {demo.checks} steps behaved as expected ({took:.0f}s).")
    return 0


def main() -> int:
    try:
        return run_demo()
    except (HarnessError, AssertionError, RuntimeError, OSError,
            subprocess.SubprocessError) as e:  # TimeoutError is an OSError
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"\nDEMO FAILED while setting up: {lines[0]}", file=sys.stderr)
        for line in lines[1:][-10:]:
            print(f"  {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
