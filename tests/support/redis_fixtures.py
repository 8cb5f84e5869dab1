"""pytest fixtures for a real Redis: a fresh server per test, and a Sentinel setup.

Imported by conftest.py. A missing redis-server or openssl fails the test with what
to install (``make test`` installs both): a skipped store test would hide a gap.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TypeVar

import pytest

from tests.support.redis_server import RedisServer, SentinelCluster, redis_server_available

R = TypeVar("R", RedisServer, SentinelCluster)


def _require_redis() -> None:
    if not redis_server_available():
        pytest.fail("redis-server is not installed: run `make test-deps` (apt: redis-server)")


def _running(server: R) -> Iterator[R]:
    """Start *server* for the test; close it afterwards, even if it failed to start."""
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port, with a Unix socket, no password."""
    _require_redis()
    yield from _running(RedisServer())


@pytest.fixture
def tls_redis_server() -> Iterator[RedisServer]:
    """A redis-server speaking TLS only; ``url`` is ``rediss://`` with its CA."""
    _require_redis()
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run `make test-deps` (apt: openssl)")
    yield from _running(RedisServer(tls=True, unix_socket=False))


@pytest.fixture
def sentinel_cluster() -> Iterator[SentinelCluster]:
    """A master, a replica and one sentinel (down-after 500 ms)."""
    _require_redis()
    yield from _running(SentinelCluster(sentinels=1))
