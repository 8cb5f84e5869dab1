"""TCP_NODELAY on the milter's inet socket (guard/milter_socket.py), in this process.

The end-to-end tests read the option back from the running guard through Postfix and
Sendmail; these check the pieces: finding a listening socket by port among the
process's descriptors, and Linux copying TCP_NODELAY to the sockets it accepts.
"""

from __future__ import annotations

import socket

import pytest

from guard.milter_socket import inet_port, listening_tcp_sockets, set_nodelay


@pytest.mark.parametrize(("spec", "want"), [
    ("inet:8894@127.0.0.1", 8894),
    ("inet6:8894@[::1]", 8894),
    ("inet:8894", 8894),
    ("unix:/run/mx-guard/guard.sock", None),
    ("local:/run/mx-guard/guard.sock", None),
])
def test_inet_port(spec: str, want: int | None) -> None:
    assert inet_port(spec) == want


def _nodelay(s: socket.socket) -> bool:
    return bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_sets_the_listener_on_the_port_and_no_other_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as ours, \
            socket.create_server(("127.0.0.1", 0)) as other:
        port = ours.getsockname()[1]
        assert listening_tcp_sockets(port) == [ours.fileno()]
        assert not _nodelay(ours)
        assert set_nodelay(port) == 1
        assert _nodelay(ours) and not _nodelay(other)


def test_accepted_connections_inherit_it_from_the_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        set_nodelay(port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                assert _nodelay(accepted)
                assert not _nodelay(client)  # only the guard's side is ours to set


def test_no_listener_means_nothing_set() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    assert set_nodelay(port) == 0
