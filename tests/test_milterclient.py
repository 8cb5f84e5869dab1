"""Tests for tests/support/milterclient.py against a real pymilter milter in a subprocess.

The probe milter below is written to tmp at test time and listens on a Unix socket and on
a free 127.0.0.1 port. It reports what it saw through headers it adds at end of message,
so the tests check both directions of the wire.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.milterclient import (
    CHUNK_SIZE,
    SMFIP_NR_MAIL,
    SMFIP_SKIP,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    EomResult,
    InsertHeader,
    MilterClient,
    MilterClosed,
    MilterConnectError,
    MilterTimeout,
    Quarantine,
)

PROBE_MILTER = r'''
import sys
import time

import Milter


def show(text):
    # Printable ASCII: libmilter refuses surrogates and pymilter would tempfail.
    return ascii(text)[1:-1]


class Probe(Milter.Base):
    def __init__(self):
        self.client = self.sender = self.auth = ""
        self.headers = []
        self.chunks = self.size = 0

    def connect(self, hostname, family, hostaddr):
        self.client = f"{hostname} {hostaddr!r}"
        return Milter.CONTINUE

    # hello, data and eoh are not overridden: Milter.Base asks the MTA to skip them.

    def negotiate(self, opts):
        # Not @Milter.symlist: pymilter 1.0.5's setsymlist passes bytes where its C
        # module wants str, fails, and the whole negotiation falls back to defaults.
        self._ctx.setsymlist(Milter.M_ENVFROM, "{auth_authen}")
        return super().negotiate(opts)

    @Milter.noreply
    def envfrom(self, mailfrom, *args):
        self.sender = " ".join((mailfrom, *args))
        self.auth = str(self.getsymval("{auth_authen}"))
        self.headers, self.chunks, self.size = [], 0, 0
        return Milter.CONTINUE

    def envrcpt(self, to, *args):
        local = to.strip("<>").split("@")[0]
        if local == "tempfail":
            self.setreply("451", "4.7.1", "Please try again later")
            return Milter.TEMPFAIL
        if local == "reject":
            self.setreply("550", "5.7.1", "No such user")
            return Milter.REJECT
        return {"busy": Milter.TEMPFAIL, "discard": Milter.DISCARD,
                "accept": Milter.ACCEPT}.get(local, Milter.CONTINUE)

    def header(self, name, value):
        self.headers.append((name, value if len(value) < 200 else f"<{len(value)} chars>"))
        return Milter.CONTINUE

    def body(self, chunk):
        self.chunks += 1
        self.size += len(chunk)
        return Milter.SKIP if len(chunk) >= 65535 else Milter.CONTINUE

    def eom(self):
        subject = dict(self.headers).get("Subject", "")
        if subject == "slow":
            self.progress()
            time.sleep(0.2)
        self.addheader("X-Probe-Client", self.client)
        self.addheader("X-Probe-From", show(self.sender))
        self.addheader("X-Probe-Auth", self.auth)
        self.addheader("X-Probe-Queue", str(self.getsymval("i")))
        self.addheader("X-Probe-Headers", ascii(self.headers))
        self.addheader("X-Probe-Body", f"{self.chunks} {self.size}")
        self.addheader("X-Inserted", "top", 0)
        self.chgheader("X-Spam-Flag", 1, "")
        if subject == "rewrite":
            self.addrcpt("<copy@example.org>")
            self.delrcpt("<user@example.org>")
            self.chgfrom("<bounce@example.org>")
            self.replacebody(b"new body\r\n")
            self.quarantine("held for review")
        return Milter.ACCEPT


Milter.factory = Probe
Milter.runmilter("probe", sys.argv[1], 10)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_milter(workdir: Path, address: str) -> Iterator[str]:
    script = workdir / "probe_milter.py"
    script.write_text(PROBE_MILTER)
    log_path = workdir / "milter.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), address],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                MilterClient(address, timeout=1).close()
                break
            except MilterConnectError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"probe milter did not start: "
                                       f"{log_path.read_text()}") from None
                time.sleep(0.02)
        yield address
    finally:
        # libmilter takes ~5 s to honour SIGTERM (it polls); this milter holds no state.
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def unix_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("unix")
    yield from _run_milter(workdir, f"unix:{workdir / 'probe.sock'}")


@pytest.fixture(scope="module")
def inet_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _run_milter(tmp_path_factory.mktemp("inet"), f"inet:{_free_port()}@127.0.0.1")


def _added(result: EomResult) -> dict[str, str]:
    return {m.name: m.value for m in result.modifications if isinstance(m, AddHeader)}


def test_negotiation_reports_skips_noreply_and_macros(unix_milter: str) -> None:
    with MilterClient(unix_milter) as client:
        neg = client.negotiate()
    assert neg.version == 6
    assert [s for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body")
            if neg.skips(s)] == ["helo", "data", "eoh"]
    assert neg.no_reply("mail") and neg.protocol & SMFIP_NR_MAIL
    assert not neg.no_reply("rcpt")
    assert neg.protocol & SMFIP_SKIP
    assert neg.macros == {"mail": ("{auth_authen}",)}


def test_step_by_step_over_unix_socket(unix_milter: str) -> None:
    with MilterClient(unix_milter, timeout=2) as client:
        reply = client.connect("mx.example.net", "192.0.2.7", 2525,
                               macros={"j": "mx.test", "{daemon_name}": "smtpd"})
        assert (reply.command, reply.name) == ("c", "continue")
        assert client.helo("helo.example.net").name == "skipped"
        mail = client.mail("<a@example.org>", "SIZE=100", macros={"{auth_authen}": "alice"})
        assert (mail.command, mail.name) == ("", "noreply")
        tempfail = client.rcpt("<tempfail@example.org>")
        assert (tempfail.command, tempfail.name) == ("y", "replycode")
        assert tempfail.text == "451 4.7.1 Please try again later"
        assert tempfail.code == "451" and tempfail.is_tempfail and not tempfail.is_reject
        assert client.rcpt("<busy@example.org>").name == "tempfail"
        reject = client.rcpt("<reject@example.org>")
        assert reject.text == "550 5.7.1 No such user" and reject.is_reject
        assert client.rcpt("<user@example.org>").name == "continue"
        assert client.data().name == "skipped"
        assert client.header("Subject", "hello").name == "continue"
        assert client.header("X-Spam-Flag", "YES").name == "continue"
        assert client.eoh().name == "skipped"
        assert client.body(b"Hi.\r\n").name == "continue"
        result = client.eom(macros={"i": "4ABCD"})
        client.quit()
        assert client.closed
    assert (result.reply.command, result.name) == ("a", "accept")
    added = _added(result)
    assert added["X-Probe-Client"] == "mx.example.net ('192.0.2.7', 2525)"
    assert added["X-Probe-From"] == "<a@example.org> SIZE=100"
    assert added["X-Probe-Auth"] == "alice"
    assert added["X-Probe-Queue"] == "4ABCD"
    assert added["X-Probe-Body"] == "1 5"
    assert InsertHeader(0, "X-Inserted", "top") in result.modifications
    deletion = ChangeHeader(1, "X-Spam-Flag", "")
    assert deletion in result.modifications and deletion.deletes
    for reply in (reject, tempfail, result.reply):
        assert 0 <= reply.elapsed < 1


def test_send_message_over_inet_with_all_modifications(inet_milter: str) -> None:
    port = int(inet_milter.split(":")[1].split("@")[0])
    with MilterClient(("127.0.0.1", port), timeout=2) as client:
        tx = client.send_message(
            "a@example.org", ["reject@example.org", "user@example.org"],
            [("Subject", "rewrite")], b"old body\r\n", client_address="2001:db8::5",
            macros={"eom": {"i": "Q1"}}, quit=True)
    assert tx.outcome == "accept" and tx.accepted_recipients == ["user@example.org"]
    assert [name for name, _ in tx.steps] == ["connect", "helo", "mail", "rcpt", "rcpt",
                                              "data", "header", "eoh", "body", "eom"]
    assert tx.reply("rcpt").is_reject
    assert tx.eom is not None
    mods = tx.eom.modifications
    assert "2001:db8::5" in _added(tx.eom)["X-Probe-Client"]
    assert AddRecipient("<copy@example.org>") in mods
    assert DeleteRecipient("<user@example.org>") in mods
    assert ChangeFrom("<bounce@example.org>") in mods
    assert Quarantine("held for review") in mods
    assert tx.eom.new_body == b"new body\r\n"


def test_send_message_stops_like_an_mta(unix_milter: str) -> None:
    with MilterClient(unix_milter, timeout=2) as client:
        # No recipient left: abort, and the session stays usable for the next message.
        tx = client.send_message("a@example.org", ["busy@example.org"])
        assert tx.outcome == "tempfail" and tx.eom is None
        assert client.send_message("a@example.org", ["discard@example.org"]).outcome \
            == "discard"
        tx = client.send_message("a@example.org", ["accept@example.org"])
        assert tx.outcome == "accept" and tx.eom is None
        tx = client.send_message("b@example.org", ["user@example.org"],
                                 [("Subject", "slow")], b"x")
        assert [name for name, _ in tx.steps] == ["mail", "rcpt", "data", "header", "eoh",
                                                  "body", "eom"]
        assert tx.final.progress == 1 and tx.final.elapsed >= 0.2


def test_hostile_bytes_and_big_values(unix_milter: str) -> None:
    with MilterClient(unix_milter, timeout=2) as client:
        client.connect("h", None)  # family 'U': no address at all
        client.mail(b"<\xff\xfe@example.org>\r\nRCPT TO:<x>")
        client.rcpt("<user@example.org>")
        client.header("X-Crlf", "a\r\nb")
        client.header("X-Nul", b"before\0after")
        client.header(b"X-Bin", b"\xff\xfe")
        client.header("X-Big", "v" * 60_000)
        # 200 KB of body: chunked, and the milter's 's' after the first chunk stops it.
        skip = client.body(b"x" * 200_000)
        assert (skip.command, skip.name) == ("s", "skip")
        added = _added(client.eom())
        assert added["X-Probe-Client"] == "h None"
        assert added["X-Probe-From"] == r"<\udcff\udcfe@example.org>\r\nRCPT TO:<x>"
        assert added["X-Probe-Headers"] == ascii(
            [("X-Crlf", "a\r\nb"), ("X-Nul", "before"), ("X-Bin", "\udcff\udcfe"),
             ("X-Big", "<60000 chars>")])
        assert added["X-Probe-Body"] == f"1 {CHUNK_SIZE}"
        # Over libmilter's 64 KB packet limit the milter drops the connection.
        started = time.monotonic()
        with pytest.raises(MilterClosed):
            client.header("X-Huge", "v" * 65_536)
        assert time.monotonic() - started < 1


@pytest.mark.parametrize("form", ["unix", "path", "inet", "tuple", "host_port"])
def test_address_forms(form: str, unix_milter: str, inet_milter: str) -> None:
    path = unix_milter.removeprefix("unix:")
    port = int(inet_milter.split(":")[1].split("@")[0])
    client = {"unix": lambda: MilterClient(unix_milter),
              "path": lambda: MilterClient(path),
              "inet": lambda: MilterClient(inet_milter),
              "tuple": lambda: MilterClient(("127.0.0.1", port)),
              "host_port": lambda: MilterClient("127.0.0.1", port)}[form]()
    with client:
        assert client.negotiate().version == 6


def test_errors_are_clear_and_fast() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        # A server that accepts and never answers, then one that hangs up at once.
        with MilterClient("127.0.0.1", port, timeout=0.2) as client:
            accepted.append(server.accept()[0])
            started = time.monotonic()
            with pytest.raises(MilterTimeout, match="negotiate"):
                client.negotiate()
            assert time.monotonic() - started < 1
        with MilterClient("127.0.0.1", port, timeout=0.2) as client:
            hang_up = threading.Thread(target=lambda: server.accept()[0].close())
            hang_up.start()
            hang_up.join()
            with pytest.raises(MilterClosed):
                client.negotiate()
        for conn in accepted:
            conn.close()
    with pytest.raises(MilterConnectError):
        MilterClient("127.0.0.1", port, timeout=0.2)
