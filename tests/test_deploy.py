"""deploy/ checked with the real tools, and the guard run the way it says.

- systemd: the unit passes ``systemd-analyze verify`` (offline, in a fake root holding
  the host's units and a stand-in for ExecStart) with no warning at all, and
  ``systemd-analyze security`` rates it at most EXPOSURE_MAX; systemd-sysusers and
  systemd-tmpfiles, run on a fake root, make the user and the 2750 mx-guard:postfix
  socket directory. The guard, started the way the unit starts it under
  MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, which refuses the same mappings),
  serves a milter conversation; its socket in such a directory is 0770 group postfix,
  so the user postfix can connect and the user nobody cannot.
- Postfix: ``postconf -n`` takes the main.cf snippet without a warning, with exactly
  the lines the README quotes; a real Postfix whose smtpd is chrooted in its queue
  directory, set up with the snippet, reaches the guard at ``unix:/mx-guard/guard.sock``.
- Sendmail: m4 builds a sendmail.cf from the .mc lines with the unpacked sendmail-cf
  tree, and a real Sendmail set up with them consults the guard, then lets mail through
  once the guard is dead (no F=T).
- Redis: the ACL file loads into a private redis-server only once its password
  placeholders are replaced; its guard user runs the whole store (publish,
  observations, history, wait_for_change) and is refused everything else; its status
  user reads, cannot write, and serves ``mx-guard status``.

Tools missing make a test fail with the package to install, never skip: systemd
(systemd-analyze), redis-server, and what tests/support/install-mtas.sh installs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guard.health import Observation, State, Target, Transition
from guard.store.base import StoreError
from guard.store.redis import RedisStore
from tests.support.demo import (
    ACL_FILE,
    ChrootedPostfix,
    acl_file,
    make_socket_dir,
    snippet_settings,
)
from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT, GuardProcess, guard_toml
from tests.support.milterclient import AddHeader, MilterClient
from tests.support.postfix import MASTER_CF_DIST, check_postfix_tools
from tests.support.redis_server import RedisServer, redis_server_available
from tests.support.sendmail import M4, SendmailMTA, sendmail_paths
from tests.support.smtp import HarnessError, send
from tests.support.smtp import make_socket_dir as make_run_dir
from tests.support.smtpserver import SmtpSink

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "mx-guard.service"
TMPFILES = DEPLOY / "systemd" / "mx-guard.tmpfiles"
SYSUSERS = DEPLOY / "systemd" / "mx-guard.sysusers"
POSTFIX_MAIN = DEPLOY / "postfix" / "main.cf.snippet"
POSTFIX_MASTER = DEPLOY / "postfix" / "master.cf.snippet"
SENDMAIL_MC = DEPLOY / "sendmail" / "mx-guard.mc"
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
EXPOSURE_MAX = 20  # systemd-analyze security, 0-100: "1.4 OK" today; 2.0 is still "OK"

# The lines README quotes; the snippets must hold them verbatim.
POSTFIX_LINES = (
    "smtpd_milters = unix:/mx-guard/guard.sock",
    "#smtpd_milters = unix:/var/spool/postfix/mx-guard/guard.sock",
    "milter_default_action = accept",
    "milter_connect_macros = j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}",
    "milter_protocol = 6",
    "milter_connect_timeout = 5s",
    "milter_command_timeout = 5s",
    "milter_content_timeout = 10s",
)
SENDMAIL_LINES = (
    "define(`confMILTER_MACROS_CONNECT', `j, _, {daemon_name}, {if_name}, {if_addr}, "
    "{client_addr}, {client_name}, {client_resolve}')dnl",
    "define(`confMILTER_MACROS_ENVFROM', `i, {auth_type}, {auth_authen}, {auth_ssf}, "
    "{auth_author}, {mail_mailer}, {mail_host}, {mail_addr}')dnl",
    "define(`confMILTER_MACROS_EOM', `{msg_id}, i')dnl",
    "INPUT_MAIL_FILTER(`mx-guard', `S=local:/run/mx-guard/guard.sock, "
    "T=C:5s;S:5s;R:5s;E:10s')dnl",
)
SENDMAIL_SOCKET = "/run/mx-guard/guard.sock"
SPAMMER = "127.0.0.2"  # untrusted for the guard (trusts 127.0.0.1) and for the MTAs
SENDER = "someone@sender.example"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def need(tool: str, package: str) -> str:
    """The tool's path; the test fails (not skips) naming the package when it is missing."""
    found = shutil.which(tool) or next(
        (p for p in (f"/usr/bin/{tool}", f"/usr/sbin/{tool}") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(f"{tool} not found: apt-get install {package} "
                    "(tests/install-test-deps.sh installs it)", pytrace=False)
    return found


def need_harness(check: Callable[[], object]) -> None:
    try:
        check()
    except HarnessError as e:
        pytest.fail(f"MTA harness unavailable: {e}", pytrace=False)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test must run as root (it switches users / starts an MTA)",
                    pytrace=False)


def write_old(path: Path, text: str) -> None:
    """Write a Postfix config file dated a minute ago: postconf waits, re-reading for
    up to two seconds, while a file it reads looks freshly modified."""
    path.write_text(text)
    past = time.time() - 60
    os.utime(path, (past, past))


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- systemd ------------------------------------------------------------------------

@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A root with the host's system units, our unit and a stand-in for ExecStart."""
    units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if units is None:
        pytest.fail("no systemd unit directory with sysinit.target: apt-get install systemd",
                    pytrace=False)
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    binary = root / unit_settings()["ExecStart"][0].split()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


def test_unit_passes_systemd_analyze_verify(fake_root: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    r = run(analyze, "verify", f"--root={fake_root}", "--man=no",
            f"/etc/systemd/system/{UNIT.name}")
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    findings = (r.stdout + r.stderr).strip()
    assert not findings, f"systemd-analyze verify:\n{findings}"
    assert r.returncode == 0


def test_unit_security_exposure_is_low(fake_root: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    r = run(analyze, "security", f"--root={fake_root}", "--offline=yes",
            f"--threshold={EXPOSURE_MAX}", f"/etc/systemd/system/{UNIT.name}")
    overall = re.search(r"Overall exposure level.*", r.stdout)
    assert overall, r.stdout + r.stderr
    assert r.returncode == 0, f"{overall.group(0)} (limit {EXPOSURE_MAX / 10})\n{r.stdout}"


def test_unit_has_the_promised_hardening() -> None:
    s = unit_settings()
    want = {
        "User": "mx-guard", "Group": "mx-guard", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "Restart": "always",
        "ReadWritePaths": "-/var/spool/postfix/mx-guard", "RuntimeDirectory": "mx-guard",
    }
    for key, value in want.items():
        assert s.get(key) == [value], f"{key}: {s.get(key)}, want {value!r}"
    assert "@system-service" in s["SystemCallFilter"]
    assert s["ExecStart"][0].endswith(" run -c /etc/mx-guard/guard.toml")
    binary = s["ExecStart"][0].split()[0]
    assert s["ExecReload"] == [f"{binary} reload -c /etc/mx-guard/guard.toml"]
    stop = s["TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) > 5, "libmilter takes up to 5 s to stop"


def test_sysusers_and_tmpfiles_make_the_socket_directory(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers", "systemd")
    tmpfiles = need("systemd-tmpfiles", "systemd")
    root = tmp_path / "root"
    (root / "etc/sysusers.d").mkdir(parents=True)
    (root / "etc/tmpfiles.d").mkdir()
    # A group postfix with a number the host does not use: proves the lookup is the root's.
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "postfix:x:4241:4242::/var/spool/postfix:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\npostfix:x:4242:\n")
    shutil.copy(SYSUSERS, root / "etc/sysusers.d/mx-guard.conf")
    shutil.copy(TMPFILES, root / "etc/tmpfiles.d/mx-guard.conf")

    r = run(sysusers, f"--root={root}", root / "etc/sysusers.d/mx-guard.conf")
    assert r.returncode == 0, r.stderr
    user = [line for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("mx-guard:")]
    assert len(user) == 1, (root / "etc/passwd").read_text()
    uid = int(user[0].split(":")[2])

    r = run(tmpfiles, f"--root={root}", "--create", root / "etc/tmpfiles.d/mx-guard.conf")
    assert r.returncode == 0, r.stderr
    st = (root / "var/spool/postfix/mx-guard").stat()
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o2750, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (uid, 4242)


# -- the guard as the unit runs it: MDWE, socket permissions, chrooted Postfix ----------

def _mdwe_available() -> bool:
    # In a child: MDWE cannot be switched off again.
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).prctl({PR_SET_MDWE}, " \
            f"{PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False, timeout=30).returncode == 0


# Switch on PR_SET_MDWE, then exec the guard: kept across execve like systemd's filter.
MDWE_LAUNCHER = (
    "import ctypes, os, sys\n"
    f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'guard', *sys.argv[1:]])\n"
)


class MdweGuard(GuardProcess):
    """``mx-guard run`` with writable+executable memory refused by the kernel."""

    def start(self, *extra: str) -> MdweGuard:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", MDWE_LAUNCHER, "run", "-c", str(self.config), *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
        return self


class Site:
    """A guard (under MDWE) with its socket in ``<queue>/mx-guard``, 2750 root:postfix."""

    def __init__(self, workdir: Path, guard: GuardProcess, primary: FakePrimary) -> None:
        self.workdir = workdir
        self.queue_dir = workdir / "spool"
        self.socket_path = self.queue_dir / "mx-guard" / "guard.sock"
        self.guard = guard
        self.primary = primary


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    need_root()
    if not _mdwe_available():
        pytest.fail("this kernel has no PR_SET_MDWE (Linux 6.3 and later), so the unit's "
                    "MemoryDenyWriteExecute cannot be checked here")
    workdir = Path(tempfile.mkdtemp(prefix="mxguard-deploy-"))
    os.chmod(workdir, 0o755)  # the user postfix must traverse it
    primary = FakePrimary().start()
    sock_dir = make_socket_dir(workdir / "spool")
    guard = MdweGuard(guard_toml(f"unix:{sock_dir}/guard.sock", primary.port), workdir)
    try:
        guard.start()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        yield Site(workdir, guard, primary)
        code = guard.stop()
        assert "Traceback" not in guard.log(), guard.log()[-3000:]
        assert code == 0, f"mx-guard exited {code} on SIGTERM:\n{guard.log()[-3000:]}"
    finally:
        guard.stop()
        primary.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_guard_serves_under_memory_deny_write_execute(site: Site) -> None:
    # The launcher asserted that PR_SET_MDWE took, and execve keeps it.
    with MilterClient(f"unix:{site.socket_path}", timeout=5) as c:
        c.connect("client.example", SPAMMER, 40000)
        c.helo("client.example")
        c.mail("<sender@client.example>")
        reply = c.rcpt("<user@example.org>")
        c.abort()
    assert reply.text == "451 4.7.1 Please deliver mail for example.org to its primary MX"
    with MilterClient(f"unix:{site.socket_path}", timeout=5) as c:
        tx = c.send_message("sender@client.example", ["user@flagged.example"],
                            [("Subject", "hi")], b"body\r\n", client_address=SPAMMER)
    assert tx.eom is not None
    assert [m for m in tx.eom.modifications if isinstance(m, AddHeader)], tx.eom.modifications


# Started as root (so it can load this Python), drops to the user, then connects.
CONNECT_AS = """
import os, pwd, socket, sys
pw = pwd.getpwnam(sys.argv[1])
os.setgroups([])
os.setgid(pw.pw_gid)
os.setuid(pw.pw_uid)
try:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sys.argv[2])
    print("ok")
except OSError as e:
    print(type(e).__name__)
"""


def _connects_as(user: str, path: Path) -> str:
    """Connect to ``path`` as ``user``: "ok" or the error's name."""
    r = subprocess.run([sys.executable, "-c", CONNECT_AS, user, str(path)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_socket_reachable_by_group_postfix_only(site: Site) -> None:
    st = site.socket_path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o770, oct(st.st_mode)  # the guard's umask 007
    assert st.st_gid == pwd.getpwnam("postfix").pw_gid  # from the setgid directory
    assert _connects_as("postfix", site.socket_path) == "ok"
    assert _connects_as("nobody", site.socket_path) == "PermissionError"


@pytest.mark.mta
def test_postfix_snippet_reaches_the_guard_from_a_chrooted_smtpd(site: Site) -> None:
    need_harness(check_postfix_tools)
    with SmtpSink() as sink:
        postfix = ChrootedPostfix(
            None, workdir=site.workdir, relay_domains=["example.org", "flagged.example"],
            next_hop=sink.address, mynetworks=["127.0.0.1/32"], main_cf=snippet_settings())
        with postfix:
            r = send(postfix.host, postfix.port, SENDER, ["user@example.org"], source=SPAMMER)
            assert r.rcpts["user@example.org"] == (
                451, "4.7.1 Please deliver mail for example.org to its primary MX"), r
            r = send(postfix.host, postfix.port, SENDER, ["user@flagged.example"],
                     source=SPAMMER)
            assert r.data and r.data[0] == 250, r
            header = sink.wait_for_message("user@flagged.example", timeout=10).header(
                "X-MX-Guard")
            assert header and header.startswith("bypass; domain=flagged.example;"), header
            # {client_addr} and the queue id (i at end of message) reached the guard.
            site.guard.wait_for_log(r"\n\S+ \S+ INFO guard\.decision: [0-9A-F]{6,}: conn=\d+ "
                                    rf"client={re.escape(SPAMMER)} .*domain=flagged\.example "
                                    r"action=flag reason=bypass")
            # The smtpd that did this was chrooted in the queue directory.
            roots = set()
            for proc in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if (proc / "comm").read_text().strip() == "smtpd":
                        roots.add(os.readlink(proc / "root"))
            assert str(postfix.queue_dir) in roots, roots


@pytest.mark.mta
def test_postfix_snippet_passes_postconf(tmp_path: Path) -> None:
    postconf = need("postconf", "postfix (tests/support/install-mtas.sh)")
    text = POSTFIX_MAIN.read_text()
    for line in POSTFIX_LINES:
        assert line in text.splitlines(), f"{POSTFIX_MAIN.name} lacks the line {line!r}"
    want = {k: v for k, _, v in (line.partition(" = ") for line in POSTFIX_LINES)
            if not k.startswith("#")}

    def postconf_n(main_cf: str) -> dict[str, str]:
        write_old(tmp_path / "main.cf", main_cf)
        r = run(postconf, "-c", tmp_path, "-n")
        assert r.returncode == 0 and not r.stderr, r.stderr
        return dict(line.split(" = ", 1) for line in r.stdout.splitlines())

    write_old(tmp_path / "master.cf", Path(MASTER_CF_DIST).read_text())
    got = postconf_n(text)
    assert {k: got.get(k) for k in want} == want
    assert got.keys() - want.keys() == {"config_directory"}

    # The commented alternatives, once uncommented, are valid main.cf too.
    unchrooted = postconf_n(text.replace("\nsmtpd_milters", "\n#").replace(
        "#smtpd_milters = unix:/var/", "smtpd_milters = unix:/var/"))
    assert unchrooted["smtpd_milters"] == "unix:/var/spool/postfix/mx-guard/guard.sock"
    per_milter = re.search(r"^#smtpd_milters = \{.*?\n(?!#\s)", text, re.M | re.S)
    assert per_milter, "the per-milter alternative is gone"
    block = re.sub(r"^#", "", per_milter.group(0), flags=re.M)
    milters = postconf_n(block)["smtpd_milters"]
    assert milters.startswith("{ unix:/mx-guard/guard.sock, default_action=accept,"), milters


@pytest.mark.mta
def test_postfix_master_snippet_needs_nothing_or_parses(tmp_path: Path) -> None:
    postconf = need("postconf", "postfix (tests/support/install-mtas.sh)")
    text = POSTFIX_MASTER.read_text()
    active = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert not active, f"master.cf.snippet is meant to change nothing: {active}"
    # Its port-25-only alternative, uncommented in place of Debian's smtp line.
    alternative = re.findall(r"^#((?:smtp +inet .*)|(?:  -o .*))$", text, re.M)
    assert len(alternative) == 2, alternative
    master = re.sub(r"^smtp +inet .*$", "\n".join(alternative),
                    Path(MASTER_CF_DIST).read_text(), count=1, flags=re.M)
    write_old(tmp_path / "master.cf", master)
    write_old(tmp_path / "main.cf", "")
    r = run(postconf, "-c", tmp_path, "-P", "smtp/inet/smtpd_milters")
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert r.stdout.strip() == "smtp/inet/smtpd_milters = unix:/mx-guard/guard.sock"


# -- Sendmail -----------------------------------------------------------------------

@pytest.mark.mta
def test_sendmail_mc_builds_with_m4(tmp_path: Path) -> None:
    need_harness(sendmail_paths)
    _, cf_dir = sendmail_paths()
    text = SENDMAIL_MC.read_text()
    for line in SENDMAIL_LINES:
        assert line in text.splitlines(), f"{SENDMAIL_MC.name} lacks the line {line!r}"
    mc = tmp_path / "test.mc"
    mc.write_text("OSTYPE(`linux')dnl\n" + text + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n")
    r = run(M4, f"-D_CF_DIR_={cf_dir}/", cf_dir / "m4" / "cf.m4", mc)
    assert r.returncode == 0 and not r.stderr, r.stderr
    cf = r.stdout.splitlines()
    for line in (
        "O InputMailFilters=mx-guard",
        f"Xmx-guard, S=local:{SENDMAIL_SOCKET}, T=C:5s;S:5s;R:5s;E:10s",
        "O Milter.macros.connect=j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}, "
        "{client_name}, {client_resolve}",
        "O Milter.macros.envfrom=i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, "
        "{mail_mailer}, {mail_host}, {mail_addr}",
        "O Milter.macros.eom={msg_id}, i",
    ):
        assert line in cf, f"sendmail.cf lacks {line!r}"
    assert not [line for line in cf if line.startswith("X") and "F=" in line]


@pytest.mark.mta
def test_sendmail_mc_consults_the_guard_and_survives_its_death(tmp_path: Path) -> None:
    need_root()
    need_harness(sendmail_paths)
    sock_dir = make_run_dir()  # Sendmail refuses a socket below /tmp (world-writable)
    sock = sock_dir / "guard.sock"
    mc_lines = SENDMAIL_MC.read_text().replace(SENDMAIL_SOCKET, str(sock)).splitlines()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)
        primary = stack.enter_context(FakePrimary())
        guard = GuardProcess(guard_toml(f"unix:{sock}", primary.port), tmp_path)
        stack.callback(guard.stop)
        guard.start()
        guard.wait_for_log(r"target 127\.0\.0\.1:\d+ is up")
        sink = stack.enter_context(SmtpSink())
        mta = stack.enter_context(SendmailMTA(
            None, relay_domains=["example.org", "flagged.example"], next_hop=sink.address,
            mc_extra=mc_lines))

        r = send(mta.host, mta.port, SENDER, ["user@example.org"], source=SPAMMER)
        assert r.code("user@example.org") == 451, r
        r = send(mta.host, mta.port, SENDER, ["user@flagged.example"], source=SPAMMER)
        assert r.data and r.data[0] == 250, r
        header = sink.wait_for_message("user@flagged.example", timeout=10).header("X-MX-Guard")
        assert header and header.startswith("bypass; domain=flagged.example;"), header
        # {client_addr} at connect, the queue id at end of message.
        guard.wait_for_log(rf"INFO guard\.decision: \w{{8,}}: conn=\d+ client={SPAMMER} "
                           r".*domain=flagged\.example action=flag reason=bypass")

        # No F=T: with the guard dead, mail goes through unguarded.
        assert guard.proc is not None
        guard.proc.send_signal(signal.SIGKILL)
        guard.stop()
        r = send(mta.host, mta.port, SENDER, ["user@example.org"], source=SPAMMER)
        assert r.code("user@example.org") == 250 and r.data and r.data[0] == 250, r
        sink.wait_for_message("user@example.org", timeout=10)


# -- Redis ACL ----------------------------------------------------------------------

GUARD_PW, STATUS_PW = "guard-test-secret", "status-test-secret"
T = Target("192.0.2.1", 25)


def need_redis() -> None:
    if not redis_server_available():
        pytest.fail("redis-server not found: apt-get install redis-server "
                    "(tests/install-test-deps.sh)", pytrace=False)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_redis()
    acl = acl_file(tmp_path_factory.mktemp("acl"), GUARD_PW, STATUS_PW)
    with RedisServer(extra_config=(f"aclfile {acl}",)) as server:
        yield server


def url(server: RedisServer, user: str, password: str, db: int = 0, extra: str = "") -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/{db}{extra}"


def an_observation(state: State = State.UP) -> Observation:
    now = time.time()
    return Observation(T, "mx2", state, since=now - 5, observed_at=now,
                       last_ok=now if state is State.UP else None,
                       last_fail=None if state is State.UP else now, detail="220 hi")


@pytest.mark.redis
def test_acl_file_refuses_to_load_until_passwords_are_set() -> None:
    need_redis()
    server = RedisServer(unix_socket=False, extra_config=(f"aclfile {ACL_FILE}",))
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            server.start()
        assert "ACL" in server.log_tail(), server.log_tail()
    finally:
        server.close()


@pytest.mark.parametrize("db_and_options", [(0, ""), (1, "?client_name=mx2")],
                         ids=["db0", "db1-client-name"])
def test_acl_guard_user_runs_the_store(acl_redis: RedisServer,
                                       db_and_options: tuple[int, str]) -> None:
    store_url = url(acl_redis, "mx-guard", GUARD_PW, *db_and_options)
    store, waiter = RedisStore(store_url), RedisStore(store_url)
    try:
        assert waiter.wait_for_change(0.3) is False  # subscribes
        woke: list[bool] = []
        thread = threading.Thread(target=lambda: woke.append(waiter.wait_for_change(5.0)))
        thread.start()
        time.sleep(0.3)
        obs = an_observation()
        change = Transition(T, "mx2", State.UNKNOWN, State.UP, at=obs.observed_at, detail="up")
        store.publish([obs], [change])
        thread.join(6)
        assert woke == [True]
        assert waiter.observations() == [obs]
        assert waiter.history() == [change]
    finally:
        store.close()
        waiter.close()


def test_acl_guard_user_is_refused_everything_else(acl_redis: RedisServer) -> None:
    import redis

    outsider = RedisStore(url(acl_redis, "mx-guard", GUARD_PW), prefix="other:")
    client = acl_redis.client(username="mx-guard", password=GUARD_PW)
    try:
        with pytest.raises(StoreError, match="NoPermissionError"):
            outsider.publish([an_observation()], [])
        with pytest.raises(StoreError, match="NoPermissionError"):
            outsider.observations()
        for command in (("GET", "other:key"), ("SET", "mxguard:x", "1"), ("KEYS", "*"),
                        ("SCAN", "0"), ("FLUSHALL",), ("CONFIG", "GET", "*"),
                        ("DEL", "mxguard:history"), ("EVAL", "return 1", "0"),
                        ("PUBLISH", "other:changes", "1"), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)  # type: ignore[no-untyped-call]
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe("other:changes")
            with pytest.raises(redis.exceptions.NoPermissionError):
                pubsub.get_message(timeout=2)
        finally:
            pubsub.close()
    finally:
        outsider.close()


def test_acl_status_user_reads_only_and_serves_status(acl_redis: RedisServer,
                                                      tmp_path: Path) -> None:
    guard_store = RedisStore(url(acl_redis, "mx-guard", GUARD_PW))
    status_store = RedisStore(url(acl_redis, "mx-guard-status", STATUS_PW))
    try:
        obs = an_observation(State.DOWN)
        change = Transition(T, "mx2", State.UP, State.DOWN, at=obs.observed_at, detail="down")
        guard_store.publish([obs], [change])
        assert obs in status_store.observations()
        assert change in status_store.history()
        with pytest.raises(StoreError, match="NoPermissionError"):
            status_store.publish([an_observation()], [change])
    finally:
        guard_store.close()
        status_store.close()

    config = tmp_path / "status.toml"
    config.write_text(guard_toml("unix:/nonexistent/guard.sock", 25,
                                 store=url(acl_redis, "mx-guard-status", STATUS_PW)))
    r = subprocess.run([sys.executable, "-m", "guard", "status", "-c", str(config)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "mx-guard-status:***@" in r.stdout and "unreachable" not in r.stdout, r.stdout
