"""A lean MTA side of the milter protocol for load: whole sessions, as fast as it can.

``tests/support/milterclient.py`` checks every byte for the tests; this one only
drives a milter as Postfix would (one connection per SMTP session: negotiate, connect,
HELO, MAIL, RCPT, DATA, headers, end of headers, body, end of message, quit) and
counts sessions, so the milter's cost and not the client's is what is measured. Each
session's packets are built once; steps the milter asked to skip are not sent, steps
it marked no-reply are sent without waiting, as the MTA does.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.support.milterclient import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    PROTOCOL_VERSION,
    SMFIP_NOBODY,
    SMFIP_NOCONNECT,
    SMFIP_NODATA,
    SMFIP_NOEOH,
    SMFIP_NOHDRS,
    SMFIP_NOHELO,
    SMFIP_NOMAIL,
    SMFIP_NORCPT,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_DATA,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
)

MODIFICATIONS = frozenset(b"him+2-beq")
PROGRESS = ord("p")

# A typical message's headers; the guard's callback runs once per header.
HEADERS = (
    ("Received", "from client.example (client.example [203.0.113.7]) by mx2.example.org"),
    ("Date", "Wed, 02 Dec 2026 10:00:00 +0000"),
    ("From", "Alice <a@client.example>"),
    ("To", "<user@flagged.example>"),
    ("Subject", "load test"),
    ("Message-ID", "<load.1@client.example>"),
    ("MIME-Version", "1.0"),
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Transfer-Encoding", "7bit"),
    ("X-Mailer", "milterload"),
)
BODY = b"Hello.\r\n" * 20


def _packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _macros(step: bytes, pairs: dict[str, str]) -> bytes:
    return _packet(b"D", step + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                          for k, v in pairs.items()))


@dataclass(frozen=True)
class Session:
    """One SMTP session as milter packets: who connects and whom they write to."""

    client: str
    recipient: str = "<user@flagged.example>"
    sender: str = "<a@client.example>"

    def steps(self) -> list[tuple[int, int, bytes]]:
        """(skip flag, no-reply flag, bytes) per step, macros included."""
        family = b"6" if ":" in self.client else b"4"
        connect = (b"client.example\0" + family + struct.pack(">H", 40000)
                   + self.client.encode() + b"\0")
        steps = [
            (SMFIP_NOCONNECT, SMFIP_NR_CONN,
             _macros(b"C", {"j": "mx2.example.org", "{client_addr}": self.client})
             + _packet(b"C", connect)),
            (SMFIP_NOHELO, SMFIP_NR_HELO, _packet(b"H", b"client.example\0")),
            (SMFIP_NOMAIL, SMFIP_NR_MAIL, _packet(b"M", self.sender.encode() + b"\0")),
            (SMFIP_NORCPT, SMFIP_NR_RCPT,
             _macros(b"R", {"i": "4ABCDEF"}) + _packet(b"R", self.recipient.encode() + b"\0")),
            (SMFIP_NODATA, SMFIP_NR_DATA, _packet(b"T")),
        ]
        steps += [(SMFIP_NOHDRS, SMFIP_NR_HDR,
                   _packet(b"L", name.encode() + b"\0" + value.encode() + b"\0"))
                  for name, value in HEADERS]
        steps += [(SMFIP_NOEOH, SMFIP_NR_EOH, _packet(b"N")),
                  (SMFIP_NOBODY, SMFIP_NR_BODY, _packet(b"B", BODY))]
        return steps


class _Conn:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)

    def read(self) -> int:
        """The next packet's command byte (its data is read and dropped)."""
        head = self._exact(5)
        (size,) = struct.unpack(">I", head[:4])
        if size > 1:
            self._exact(size - 1)
        return head[4]

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("milter closed the connection")
            data += chunk
        return data


NEGOTIATE = _packet(b"O", struct.pack(">III", PROTOCOL_VERSION, ALL_ACTIONS, ALL_PROTOCOL))
EOM = _macros(b"E", {"i": "4ABCDEF"}) + _packet(b"E")
QUIT = _packet(b"Q")


def run_session(address: str, steps: Sequence[tuple[int, int, bytes]]) -> int:
    """One whole session; returns how many header changes the milter sent."""
    conn = _Conn(address)
    try:
        conn.sock.sendall(NEGOTIATE)
        head = conn._exact(5)
        (size,) = struct.unpack(">I", head[:4])
        body = conn._exact(size - 1)
        protocol = struct.unpack(">III", body[:12])[2]
        pending = b""
        for skip, noreply, data in steps:
            if protocol & skip:
                continue
            pending += data
            if not protocol & noreply:
                conn.sock.sendall(pending)
                pending = b""
                if conn.read() not in b"c":
                    raise RuntimeError("milter did not continue")
        conn.sock.sendall(pending + EOM)
        changes = 0
        while True:
            command = conn.read()
            if command in MODIFICATIONS:
                changes += 1
            elif command != PROGRESS:
                break
        conn.sock.sendall(QUIT)
        return changes
    finally:
        conn.sock.close()


def sessions_per_second(address: str, session: Session, clients: int, seconds: float) -> float:
    """Whole sessions per second with ``clients`` running at once for ``seconds``."""
    steps = session.steps()
    run_session(address, steps)  # the milter's first connection is not timed
    done = [0] * clients
    errors: list[BaseException] = []
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        try:
            while time.perf_counter() < stop:
                run_session(address, steps)
                done[i] += 1
        except BaseException as e:  # reported below; a thread must not die silently
            errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"load client failed: {errors[0]!r}")
    return sum(done) / elapsed
