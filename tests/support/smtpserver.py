"""A tiny threaded SMTP server on loopback, for every test that needs one.

* ``SmtpServer`` - greets, answers EHLO/HELO/NOOP/RSET/QUIT, takes MAIL/RCPT/DATA
  (or answers them ``mail_reply`` when ``accept_mail`` is false), and records
  ``connections``, ``commands`` and ``messages``; ``ehlo_reply`` and ``rcpt_reply``
  refuse chosen names; start()/stop() may be called repeatedly on the same port.
* ``SmtpSink`` - accepts and records every message (the e2e MTAs' next hop).
* ``free_port``.

The fake primary MX (tests/fakeprimary.py) is an SmtpServer too.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

Address = tuple[Any, ...]  # a socket address: (host, port) or (host, port, flow, scope)

LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on *host* right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    helo: str
    peer: Address
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def header(self, name: str) -> str | None:
        value = self.message.get(name)
        return None if value is None else str(value)

    def headers(self, name: str) -> list[str]:
        return [str(v) for v in self.message.get_all(name) or []]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8", "replace") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        owner = self.server.owner
        owner._note_connection(self.client_address)
        if not owner._greet(self.wfile.write):
            return
        helo, mail_from, rcpts = "", None, []  # type: str, str | None, list[str]
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            owner._note_command(line)
            if verb == "EHLO" and owner.ehlo_reply and (refusal := owner.ehlo_reply(arg)):
                self.reply(refusal)
            elif verb == "EHLO":
                helo = arg
                lines = [owner.hostname, *owner.ehlo_keywords]
                for i, text in enumerate(lines):
                    sep = " " if i == len(lines) - 1 else "-"
                    self.reply(f"250{sep}{text}")
            elif verb == "HELO":
                helo = arg
                self.reply(f"250 {owner.hostname}")
            elif verb in ("NOOP", "RSET"):
                if verb == "RSET":
                    mail_from, rcpts = None, []
                self.reply("250 2.0.0 OK")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            elif not owner.accept_mail:
                self.reply(owner.mail_reply)
            elif verb == "MAIL":
                mail_from, rcpts = _path(arg), []
                self.reply("250 2.1.0 OK")
            elif verb == "RCPT":
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                rcpt = _path(arg)
                code = owner.rcpt_reply(rcpt) if owner.rcpt_reply else None
                if code:
                    self.reply(code)
                else:
                    rcpts.append(rcpt)
                    self.reply("250 2.1.5 OK")
            elif verb == "DATA":
                if not rcpts:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                chunks = []
                while True:
                    raw = self.rfile.readline(1 << 20)
                    if not raw:
                        return
                    if raw in (b".\r\n", b".\n"):
                        break
                    if raw.startswith(b".."):
                        raw = raw[1:]
                    chunks.append(raw)
                data = b"".join(chunks)
                owner._store(ReceivedMessage(mail_from or "", list(rcpts), data, helo,
                                             self.client_address))
                self.reply("250 2.0.0 Ok: queued")
                mail_from, rcpts = None, []
            else:
                self.reply("502 5.5.2 Command not implemented")


def _path(arg: str) -> str:
    # "FROM:<a@b> SIZE=10" -> "a@b"
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1:rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: SmtpServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class SmtpServer:
    """A tiny threaded SMTP server; see SmtpSink and tests/fakeprimary.py."""

    accept_mail = True
    mail_reply = "451 4.3.0 Not accepting mail"

    def __init__(self, port: int = 0, host: str = LOCALHOST, *,
                 hostname: str = "sink.test.example",
                 greeting: str | None = None,
                 greeting_delay: float = 0.0,
                 rcpt_reply: Callable[[str], str | None] | None = None,
                 ehlo_reply: Callable[[str], str | None] | None = None):
        self.host = host
        self.port = port
        self.hostname = hostname
        self.greeting = greeting or f"220 {hostname} ESMTP test server"
        self.greeting_delay = greeting_delay
        self.rcpt_reply = rcpt_reply  # rcpt -> "550 ..." to refuse, None to accept
        # EHLO name -> "554 ..." to refuse that client, None to answer 250; may be
        # replaced while the server runs (a primary that one prober cannot use).
        self.ehlo_reply = ehlo_reply
        self.ehlo_keywords: list[str] = ["PIPELINING", "8BITMIME", "SIZE 52428800"]
        self.messages: list[ReceivedMessage] = []
        self.connections: list[Address] = []   # client addresses, in order
        self.commands: list[str] = []      # every command line received
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle
    def start(self) -> Self:
        if self._server is not None:
            return self
        cls = _Server6 if ":" in self.host else _Server
        deadline = time.monotonic() + 5
        while True:  # the port may be in TIME_WAIT/closing right after a stop()
            try:
                server = cls((self.host, self.port), _Handler)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        server.owner = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"smtp-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread:
            self._thread.join(5)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the session
    def _greet(self, write: Callable[[bytes], object]) -> bool:
        """Send the greeting (after greeting_delay); True if the session goes on."""
        if self.greeting_delay:
            time.sleep(self.greeting_delay)
        write(self.greeting.encode("utf-8", "replace") + b"\r\n")
        return self.greeting.startswith("220")

    # --- recording
    def _note_connection(self, peer: Address) -> None:
        with self._cond:
            self.connections.append(peer)
            self._cond.notify_all()

    def _note_command(self, line: str) -> None:
        with self._cond:
            self.commands.append(line)

    def _store(self, msg: ReceivedMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.connections.clear()
            self.commands.clear()

    def wait_for_message(self, rcpt: str | None = None, timeout: float = 10.0,
                         predicate: Callable[[ReceivedMessage], bool] | None = None
                         ) -> ReceivedMessage:
        """Wait for a delivered message (for *rcpt*, and/or matching *predicate*)."""
        def match(m: ReceivedMessage) -> bool:
            if rcpt is not None and rcpt.lower() not in (r.lower() for r in m.rcpt_tos):
                return False
            return predicate(m) if predicate else True

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if match(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(m.mail_from, m.rcpt_tos) for m in self.messages]
                    raise TimeoutError(f"no message for {rcpt!r} at {self.host}:{self.port} "
                                       f"within {timeout:.1f}s; received: {got}")
                self._cond.wait(left)

    def wait_for_connections(self, count: int = 1, timeout: float = 10.0) -> list[Address]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.connections) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.connections)} connection(s) to "
                                       f"{self.host}:{self.port}, wanted {count}")
                self._cond.wait(left)
            return list(self.connections)

    def messages_for(self, rcpt: str) -> list[ReceivedMessage]:
        with self._cond:
            return [m for m in self.messages if rcpt.lower() in (r.lower() for r in m.rcpt_tos)]


class SmtpSink(SmtpServer):
    """Accepts and records every message (the MTA's next hop)."""

