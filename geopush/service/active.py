"""The active geofencing: stores → index → tracker → engine, built in one place from settings.

The service, `geopush replay` and a reload all build it here, so they cannot drift apart. A
Geofencing is immutable: a reload builds a new one and swaps the reference, so a request in
flight finishes on the set it started with.

What a reload publishes to the other instances is the `ConfigSet` it was built from: the text
of the files (the rules will join the stores), so every instance builds the same set whatever
its own files say, and a version that names that content.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from geopush.config import Settings
from geopush.engine import Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.stores import StoreSet, read_stores_text, stores_from_text
from geopush.geo.transitions import Tracker


@dataclass(frozen=True)
class ConfigSet:
    """The files a geofencing is built from, as text: what a reload validates and publishes."""

    stores_source: str  # where the stores came from, for messages ("stores.geojson")
    stores_text: str

    @property
    def version(self) -> str:
        """Names the content: equal files give equal versions on every instance."""
        digest = hashlib.sha256(self.stores_text.encode("utf-8")).hexdigest()
        return digest[:16]

    def to_bytes(self) -> bytes:
        return json.dumps({"version": self.version, "stores_source": self.stores_source,
                           "stores_text": self.stores_text}).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> ConfigSet:
        """Raises ValueError on what a publish did not write."""
        try:
            data = json.loads(raw)
            return cls(str(data["stores_source"]), str(data["stores_text"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a published configuration: {exc}") from None


@dataclass(frozen=True)
class Geofencing:
    """The active stores and what is built from them; replaced whole, never edited."""

    stores: StoreSet
    index: GeofenceIndex
    engine: Engine
    loaded_at: float
    version: str  # of the ConfigSet it was built from


def build_engine(settings: Settings, stores: StoreSet) -> Engine:
    """The engine as the service wires it, from the settings and a validated store set."""
    return build_geofencing(stores, settings).engine


def build_geofencing(stores: StoreSet, settings: Settings, version: str = "") -> Geofencing:
    index = GeofenceIndex.from_stores(stores, hysteresis_m=settings.geofence.exit_hysteresis_m)
    tracker = Tracker(
        index,
        max_accuracy_m=settings.geofence.max_accuracy_m,
        stale_after_s=settings.geofence.stale_after,
        min_visit_s=settings.visits.min_dwell,
        pings_per_minute=settings.limits.device_pings_per_minute,
    )
    return Geofencing(stores, index, Engine(tracker), time.time(), version)


def read_config_set(settings: Settings) -> ConfigSet:
    """The configured files as text; StoreLoadError if one cannot be read."""
    path = Path(settings.stores_file)
    return ConfigSet(str(path), read_stores_text(path))


def geofencing_of(config: ConfigSet, settings: Settings) -> Geofencing:
    """Validate and build; StoreLoadError lists every error."""
    stores = stores_from_text(config.stores_text, source=config.stores_source,
                              default_radius_m=settings.geofence.default_radius_m)
    return build_geofencing(stores, settings, config.version)


def load_geofencing(settings: Settings) -> Geofencing:
    """Load settings.stores_file and build on it; StoreLoadError lists every error."""
    return geofencing_of(read_config_set(settings), settings)
