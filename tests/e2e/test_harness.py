"""Proves the e2e harness: real Postfix/Sendmail + a trivial pymilter milter.

The milter tempfails RCPT TO:<blocked@example.com> with 451 4.7.1 and adds an
X-Test-Milter header at end of message carrying the macros it saw
({client_addr} at connect, {auth_authen} at MAIL FROM, i at EOM).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.fakeprimary import FakePrimary
from tests.support.guardproc import ROOT
from tests.support.postfix import PostfixMTA, check_postfix_tools
from tests.support.sendmail import SendmailMTA
from tests.support.smtp import MilterProcess, send
from tests.support.smtpserver import ReceivedMessage, SmtpSink, free_port

from .scenarios import require_harness

# the factory fixtures of conftest.py
PostfixFactory = Callable[..., PostfixMTA]
SendmailFactory = Callable[..., SendmailMTA]
FakeMXFactory = Callable[..., FakePrimary]
MilterFactory = Callable[..., MilterProcess]

BLOCKED = "blocked@example.com"
GOOD = "good@example.com"
SENDER = "someone@sender.example"

MILTER_SCRIPT = r'''
import os
import sys

import Milter

BLOCKED = "blocked@example.com"


class TestMilter(Milter.Base):
    def __init__(self):
        self.client_addr = None
        self.auth = None

    def connect(self, hostname, family, hostaddr):
        self.client_addr = self.getsymval("{client_addr}")
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.auth = self.getsymval("{auth_authen}")
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        if to.strip("<>").lower() == BLOCKED:
            self.setreply("451", "4.7.1", "Greylisted by test milter")
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def eom(self):
        qid = self.getsymval("i")
        self.addheader("X-Test-Milter",
                       f"client={self.client_addr}; auth={self.auth}; qid={qid}")
        return Milter.ACCEPT


if __name__ == "__main__":
    socket = sys.argv[1]
    os.umask(0)  # the socket must be writable by Postfix's smtpd (user postfix)
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS)
    print("test milter listening on", socket, flush=True)
    Milter.runmilter("testmilter", socket, timeout=30)
'''


def milter_socket(kind: str, socket_dir: Path) -> str:
    if kind == "unix":
        return f"unix:{socket_dir}/test.sock"
    return f"inet:127.0.0.1:{free_port()}"


def check_milter_effects(mta: PostfixMTA | SendmailMTA, sink: SmtpSink, *,
                         source: str = "127.0.0.2", auth: tuple[str, str] | None = None,
                         expect_auth: str | None = None) -> ReceivedMessage:
    """451 at RCPT for BLOCKED; delivery to GOOD with the milter's header."""
    result = send(mta.host, mta.port, SENDER, [BLOCKED, GOOD], source=source, auth=auth)
    code, text = result.rcpts[BLOCKED]
    assert code == 451, result
    assert "4.7.1" in text and "Greylisted by test milter" in text, result
    assert result.code(GOOD) == 250, result
    assert result.data and result.data[0] == 250, result

    msg = sink.wait_for_message(GOOD, timeout=10)
    assert BLOCKED not in msg.rcpt_tos
    header = msg.header("X-Test-Milter")
    assert header, msg.data.decode(errors="replace")
    assert f"client={source}" in header, header
    assert f"auth={expect_auth}" in header, header
    # the queue id macro "i" reaches the milter at end of message
    qid = re.search(r"qid=(\S+)", header)
    assert qid and qid.group(1) not in ("None", ""), header
    return msg


@pytest.mark.parametrize("kind", ["unix", "inet"])
def test_postfix_milter(kind: str, postfix_mta: PostfixFactory, milter_process: MilterFactory,
                        sink: SmtpSink, socket_dir: Path) -> None:
    t0 = time.monotonic()
    sock = milter_socket(kind, socket_dir)
    milter = milter_process(MILTER_SCRIPT, sock)
    pf = postfix_mta(sock, relay_domains=["example.com"], mynetworks=["127.0.0.1/32"])

    check_milter_effects(pf, sink)

    # A dead milter must not stop mail: milter_default_action = accept.
    milter.kill()
    sink.clear()
    result = send(pf.host, pf.port, SENDER, [BLOCKED, GOOD], source="127.0.0.3")
    assert result.code(BLOCKED) == 250 and result.code(GOOD) == 250, result
    assert result.data and result.data[0] == 250, result
    msg = sink.wait_for_message(GOOD, timeout=10)
    assert msg.header("X-Test-Milter") is None
    assert "connect to Milter service" in pf.log_text()
    assert time.monotonic() - t0 < 15


def test_postfix_untrusted_client_cannot_relay(postfix_mta: PostfixFactory, sink: SmtpSink) -> None:
    pf = postfix_mta(None, relay_domains=["example.com"], mynetworks=["127.0.0.1/32"])
    # from 127.0.0.2 (not in mynetworks): only the backup-MX domains are accepted
    r = send(pf.host, pf.port, SENDER, ["x@elsewhere.example", GOOD], source="127.0.0.2")
    assert r.code("x@elsewhere.example") == 554, r
    assert r.code(GOOD) == 250, r
    # from 127.0.0.1 (trusted): relaying elsewhere is allowed (relayhost = the sink)
    r = send(pf.host, pf.port, SENDER, ["x@elsewhere.example"], source="127.0.0.1")
    assert r.code("x@elsewhere.example") == 250, r
    sink.wait_for_message("x@elsewhere.example")


def test_postfix_sasl_auth_reaches_milter(postfix_mta: PostfixFactory,
                                          milter_process: MilterFactory, sink: SmtpSink,
                                          socket_dir: Path) -> None:
    sock = milter_socket("unix", socket_dir)
    milter_process(MILTER_SCRIPT, sock)
    pf = postfix_mta(sock, sasl_users={"alice@example.com": "s3cret"})
    check_milter_effects(pf, sink, auth=("alice@example.com", "s3cret"),
                         expect_auth="alice@example.com")
    # authenticated clients may relay anywhere
    r = send(pf.host, pf.port, SENDER, ["x@elsewhere.example"], source="127.0.0.2",
             auth=("alice@example.com", "s3cret"))
    assert r.code("x@elsewhere.example") == 250, r
    assert "sasl_username=alice@example.com" in pf.log_text()


@pytest.mark.parametrize("kind", ["unix", "inet"])
def test_sendmail_milter(kind: str, sendmail_mta: SendmailFactory,
                         milter_process: MilterFactory, sink: SmtpSink,
                         socket_dir: Path) -> None:
    t0 = time.monotonic()
    sock = milter_socket(kind, socket_dir)
    milter = milter_process(MILTER_SCRIPT, sock)
    sm = sendmail_mta(sock, relay_domains=["example.com"])

    check_milter_effects(sm, sink)
    assert "Milter: to=<blocked@example.com>, reject=451 4.7.1" in sm.log_text()

    # F=T: with the milter gone Sendmail tempfails instead of accepting unfiltered.
    milter.kill()
    r = send(sm.host, sm.port, SENDER, [GOOD], source="127.0.0.3")
    assert r.mail[0] == 451 or r.code(GOOD) == 451, r
    assert time.monotonic() - t0 < 15


def test_sendmail_without_flags_accepts_when_milter_dead(sendmail_mta: SendmailFactory,
                                                        sink: SmtpSink,
                                                        socket_dir: Path) -> None:
    sm = sendmail_mta(f"unix:{socket_dir}/nothing-here.sock", milter_flags="")
    r = send(sm.host, sm.port, SENDER, [GOOD], source="127.0.0.2")
    assert r.code(GOOD) == 250 and r.data and r.data[0] == 250, r
    sink.wait_for_message(GOOD)


def test_fake_primary_mx_start_stop(fake_primary_mx: FakeMXFactory) -> None:
    port = free_port()
    mx = fake_primary_mx(port)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test.example", timeout=5) as c:
        code, _ = c.ehlo()
        assert code == 250
        code, _ = c.noop()
        assert code == 250
    mx.stop()
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", port, timeout=2)
    mx.start()
    assert mx.port == port
    with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test.example", timeout=5) as c:
        assert c.ehlo()[0] == 250
    assert len(mx.connections) == 2


CUSTOMISED_MASTER_CHILD = r'''
import sys
from pathlib import Path

from tests.support.postfix import PostfixMTA
from tests.support.smtp import send
from tests.support.smtpserver import SmtpSink

marker = sys.argv[1]
assert marker in Path("/etc/postfix/master.cf").read_text(), "the bind mount did not apply"
with SmtpSink() as sink, PostfixMTA(None, next_hop=(sink.host, sink.port)) as pf:
    assert marker not in (pf.config_dir / "master.cf").read_text()
    r = send(pf.host, pf.port, "someone@sender.example", ["good@example.com"],
             source="127.0.0.2")
    assert r.code("good@example.com") == 250, r
    sink.wait_for_message("good@example.com", timeout=20)
print("relayed")
'''


def test_postfix_harness_ignores_a_customised_system_master_cf(tmp_path: Path) -> None:
    """A real MX has its own master.cf (here: smtp inet commented out, as on a host that
    listens through postscreen); the harness must not inherit it.  The custom file is
    bind-mounted over /etc/postfix/master.cf in a private mount namespace only."""
    require_harness(check_postfix_tools)
    system = Path("/etc/postfix/master.cf")
    before = system.read_bytes()
    marker = "# customised by the harness test"
    custom = tmp_path / "master.cf"
    lines = [("#" + line if re.match(r"smtp\s+inet\s", line) else line)
             for line in before.decode().splitlines(keepends=True)]
    custom.write_text(marker + "\n" + "".join(lines)
                      + "2525 inet n - y - - smtpd\n")  # a listener the harness must drop
    script = tmp_path / "child.py"
    script.write_text(CUSTOMISED_MASTER_CHILD)
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed: sh tests/support/install-test-deps.sh"
    r = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c",
         'mount --bind "$1" /etc/postfix/master.cf && exec "$2" "$3" "$4"', "sh",
         str(custom), sys.executable, str(script), marker],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "relayed" in r.stdout, r.stdout + r.stderr
    assert system.read_bytes() == before  # the host's file was never touched
