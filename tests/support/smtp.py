"""SMTP and process helpers for the end-to-end tests (no aiosmtpd needed).

* ``SmtpSink`` (tests/smtpserver.py) is the MTAs' next hop and ``FakePrimary``
  (tests/fakeprimary.py) the primary MX the guard probes; tests start/stop it on
  a given port to simulate a primary that is up or down.
* ``send`` / ``smtp_session`` - an smtplib client that can connect *from* any
  127.x.y.z address (Linux accepts every 127/8 source address on lo), so a test
  client can look "untrusted" to an MTA whose mynetworks is 127.0.0.1/32;
  ``send`` returns every reply instead of raising on refused recipients.
* ``MilterProcess`` - runs a milter script in a subprocess until it listens.
* ``GuardFleet``, ``guard_config``, ``GuardedDomain``, ``GuardSocket``,
  ``guard_socket_dir`` - the real guard (``python -m guard run``) for the MTAs.
* ``wait_for_port`` / ``wait_for_banner`` / ``wait_until``.
* ``HarnessError``, ``isolation`` (private namespaces: no DNS leaves the
  machine), ``SyslogReceiver``, ``make_socket_dir`` for postfix.py/sendmail.py.
"""

from __future__ import annotations

import email.message
import email.policy
import email.utils
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from tests.support.guardproc import GuardProcess
from tests.support.smtpserver import LOCALHOST, free_port

T = TypeVar("T")
CLIENT_HELO = "client.test.example"


# --------------------------------------------------------------------------
# generic helpers


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0,
               interval: float = 0.05, message: str = "condition") -> T:
    """Poll *predicate* until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def wait_for_banner(host: str, port: int, timeout: float = 30.0) -> str:
    """Wait until *host:port* accepts a connection and sends a 220 greeting."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                line = data.decode("latin-1").strip()
                if line.startswith("220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return line
                last = line
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"no SMTP greeting on {host}:{port} within {timeout:.0f}s (last: {last!r})")


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    wait_until(lambda: port_open(host, port), timeout, 0.1, f"{host}:{port} to listen")


# --------------------------------------------------------------------------
# client


@dataclass
class SendResult:
    mail: tuple[int, str]                   # (code, text) of MAIL FROM
    rcpts: dict[str, tuple[int, str]]       # rcpt -> (code, text)
    data: tuple[int, str] | None = None     # (code, text) after the final dot, if reached

    @property
    def accepted(self) -> list[str]:
        return [r for r, (c, _) in self.rcpts.items() if 200 <= c < 300]

    def code(self, rcpt: str) -> int:
        return self.rcpts[rcpt][0]


def smtp_session(host: str, port: int, *, source: str | None = None,
                 helo: str = CLIENT_HELO, timeout: float = 30.0) -> smtplib.SMTP:
    """An smtplib.SMTP connected to *host:port* (from *source* address if given)
    that has already said EHLO."""
    client = smtplib.SMTP(timeout=timeout, local_hostname=helo,
                          source_address=(source, 0) if source else None)
    client.connect(host, port)
    client.ehlo()
    return client


def make_message(mail_from: str, rcpts: Sequence[str], subject: str = "test",
                 body: str = "hello\n", headers: dict[str, str] | None = None) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = mail_from
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="client.test.example")
    msg["Date"] = email.utils.formatdate(localtime=False)
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def send(host: str, port: int, mail_from: str, rcpts: str | Iterable[str],
         message: bytes | None = None, *, source: str | None = None,
         helo: str = CLIENT_HELO, auth: tuple[str, str] | None = None,
         timeout: float = 30.0) -> SendResult:
    """Run one SMTP transaction step by step and return every reply.

    Unlike smtplib.sendmail() this never raises on refused recipients: it
    returns their codes, and only sends DATA if at least one RCPT was accepted.
    *auth* = (user, password) does AUTH PLAIN first.
    """
    rcpts = [rcpts] if isinstance(rcpts, str) else list(rcpts)
    if message is None:
        message = make_message(mail_from, rcpts)
    client = smtp_session(host, port, source=source, helo=helo, timeout=timeout)
    try:
        if auth:
            client.login(*auth)
        mail = client.mail(mail_from)
        result = SendResult(mail=(mail[0], _text(mail[1])), rcpts={})
        if mail[0] >= 400:
            return result
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            result.rcpts[rcpt] = (code, _text(text))
        if result.accepted:
            code, text = client.data(message)
            result.data = (code, _text(text))
        else:
            client.rset()
        return result
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def _text(b: object) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)



# --------------------------------------------------------------------------
# process/harness helpers shared by postfix.py and sendmail.py

INSTALL_HINT = "run `sh tests/support/install-mtas.sh` as root"


class HarnessError(RuntimeError):
    """The e2e MTA harness cannot run (missing tool, failed start, ...)."""


def require_tool(path: str, what: str = "") -> str:
    """Return *path* if it is an executable file, else raise HarnessError."""
    found = path if os.path.isabs(path) else shutil.which(path)
    if not found or not os.access(found, os.X_OK):
        raise HarnessError(f"{what or path} not found ({path}): {INSTALL_HINT}")
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise HarnessError(f"{what} must run as root (it starts a real MTA)")


def tail(path: str | os.PathLike[str], lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return f"(no {path})"


class SyslogReceiver:
    """Receives syslog datagrams on a Unix socket and appends them to a file.

    Used for Sendmail, which can only log through syslog(3) to /dev/log: the
    harness bind-mounts this socket over /dev/log in Sendmail's private mount
    namespace, so no system syslog daemon is needed or touched.
    """

    def __init__(self, sock_path: str | os.PathLike[str], log_path: str | os.PathLike[str]):
        self.sock_path = str(sock_path)
        self.log_path = str(log_path)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SyslogReceiver:
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(self.sock_path)
        os.chmod(self.sock_path, 0o666)
        s.settimeout(0.2)
        self._sock = s
        prio = re.compile(rb"^<\d+>")

        def run() -> None:
            with open(self.log_path, "ab", buffering=0) as out:
                while self._sock is not None:
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    out.write(prio.sub(b"", data).rstrip(b"\n\0") + b"\n")

        self._thread = threading.Thread(target=run, name="syslog-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        s, self._sock = self._sock, None
        if self._thread:
            self._thread.join(2)
        if s is not None:
            s.close()


ISOLATE_SH = r"""#!/bin/sh
# Run "$@" in the private mount (and UTS) namespace created by unshare:
# private /etc/hosts, /etc/resolv.conf (nameserver 127.0.0.1) and
# /etc/nsswitch.conf (hosts: files), so the MTA never sends a DNS query
# off this machine; optionally a hostname and a private /dev with /dev/log.
set -e
D="$ISOLATE_DIR"
for f in hosts resolv.conf nsswitch.conf; do
    if [ -e "/etc/$f" ]; then mount --bind "$D/$f" "/etc/$f"; fi
done
if [ -n "$ISOLATE_HOSTNAME" ]; then hostname "$ISOLATE_HOSTNAME"; fi
if [ -n "$ISOLATE_LOG_SOCKET" ]; then
    mkdir -p "$D/hostdev"
    mount --rbind /dev "$D/hostdev"
    mount -t tmpfs -o mode=0755 isolatedev /dev
    for n in null zero full random urandom tty; do
        if [ -e "$D/hostdev/$n" ]; then touch "/dev/$n"; mount --bind "$D/hostdev/$n" "/dev/$n"; fi
    done
    ln -s /proc/self/fd /dev/fd
    ln -s /proc/self/fd/0 /dev/stdin
    ln -s /proc/self/fd/1 /dev/stdout
    ln -s /proc/self/fd/2 /dev/stderr
    mkdir /dev/shm && chmod 1777 /dev/shm
    touch /dev/log
    mount --bind "$ISOLATE_LOG_SOCKET" /dev/log
fi
exec "$@"
"""


def isolation(workdir: str | os.PathLike[str], *, hostname: str | None = None,
              log_socket: str | None = None,
              hosts: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Prepare files for ISOLATE_SH in *workdir*/isolate and return
    (argv_prefix, env) that runs a command inside fresh namespaces."""
    unshare = require_tool("/usr/bin/unshare", "unshare (util-linux)")
    d = os.path.join(str(workdir), "isolate")
    os.makedirs(d, exist_ok=True)
    names = " ".join(n for n in (hostname, hostname.split(".")[0] if hostname else None) if n)
    with open(os.path.join(d, "hosts"), "w") as f:
        f.write(f"127.0.0.1\tlocalhost {names}\n::1\tlocalhost ip6-localhost\n")
        for line in hosts:
            f.write(line + "\n")
    with open(os.path.join(d, "resolv.conf"), "w") as f:
        f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    with open(os.path.join(d, "nsswitch.conf"), "w") as f:
        f.write("passwd: files\ngroup: files\nshadow: files\nhosts: files\n"
                "networks: files\nprotocols: files\nservices: files\n")
    script = os.path.join(d, "isolate.sh")
    with open(script, "w") as f:
        f.write(ISOLATE_SH)
    os.chmod(script, 0o755)
    argv = [unshare, "--mount", "--propagation", "private"]
    if hostname:
        argv.append("--uts")
    argv += ["/bin/sh", script]
    env = dict(os.environ, ISOLATE_DIR=d, ISOLATE_HOSTNAME=hostname or "",
               ISOLATE_LOG_SOCKET=log_socket or "")
    return argv, env


SOCKET_PARENT = "/run/mxguard-e2e"


def make_socket_dir() -> Path:
    """A fresh, short, 0755 directory for milter sockets, removed by the caller.

    Not below /tmp: Sendmail refuses a milter socket in a directory path that
    contains a world-writable directory ("unsafe: World writable directory"),
    even a sticky one.  /run is root-owned 0755, so /run/mxguard-e2e/XXXX is safe;
    Postfix's smtpd (user postfix) can traverse it.
    """
    os.makedirs(SOCKET_PARENT, mode=0o755, exist_ok=True)
    os.chmod(SOCKET_PARENT, 0o755)
    d = tempfile.mkdtemp(prefix="s-", dir=SOCKET_PARENT)
    os.chmod(d, 0o755)
    return Path(d)


class MilterProcess:
    """A milter script run by the current Python in a subprocess.

    *socket* is the address in Postfix notation ("unix:/path" or
    "inet:127.0.0.1:PORT"); the script gets it in libmilter notation
    ("unix:/path", "inet:PORT@127.0.0.1") as argv[1], then *args*.
    start() returns once the socket exists / the port accepts connections.
    Output goes to *log* (default: the script path with .log).
    """

    def __init__(self, script: str | os.PathLike[str], socket: str, args: Sequence[str] = (),
                 log: str | os.PathLike[str] | None = None, ready_timeout: float = 15.0):
        self.script = Path(script)
        self.socket = socket
        self.args = list(args)
        self.log = Path(log) if log else self.script.with_suffix(".log")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def libmilter_socket(self) -> str:
        if self.socket.startswith(("inet:", "inet6:")) and "@" not in self.socket:
            family, _, rest = self.socket.partition(":")
            host, _, port = rest.rpartition(":")
            return f"{family}:{port}@{host.strip('[]')}"
        return self.socket

    def _ready(self) -> bool:
        if self.socket.startswith(("unix:", "local:")):
            return os.path.exists(self.socket.split(":", 1)[1])
        _, _, addr = self.libmilter_socket.partition(":")
        port, _, host = addr.partition("@")
        return port_open(host or LOCALHOST, int(port))

    def start(self) -> Self:
        if self.socket.startswith(("unix:", "local:")):
            path = self.socket.split(":", 1)[1]
            if os.path.exists(path):
                os.unlink(path)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.script), self.libmilter_socket, *self.args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        proc = self.proc
        try:
            wait_until(lambda: self._ready() or proc.poll() is not None,
                       self.ready_timeout, message=f"milter on {self.socket}")
        except TimeoutError:
            self.kill()
            raise HarnessError(f"milter did not come up on {self.socket}:\n{tail(self.log)}") \
                from None
        if proc.poll() is not None:
            raise HarnessError(f"milter exited with {proc.returncode}:\n{tail(self.log)}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send *sig* (default SIGKILL) and reap.  libmilter may take seconds
        to honour SIGTERM."""
        proc = self.proc
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    stop = kill

    def output(self) -> str:
        return tail(self.log, 200)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --------------------------------------------------------------------------
# the real guard (``python -m guard run``) as the MTAs see it


@dataclass(frozen=True)
class GuardedDomain:
    """One [[domain]] of a guard config: mx1.example.org (preference 10) at *primary*,
    then *secondaries* (preference 20; the guard's [self] name must be among them)."""

    name: str
    primary: tuple[str, int]
    action: str | None = None  # None: [policy] action (tempfail)
    secondaries: tuple[str, ...] = ("mx2.example.org",)

    def toml(self) -> str:
        host, port = self.primary
        mx = [f'{{ host = "mx1.example.org", preference = 10, addresses = ["{host}"], '
              f"port = {port} }}"]
        mx += [f'{{ host = "{s}", preference = 20 }}' for s in self.secondaries]
        action = f'action = "{self.action}"\n' if self.action else ""
        hosts = ",\n  ".join(mx)
        return f'[[domain]]\nname = "{self.name}"\n{action}mx = [\n  {hosts},\n]\n'



def guard_config(socket: str, domains: Sequence[GuardedDomain], *, node: str = "mx2",
                 self_name: str = "mx2.example.org", store: str = "memory://",
                 probe_mode: str = "banner",
                 trusted_networks: Sequence[str] = ("127.0.0.1/32", "::1/128"),
                 stale_after: str = "10s", extra: str = "") -> str:
    """A guard config with fast probes (every 200 ms, rise = fall = 2), the EHLO name
    *self_name*, and everything else at its default (down_grace 30m, header
    X-MX-Guard, the default 451 reply, trust_authenticated). *extra* is more TOML
    (whole tables, e.g. [release]) placed before the domains."""
    trusted = ", ".join(f'"{n}"' for n in trusted_networks)
    return (f'[milter]\nsocket = "{socket}"\n'
            f'[self]\nnode = "{node}"\nnames = ["{self_name}"]\n'
            f'[store]\nurl = "{store}"\nrefresh = "200ms"\n'
            f'[probe]\nmode = "{probe_mode}"\ninterval = "200ms"\ndown_interval = "200ms"\n'
            f'timeout = "1s"\nrise = 2\nfall = 2\nhelo = "{self_name}"\n'
            f'[policy]\nstale_after = "{stale_after}"\ntrusted_networks = [{trusted}]\n'
            + extra + "\n" + "".join(d.toml() for d in domains))


@dataclass(frozen=True)
class GuardSocket:
    """One milter socket in both notations: Postfix's and the guard's (libmilter)."""

    postfix: str  # "unix:/path" or "inet:127.0.0.1:PORT"
    guard: str    # "unix:/path" or "inet:PORT@127.0.0.1"

    @classmethod
    def unix(cls, directory: Path, name: str) -> GuardSocket:
        return cls(f"unix:{directory / name}.sock", f"unix:{directory / name}.sock")

    @classmethod
    def inet(cls, host: str = LOCALHOST) -> GuardSocket:
        port = free_port(host)
        return cls(f"inet:{host}:{port}", f"inet:{port}@{host}")

    def accepts(self) -> bool:
        kind, _, where = self.guard.partition(":")
        if kind == "unix":
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    s.connect(where)
                    return True
            except OSError:
                return False
        port, _, host = where.partition("@")
        return port_open(host, int(port))


def guard_socket_dir() -> Path:
    """make_socket_dir(), then group postfix and setgid (2750): the guard (root, umask
    007) creates its socket 0770 and the directory gives it group postfix, so Postfix's
    smtpd reaches it, as with the SPEC's "socket directory 0750 with group postfix".
    Sendmail runs as root and accepts it (no world- or group-writable directory)."""
    import grp  # Unix only, like everything here

    d = make_socket_dir()
    os.chown(d, 0, grp.getgrnam("postfix").gr_gid)
    os.chmod(d, 0o2750)
    return d


class GuardFleet:
    """Guards run as processes (tests/guardproc.py) and stopped together.

    ``launch()`` starts one and returns at once; ``ready()`` waits until each listens
    and sees its primaries up. ``stop_all()`` sends SIGTERM to all before waiting
    (libmilter takes up to 5 s to notice), then checks every exit code and log.
    """

    LOG_FAILURES = ("Traceback", "callback failed")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.guards: list[tuple[GuardProcess, GuardSocket, list[tuple[str, int]]]] = []

    def launch(self, name: str, sock: GuardSocket, domains: Sequence[GuardedDomain],
               **config: Any) -> GuardProcess:
        guard = GuardProcess(guard_config(sock.guard, domains, **config), self.workdir, name)
        guard.start()
        primaries = sorted({d.primary for d in domains})
        self.guards.append((guard, sock, primaries))
        return guard

    def ready(self, timeout: float = 15.0) -> None:
        for guard, sock, primaries in self.guards:
            for host, port in primaries:
                guard.wait_for_log(rf"target {re.escape(host)}:{port} is up", timeout)
            wait_until(sock.accepts, timeout, message=f"{guard.config.name} on {sock.guard}")

    def stop_all(self) -> None:
        for guard, _, _ in self.guards:
            if guard.proc is not None and guard.proc.poll() is None:
                guard.signal(signal.SIGCONT)  # in case a test froze it
                guard.signal(signal.SIGTERM)
        problems = []
        for guard, _, _ in self.guards:
            code = guard.stop()
            log = guard.log()
            if code not in (0, None):
                problems.append(f"{guard.config.name}: exit code {code}")
            problems += [f"{guard.logfile.name}: {bad!r} in the log:\n{log[-3000:]}"
                         for bad in self.LOG_FAILURES if bad in log]
        assert not problems, "\n".join(problems)
