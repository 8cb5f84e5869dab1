"""Shared fixtures (real Redis servers: tests/support/redis_fixtures.py) and markers.

Every test gets the markers (registered in pyproject.toml) of what it needs, so a
host can run the part it can:

    unit   needs nothing beyond the virtualenv: no root, no apt package, no server
           (`make unit`, `pytest -m unit`)
    redis  starts its own redis-server
    mta    drives a real Postfix or Sendmail, or Debian's miltertest
    root   needs root (namespaces, other users, MTAs)
    tools  runs a tool that tests/support/install-test-deps.sh installs (promtool, groff)

The markers follow from the fixtures a test uses and the module it lives in; a test
that starts such a part by hand is marked where it is written.  A test with none of
redis, mta, root or tools is a unit test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.redis_fixtures import redis_server, sentinel_cluster, tls_redis_server  # noqa: F401

NEEDS = ("redis", "mta", "root", "tools")

FIXTURE_NEEDS = {
    "redis_server": ("redis",),
    "tls_redis_server": ("redis",),
    "sentinel_cluster": ("redis",),
    "acl_redis": ("redis",),
    "postfix_mta": ("mta", "root"),
    "sendmail_mta": ("mta", "root"),
}

# Paths relative to tests/: a folder covers every module below it.
MODULE_NEEDS = {
    "e2e": ("mta", "root"),
    "test_deploy.py": ("root",),           # other users, systemd tools, the MTAs' tools
    "test_shared_health.py": ("redis", "root"),  # network namespaces
    "test_miltertest.py": ("mta",),        # Debian's miltertest (sendmail's libmilter)
}

TESTS = Path(__file__).parent


def _module_needs(path: Path) -> set[str]:
    try:
        parts = path.relative_to(TESTS).parts
    except ValueError:
        return set()
    prefixes = ("/".join(parts[: i + 1]) for i in range(len(parts)))
    return {need for prefix in prefixes for need in MODULE_NEEDS.get(prefix, ())}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = _module_needs(Path(item.path))
        for fixture in getattr(item, "fixturenames", ()):
            needs.update(FIXTURE_NEEDS.get(fixture, ()))
        needs.update(m.name for m in item.iter_markers() if m.name in NEEDS)
        # The store suites run each test once per kind of store, named by a parameter
        # ("memory", "redis") whose fixture starts the server by getfixturevalue().
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(v == "redis" for v in callspec.params.values()):
            needs.add("redis")
        for need in sorted(needs):
            item.add_marker(need)
        if not needs:
            item.add_marker("unit")
