"""Spatial index of geofences: which fences are within reach of each ping of a batch.

Distances are metres on the sphere, right at every latitude: circles use the haversine distance
to the centre, polygons are kept in a local metric frame around their own centre. Candidates come
from a shapely STRtree (a packed R-tree) of each fence's bounding box in degrees, widened by the
fence's reach with the exact spherical-cap longitude span, split at the antimeridian and opened
to every longitude around the poles. The index is immutable: a reload builds a new one and swaps
the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from geopush.geo.stores import Geofence, StoreSet

EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius; haversine on it is within 0.5 % of WGS84

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True, slots=True)
class Proximity:
    """The (ping, fence) pairs of a batch within each fence's reach, grouped by ping."""

    ping: IntArray  # index into the batch, ascending
    fence: IntArray  # index into the index's fences
    distance_m: FloatArray  # 0 inside a polygon

    def __len__(self) -> int:
        return len(self.ping)


def haversine_m(
    lat1: FloatArray | float, lon1: FloatArray | float, lat2: FloatArray | float,
    lon2: FloatArray | float,
) -> FloatArray:
    """Great-circle distance in metres between points given in degrees (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0))))


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Scalar haversine, for single pings (no numpy overhead)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(a, 1.0)))


class GeofenceIndex:
    """Immutable index over circles (centre + radius) and polygons (+ buffer)."""

    def __init__(
        self,
        lat: Sequence[float] | FloatArray,
        lon: Sequence[float] | FloatArray,
        inside_m: Sequence[float] | FloatArray,
        polygons: Sequence[BaseGeometry | None] | None = None,
        *,
        hysteresis_m: float = 25.0,
        fences: Sequence[Geofence] = (),
        ids: Sequence[str] | None = None,
        store_ids: Sequence[str] | None = None,
    ) -> None:
        """Build from columns: a fence is a circle where polygons[i] is None.

        `inside_m` is the circle radius or the polygon buffer; a fence is *near* a ping within
        inside_m + hysteresis_m (the exit threshold), which is what a query returns."""
        self.fences = tuple(fences)
        self.lat = np.asarray(lat, dtype=np.float64)
        n = len(self.lat)
        if ids is None:
            ids = [f.id for f in fences] if fences else [str(i) for i in range(n)]
        self.ids: tuple[str, ...] = tuple(ids)
        self.store_ids: tuple[str, ...] = tuple(
            store_ids if store_ids is not None
            else ([f.store_id for f in fences] if fences else self.ids)
        )
        self.position: dict[str, int] = {fid: i for i, fid in enumerate(self.ids)}
        self.lon = np.asarray(lon, dtype=np.float64)
        self.inside_m = np.asarray(inside_m, dtype=np.float64)
        self.hysteresis_m = float(hysteresis_m)
        self.reach_m = self.inside_m + self.hysteresis_m
        self._polygon_of = np.full(n, -1, dtype=np.intp)  # fence → slot in _local_polygons
        local: list[BaseGeometry] = []
        if polygons is not None:
            for i, poly in enumerate(polygons):
                if poly is not None:
                    self._polygon_of[i] = len(local)
                    local.append(_to_local(poly, self.lat[i], self.lon[i]))
        self._local_polygons = np.array(local, dtype=object)
        self._has_polygons = bool(local)
        self._polygon_fences = frozenset(np.flatnonzero(self._polygon_of >= 0).tolist())
        bounds = self._bounds(polygons)
        self._box_fence, boxes = _boxes(bounds, self.reach_m)
        self._tree = shapely.STRtree(boxes)

    @classmethod
    def from_stores(cls, stores: StoreSet, *, hysteresis_m: float) -> GeofenceIndex:
        fences = stores.geofences
        return cls(
            [f.lat for f in fences],
            [f.lon for f in fences],
            [f.radius_m for f in fences],
            [f.polygon for f in fences],
            hysteresis_m=hysteresis_m,
            fences=fences,
        )

    def __len__(self) -> int:
        return len(self.lat)

    def is_polygon(self, fence: int) -> bool:
        return fence in self._polygon_fences

    def distance_to(self, fence: int, lat: float, lon: float) -> float:
        """Metres from a point to one fence (0 inside a polygon), whether in reach or not.

        Polygons are measured in their local frame, exact within a few km of the fence."""
        slot = int(self._polygon_of[fence])
        if slot < 0:
            return distance_m(lat, lon, float(self.lat[fence]), float(self.lon[fence]))
        x, y = _local_xy(np.array([lat]), np.array([lon]), self.lat[fence:fence + 1],
                         self.lon[fence:fence + 1])
        return float(shapely.distance(self._local_polygons[slot], shapely.points(x, y))[0])

    def query(self, lat: Sequence[float] | FloatArray, lon: Sequence[float] | FloatArray) -> Proximity:
        """Every (ping, fence) pair with the ping within the fence's reach, in ping order."""
        plat = np.asarray(lat, dtype=np.float64)
        plon = np.asarray(lon, dtype=np.float64)
        if len(plat) == 0 or len(self) == 0:
            empty_i = np.empty(0, dtype=np.intp)
            return Proximity(empty_i, empty_i.copy(), np.empty(0, dtype=np.float64))
        ping, box = self._tree.query(shapely.points(plon, plat))
        fence = self._box_fence[box]
        dist = haversine_m(plat[ping], plon[ping], self.lat[fence], self.lon[fence])
        if self._has_polygons:
            slot = self._polygon_of[fence]
            is_poly = slot >= 0
            if is_poly.any():
                pp, pf = ping[is_poly], fence[is_poly]
                x, y = _local_xy(plat[pp], plon[pp], self.lat[pf], self.lon[pf])
                dist[is_poly] = shapely.distance(
                    self._local_polygons[slot[is_poly]], shapely.points(x, y)
                )
        keep = dist <= self.reach_m[fence]
        if len(self._box_fence) != len(self) and keep.any():
            keep &= _first_of_repeats(ping, fence)
        ping, fence, dist = ping[keep], fence[keep], dist[keep]
        if len(ping) > 1 and not bool((ping[1:] >= ping[:-1]).all()):
            # GEOS answers in input order today; the tracker relies on it, so make sure
            order = np.argsort(ping, kind="stable")
            ping, fence, dist = ping[order], fence[order], dist[order]
        return Proximity(ping, fence, dist)

    def _bounds(self, polygons: Sequence[BaseGeometry | None] | None) -> FloatArray:
        """minlon, minlat, maxlon, maxlat of each fence's own shape (a circle's is its centre)."""
        bounds = np.column_stack([self.lon, self.lat, self.lon, self.lat])
        if polygons is not None:
            for i, poly in enumerate(polygons):
                if poly is not None:
                    bounds[i] = poly.bounds
        return bounds


def _boxes(bounds: FloatArray, reach_m: FloatArray) -> tuple[IntArray, npt.NDArray[np.object_]]:
    """Degree boxes that surely contain every point within reach of each shape."""
    angular = reach_m / EARTH_RADIUS_M  # radians
    dlat = np.degrees(angular)
    minlat = bounds[:, 1] - dlat
    maxlat = bounds[:, 3] + dlat
    polar = (minlat <= -90.0) | (maxlat >= 90.0)
    # Longitude half-width of a spherical cap of angular radius a at latitude φ is
    # asin(sin a / cos φ); taken at the shape's most poleward latitude it covers the whole cap.
    worst = np.maximum(np.abs(bounds[:, 1]), np.abs(bounds[:, 3]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sin(angular) / np.cos(np.radians(worst))
    polar |= ratio >= 1.0
    dlon = np.degrees(np.arcsin(np.clip(ratio, 0.0, 1.0)))
    minlon = np.where(polar, -180.0, bounds[:, 0] - dlon)
    maxlon = np.where(polar, 180.0, bounds[:, 2] + dlon)
    minlat = np.maximum(minlat, -90.0)
    maxlat = np.minimum(maxlat, 90.0)

    owner = np.arange(len(bounds), dtype=np.intp)
    parts = [(owner, np.maximum(minlon, -180.0), minlat, np.minimum(maxlon, 180.0), maxlat)]
    west = minlon < -180.0  # wraps past -180: the rest lies near +180
    if west.any():
        parts.append((owner[west], minlon[west] + 360.0, minlat[west],
                      np.full(west.sum(), 180.0), maxlat[west]))
    east = maxlon > 180.0
    if east.any():
        parts.append((owner[east], np.full(east.sum(), -180.0), minlat[east],
                      maxlon[east] - 360.0, maxlat[east]))
    fence = np.concatenate([p[0] for p in parts])
    boxes = shapely.box(
        np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
        np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts]),
    )
    return fence, boxes


def _local_xy(
    lat: FloatArray, lon: FloatArray, lat0: FloatArray, lon0: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Metres east and north of (lat0, lon0). Exact enough within a few km of the origin,
    which is all a geofence's reach covers."""
    dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
    x = np.radians(dlon) * EARTH_RADIUS_M * np.cos(np.radians(lat0))
    y = np.radians(lat - lat0) * EARTH_RADIUS_M
    return x, y


def _to_local(polygon: BaseGeometry, lat0: float, lon0: float) -> BaseGeometry:
    def project(coords: FloatArray) -> FloatArray:
        n = len(coords)
        x, y = _local_xy(coords[:, 1], coords[:, 0], np.full(n, lat0), np.full(n, lon0))
        return np.column_stack([x, y])

    local = shapely.transform(polygon, project)
    shapely.prepare(local)
    return local


def _first_of_repeats(ping: IntArray, fence: IntArray) -> npt.NDArray[np.bool_]:
    """A fence split at the antimeridian can match one ping twice; keep one pair."""
    key = ping.astype(np.int64) * (int(fence.max()) + 1) + fence
    _, first = np.unique(key, return_index=True)
    mask = np.zeros(len(ping), dtype=bool)
    mask[first] = True
    return mask
