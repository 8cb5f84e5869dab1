"""The MTA side of the milter protocol (version 6), for tests.

An independent implementation written from the protocol description (libmilter's mfdef.h,
Sendmail's milter.c and Postfix's milter8.c behaviour), so tests can drive a milter byte by
byte as an MTA would and see exactly what it answers, without trusting libmilter twice.

Contracts:
- Wire format: a 4-byte big-endian length (counting the command byte), one command byte,
  then data; strings are NUL-terminated.
- negotiate() offers version 6, every action and every protocol flag (override with
  ``actions=`` / ``protocol=``). The answer rules the session: steps the milter asked to
  skip (SMFIP_NO*) are not sent and return a Reply named "skipped"; steps it marked
  no-reply (SMFIP_NR_*) are sent without waiting and return a Reply named "noreply". Any
  command issued before negotiate() negotiates first.
- Arguments may be str or bytes; str is encoded UTF-8 with surrogateescape. Nothing is
  validated or escaped, so tests can send CR/LF, NUL, invalid UTF-8 or huge values.
  Strings from the milter are decoded the same way, so they round-trip.
- Macros given to a command travel in a 'D' packet just before it, names verbatim (write
  "{client_addr}" with braces), and only when the command itself is sent (as Postfix does).
- Every reply records ``elapsed``: seconds from sending the command to the final answer.
  Progress packets ('p') are counted and waited through; each restarts the timeout.
- Every read is bounded by ``timeout``: MilterTimeout when it expires, MilterClosed on EOF
  or reset, MilterProtocolError on malformed or unexpected packets. After any MilterError
  the session state is undefined: close the client (it is a context manager).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, TypeAlias

Text: TypeAlias = str | bytes
Macros: TypeAlias = Mapping[str, Text] | Mapping[bytes, Text]

PROTOCOL_VERSION: Final = 6

# Actions the milter may take (SMFIF_*).
SMFIF_ADDHDRS: Final = 0x001
SMFIF_CHGBODY: Final = 0x002
SMFIF_ADDRCPT: Final = 0x004
SMFIF_DELRCPT: Final = 0x008
SMFIF_CHGHDRS: Final = 0x010
SMFIF_QUARANTINE: Final = 0x020
SMFIF_CHGFROM: Final = 0x040
SMFIF_ADDRCPT_PAR: Final = 0x080
SMFIF_SETSYMLIST: Final = 0x100
ALL_ACTIONS: Final = 0x1FF

# Protocol flags (SMFIP_*): steps to skip, steps without reply, and features.
SMFIP_NOCONNECT: Final = 0x000001
SMFIP_NOHELO: Final = 0x000002
SMFIP_NOMAIL: Final = 0x000004
SMFIP_NORCPT: Final = 0x000008
SMFIP_NOBODY: Final = 0x000010
SMFIP_NOHDRS: Final = 0x000020
SMFIP_NOEOH: Final = 0x000040
SMFIP_NR_HDR: Final = 0x000080
SMFIP_NOUNKNOWN: Final = 0x000100
SMFIP_NODATA: Final = 0x000200
SMFIP_SKIP: Final = 0x000400
SMFIP_RCPT_REJ: Final = 0x000800
SMFIP_NR_CONN: Final = 0x001000
SMFIP_NR_HELO: Final = 0x002000
SMFIP_NR_MAIL: Final = 0x004000
SMFIP_NR_RCPT: Final = 0x008000
SMFIP_NR_DATA: Final = 0x010000
SMFIP_NR_UNKN: Final = 0x020000
SMFIP_NR_EOH: Final = 0x040000
SMFIP_NR_BODY: Final = 0x080000
SMFIP_HDR_LEADSPC: Final = 0x100000
SMFIP_MDS_256K: Final = 0x10000000
SMFIP_MDS_1M: Final = 0x20000000
# Everything a version 6 MTA can offer; the MDS bits are left out on purpose, so the
# milter keeps libmilter's default 64 KB packet limit, as with a stock Postfix.
ALL_PROTOCOL: Final = 0x1FFFFF

# Body chunks larger than this are split, as MTAs do (MILTER_CHUNK_SIZE).
CHUNK_SIZE: Final = 65535

# Macro stages (SMFIM_*) named after the step they precede.
MACRO_STAGES: Final = {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom",
                       6: "eoh"}

REPLY_NAMES: Final = {
    "c": "continue", "a": "accept", "r": "reject", "t": "tempfail", "d": "discard",
    "y": "replycode", "s": "skip", "f": "conn_fail", "4": "shutdown",
}
_MODIFICATIONS: Final = frozenset("h" "i" "m" "+" "2" "-" "b" "e" "q")
# Sanity bound on one packet; real milters never come near it.
_MAX_PACKET: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Step:
    command: bytes
    skip_flag: int
    noreply_flag: int


_STEPS: Final = {
    "connect": _Step(b"C", SMFIP_NOCONNECT, SMFIP_NR_CONN),
    "helo": _Step(b"H", SMFIP_NOHELO, SMFIP_NR_HELO),
    "mail": _Step(b"M", SMFIP_NOMAIL, SMFIP_NR_MAIL),
    "rcpt": _Step(b"R", SMFIP_NORCPT, SMFIP_NR_RCPT),
    "data": _Step(b"T", SMFIP_NODATA, SMFIP_NR_DATA),
    "header": _Step(b"L", SMFIP_NOHDRS, SMFIP_NR_HDR),
    "eoh": _Step(b"N", SMFIP_NOEOH, SMFIP_NR_EOH),
    "body": _Step(b"B", SMFIP_NOBODY, SMFIP_NR_BODY),
    "unknown": _Step(b"U", SMFIP_NOUNKNOWN, SMFIP_NR_UNKN),
    "eom": _Step(b"E", 0, 0),
}


class MilterError(Exception):
    """Base of every error this client raises."""


class MilterConnectError(MilterError, ConnectionError):
    """The milter socket could not be opened."""


class MilterTimeout(MilterError, TimeoutError):
    """The milter did not answer within the timeout."""


class MilterClosed(MilterError, ConnectionError):
    """The milter closed or reset the connection."""


class MilterProtocolError(MilterError):
    """The milter sent something malformed or out of place."""


@dataclass(frozen=True)
class Reply:
    """One answer: command char ("" when none was awaited), its name, 'y' text, timing."""

    command: str
    name: str
    text: str = ""
    elapsed: float = 0.0
    progress: int = 0
    step: str = ""

    @property
    def code(self) -> str:
        """The SMTP code of a 'y' reply ("451"), else ""."""
        return self.text[:3] if self.command == "y" else ""

    @property
    def proceeds(self) -> bool:
        """True when the MTA would go on with the next step as if told "continue"."""
        return self.name in ("continue", "noreply", "skipped")

    @property
    def is_tempfail(self) -> bool:
        return self.name == "tempfail" or (self.command == "y" and self.code.startswith("4"))

    @property
    def is_reject(self) -> bool:
        return self.name == "reject" or (self.command == "y" and self.code.startswith("5"))


@dataclass(frozen=True)
class AddHeader:
    """'h': append a header."""

    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader:
    """'i': insert a header at a 0-based position."""

    index: int
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader:
    """'m': change the index-th (1-based) header of that name; empty value deletes it."""

    index: int
    name: str
    value: str

    @property
    def deletes(self) -> bool:
        return self.value == ""


@dataclass(frozen=True)
class AddRecipient:
    """'+' (args None) or '2' (with ESMTP args)."""

    recipient: str
    args: str | None = None


@dataclass(frozen=True)
class DeleteRecipient:
    """'-'."""

    recipient: str


@dataclass(frozen=True)
class ReplaceBody:
    """'b': one chunk of the new body."""

    data: bytes


@dataclass(frozen=True)
class ChangeFrom:
    """'e': new envelope sender, optional ESMTP args."""

    sender: str
    args: str | None = None


@dataclass(frozen=True)
class Quarantine:
    """'q'."""

    reason: str


Modification: TypeAlias = (AddHeader | InsertHeader | ChangeHeader | AddRecipient
                           | DeleteRecipient | ReplaceBody | ChangeFrom | Quarantine)


@dataclass(frozen=True)
class EomResult:
    """The final reply to end-of-message and the modifications that preceded it, in order."""

    reply: Reply
    modifications: list[Modification] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.reply.name

    @property
    def elapsed(self) -> float:
        return self.reply.elapsed

    @property
    def new_body(self) -> bytes | None:
        """The replacement body (all 'b' chunks joined), or None if it was not replaced."""
        chunks = [m.data for m in self.modifications if isinstance(m, ReplaceBody)]
        return b"".join(chunks) if chunks else None


@dataclass(frozen=True)
class Negotiation:
    """What the milter answered to SMFIC_OPTNEG."""

    version: int
    actions: int
    protocol: int
    macros: dict[str, tuple[str, ...]]
    elapsed: float

    def skips(self, step: str) -> bool:
        return bool(self.protocol & _STEPS[step].skip_flag)

    def no_reply(self, step: str) -> bool:
        return bool(self.protocol & _STEPS[step].noreply_flag)


@dataclass
class Transaction:
    """What send_message() did: each step's reply, the EOM result if reached, the outcome."""

    steps: list[tuple[str, Reply]]
    final: Reply
    eom: EomResult | None = None
    accepted_recipients: list[Text] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return self.final.name

    def replies(self, step: str) -> list[Reply]:
        return [reply for name, reply in self.steps if name == step]

    def reply(self, step: str) -> Reply:
        """The first reply to ``step``; KeyError if it was never reached."""
        found = self.replies(step)
        if not found:
            raise KeyError(step)
        return found[0]


def _b(value: Text) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _cstr(value: Text) -> bytes:
    return _b(value) + b"\0"


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _cstrings(data: bytes, what: str) -> list[str]:
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated: {data[:80]!r}")
    return [_decode(part) for part in data[:-1].split(b"\0")]


def _parse_modification(command: str, data: bytes) -> Modification:
    if command in ("i", "m"):
        if len(data) < 4:
            raise MilterProtocolError(f"'{command}' packet too short: {data!r}")
        (index,) = struct.unpack(">i", data[:4])
        strings = _cstrings(data[4:], command)
        if len(strings) != 2:
            raise MilterProtocolError(f"'{command}' needs name and value: {data[:80]!r}")
        cls = InsertHeader if command == "i" else ChangeHeader
        return cls(index, strings[0], strings[1])
    if command == "b":
        return ReplaceBody(data)
    strings = _cstrings(data, command)
    if command == "h" and len(strings) == 2:
        return AddHeader(strings[0], strings[1])
    if command == "+" and len(strings) == 1:
        return AddRecipient(strings[0])
    if command == "2" and len(strings) in (1, 2):
        return AddRecipient(strings[0], strings[1] if len(strings) == 2 else None)
    if command == "-" and len(strings) == 1:
        return DeleteRecipient(strings[0])
    if command == "e" and len(strings) in (1, 2):
        return ChangeFrom(strings[0], strings[1] if len(strings) == 2 else None)
    if command == "q" and len(strings) == 1:
        return Quarantine(strings[0])
    raise MilterProtocolError(f"malformed '{command}' packet: {data[:80]!r}")


def _macro_data(command: bytes, macros: Macros) -> bytes:
    return command + b"".join(_cstr(name) + _cstr(value) for name, value in macros.items())


def _guess_family(address: Text | None) -> str:
    if address is None:
        return "U"
    raw = _b(address)
    if raw.startswith(b"/"):
        return "L"
    return "6" if b":" in raw else "4"


def _open_socket(address: str | tuple[str, int], port: int | None,
                 timeout: float) -> socket.socket:
    """Open "unix:/path", "local:/path", "/path", "inet:PORT@HOST", "inet6:PORT@HOST",
    (host, port) or host with port=."""
    path: str | None = None
    host = ""
    if isinstance(address, tuple):
        host, port = address
    elif port is not None:
        host = address
    elif address.startswith(("unix:", "local:")):
        path = address.split(":", 1)[1]
    elif address.startswith("/"):
        path = address
    elif address.startswith(("inet:", "inet6:")):
        kind, spec = address.split(":", 1)
        port_text, _, host = spec.partition("@")
        host = host.strip("[]") or ("::1" if kind == "inet6" else "127.0.0.1")
        port = int(port_text)
    else:
        raise ValueError(f"unsupported milter address {address!r}")
    try:
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert port is not None
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise MilterConnectError(f"cannot connect to milter at {address!r}: {exc}") from exc
    # We write each command (with its macros) in one sendall, but Nagle would still hold
    # a command back while an earlier small segment waits for its ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class MilterClient:
    """One MTA-to-milter session; see the module docstring for the contracts."""

    def __init__(self, address: str | tuple[str, int], port: int | None = None, *,
                 timeout: float = 5.0, actions: int = ALL_ACTIONS,
                 protocol: int = ALL_PROTOCOL, version: int = PROTOCOL_VERSION) -> None:
        self.address = address
        self.timeout = timeout
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.offered_version = version
        self.negotiation: Negotiation | None = None
        self._connect_sent = False
        self._helo_sent = False
        self._sock: socket.socket | None = _open_socket(address, port, timeout)

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- wire -------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise MilterClosed("client is closed")
        return self._sock

    def _send(self, data: bytes) -> None:
        sock = self._socket()
        # Anything already waiting is a reply nobody asked for (e.g. an answer to a
        # no-reply step); reading it as the next reply would misattribute it.
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            try:
                pending = sock.recv(64, socket.MSG_PEEK)
            except OSError as exc:
                raise MilterClosed(f"milter connection failed: {exc}") from exc
            if not pending:
                raise MilterClosed("milter closed the connection")
            raise MilterProtocolError(f"milter sent unsolicited data: {pending!r}")
        try:
            sock.sendall(data)
        except OSError as exc:
            raise MilterClosed(f"cannot write to milter: {exc}") from exc

    def _recv_exact(self, size: int, what: str) -> bytes:
        sock = self._socket()
        sock.settimeout(self.timeout)
        chunks: list[bytes] = []
        missing = size
        while missing:
            try:
                chunk = sock.recv(min(missing, 1 << 20))
            except TimeoutError as exc:
                raise MilterTimeout(f"no answer to {what} within {self.timeout}s") from exc
            except OSError as exc:
                raise MilterClosed(f"milter connection failed during {what}: {exc}") from exc
            if not chunk:
                raise MilterClosed(f"milter closed the connection during {what}")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def _read_packet(self, what: str) -> tuple[str, bytes]:
        (length,) = struct.unpack(">I", self._recv_exact(4, what))
        if length == 0 or length > _MAX_PACKET:
            raise MilterProtocolError(f"bad packet length {length} during {what}")
        packet = self._recv_exact(length, what)
        return chr(packet[0]), packet[1:]

    def _await(self, step: str, start: float, eom: bool) -> tuple[Reply, list[Modification]]:
        progress = 0
        modifications: list[Modification] = []
        while True:
            command, data = self._read_packet(step)
            if command == "p":
                progress += 1
            elif command in REPLY_NAMES:
                text = _decode(data.split(b"\0", 1)[0]) if command == "y" else ""
                reply = Reply(command, REPLY_NAMES[command], text,
                              time.monotonic() - start, progress, step)
                return reply, modifications
            elif eom and command in _MODIFICATIONS:
                modifications.append(_parse_modification(command, data))
            else:
                raise MilterProtocolError(f"unexpected '{command}' packet after {step}: "
                                          f"{data[:80]!r}")

    def _command(self, step: str, data: bytes = b"",
                 macros: Macros | None = None) -> tuple[Reply, list[Modification]]:
        negotiation = self.negotiation or self.negotiate()
        spec = _STEPS[step]
        if negotiation.protocol & spec.skip_flag:
            return Reply("", "skipped", step=step), []
        wire = _packet(b"D", _macro_data(spec.command, macros)) if macros else b""
        start = time.monotonic()
        self._send(wire + _packet(spec.command, data))
        if negotiation.protocol & spec.noreply_flag:
            return Reply("", "noreply", elapsed=time.monotonic() - start, step=step), []
        return self._await(step, start, eom=step == "eom")

    # -- commands ---------------------------------------------------------------------

    def negotiate(self) -> Negotiation:
        """Send SMFIC_OPTNEG and parse the answer, including requested macro lists."""
        if self.negotiation is not None:
            raise MilterProtocolError("already negotiated")
        start = time.monotonic()
        self._send(_packet(b"O", struct.pack(">III", self.offered_version,
                                             self.offered_actions, self.offered_protocol)))
        command, data = self._read_packet("negotiate")
        if command != "O" or len(data) < 12:
            raise MilterProtocolError(f"bad negotiation answer '{command}': {data[:80]!r}")
        version, actions, protocol = struct.unpack(">III", data[:12])
        if not 2 <= version <= self.offered_version:
            raise MilterProtocolError(f"milter speaks unsupported version {version}")
        if actions & ~self.offered_actions:
            raise MilterProtocolError(f"milter wants unoffered actions {actions:#x}")
        if protocol & ~self.offered_protocol & ALL_PROTOCOL:
            raise MilterProtocolError(f"milter wants unoffered protocol flags {protocol:#x}")
        macros: dict[str, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            if len(rest) < 5:
                raise MilterProtocolError(f"truncated macro list: {rest!r}")
            (stage,) = struct.unpack(">I", rest[:4])
            names, found, rest = rest[4:].partition(b"\0")
            if not found:
                raise MilterProtocolError(f"macro list not NUL-terminated: {names!r}")
            macros[MACRO_STAGES.get(stage, f"stage{stage}")] = tuple(_decode(names).split())
        self.negotiation = Negotiation(version, actions, protocol, macros,
                                       time.monotonic() - start)
        return self.negotiation

    def connect(self, hostname: Text, address: Text | None = None, port: int = 0,
                family: str | None = None, macros: Macros | None = None) -> Reply:
        """SMFIC_CONNECT; family '4', '6', 'L' (Unix) or 'U' (unknown: no port/address),
        guessed from the address when not given."""
        fam = family or _guess_family(address)
        data = _cstr(hostname) + fam.encode("latin-1")
        if fam != "U":
            data += struct.pack(">H", port) + _cstr(address or b"")
        self._connect_sent = True
        return self._command("connect", data, macros)[0]

    def helo(self, name: Text, macros: Macros | None = None) -> Reply:
        self._helo_sent = True
        return self._command("helo", _cstr(name), macros)[0]

    def mail(self, sender: Text, *args: Text, macros: Macros | None = None) -> Reply:
        """SMFIC_MAIL; pass the sender as the MTA would, with angle brackets."""
        return self._command("mail", b"".join(map(_cstr, (sender, *args))), macros)[0]

    def rcpt(self, recipient: Text, *args: Text, macros: Macros | None = None) -> Reply:
        return self._command("rcpt", b"".join(map(_cstr, (recipient, *args))), macros)[0]

    def data(self, macros: Macros | None = None) -> Reply:
        return self._command("data", b"", macros)[0]

    def header(self, name: Text, value: Text, macros: Macros | None = None) -> Reply:
        return self._command("header", _cstr(name) + _cstr(value), macros)[0]

    def eoh(self, macros: Macros | None = None) -> Reply:
        return self._command("eoh", b"", macros)[0]

    def body(self, content: Text, macros: Macros | None = None) -> Reply:
        """Send the body in chunks of at most CHUNK_SIZE; stop early on any answer other
        than continue (e.g. 's' skip). Returns the last reply, with the total elapsed."""
        raw = _b(content)
        pieces = [raw[i:i + CHUNK_SIZE] for i in range(0, len(raw), CHUNK_SIZE)] or [b""]
        total = 0.0
        reply = Reply("", "skipped", step="body")
        for i, piece in enumerate(pieces):
            reply = self._command("body", piece, macros if i == 0 else None)[0]
            total += reply.elapsed
            if not reply.proceeds:
                break
        return replace(reply, elapsed=total)

    def eom(self, macros: Macros | None = None, chunk: Text = b"") -> EomResult:
        """SMFIC_BODYEOB; collects modifications until the final reply."""
        reply, modifications = self._command("eom", _b(chunk), macros)
        return EomResult(reply, modifications)

    def unknown(self, command: Text, macros: Macros | None = None) -> Reply:
        return self._command("unknown", _cstr(command), macros)[0]

    def abort(self) -> None:
        """SMFIC_ABORT: end the message; the milter does not answer."""
        if self.negotiation is None:
            self.negotiate()
        self._send(_packet(b"A"))

    def quit(self) -> None:
        """SMFIC_QUIT (no answer), then close the socket."""
        if self._sock is not None:
            try:
                self._send(_packet(b"Q"))
            finally:
                self.close()

    # -- convenience ------------------------------------------------------------------

    def send_message(self, sender: Text, recipients: Iterable[Text],
                     headers: Sequence[tuple[Text, Text]] = (), body: Text = b"", *,
                     client_name: Text = "client.example.net",
                     client_address: Text | None = "192.0.2.25", client_port: int = 42424,
                     family: str | None = None, helo: Text = "client.example.net",
                     mail_args: Sequence[Text] = (),
                     macros: Mapping[str, Macros] | None = None,
                     quit: bool = False) -> Transaction:
        """Run one transaction the way an MTA does. connect and helo go out only on the
        first message of the session; ``macros`` maps a step name ("connect", "mail",
        "rcpt", "eom", ...) to the macros sent with it. Stops at the first answer that ends
        the message (sending abort when a message was under way); a rejected recipient
        only drops that recipient, and no recipient left also ends it."""
        macros = macros or {}
        steps: list[tuple[str, Reply]] = []

        def run(step: str, reply: Reply) -> Reply:
            steps.append((step, reply))
            return reply

        def done(final: Reply, in_message: bool, accepted: list[Text] | None = None,
                 eom: EomResult | None = None) -> Transaction:
            if in_message:
                self.abort()
            if quit:
                self.quit()
            return Transaction(steps, final, eom, accepted or [])

        if not self._connect_sent:
            reply = run("connect", self.connect(client_name, client_address, client_port,
                                                 family, macros.get("connect")))
            if not reply.proceeds:
                return done(reply, False)
        if not self._helo_sent:
            reply = run("helo", self.helo(helo, macros.get("helo")))
            if not reply.proceeds:
                return done(reply, False)
        raw_sender = _b(sender)
        if not raw_sender.startswith(b"<"):
            raw_sender = b"<" + raw_sender + b">"
        reply = run("mail", self.mail(raw_sender, *mail_args, macros=macros.get("mail")))
        if not reply.proceeds:
            return done(reply, True)
        accepted: list[Text] = []
        for recipient in recipients:
            raw = _b(recipient)
            raw = raw if raw.startswith(b"<") else b"<" + raw + b">"
            reply = run("rcpt", self.rcpt(raw, macros=macros.get("rcpt")))
            if reply.name in ("accept", "discard"):
                return done(reply, True, [*accepted, recipient])
            if reply.proceeds:
                accepted.append(recipient)
        if not accepted:
            return done(reply, True)
        reply = run("data", self.data(macros.get("data")))
        if not reply.proceeds:
            return done(reply, True, accepted)
        for name, value in headers:
            reply = run("header", self.header(name, value, macros.get("header")))
            if not reply.proceeds:
                return done(reply, True, accepted)
        reply = run("eoh", self.eoh(macros.get("eoh")))
        if not reply.proceeds:
            return done(reply, True, accepted)
        if body:
            reply = run("body", self.body(body, macros.get("body")))
            if not reply.proceeds and reply.name != "skip":
                return done(reply, True, accepted)
        result = self.eom(macros.get("eom"))
        run("eom", result.reply)
        return done(result.reply, False, accepted, result)
