"""Reload across instances (contract §6): a reload on one instance reaches every instance.

`reload` reads this instance's files, validates and builds them off the event loop, publishes
the set (the files' text, with the version that names it) in the state store, then swaps it in.
A set with errors is neither published nor swapped in: StoreLoadError or RuleLoadError (422)
lists every error.
If the store cannot take the publish (Redis down), nothing is swapped either: the instances
never run different sets because of a half-done reload.

Every instance (the one that reloaded too) polls the publish serial every second; when it moves,
the instance fetches the published set, builds it and swaps it in, whatever its own files say:
well within the 5 s the contract gives. An instance adopts only what is published after it
started: its own files are what it starts on, so a fresh deployment is not overridden by a set
published by the one before it (POST /v1/admin/reload on any instance publishes to all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace

from geopush.config import Settings
from geopush.errors import RuleLoadError, StoreLoadError
from geopush.logs import fields
from geopush.service.active import ConfigSet, Geofencing, geofencing_of, read_config_set
from geopush.state.base import StateStore, StateUnavailable

log = logging.getLogger("geopush.service.reloading")

POLL_S = 1.0


class Reloader:
    def __init__(self, settings: Settings, store: StateStore,
                 current: Callable[[], Geofencing | None],
                 install: Callable[[Geofencing], None], *, poll_s: float = POLL_S) -> None:
        self._settings = settings
        self._store = store
        self._current = current
        self._install = install
        self._poll_s = poll_s
        self._lock = asyncio.Lock()  # one reload or adoption at a time
        self._seen: int | None = None  # publish serial this instance is up to; None: unknown
        self._stopping = asyncio.Event()

    @property
    def serial(self) -> int | None:
        """The latest publish this instance has taken in (None: not known yet)."""
        return self._seen

    async def reload(self) -> Geofencing:
        """This instance's files → every instance. StoreLoadError or RuleLoadError on errors,
        StateUnavailable when the publish cannot be made; nothing changes anywhere in either
        case."""
        async with self._lock:
            config = await asyncio.to_thread(read_config_set, self._settings)
            config = replace(config, published_at=time.time())
            geofencing = await asyncio.to_thread(geofencing_of, config, self._settings,
                                                 self._current())
            self._seen = await self._store.publish_config(config.to_bytes())
            self._install(geofencing)
            log.info("config_published", extra=fields(version=geofencing.version,
                                                      serial=self._seen))
            return geofencing

    async def follow_once(self) -> bool:
        """Take in a publish newer than the one this instance is up to; True if it swapped."""
        serial = await self._store.config_serial()
        if self._seen is None:
            self._seen = serial  # at start: what was published before is not ours to adopt
            return False
        if serial == self._seen:
            return False
        async with self._lock:
            published = await self._store.published_config()
            if published is None or published[0] == self._seen:
                return False
            serial, payload = published
            self._seen = serial  # a set that cannot be built here is not tried again
            try:
                config = ConfigSet.from_bytes(payload)
                current = self._current()
                if current is not None and current.version == config.version:
                    return False
                if config.published_at is None:  # published by a release before
                    config = replace(config, published_at=time.time())
                geofencing = await asyncio.to_thread(geofencing_of, config, self._settings,
                                                     current)
            except (ValueError, StoreLoadError, RuleLoadError) as exc:
                log.error("published_config_rejected",
                          extra=fields(serial=serial, reason=str(exc)))
                return False
            self._install(geofencing)
            log.info("config_adopted", extra=fields(version=geofencing.version, serial=serial))
            return True

    async def run(self) -> None:
        """Follow the publishes until stop(); a state store that is down is tried again."""
        while not self._stopping.is_set():
            try:
                await self.follow_once()
            except StateUnavailable as exc:
                log.debug("config_poll_failed", extra=fields(reason=str(exc)))
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_s)

    def stop(self) -> None:
        self._stopping.set()
