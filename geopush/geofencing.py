"""The active geofencing: stores → index → tracker → engine, built in one place from settings.

The service, `geopush replay` and a reload all build it here, so they cannot drift apart. A
Geofencing is immutable: a reload builds a new one and swaps the reference, so a request in
flight finishes on the set it started with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from geopush.config import Settings
from geopush.engine import Engine
from geopush.geo.index import GeofenceIndex
from geopush.geo.stores import StoreSet, load_stores
from geopush.geo.transitions import Tracker


@dataclass(frozen=True)
class Geofencing:
    """The active stores and what is built from them; replaced whole, never edited."""

    stores: StoreSet
    index: GeofenceIndex
    engine: Engine
    loaded_at: float


def build_engine(settings: Settings, stores: StoreSet) -> Engine:
    """The engine as the service wires it, from the settings and a validated store set."""
    return build_geofencing(stores, settings).engine


def build_geofencing(stores: StoreSet, settings: Settings) -> Geofencing:
    index = GeofenceIndex.from_stores(stores, hysteresis_m=settings.geofence.exit_hysteresis_m)
    tracker = Tracker(
        index,
        max_accuracy_m=settings.geofence.max_accuracy_m,
        stale_after_s=settings.geofence.stale_after,
        min_visit_s=settings.visits.min_dwell,
    )
    return Geofencing(stores, index, Engine(tracker), time.time())


def load_geofencing(settings: Settings) -> Geofencing:
    """Load settings.stores_file and build on it; StoreLoadError lists every error."""
    stores = load_stores(settings.stores_file, default_radius_m=settings.geofence.default_radius_m)
    return build_geofencing(stores, settings)
