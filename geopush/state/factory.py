"""Picks the state backend named by `storage.backend`."""

from __future__ import annotations

from geopush.config import Settings
from geopush.state.base import StateStore


def make_store(settings: Settings) -> StateStore:
    storage = settings.storage
    if storage.backend == "redis":
        from geopush.state.redis import RedisStore  # redis is only imported when used

        return RedisStore(storage.redis_url, key_prefix=storage.key_prefix,
                          cluster=storage.redis_cluster,
                          socket_timeout_s=storage.redis_timeout)
    from geopush.state.memory import MemoryStore

    return MemoryStore(storage.snapshot_path, fsync_every=storage.fsync_every)
