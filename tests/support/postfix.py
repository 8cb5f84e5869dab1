"""A private, throwaway Postfix instance acting as a secondary (backup) MX.

    with PostfixMTA(milter="unix:/tmp/x/guard.sock", relay_domains=["example.com"],
                    next_hop=("127.0.0.1", sink.port)) as pf:
        send(pf.host, pf.port, ...)

Everything lives in one temporary directory (config_directory with main.cf and
master.cf, queue_directory, data_directory, maillog_file).  master.cf is built
from Postfix's shipped default (MASTER_CF_DIST), never from the host's
/etc/postfix/master.cf, which a real mail host has customised (a commented-out
``smtp inet`` line there would leave the instance listening nowhere); /etc/postfix
is only read for the package's own meta files (postfix-files, dynamicmaps.cf).
chroot is off for every service.  The master process runs in a private mount
namespace whose /etc/resolv.conf points at 127.0.0.1 and whose nsswitch.conf
says "hosts: files", so nothing in the instance can query a real DNS server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.smtpserver import free_port

from .mta import PrivateMTA
from .smtp import HarnessError, isolation, require_tool, wait_until

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
# The package's pristine master.cf (Debian: postfix ships it read-only in /usr/share).
MASTER_CF_DIST = "/usr/share/postfix/master.cf.dist"

# Macros the guard needs.  Postfix does not send {client_addr} by default;
# {auth_authen} is sent at MAIL FROM and the queue id "i" only at end of message.
DEFAULT_MILTER_MACROS = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name} "
                             "{client_port} {client_ptr}",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                          "{mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_end_of_data_macros": "i",
}


def check_postfix_tools() -> None:
    """HarnessError unless Postfix (as installed by install-mtas.sh) is there."""
    for tool in (POSTFIX, POSTCONF, "/usr/lib/postfix/sbin/master", "/usr/lib/postfix/sbin/smtpd",
                 "/usr/lib/postfix/sbin/postlogd"):
        require_tool(tool, "Postfix")
    if not os.path.exists(MASTER_CF_DIST):
        raise HarnessError(f"{MASTER_CF_DIST} missing: Postfix is not installed properly; "
                           "run `sh tests/support/install-mtas.sh` as root")


class PostfixMTA(PrivateMTA):
    """A private Postfix secondary MX.  Use start()/stop() or ``with`` (see mta.py).

    milter: Postfix notation, "unix:/path/guard.sock" or "inet:127.0.0.1:PORT";
        None for no milter.  Several milters: pass a space-separated string.
    relay_domains: domains Postfix is backup MX for (relays them to next_hop).
    next_hop: (host, port) of the primary/sink; mail for relay_domains goes to
        relay:[host]:port.  transports: extra {domain: "relay:[127.0.0.1]:PORT"}.
    mynetworks: trusted client networks (tests connect from other 127.x
        addresses to be "untrusted").
    sasl_users: {"user@realm" or "user": "password"} enables AUTH PLAIN/LOGIN
        (Cyrus SASL, private sasldb) without TLS.
    milter_*_timeout, milter_default_action, milter_macros (dict overriding
        DEFAULT_MILTER_MACROS), main_cf (extra main.cf settings) are passed on.
    listeners: {name: {parameter: value}} adds one more smtpd listener per name,
        on a free port of *host*, with its own ``-o parameter=value`` overrides in
        master.cf (e.g. another smtpd_milters, shorter milter timeouts): one
        instance then serves several milter setups.  ``listener(name)`` gives
        its (host, port).
    """

    NAME = "Postfix"
    DEFAULT_MILTER_MACROS = DEFAULT_MILTER_MACROS

    def __init__(self, milter: str | None = None, *,
                 relay_domains: Sequence[str] = ("example.com",),
                 next_hop: tuple[str, int] | None = None,
                 transports: Mapping[str, str] | None = None,
                 mynetworks: Sequence[str] = ("127.0.0.1/32",),
                 host: str = "127.0.0.1",
                 port: int | None = None,
                 myhostname: str = "mx2.test.example",
                 milter_default_action: str = "accept",
                 milter_connect_timeout: str = "5s",
                 milter_command_timeout: str = "5s",
                 milter_content_timeout: str = "10s",
                 milter_macros: Mapping[str, str] | None = None,
                 sasl_users: Mapping[str, str] | None = None,
                 main_cf: Mapping[str, str] | None = None,
                 listeners: Mapping[str, Mapping[str, str]] | None = None,
                 workdir: str | os.PathLike[str] | None = None,
                 start_timeout: float = 60.0,
                 isolate: bool = True):
        super().__init__(milter, milter_macros=milter_macros, host=host, port=port,
                         workdir=workdir, start_timeout=start_timeout)
        self.relay_domains = list(relay_domains)
        self.next_hop = next_hop
        self.transports = dict(transports or {})
        self.mynetworks = list(mynetworks)
        self.myhostname = myhostname
        self.milter_default_action = milter_default_action
        self.milter_timeouts = (milter_connect_timeout, milter_command_timeout,
                                milter_content_timeout)
        self.sasl_users = dict(sasl_users or {})
        self.extra_main_cf = dict(main_cf or {})
        self.listeners = {name: dict(o) for name, o in (listeners or {}).items()}
        self._listener_ports: dict[str, int] = {}
        self.isolate = isolate
        self._started = False

    # ------------------------------------------------------------ paths
    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "spool"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def running(self) -> bool:
        return self._started

    def listener(self, name: str) -> tuple[str, int]:
        """(host, port) of the extra smtpd listener *name* (see ``listeners``)."""
        if name not in self._listener_ports:
            raise HarnessError(f"{type(self).__name__} has no started listener {name!r}")
        return (self.host, self._listener_ports[name])

    # ------------------------------------------------------------ config
    def main_cf_settings(self) -> dict[str, str]:
        s = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-e2e",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": self.myhostname,
            "mydomain": self.myhostname.partition(".")[2] or "test.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv6" if ":" in self.host else "ipv4",
            "mynetworks": " ".join(self.mynetworks),
            "relay_domains": " ".join(self.relay_domains),
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
                                        "reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_connect_timeout": "5s",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "smtputf8_enable": "no",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            "milter_default_action": self.milter_default_action,
            "milter_connect_timeout": self.milter_timeouts[0],
            "milter_command_timeout": self.milter_timeouts[1],
            "milter_content_timeout": self.milter_timeouts[2],
        }
        s.update(self.milter_macros)
        if self.next_hop:
            h, p = self.next_hop
            s["relay_transport"] = f"relay:[{h}]:{p}"
            s["relayhost"] = f"[{h}]:{p}"  # everything else (e.g. authenticated relaying)
        if self.transports:
            s["transport_maps"] = f"texthash:{self.config_dir / 'transport'}"
        if self.sasl_users:
            s.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": str(self.config_dir / "sasl"),
                "smtpd_sasl_security_options": "noanonymous",
                "smtpd_sasl_local_domain": "",
                "broken_sasl_auth_clients": "no",
            })
        s.update(self.extra_main_cf)
        return s

    def _listen_address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def _write_master_cf(self) -> None:
        """Postfix's shipped master.cf with chroot off, smtp inet on our address, and one more
        smtpd line per extra listener."""
        listen = self._listen_address(self.port)
        out = []
        with open(MASTER_CF_DIST) as f:
            for line in f:
                if not line.strip() or line[0] in "# \t":
                    out.append(line)
                    continue
                fields = line.split()
                if len(fields) < 8:
                    out.append(line)
                    continue
                if fields[1] == "inet":
                    if fields[0] != "smtp":
                        continue  # drop other listeners (submission etc. are commented anyway)
                    fields[0] = listen
                fields[4] = "n"  # chroot
                out.append(" ".join(fields[:7]) + " " + line.split(None, 7)[7])
        for name, overrides in self.listeners.items():
            # "-o { name = value }" (Postfix >= 3.0) keeps values with spaces whole.
            opts = "".join(f"\n  -o {{ {k} = {v} }}" for k, v in overrides.items())
            out.append(f"# listener {name}\n"
                       f"{self._listen_address(self._listener_ports[name])} inet n - n - - "
                       f"smtpd{opts}\n")
        (self.config_dir / "master.cf").write_text("".join(out))

    def _write_sasl(self) -> None:
        require_tool(SASLPASSWD2, "saslpasswd2 (sasl2-bin)")
        sasl_dir = self.config_dir / "sasl"
        sasl_dir.mkdir(exist_ok=True)
        db = self.workdir / "sasldb2"
        (sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            f"sasldb_path: {db}\n"
            "mech_list: PLAIN LOGIN\n")
        for user, password in self.sasl_users.items():
            name, _, realm = user.partition("@")
            cmd = [SASLPASSWD2, "-f", str(db), "-c", "-p", "-u", realm or self.myhostname, name]
            r = subprocess.run(cmd, input=password.encode(), capture_output=True, timeout=30)
            if r.returncode:
                raise HarnessError(f"saslpasswd2 failed: {r.stderr.decode(errors='replace')}")
        shutil.chown(db, "postfix", "postfix")
        os.chmod(db, 0o640)

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        lines = [f"{k} = {v}\n" for k, v in self.main_cf_settings().items()]
        (self.config_dir / "main.cf").write_text("".join(lines))
        self._write_master_cf()
        if self.transports:
            (self.config_dir / "transport").write_text(
                "".join(f"{d} {t}\n" for d, t in self.transports.items()))
        if self.sasl_users:
            self._write_sasl()

    # ------------------------------------------------------------ control
    def _run(self, *args: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [POSTFIX, "-c", str(self.config_dir), *args]
        env = os.environ.copy()
        if self.isolate and args and args[0] == "start":
            prefix, env = isolation(self.workdir)
            cmd = prefix + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
        if check and r.returncode:
            raise HarnessError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}\n"
                               f"{self._diagnostics()}")
        return r

    def postconf(self, *args: str) -> str:
        r = subprocess.run([POSTCONF, "-c", str(self.config_dir), *args], capture_output=True,
                           text=True, timeout=30)
        if r.returncode:
            raise HarnessError(f"postconf {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def set_main(self, reload: bool = True, **settings: str) -> None:
        """Change main.cf settings (e.g. smtpd_milters=...) and reload."""
        self.extra_main_cf.update(settings)
        self.postconf("-e", *[f"{k}={v}" for k, v in settings.items()])
        if reload and self.running:
            self.reload()

    def reload(self) -> None:
        self._run("reload")
        time.sleep(0.5)  # master restarts its children lazily

    def flush(self) -> None:
        """Retry deferred mail now."""
        self._run("flush")

    def queue(self) -> str:
        """`postqueue -p` output for this instance."""
        r = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-p"], capture_output=True,
                           text=True, timeout=30)
        return r.stdout + r.stderr

    def queue_is_empty(self) -> bool:
        return "Mail queue is empty" in self.queue()

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # ------------------------------------------------------------ lifecycle (mta.py)
    def _check_installed(self) -> None:
        check_postfix_tools()

    def _launch(self) -> None:
        self._listener_ports = {name: free_port(self.host) for name in self.listeners}
        self._write_config()
        self._started = True
        self._run("start")
        self._await_greeting(self.port, self.start_timeout, "Postfix")
        for name, port in self._listener_ports.items():
            self._await_greeting(port, 10, f"Postfix listener {name!r}")

    def _shutdown(self) -> None:
        if self._started:
            pid = self.master_pid()
            self._run("stop", check=False, timeout=60)
            if pid:
                try:
                    wait_until(lambda: not _alive(pid), 15, 0.1, "postfix master to exit")
                except TimeoutError:
                    _kill_tree(pid)
            self._started = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL the master and, as it is a session leader, its process group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
