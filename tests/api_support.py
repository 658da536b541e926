"""Helpers for the tests of the running service (tests/test_api_*.py, test_app_*.py, …).

The real app runs on a local port; stores are placed on a real GPS trace (Munich drive,
bmwcarit/barefoot, Apache-2.0) so pings produce real enter and exit events.
"""

from __future__ import annotations

import csv
import json
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geopush.config import Settings

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_NAME = "barefoot_munich_x0001-001.csv"

INGEST_KEY = "ingest-key-0123456789"
DEVICES_KEY = "devices-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abc"
KEYS = [
    {"name": "app", "key": INGEST_KEY, "scopes": ["ingest"]},
    {"name": "backend", "key": DEVICES_KEY, "scopes": ["devices"]},
    {"name": "ops", "key": ADMIN_KEY, "scopes": ["admin", "ingest", "devices"]},
]
# device tokens (contract §13): the secrets they are made with, newest first
TOKEN_SECRET = "device-token-secret-0123456789abcdef"
INGEST = {"Authorization": f"Bearer {INGEST_KEY}"}
DEVICES = {"Authorization": f"Bearer {DEVICES_KEY}"}

# Geofences on the trace: (trace index of the centre, radius m)
FENCES_ON_ROUTE = {"bakery-300": (300, 40.0), "pharmacy-700": (700, 40.0)}
HYSTERESIS_M = 25.0


def trace_path() -> Path:
    return FIXTURES / "traces" / TRACE_NAME


@dataclass(frozen=True)
class TracePoint:
    ts: float
    lat: float
    lon: float


def load_trace(end_at: float | None = None) -> list[TracePoint]:
    """The Munich drive, shifted so its last point is `end_at` (default: a minute ago), so
    no stale-exit timer (2 h) falls due while a test runs."""
    with trace_path().open(newline="") as f:
        rows = list(csv.DictReader(f))
    from datetime import datetime

    stamps = [datetime.fromisoformat(r["ts_iso"].replace("Z", "+00:00")).timestamp()
              for r in rows]
    # whole seconds: the trace is 1 Hz, and epoch-ms pings then round-trip exactly
    shift = round((end_at if end_at is not None else time.time() - 60.0) - stamps[-1])
    return [TracePoint(ts + shift, float(r["lat"]), float(r["lon"]))
            for ts, r in zip(stamps, rows, strict=True)]


def ping(device_id: str, point: TracePoint, **extra: Any) -> dict[str, Any]:
    return {"device_id": device_id, "lat": point.lat, "lon": point.lon,
            "ts": round(point.ts * 1000), **extra}


def haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Independent of geopush's own, so the expected events are not computed by the code
    under test."""
    r = 6_371_008.8
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def write_stores(path: Path, trace: list[TracePoint]) -> Path:
    features = []
    for fid, (at, radius) in FENCES_ON_ROUTE.items():
        centre = trace[at]
        features.append({
            "type": "Feature", "id": fid,
            "properties": {"name": fid, "radius_m": radius, "shop": "bakery"},
            "geometry": {"type": "Point", "coordinates": [centre.lon, centre.lat]},
        })
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def expected_events(device_id: str, trace: list[TracePoint]) -> list[tuple[str, str, int]]:
    """(geofence, type, ms) from contract §5 by hand: enter at the first ping within the
    radius, exit at the first later ping beyond radius + hysteresis."""
    events = []
    for fid, (at, radius) in FENCES_ON_ROUTE.items():
        centre = trace[at]
        inside = False
        for p in trace:
            d = haversine(p.lat, p.lon, centre.lat, centre.lon)
            if not inside and d <= radius:
                inside = True
                events.append((p.ts, fid, "enter"))
            elif inside and d > radius + HYSTERESIS_M:
                inside = False
                events.append((p.ts, fid, "exit"))
    events.sort()
    return [(fid, kind, round(ts * 1000)) for ts, fid, kind in events]


def settings_for(tmp_path: Path, *, backend: str = "memory", redis_url: str | None = None,
                 keys: list[dict[str, Any]] | None = None, **sections: Any) -> Settings:
    trace = load_trace()
    stores = write_stores(tmp_path / "stores.geojson", trace)
    storage: dict[str, Any] = {"backend": backend,
                               "snapshot_path": str(tmp_path / "state.json")}
    if redis_url is not None:
        storage["redis_url"] = redis_url
    raw: dict[str, Any] = {
        "stores_file": str(stores),
        "rules_dir": str(tmp_path / "rules"),
        "storage": storage,
        "auth": {"keys": KEYS if keys is None else keys, "device_token_secret": [TOKEN_SECRET]},
        "logging": {"pseudonym_key": "test-pseudonym-key"},
    }
    for name, section in sections.items():
        raw[name] = {**raw.get(name, {}), **section}
    return Settings(**raw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def event_tuples(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    from geopush.timeutil import parse_ts

    return [(e["geofence_id"], e["type"], round(parse_ts(e["ts"]) * 1000))
            for e in events]


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
