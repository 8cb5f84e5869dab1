"""Shared state behind one small interface; ``open_store`` picks the implementation."""

from __future__ import annotations

from guard.config import Config, ConfigError
from guard.store.base import Store, StoreError
from guard.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "StoreError", "observation_ttl", "open_store"]


def observation_ttl(config: Config) -> float:
    """How long an observation lives in the store: a little past ``stale_after``.

    Past ``stale_after`` an observation no longer counts; the margin lets ``status``
    show a node that went quiet as stale before its observation disappears.
    """
    return config.policy.stale_after * 2


def open_store(config: Config) -> Store:
    url = config.store.url
    if url.startswith("memory://"):
        return MemoryStore(observation_ttl(config))
    from guard.store.redis import RedisStore  # redis-py is only loaded when used

    try:
        return RedisStore.from_config(config)
    except ValueError as e:
        raise ConfigError(f"{config.path}: [store] url: {e}") from None
