"""Socket options of another process's TCP sockets, read back from the kernel.

``pidfd_getfd(2)`` (Linux 5.6) copies a descriptor out of a running process; a
``getsockopt`` on the copy reads the very socket the process uses, so a test sees
what the guard really set, not what it meant to set. Needs the right to ptrace the
process (root, here). /proc/net/tcp does not show TCP_NODELAY; this does.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
from dataclasses import dataclass

# pidfd_getfd: 438 on x86-64, arm64 and every architecture of the unified syscall table.
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class TcpSocket:
    fd: int  # in the inspected process
    listening: bool
    local: tuple[str, int]
    peer: tuple[str, int] | None
    nodelay: bool


def _steal(pidfd: int, fd: int) -> int:
    new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if new < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({fd}): {os.strerror(err)} "
                           f"(kernel {platform.release()})")
    return int(new)


def tcp_sockets(pid: int, port: int) -> list[TcpSocket]:
    """The TCP sockets of process ``pid`` whose local port is ``port``."""
    found = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue  # closed meanwhile
            try:
                copy = _steal(pidfd, int(name))
            except OSError as e:
                if e.errno == 9:  # EBADF: closed meanwhile
                    continue
                raise
            with socket.socket(fileno=copy) as s:
                if s.family not in (socket.AF_INET, socket.AF_INET6) or \
                        s.type != socket.SOCK_STREAM or s.getsockname()[1] != port:
                    continue
                listening = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
                try:
                    peer = s.getpeername()[:2]
                except OSError:
                    peer = None
                found.append(TcpSocket(
                    int(name), listening, s.getsockname()[:2], peer,
                    bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))))
    finally:
        os.close(pidfd)
    return found
