"""Shared state behind one small interface; ``open_store`` picks the implementation."""

from __future__ import annotations

from guard.config import Config, ConfigError
from guard.store.base import Store, StoreError
from guard.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "StoreError", "observation_ttl", "open_store"]


def observation_ttl(config: Config) -> float:
    """How long an observation lives in the store.

    Past ``stale_after`` it no longer counts for health, but it is kept: ``status``
    shows a node that went quiet as stale, and a node restarted within ``down_grace``
    reads back the failures it saw before (so a restart cannot shorten down_grace).
    """
    return max(config.policy.stale_after * 2, config.policy.down_grace)


def open_store(config: Config) -> Store:
    url = config.store.url
    if url.startswith("memory://"):
        return MemoryStore(observation_ttl(config))
    from guard.store.redis import RedisStore  # redis-py is only loaded when used

    try:
        return RedisStore.from_config(config)
    except ValueError as e:
        raise ConfigError(f"{config.path}: [store] url: {e}") from None
