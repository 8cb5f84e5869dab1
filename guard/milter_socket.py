"""The milter's listening socket: TCP_NODELAY on every inet socket libmilter opens.

Over TCP a milter conversation is a run of small packets, each waiting for an answer.
With Nagle's algorithm on, the milter holds a small write (the final reply after a
header change) until the MTA acknowledges the previous one, and the MTA delays that
acknowledgement by up to 40 ms: libmilter milters pay 40-90 ms per message over inet
and nothing over a Unix socket. Postfix and Sendmail never set TCP_NODELAY on their
side and have no setting for it, so the guard sets it on its own.

libmilter keeps its listening socket to itself and pymilter exposes no file
descriptor; but ``Milter.runmilter`` opens the socket (``opensocket``) before it starts
accepting (``main``). ``nodelay_on_open`` wraps that one call so the listening socket
is found among the process's descriptors and set in between. Linux copies TCP_NODELAY
from a listening socket to the sockets it accepts (the tests check it through the
MTAs), so every milter connection has it from its first byte.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import Milter

log = logging.getLogger("guard.milter")

INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def inet_port(spec: str) -> int | None:
    """The TCP port of a libmilter socket spec (``inet:PORT@HOST``, ``inet6:PORT``),
    None for a Unix socket."""
    kind, _, where = spec.partition(":")
    if kind not in ("inet", "inet6"):
        return None
    port, _, _host = where.partition("@")
    return int(port)


def listening_tcp_sockets(port: int) -> list[int]:
    """File descriptors of this process's TCP sockets listening on ``port``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # A socket object on a duplicate: closing it leaves libmilter's fd alone.
            with socket.socket(fileno=os.dup(fd)) as s:
                if (s.family in INET_FAMILIES and s.type == socket.SOCK_STREAM
                        and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        and s.getsockname()[1] == port):
                    found.append(fd)
        except OSError:
            continue  # gone meanwhile (the listdir fd itself), or not a socket we know
    return found


def set_nodelay(port: int) -> int:
    """TCP_NODELAY on every socket listening on ``port``; how many were set."""
    fds = listening_tcp_sockets(port)
    for fd in fds:
        with socket.socket(fileno=os.dup(fd)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return len(fds)


@contextlib.contextmanager
def nodelay_on_open(spec: str) -> Iterator[None]:
    """While ``Milter.runmilter`` runs, set TCP_NODELAY right after libmilter opens an
    inet socket. A failure is logged, never raised: mail flows, only slower."""
    port = inet_port(spec)
    if port is None:
        yield
        return
    module: Any = Milter.milter
    opensocket: Callable[..., Any] = module.opensocket

    def opensocket_nodelay(*args: Any) -> Any:
        result = opensocket(*args)
        try:
            if set_nodelay(port):
                log.info("TCP_NODELAY set on the milter socket (port %d)", port)
            else:
                log.warning("no listening socket on port %d found: TCP_NODELAY not set; "
                            "every message may wait 40 ms on Nagle", port)
        except OSError as e:
            log.warning("cannot set TCP_NODELAY on port %d: %s", port, e)
        return result

    module.opensocket = opensocket_nodelay
    try:
        yield
    finally:
        module.opensocket = opensocket
