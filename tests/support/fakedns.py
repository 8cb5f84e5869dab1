"""A small authoritative DNS server on loopback, for tests.

Serves records given as Python data over UDP and TCP on one free port of 127.0.0.1, from a
background thread, built on dnspython's message API. Tests change it while it runs.

Contracts:
- FakeDNS(records, behaviours) is a context manager: start() binds and serves, stop()
  closes every socket and joins the thread. ``port`` is valid once started.
- A record is (name, type, ttl, rdata text). Names are absolute whether or not they end
  in a dot, and case-insensitive. One TTL per (name, type): the last one given wins.
- Behaviour per name, or per (name, type) which takes precedence:
  normal   - the records; NOERROR/no answer if the name owns other records or has
             records below it; NXDOMAIN otherwise.
  nxdomain - NXDOMAIN.          nodata   - NOERROR with an empty answer.
  null_mx  - MX "0 ." (RFC 7505) with ``default_ttl``; NOERROR/no answer for other types.
  servfail - SERVFAIL.          silent   - no answer at all, for timeouts.
- Negative answers carry an SOA (owner: the query name's parent) whose TTL and minimum
  are ``negative_ttl``, so resolvers can cache them.
- Every query received is counted per (name, type), silent ones included.
- Mutators are thread-safe and take effect from the next query.
- A UDP answer larger than the client allows (512 bytes without EDNS) goes out truncated
  (TC), so resolvers retry over TCP. No recursion, CNAME chasing or wildcards.
"""

from __future__ import annotations

import contextlib
import enum
import selectors
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

Record: TypeAlias = tuple[str, str, int, str]
_Key: TypeAlias = tuple[dns.name.Name, dns.rdatatype.RdataType]


class Behaviour(enum.StrEnum):
    NORMAL = "normal"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    NULL_MX = "null_mx"
    SERVFAIL = "servfail"
    SILENT = "silent"


def _name(name: str | dns.name.Name) -> dns.name.Name:
    parsed = dns.name.from_text(name) if isinstance(name, str) else name
    return parsed.canonicalize()


def _rdtype(rtype: str | dns.rdatatype.RdataType) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(rtype)


def _bind_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port (retrying when TCP's is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(16)
            return udp, tcp
        except OSError:
            udp.close()
            tcp.close()
    raise OSError(f"no port free for both UDP and TCP on {host}")


class FakeDNS:
    """See the module docstring for the contracts."""

    def __init__(self, records: Iterable[Record] = (),
                 behaviours: Mapping[str, Behaviour | str] | None = None, *,
                 host: str = "127.0.0.1", default_ttl: int = 300,
                 negative_ttl: int = 60) -> None:
        self.host = host
        self.port = 0
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._rrsets: dict[_Key, tuple[int, list[dns.rdata.Rdata]]] = {}
        self._behaviours: dict[tuple[dns.name.Name, dns.rdatatype.RdataType | None],
                               Behaviour] = {}
        self._counts: Counter[_Key] = Counter()
        self._log: list[tuple[str, str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        for record in records:
            self.add(*record)
        for name, behaviour in (behaviours or {}).items():
            self.set_behaviour(name, behaviour)

    # -- zone data ----------------------------------------------------------------------

    def add(self, name: str, rtype: str, ttl: int, rdata: str) -> None:
        """Add one record; the rrset takes this TTL."""
        key = (_name(name), _rdtype(rtype))
        parsed = dns.rdata.from_text(dns.rdataclass.IN, key[1], rdata,
                                     origin=dns.name.root, relativize=False)
        with self._lock:
            _, existing = self._rrsets.get(key, (ttl, []))
            self._rrsets[key] = (ttl, [*existing, parsed] if parsed not in existing
                                 else existing)

    def set_records(self, name: str, rtype: str, ttl: int, rdatas: Iterable[str]) -> None:
        """Replace the (name, type) rrset; an empty list removes it."""
        key = (_name(name), _rdtype(rtype))
        parsed = [dns.rdata.from_text(dns.rdataclass.IN, key[1], text,
                                      origin=dns.name.root, relativize=False)
                  for text in rdatas]
        with self._lock:
            if parsed:
                self._rrsets[key] = (ttl, parsed)
            else:
                self._rrsets.pop(key, None)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove one rrset, or every rrset of the name."""
        owner = _name(name)
        with self._lock:
            for key in [k for k in self._rrsets
                        if k[0] == owner and (rtype is None or k[1] == _rdtype(rtype))]:
                del self._rrsets[key]

    def set_behaviour(self, name: str, behaviour: Behaviour | str,
                      rtype: str | None = None) -> None:
        key = (_name(name), None if rtype is None else _rdtype(rtype))
        with self._lock:
            self._behaviours[key] = Behaviour(behaviour)

    def clear_behaviour(self, name: str, rtype: str | None = None) -> None:
        key = (_name(name), None if rtype is None else _rdtype(rtype))
        with self._lock:
            self._behaviours.pop(key, None)

    # -- observation ----------------------------------------------------------------------

    def queries(self, name: str, rtype: str) -> int:
        """How many queries for (name, type) arrived, over UDP and TCP together."""
        with self._lock:
            return self._counts[(_name(name), _rdtype(rtype))]

    @property
    def total_queries(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    @property
    def query_log(self) -> list[tuple[str, str, str]]:
        """(name, type, "udp"/"tcp") for every query, in arrival order."""
        with self._lock:
            return list(self._log)

    def reset_queries(self) -> None:
        with self._lock:
            self._counts.clear()
            self._log.clear()

    def resolver(self, *, timeout: float = 0.5, lifetime: float = 1.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server, without cache."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = timeout
        resolver.lifetime = lifetime
        return resolver

    # -- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> FakeDNS:
        if self._thread is not None:
            raise RuntimeError("FakeDNS already started")
        self._udp, self._tcp = _bind_pair(self.host)
        self.port = self._udp.getsockname()[1]
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"fakedns-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None or self._wake is None:
            return
        self._wake[1].send(b"x")
        self._thread.join()
        for sock in (self._udp, self._tcp, *self._wake):
            if sock is not None:
                sock.close()
        self._thread = self._udp = self._tcp = self._wake = None

    def __enter__(self) -> FakeDNS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- serving ----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake is not None
        udp, listener, wake = self._udp, self._tcp, self._wake[0]
        selector = selectors.DefaultSelector()
        selector.register(udp, selectors.EVENT_READ, "udp")
        selector.register(listener, selectors.EVENT_READ, "listen")
        selector.register(wake, selectors.EVENT_READ, "wake")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while True:
                for key, _ in selector.select():
                    if key.data == "wake":
                        return
                    if key.data == "udp":
                        self._serve_udp(udp)
                    elif key.data == "listen":
                        conn, _ = listener.accept()
                        # Only for sendall: reads happen after select says readable.
                        conn.settimeout(2.0)
                        buffers[conn] = bytearray()
                        selector.register(conn, selectors.EVENT_READ, conn)
                    else:
                        conn = key.data
                        if not self._serve_tcp(conn, buffers[conn]):
                            selector.unregister(conn)
                            del buffers[conn]
                            conn.close()
        finally:
            for conn in buffers:
                conn.close()
            selector.close()

    def _serve_udp(self, udp: socket.socket) -> None:
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:
            return
        answer = self._answer(wire, "udp")
        if answer is not None:
            with contextlib.suppress(OSError):  # the client went away: nobody to tell
                udp.sendto(answer, peer)

    def _serve_tcp(self, conn: socket.socket, buffer: bytearray) -> bool:
        """Read what arrived, answer every complete query; False when the peer is gone."""
        try:
            data = conn.recv(65535)
        except OSError:
            return False
        if not data:
            return False
        buffer += data
        while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
            size = int.from_bytes(buffer[:2], "big")
            wire = bytes(buffer[2:2 + size])
            del buffer[:2 + size]
            answer = self._answer(wire, "tcp")
            if answer is not None:
                try:
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)
                except OSError:
                    return False
        return True

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        owner = qname.parent() if qname != dns.name.root else qname
        soa = dns.rdata.from_text(
            dns.rdataclass.IN, dns.rdatatype.SOA,
            f"ns.fake.invalid. hostmaster.fake.invalid. 1 3600 600 86400 {self.negative_ttl}")
        return dns.rrset.from_rdata_list(owner, self.negative_ttl, [soa])

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server would drop it too
        response = dns.message.make_response(query)
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name.canonicalize(), question.rdtype
        with self._lock:
            self._counts[(qname, qtype)] += 1
            self._log.append((qname.to_text(), dns.rdatatype.to_text(qtype), transport))
            behaviour = (self._behaviours.get((qname, qtype))
                         or self._behaviours.get((qname, None)) or Behaviour.NORMAL)
            if behaviour is Behaviour.SILENT:
                return None
            if behaviour is Behaviour.NORMAL:
                found = self._rrsets.get((qname, qtype))
                exists = any(owner.is_subdomain(qname) for owner, _ in self._rrsets)
                if found is not None:
                    ttl, rdatas = found
                    response.answer.append(dns.rrset.from_rdata_list(qname, ttl, rdatas))
                elif not exists:
                    behaviour = Behaviour.NXDOMAIN
                else:
                    behaviour = Behaviour.NODATA
        response.flags |= dns.flags.AA
        if behaviour is Behaviour.SERVFAIL:
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.SERVFAIL)
        elif behaviour is Behaviour.NULL_MX and qtype == dns.rdatatype.MX:
            null_mx = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, "0 .")
            response.answer.append(dns.rrset.from_rdata_list(qname, self.default_ttl,
                                                             [null_mx]))
        elif behaviour is not Behaviour.NORMAL:
            if behaviour is Behaviour.NXDOMAIN:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa(qname))
        limit = 65535
        if transport == "udp":
            limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()
