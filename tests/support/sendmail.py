"""A private, throwaway Sendmail daemon acting as a secondary (backup) MX.

Sendmail is not installed through apt (sendmail-bin conflicts with postfix):
tests/support/install-mtas.sh unpacks the Debian packages into <repo>/.mta/sendmail
(override with $MXGUARD_SENDMAIL_ROOT).  The harness builds a sendmail.cf with
m4 from a generated .mc and runs `sendmail -C <cf> -bD` (foreground daemon) as
root, inside fresh mount+UTS namespaces (unshare) where:

* the host name is qualified (mx2.test.example) and resolvable from a private
  /etc/hosts: Sendmail otherwise waits ~60 s trying to qualify it;
* /etc/nsswitch.conf says "hosts: files" and /etc/resolv.conf points to
  127.0.0.1, so nothing can send a DNS query off the machine;
* /dev is a private tmpfs whose /dev/log is a socket the harness reads, so the
  Sendmail log is written to <workdir>/maillog without any syslog daemon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .mta import PrivateMTA
from .smtp import HarnessError, SyslogReceiver, isolation, require_tool, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
SENDMAIL_ROOT_ENV = "MXGUARD_SENDMAIL_ROOT"
M4 = "/usr/bin/m4"

DEFAULT_MILTER_MACROS = {
    "confMILTER_MACROS_CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}, "
                                 "{client_name}, {client_port}, {client_ptr}",
    "confMILTER_MACROS_HELO": "{tls_version}, {cipher}, {cipher_bits}, {cert_subject}, "
                              "{cert_issuer}",
    "confMILTER_MACROS_ENVFROM": "i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, "
                                 "{mail_mailer}, {mail_host}, {mail_addr}",
    "confMILTER_MACROS_ENVRCPT": "{rcpt_mailer}, {rcpt_host}, {rcpt_addr}",
    "confMILTER_MACROS_EOM": "{msg_id}, i",
}


def sendmail_root() -> Path:
    return Path(os.environ.get(SENDMAIL_ROOT_ENV) or REPO_ROOT / ".mta" / "sendmail")


def sendmail_paths() -> tuple[Path, Path]:
    """(sendmail binary, cf directory) of the unpacked tree; HarnessError if absent."""
    root = sendmail_root()
    binary = root / "usr/libexec/sendmail/sendmail"
    cf_dir = root / "usr/share/sendmail/cf"
    require_tool(str(binary), f"Sendmail (unpacked tree {root})")
    if not (cf_dir / "m4" / "cf.m4").is_file():
        raise HarnessError(f"Sendmail cf tree {cf_dir} missing: run "
                           "`sh tests/support/install-mtas.sh` as root")
    require_tool(M4, "m4")
    return binary, cf_dir


def milter_spec(milter: str) -> str:
    """Postfix notation -> Sendmail S= value: "inet:127.0.0.1:99" -> "inet:99@127.0.0.1"."""
    if milter.startswith(("inet:", "inet6:")):
        family, _, rest = milter.partition(":")
        if "@" in rest:
            return milter
        host, _, port = rest.rpartition(":")
        return f"{family}:{port}@{host.strip('[]')}"
    if milter.startswith("/"):
        return "unix:" + milter
    return milter  # unix:/path, local:/path


class SendmailMTA(PrivateMTA):
    """A private Sendmail secondary MX.  Use start()/stop() or ``with`` (see mta.py).

    milter: "unix:/path" or "inet:127.0.0.1:PORT" (Postfix notation is
        converted; "inet:PORT@127.0.0.1" is taken as is); None for no milter.
    milter_flags: F= of INPUT_MAIL_FILTER: "T" tempfails when the milter is
        unavailable, "R" rejects, "" accepts (= Postfix milter_default_action=accept).
    milter_timeouts: T= of INPUT_MAIL_FILTER.
    relay_domains: domains Sendmail is backup MX for (class R); relay_from:
        client IP prefixes allowed to relay anywhere (also class R; Sendmail
        always lets 127.0.0.1 relay).
    next_hop: (host, port) that all non-local mail goes to (SMART_HOST).
    mc_extra: extra lines appended to the .mc before the MAILER lines.
    """

    NAME = "Sendmail"
    DEFAULT_MILTER_MACROS = DEFAULT_MILTER_MACROS

    def __init__(self, milter: str | None = None, *,
                 milter_name: str = "guard",
                 milter_flags: str = "T",
                 milter_timeouts: str = "S:4s;R:4s;E:10s",
                 milter_macros: Mapping[str, str] | None = None,
                 relay_domains: Sequence[str] = ("example.com",),
                 relay_from: Sequence[str] = (),
                 next_hop: tuple[str, int] | None = None,
                 host: str = "127.0.0.1",
                 port: int | None = None,
                 hostname: str = "mx2.test.example",
                 mc_extra: Sequence[str] = (),
                 workdir: str | os.PathLike[str] | None = None,
                 start_timeout: float = 60.0,
                 log_level: int = 14):
        super().__init__(milter, milter_macros=milter_macros, host=host, port=port,
                         workdir=workdir, start_timeout=start_timeout)
        self.milter_name = milter_name
        self.milter_flags = milter_flags
        self.milter_timeouts = milter_timeouts
        self.relay_domains = list(relay_domains)
        self.relay_from = list(relay_from)
        self.next_hop = next_hop
        self.hostname = hostname
        self.mc_extra = list(mc_extra)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self._syslog: SyslogReceiver | None = None

    # ------------------------------------------------------------ paths
    @property
    def cf_path(self) -> Path:
        return self.workdir / "sendmail.cf"

    @property
    def mc_path(self) -> Path:
        return self.workdir / "sendmail.mc"

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "mqueue"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------ config
    def milter_mc_line(self) -> str:
        if not self.milter:
            raise HarnessError("no milter configured")
        parts = [f"S={milter_spec(self.milter)}"]
        if self.milter_flags:
            parts.append(f"F={self.milter_flags}")
        if self.milter_timeouts:
            parts.append(f"T={self.milter_timeouts}")
        return f"INPUT_MAIL_FILTER(`{self.milter_name}', `{', '.join(parts)}')dnl"

    def mc_text(self) -> str:
        w = self.workdir
        family = "inet6" if ":" in self.host else "inet"
        lines = [
            "divert(-1)dnl",
            "# generated by tests/e2e/sendmail.py: a private secondary MX for tests",
            "divert(0)dnl",
            "VERSIONID(`mx-guard e2e')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            f"define(`confPID_FILE', `{w}/sendmail.pid')dnl",
            f"define(`QUEUE_DIR', `{self.queue_dir}')dnl",
            f"define(`confSTATUS_FILE', `{w}/statistics')dnl",
            f"define(`ALIAS_FILE', `{w}/aliases')dnl",
            f"define(`confHELP_FILE', `{w}/helpfile')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{w}/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{w}/isolate/hosts')dnl",
            f"define(`confLOG_LEVEL', `{self.log_level}')dnl",
            "define(`confMILTER_LOG_LEVEL', `6')dnl",
            "define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confTO_CONNECT', `5s')dnl",
            "define(`confTO_INITIAL', `5s')dnl",
            "define(`confTO_ICONNECT', `5s')dnl",
            "define(`confDELIVERY_MODE', `background')dnl",
            "define(`confQUEUE_LA', `100')dnl",
            "define(`confREFUSE_LA', `100')dnl",
            "define(`confDELAY_LA', `100')dnl",
            "define(`confMIN_QUEUE_AGE', `0')dnl",
            "define(`confCONNECTION_RATE_THROTTLE', `0')dnl",
            "define(`confMAX_DAEMON_CHILDREN', `0')dnl",
            "define(`confPRIVACY_FLAGS', `authwarnings,noexpn,novrfy')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            "define(`confSMTP_LOGIN_MSG', `$j ESMTP')dnl",
        ]
        if self.next_hop:
            h, p = self.next_hop
            lines += [f"define(`SMART_HOST', `relay:[{h}]')dnl",
                      f"define(`RELAY_MAILER_ARGS', `TCP $h {p}')dnl",
                      f"define(`ESMTP_MAILER_ARGS', `TCP $h {p}')dnl"]
        for name, value in self.milter_macros.items():
            lines.append(f"define(`{name}', `{value}')dnl")
        lines += [
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`accept_unqualified_senders')dnl",
            # M=A: no AUTH, M=S: no STARTTLS (neither is configured here)
            f"DAEMON_OPTIONS(`Family={family}, Addr={self.host}, Port={self.port}, Name=MTA, "
            "M=AS')dnl",
        ]
        lines += [f"RELAY_DOMAIN(`{d}')dnl" for d in self.relay_domains + self.relay_from]
        if self.milter:
            lines.append(self.milter_mc_line())
        lines += list(self.mc_extra)
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl", ""]
        return "\n".join(lines)

    def _write_config(self, cf_dir: Path) -> None:
        w = self.workdir
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.queue_dir, 0o700)
        (w / "aliases").write_text("postmaster: root\n")
        (w / "helpfile").write_text("")
        (w / "service.switch").write_text("hosts files\naliases files\n")
        self.mc_path.write_text(self.mc_text())
        r = subprocess.run([M4, f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"),
                            str(self.mc_path)], capture_output=True, text=True, timeout=60)
        if r.returncode or "ERROR" in r.stderr:
            raise HarnessError(f"m4 failed building {self.cf_path}:\n{r.stderr}")
        self.cf_path.write_text(r.stdout)
        os.chmod(self.cf_path, 0o644)

    # ------------------------------------------------------------ control
    def queue_files(self) -> list[str]:
        return sorted(p.name for p in self.queue_dir.iterdir()) if self._workdir else []

    # ------------------------------------------------------------ lifecycle (mta.py)
    def _check_installed(self) -> None:
        sendmail_paths()

    def _launch(self) -> None:
        binary, cf_dir = sendmail_paths()
        self._syslog = SyslogReceiver(self.workdir / "log.sock", self.log_path).start()
        prefix, env = isolation(self.workdir, hostname=self.hostname,
                                log_socket=str(self.workdir / "log.sock"))
        self._write_config(cf_dir)
        cmd = [*prefix, str(binary), "-C", str(self.cf_path), "-bD", "-q30s"]
        with open(self.workdir / "sendmail.out", "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(self.workdir),
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._await_greeting(self.port, self.start_timeout, "Sendmail")

    def _exited(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"sendmail exited with {self.proc.returncode}"
        return None

    def _diagnostics(self) -> str:
        return (f"--- sendmail stdout/stderr ---\n{tail(self.workdir / 'sendmail.out')}\n"
                f"--- maillog ---\n{tail(self.log_path)}")

    def _shutdown(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            # delivery children forked by the daemon live in its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(5)
        if self._syslog:
            self._syslog.stop()
            self._syslog = None
