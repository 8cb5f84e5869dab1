"""Real ``redis-server`` processes for tests: standalone servers and a Sentinel setup.

Every process listens on a free port of 127.0.0.1 (never the system Redis on 6379),
lives in its own temporary directory, persists nothing (``save ""``,
``appendonly no``) and is reaped by ``stop()``/``close()``, so tests can kill it,
freeze it (SIGSTOP), resume it and restart it on the same port. Readiness is an
inline ``PING`` on a raw socket, so waiting for a server needs no client to close.
``RedisServer(tls=True)`` serves TLS only, with a throwaway CA made by ``openssl``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
LOOPBACK = "127.0.0.1"


def redis_server_available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """True once the server handles commands (NOAUTH also proves it is up)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as raw:
            s = tls.wrap_socket(raw, server_hostname=LOOPBACK) if tls else raw
            with s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def make_tls_files(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1: ``ca.crt``, ``server.{crt,key}``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=mx-guard test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={LOOPBACK}")
    (directory / "san.ext").write_text(f"subjectAltName=IP:{LOOPBACK}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-out", "server.crt", "-extfile", "san.ext")


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class _Process:
    """One redis-server process with a config file in its own temporary directory."""

    sentinel = False

    def __init__(self, port: int | None = None) -> None:
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mxg-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self.paused = False
        self.tls_context: ssl.SSLContext | None = None

    # Subclasses say what goes into the config file.
    def config_lines(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not running"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        for _ in range(5):
            if self._try_start():
                return
            if self._fixed_port:
                break
            self.port = free_port()  # somebody took the port between probe and bind
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")

    def _try_start(self) -> bool:
        conf = self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")
        conf.write_text("\n".join(self.config_lines()) + "\n")
        args = [REDIS_SERVER, str(conf)] + (["--sentinel"] if self.sentinel else [])
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                return False
            if _answers_ping(self.port, self.tls_context):
                self.paused = False
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def stop(self) -> None:
        """Shut the server down (SIGTERM, SIGKILL if it lingers) and reap it."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            if self.paused:
                self._proc.send_signal(signal.SIGCONT)  # SIGTERM waits for SIGCONT
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-flight, as on a crash or OOM kill."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing ever answers."""
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self._proc is not None, "not running"
        self._proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        """Stop and start again on the same port; every connection is dropped."""
        self.stop()
        self._fixed_port = True
        self.start()

    @property
    def admin(self) -> redis.Redis:
        """One shared client for assertions and polling; closed by ``close()``."""
        if not self._clients:
            self.client()
        return self._clients[0]

    def client(self, **options: Any) -> redis.Redis:
        """A new client for assertions; closed by ``close()``."""
        settings: dict[str, Any] = {
            "host": LOOPBACK,
            "port": self.port,
            "decode_responses": True,
            "socket_timeout": 5,
            "protocol": 2,
        } | options
        client = redis.Redis(**settings)
        self._clients.append(client)
        return client

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisServer(_Process):
    """A standalone (or replica) redis-server; ``url``/``unix_url`` point at it."""

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        unix_socket: bool = True,
        replica_of: int | None = None,
        tls: bool = False,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        super().__init__(port)
        self.password = password
        self.unix_socket = unix_socket
        self.replica_of = replica_of
        self.tls = tls
        self.extra_config = extra_config
        if tls:
            make_tls_files(self.dir)
            self.tls_context = ssl.create_default_context(cafile=str(self.ca_path))

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def socket_path(self) -> Path:
        # Our own short temporary directory keeps this under the 107-byte limit.
        return self.dir / "redis.sock"

    def config_lines(self) -> list[str]:
        if self.tls:
            listen = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.dir / 'server.crt'}",
                f"tls-key-file {self.dir / 'server.key'}",
                f"tls-ca-cert-file {self.ca_path}",
                "tls-auth-clients no",
            ]
        else:
            listen = [f"port {self.port}"]
        lines = [
            *listen,
            f"bind {LOOPBACK}",
            'save ""',
            "appendonly no",
            f"dir {self.dir}",
            "daemonize no",
            'logfile ""',
            # A replica's full sync would otherwise wait 5 s for more replicas to join.
            "repl-diskless-sync-delay 0",
        ]
        if self.unix_socket:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.replica_of:
            lines.append(f"replicaof {LOOPBACK} {self.replica_of}")
        return lines + list(self.extra_config)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{LOOPBACK}:{self.port}/0?ssl_ca_certs={self.ca_path}"
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f"&password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}?db=0{auth}"

    def client(self, **options: Any) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca_path)} if self.tls else {}
        return super().client(**({"password": self.password} | tls | options))


class SentinelServer(_Process):
    """A ``redis-server --sentinel`` watching one master."""

    sentinel = True

    def __init__(
        self,
        service: str,
        master_port: int,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        password: str | None,
    ) -> None:
        super().__init__()
        self.service = service
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password

    def config_lines(self) -> list[str]:
        s = self.service
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f"dir {self.dir}",
            "daemonize no",
            'logfile ""',
            f"sentinel monitor {s} {LOOPBACK} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {s} {self.down_after_ms}",
            f"sentinel failover-timeout {s} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {s} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {s} {self.password}")
        return lines

    def master_address(self) -> tuple[str, int]:
        address = self.admin.sentinel_get_master_addr_by_name(self.service)
        assert isinstance(address, tuple), f"sentinel does not know {self.service}"
        return str(address[0]), int(address[1])


class SentinelCluster:
    """A master, one replica and ``sentinels`` sentinels, all on loopback.

    ``url`` is a ``redis+sentinel://`` URL listing every sentinel. ``kill_master()``
    and ``failover()`` change the master and return once the sentinels name the new
    one and it accepts writes.
    """

    def __init__(
        self,
        sentinels: int = 1,
        *,
        service: str = "mxguard",
        password: str | None = None,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.service = service
        self.password = password
        self.master = RedisServer(password=password, unix_socket=False)
        self.replica = RedisServer(
            password=password, unix_socket=False, replica_of=self.master.port
        )
        self.servers = {s.port: s for s in (self.master, self.replica)}
        self.sentinels = [
            SentinelServer(
                service,
                self.master.port,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                password=password,
            )
            for _ in range(sentinels)
        ]

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        # Sentinels learn replicas from the master's INFO, which they read at start and
        # then only every 10 s: start them once the replica is attached and in sync.
        wait_until(self._replica_in_sync, START_TIMEOUT_SECONDS, "the replica to sync")
        for s in self.sentinels:
            s.start()
        wait_until(self._sentinels_ready, START_TIMEOUT_SECONDS, "sentinels to see the replica")

    def _replica_in_sync(self) -> bool:
        info = self.replica.admin.info("replication")
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            replicas = s.admin.sentinel_slaves(self.service)
            if not any(
                r.get("is_slave") and not r.get("is_sdown") and r.get("master-link-status") == "ok"
                for r in replicas
            ):
                return False
            if len(self.sentinels) > 1:
                master = s.admin.sentinel_master(self.service)
                assert isinstance(master, dict)
                if int(master.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
        return True

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.service}"

    def master_port(self) -> int:
        """The master's port as the first live sentinel reports it."""
        for s in self.sentinels:
            if s.running:
                return s.master_address()[1]
        raise RuntimeError("no sentinel is running")

    def current_master(self) -> RedisServer:
        return self.servers[self.master_port()]

    def kill_master(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master; return the replica the sentinels promoted."""
        old = self.current_master()
        old.kill()
        return self._await_new_master(old.port, timeout)

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """``SENTINEL FAILOVER``; returns once the old master has become a replica.

        The sentinels demote the old master only when their next INFO (every 10 s)
        finds it still a master, and until then it takes writes from connections made
        before (Sentinel's split-brain window). To keep tests quick this sends that
        ``REPLICAOF`` itself, and unlike Sentinel it leaves the old master's clients
        connected: their next write is refused with READONLY, the harder case.
        """
        old = self.current_master()
        self.sentinels[0].admin.sentinel_failover(self.service)
        new = self._await_new_master(old.port, timeout)
        old.admin.replicaof(LOOPBACK, new.port)
        wait_until(
            lambda: old.admin.info("replication").get("role") == "slave",
            timeout,
            "the old master to become a replica",
        )
        return new

    def _await_new_master(self, old_port: int, timeout: float) -> RedisServer:
        def promoted() -> bool:
            ports = {s.master_address()[1] for s in self.sentinels if s.running}
            if ports == {old_port} or len(ports) != 1:
                return False
            role = self.servers[ports.pop()].admin.info("replication").get("role")
            return bool(role == "master")

        wait_until(promoted, timeout, "the sentinels to promote a new master", 0.1)
        return self.current_master()

    def close(self) -> None:
        for p in [*self.sentinels, self.master, self.replica]:
            with contextlib.suppress(Exception):
                p.close()

    def __enter__(self) -> SentinelCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

