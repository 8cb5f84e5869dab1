"""Shared fixtures: real Redis servers (tests/support/redis_fixtures.py)."""

from tests.support.redis_fixtures import redis_server, sentinel_cluster, tls_redis_server  # noqa: F401
