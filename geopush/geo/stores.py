"""Stores file (GeoJSON FeatureCollection) → validated geofences.

Overpass / overpass-turbo exports of OSM shops load as they are. Every problem is collected with
the feature's index, id, line, field and bad value: `geopush check` lists them all, `serve`
refuses to start on errors, a reload with errors keeps the previous stores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from geopush.errors import Problem, Report, StoreLoadError, not_utf8
from geopush.errors import shortened as _short
from geopush.geo.hours import HoursSyntaxError, StoreHours

# OSM keys that become `key:value` tags (contract §2).
TAG_KEYS = ("shop", "amenity", "cuisine", "brand", "operator")
_MULTI_VALUE_KEYS = {"cuisine", "shop", "amenity"}  # OSM separates several values with ';'


@dataclass(frozen=True, slots=True, eq=False)
class Geofence:
    """One geofence: a circle around a point, or a (buffered) polygon, in WGS84."""

    id: str
    store_id: str
    name: str
    kind: Literal["circle", "polygon"]
    lat: float  # circle centre, or a point inside the polygon
    lon: float
    radius_m: float  # circle radius, or the polygon's buffer
    polygon: BaseGeometry | None
    tags: tuple[str, ...]
    timezone: str
    hours: StoreHours | None
    properties: Mapping[str, Any] = field(repr=False)  # what templates see as store.<key>


@dataclass(frozen=True)
class StoreSet:
    """A validated, immutable set of geofences; swapped whole on reload."""

    geofences: tuple[Geofence, ...]
    source: str = "<memory>"
    warnings: tuple[Problem, ...] = ()

    def __len__(self) -> int:
        return len(self.geofences)


def load_stores(path: str | Path, *, default_radius_m: float = 100.0) -> StoreSet:
    """Load and validate a stores file; raise StoreLoadError listing every error."""
    return stores_from_text(read_stores_text(path), source=str(path),
                            default_radius_m=default_radius_m)


def read_stores_text(path: str | Path) -> str:
    """The stores file's text; StoreLoadError if it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreLoadError(f"{path}: cannot read stores file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise StoreLoadError(f"{path}: stores file: {not_utf8(exc)}") from None


def stores_from_text(text: str, *, source: str = "<stores>", default_radius_m: float = 100.0
                     ) -> StoreSet:
    """Validate GeoJSON text; raise StoreLoadError listing every error."""
    stores, report = parse_stores(text, source=source, default_radius_m=default_radius_m)
    if stores is None:
        raise StoreLoadError(
            f"{source}: {len(report.errors)} error(s) in stores file", report.problems
        )
    return stores


def parse_stores(
    text: str, *, source: str = "<stores>", default_radius_m: float = 100.0
) -> tuple[StoreSet | None, Report]:
    """Parse GeoJSON text. Returns (stores, report); stores is None when there are errors."""
    report = Report()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        report.error(
            f"{source}:{exc.lineno}", f"not valid JSON: {exc.msg} (column {exc.colno})",
            expected="a GeoJSON FeatureCollection",
        )
        return None, report
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        got = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        report.error(
            f"{source}:1", f"type = {got!r}: expected a GeoJSON FeatureCollection",
            field="type", value=got, expected="FeatureCollection",
        )
        return None, report
    features = doc.get("features")
    if not isinstance(features, list):
        report.error(
            f"{source}:1", "features: expected a list of Features",
            field="features", value=type(features).__name__, expected="list",
        )
        return None, report

    if not features:
        report.warning(f"{source}:1", "features: the collection is empty; no geofence can fire",
                       field="features", value=0, expected="at least one Feature")
    lines = _feature_lines(text, len(features))
    builder = _Builder(source, default_radius_m, report)
    for index, feature in enumerate(features):
        builder.add(index, lines[index] if lines else None, feature)
    if report.errors:
        return None, report
    return StoreSet(tuple(builder.geofences), source, tuple(report.warnings)), report


class _Builder:
    def __init__(self, source: str, default_radius_m: float, report: Report) -> None:
        self.source = source
        self.default_radius_m = default_radius_m
        self.report = report
        self.geofences: list[Geofence] = []
        self._by_id: dict[str, tuple[int, Any]] = {}

    def add(self, index: int, line: int | None, feature: Any) -> None:
        at = f"{self.source}:{line}" if line else self.source
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            self.report.error(
                f"{at}: feature #{index}",
                f"expected a GeoJSON Feature, got {_say(feature)}",
                field="type", value=_short(feature), expected="Feature",
            )
            return
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            self.report.error(
                f"{at}: feature #{index}", "properties: expected an object",
                field="properties", value=_short(props), expected="object",
            )
            return
        # first of the three that is given: a `"id": null` must not hide properties["@id"]
        raw_id = next(
            (v for v in (feature.get("id"), props.get("id"), props.get("@id")) if v is not None),
            None,
        )
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
            self.report.error(
                f"{at}: feature #{index}",
                "id: missing (expected the Feature's id, properties.id or properties['@id'])",
                field="id", value=None, expected="a unique string",
            )
            return
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
            self.report.error(
                f"{at}: feature #{index}", f"id = {_say(raw_id)}: expected a string or an integer",
                field="id", value=_short(raw_id), expected="a unique string",
            )
            return
        fid = str(raw_id).strip()
        where = f"{at}: feature #{index} (id {fid!r})"
        errors_before = len(self.report.errors)

        geometry = feature.get("geometry")
        shape = _check_geometry(geometry, where, self.report)
        if fid in self._by_id:
            first_index, first_geometry = self._by_id[fid]
            if _same_geometry(first_geometry, geometry):
                self.report.warning(
                    where, f"duplicate of feature #{first_index} with the same geometry: merged",
                    field="id", value=fid,
                )
            else:
                self.report.error(
                    where,
                    f"id {fid!r} repeats feature #{first_index} with a different geometry",
                    field="id", value=fid, expected="a unique id",
                )
            return
        self._by_id[fid] = (index, geometry)
        if shape is None:
            return

        kind, lat, lon, polygon = shape
        radius = self._radius(kind, props, where)
        store_id = _as_text(props.get("store_id"), fid, "store_id", where, self.report)
        tags = _tags(props, where, self.report)
        timezone = _timezone(props, lat, lon, where, self.report)
        if len(self.report.errors) > errors_before or radius is None or timezone is None:
            return
        name = str(props.get("name") or props.get("brand") or props.get("operator") or fid)
        hours = _hours(props, timezone, lat, lon, where, self.report)
        template_props = dict(props)
        template_props.update(
            {"id": fid, "store_id": store_id, "name": name, "tags": list(tags), "timezone": timezone}
        )
        self.geofences.append(
            Geofence(
                id=fid, store_id=store_id, name=name, kind=kind, lat=lat, lon=lon,
                radius_m=radius, polygon=polygon, tags=tags, timezone=timezone, hours=hours,
                properties=template_props,
            )
        )

    def _radius(self, kind: str, props: dict[str, Any], where: str) -> float | None:
        if kind == "circle":
            if "buffer_m" in props:
                self.report.warning(where, "buffer_m is for polygons; ignored on a Point",
                                    field="buffer_m", value=props["buffer_m"])
            return _number(props, "radius_m", self.default_radius_m, where, self.report,
                           minimum=0.0, exclusive=True)
        if "radius_m" in props:
            self.report.warning(where, "radius_m is for Points; ignored on a polygon "
                                "(use buffer_m to widen it)", field="radius_m",
                                value=props["radius_m"])
        return _number(props, "buffer_m", 0.0, where, self.report, minimum=0.0, exclusive=False)


def _check_geometry(
    geometry: Any, where: str, report: Report
) -> tuple[Literal["circle", "polygon"], float, float, BaseGeometry | None] | None:
    if not isinstance(geometry, dict):
        report.error(where, "geometry: missing (expected Point, Polygon or MultiPolygon)",
                     field="geometry", value=_short(geometry),
                     expected="Point, Polygon or MultiPolygon")
        return None
    gtype = geometry.get("type")
    coords = geometry.get("coordinates")
    if gtype == "Point":
        position = _position(coords, "geometry.coordinates", where, report)
        if position is None:
            return None
        lon, lat = position
        return "circle", lat, lon, None
    if gtype == "Polygon":
        rings = _polygon(coords, "geometry.coordinates", where, report)
        if rings is None:
            return None
        shape: BaseGeometry = Polygon(rings[0], rings[1:])
    elif gtype == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            report.error(where, f"geometry.coordinates = {_say(coords)}: expected a list of "
                         "polygons", field="geometry.coordinates", value=_short(coords),
                         expected="list of polygons")
            return None
        parts = []
        for i, poly in enumerate(coords):
            rings = _polygon(poly, f"geometry.coordinates[{i}]", where, report)
            if rings is None:
                return None
            parts.append(Polygon(rings[0], rings[1:]))
        shape = MultiPolygon(parts)
    else:
        report.error(where, f"geometry.type = {gtype!r}: expected Point, Polygon or MultiPolygon",
                     field="geometry.type", value=_short(gtype),
                     expected="Point, Polygon or MultiPolygon")
        return None
    if not shape.is_valid:
        reason = shapely.is_valid_reason(shape)
        shape = shapely.make_valid(shape)
        shape = shapely.union_all(
            [g for g in getattr(shape, "geoms", [shape]) if g.geom_type in ("Polygon", "MultiPolygon")]
        )
        if shape.is_empty:
            report.error(where, f"geometry is not a valid polygon ({reason})",
                         field="geometry", value=reason, expected="a valid polygon")
            return None
        report.warning(where, f"geometry was not valid ({reason}); repaired",
                       field="geometry", value=reason)
    point = shape.representative_point() if shape.centroid.within(shape) is False else shape.centroid
    return "polygon", float(point.y), float(point.x), shape


def _polygon(
    coords: Any, fieldname: str, where: str, report: Report
) -> list[list[tuple[float, float]]] | None:
    if not isinstance(coords, list) or not coords:
        report.error(where, f"{fieldname} = {_say(coords)}: expected a list of linear rings",
                     field=fieldname, value=_short(coords), expected="list of linear rings")
        return None
    rings = []
    for r, ring in enumerate(coords):
        name = f"{fieldname}[{r}]"
        if not isinstance(ring, list) or len(ring) < 4:
            report.error(where, f"{name}: expected a closed ring of at least 4 positions, got "
                         f"{_say(ring)}", field=name, value=_short(ring),
                         expected="at least 4 positions, first = last")
            return None
        positions = []
        for p, pos in enumerate(ring):
            position = _position(pos, f"{name}[{p}]", where, report)
            if position is None:
                return None
            positions.append(position)
        if positions[0] != positions[-1]:
            report.error(where, f"{name}: ring is not closed (first position {positions[0]} "
                         f"differs from last {positions[-1]})", field=name,
                         value=[positions[0], positions[-1]], expected="first = last")
            return None
        rings.append(positions)
    return rings


def _position(pos: Any, fieldname: str, where: str, report: Report) -> tuple[float, float] | None:
    if (
        not isinstance(pos, list | tuple)
        or len(pos) < 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pos[:2])
    ):
        report.error(where, f"{fieldname} = {_say(pos)}: expected [lon, lat] numbers",
                     field=fieldname, value=_short(pos), expected="[lon, lat]")
        return None
    lon, lat = float(pos[0]), float(pos[1])
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        report.error(where, f"{fieldname}: longitude {pos[0]!r} out of range",
                     field=fieldname, value=pos[0], expected="longitude in [-180, 180]")
        return None
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        report.error(where, f"{fieldname}: latitude {pos[1]!r} out of range "
                     "(GeoJSON positions are [lon, lat])",
                     field=fieldname, value=pos[1], expected="latitude in [-90, 90]")
        return None
    return lon, lat


def _number(props: dict[str, Any], key: str, default: float, where: str, report: Report,
            *, minimum: float, exclusive: bool) -> float | None:
    value = props.get(key, default)
    if value is None:
        value = default
    bound = f"> {minimum:g}" if exclusive else f"≥ {minimum:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
        or (exclusive and value == minimum)
    ):
        report.error(where, f"{key} = {value!r}: expected a number of metres {bound}",
                     field=key, value=_short(value), expected=f"number {bound}")
        return None
    return float(value)


def _as_text(value: Any, default: str, key: str, where: str, report: Report) -> str:
    if value is None:
        return default
    if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    report.error(where, f"{key} = {_say(value)}: expected a non-empty string",
                 field=key, value=_short(value), expected="string")
    return default


def _tags(props: dict[str, Any], where: str, report: Report) -> tuple[str, ...]:
    tags: list[str] = []
    given = props.get("tags")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
            report.error(where, f"tags = {_say(given)}: expected a list of strings",
                         field="tags", value=_short(given), expected="list of strings")
        else:
            tags.extend(given)
    for key in TAG_KEYS:
        value = props.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        values = value.split(";") if key in _MULTI_VALUE_KEYS else [value]
        tags.extend(f"{key}:{v.strip()}" for v in values if v.strip())
    return tuple(dict.fromkeys(tags))  # keep order, drop repeats


def _timezone(props: dict[str, Any], lat: float, lon: float, where: str, report: Report) -> str | None:
    given = props.get("timezone")
    if given is not None:
        if isinstance(given, str) and _is_zone(given):
            return given
        report.error(where, f"timezone = {_say(given)}: expected an IANA time zone name "
                     "like Europe/Paris", field="timezone", value=_short(given),
                     expected="IANA time zone")
        return None
    return timezone_at(lat, lon)


def _hours(props: dict[str, Any], timezone: str, lat: float, lon: float, where: str,
           report: Report) -> StoreHours | None:
    expression = props.get("opening_hours")
    if expression is None:
        return None
    if not isinstance(expression, str):
        report.warning(where, f"opening_hours = {_say(expression)}: not text; hours unknown",
                       field="opening_hours", value=_short(expression))
        return None
    try:
        return StoreHours.parse(expression, timezone, lat, lon)
    except HoursSyntaxError as exc:
        report.warning(where, f"opening_hours = {expression!r} is not OSM opening_hours syntax "
                       f"({exc}); hours unknown", field="opening_hours", value=expression,
                       expected="OSM opening_hours syntax")
        return None


@lru_cache(maxsize=4096)
def _is_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@lru_cache(maxsize=1)
def _finder() -> Any:
    from timezonefinder import TimezoneFinder

    # in_memory: no data files left open for the life of the process (ResourceWarning at exit)
    return TimezoneFinder(in_memory=True)


def timezone_at(lat: float, lon: float) -> str:
    """IANA zone at a point; offshore points get the nautical Etc/GMT±h zone, never nothing."""
    name = _finder().timezone_at(lng=lon, lat=lat)
    if name and _is_zone(name):
        return str(name)
    return "UTC"


def _same_geometry(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _say(value: Any) -> str:
    """A bad value as an error message shows it: text quoted, anything else as JSON."""
    short = _short(value)
    return repr(short) if isinstance(value, str) else str(short)


_FEATURES_KEY = re.compile(r'"features"\s*:\s*\[')


def _feature_lines(text: str, count: int) -> list[int] | None:
    """1-based line where each feature starts, found by decoding the array element by element.

    json.loads keeps no positions; errors are far easier to fix with a line number."""
    match = _FEATURES_KEY.search(text)
    if match is None:
        return None
    decoder = json.JSONDecoder()
    pos = match.end()
    starts: list[int] = []
    newlines = 0
    last = 0
    length = len(text)
    while len(starts) < count:
        while pos < length and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= length or text[pos] == "]":
            break
        newlines += text.count("\n", last, pos)
        last = pos
        starts.append(newlines + 1)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
    return starts if len(starts) == count else None
