"""GeofenceIndex: metres right at every latitude, circles and polygons, exactly the pairs in reach.

The reference distances come from spherical trigonometry written here independently of the
index (the direct problem for points at a known distance, and a chord in 3-D for distances),
and the reference pair sets from a brute-force scan of every (ping, fence) pair.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon

from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex, distance_m, haversine_m

R = EARTH_RADIUS_M


def destination(lat: float, lon: float, bearing_deg: float, dist_m: float) -> tuple[float, float]:
    """The point `dist_m` from (lat, lon) along the initial bearing, on the sphere (the direct
    geodesic problem), longitude normalised to [-180, 180)."""
    phi1, lmb1, theta = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    delta = dist_m / R
    phi2 = math.asin(math.sin(phi1) * math.cos(delta)
                     + math.cos(phi1) * math.sin(delta) * math.cos(theta))
    lmb2 = lmb1 + math.atan2(math.sin(theta) * math.sin(delta) * math.cos(phi1),
                             math.cos(delta) - math.sin(phi1) * math.sin(phi2))
    lon2 = (math.degrees(lmb2) + 180.0) % 360.0 - 180.0
    return math.degrees(phi2), lon2


def chord_distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance through the 3-D chord between the two points (no haversine)."""
    def xyz(lat: float, lon: float) -> tuple[float, float, float]:
        p, lm = math.radians(lat), math.radians(lon)
        return math.cos(p) * math.cos(lm), math.cos(p) * math.sin(lm), math.sin(p)

    a, b = xyz(lat1, lon1), xyz(lat2, lon2)
    chord = math.dist(a, b)
    return 2 * R * math.asin(min(chord / 2, 1.0))


def square(lat: float, lon: float, half_m: float) -> Polygon:
    """A square of side 2·half_m centred on (lat, lon), its sides north-south and east-west."""
    north, _ = destination(lat, lon, 0, half_m)
    south, _ = destination(lat, lon, 180, half_m)
    _, east = destination(lat, lon, 90, half_m)
    _, west = destination(lat, lon, 270, half_m)
    return Polygon([(west, south), (east, south), (east, north), (west, north)])


def pairs(index: GeofenceIndex, lat: list[float], lon: list[float]) -> dict[tuple[int, int], float]:
    prox = index.query(lat, lon)
    return {(p, f): d for p, f, d in zip(prox.ping.tolist(), prox.fence.tolist(),
                                          prox.distance_m.tolist(), strict=True)}


# -- distances -------------------------------------------------------------------------------

PLACES = [
    pytest.param(0.0, 0.0, id="equator"),
    pytest.param(45.0, 7.0, id="45N"),
    pytest.param(-45.0, -70.0, id="45S"),
    pytest.param(70.0, 25.0, id="70N"),
    pytest.param(85.0, -40.0, id="85N"),
    pytest.param(89.99, 10.0, id="near-north-pole"),
    pytest.param(-89.99, 120.0, id="near-south-pole"),
    pytest.param(10.0, 179.9995, id="antimeridian-east"),
    pytest.param(-20.0, -179.9995, id="antimeridian-west"),
]


@pytest.mark.parametrize(("lat", "lon"), PLACES)
@pytest.mark.parametrize("bearing", [0, 45, 90, 135, 180, 270, 300])
@pytest.mark.parametrize("dist", [0.0, 1.0, 37.5, 99.0, 124.0])
def test_distance_is_metres_on_the_sphere_everywhere(
    lat: float, lon: float, bearing: float, dist: float
) -> None:
    index = GeofenceIndex([lat], [lon], [100.0], hysteresis_m=25.0)
    plat, plon = destination(lat, lon, bearing, dist)
    found = pairs(index, [plat], [plon])
    assert list(found) == [(0, 0)]
    assert found[0, 0] == pytest.approx(dist, abs=1e-3)
    assert found[0, 0] == pytest.approx(chord_distance_m(lat, lon, plat, plon), abs=1e-3)
    assert index.distance_to(0, plat, plon) == pytest.approx(dist, abs=1e-3)


@pytest.mark.parametrize(("lat", "lon"), PLACES)
@pytest.mark.parametrize("bearing", [0, 60, 90, 180, 250])
def test_reach_is_radius_plus_hysteresis_at_every_latitude(
    lat: float, lon: float, bearing: float
) -> None:
    index = GeofenceIndex([lat], [lon], [80.0], hysteresis_m=25.0)  # reach 105 m
    just_in = destination(lat, lon, bearing, 104.9)
    just_out = destination(lat, lon, bearing, 105.1)
    found = pairs(index, [just_in[0], just_out[0]], [just_in[1], just_out[1]])
    assert list(found) == [(0, 0)]


def test_scalar_and_vector_haversine_agree_with_the_chord() -> None:
    rng = np.random.default_rng(3)
    lat1, lat2 = rng.uniform(-90, 90, 200), rng.uniform(-90, 90, 200)
    lon1, lon2 = rng.uniform(-180, 180, 200), rng.uniform(-180, 180, 200)
    vector = haversine_m(lat1, lon1, lat2, lon2)
    for i in range(200):
        args = (float(lat1[i]), float(lon1[i]), float(lat2[i]), float(lon2[i]))
        reference = chord_distance_m(*args)
        assert distance_m(*args) == pytest.approx(reference, rel=1e-9, abs=1e-6)
        assert float(vector[i]) == pytest.approx(reference, rel=1e-9, abs=1e-6)


def test_known_lengths_of_a_degree() -> None:
    """One degree of latitude is R·π/180 everywhere; of longitude, that times cos(latitude)."""
    degree = R * math.pi / 180  # 111 195.08 m
    assert distance_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(degree, rel=1e-12)
    assert distance_m(60.0, 10.0, 61.0, 10.0) == pytest.approx(degree, rel=1e-12)
    assert distance_m(0.0, 179.5, 0.0, -179.5) == pytest.approx(degree, rel=1e-12)
    # along a parallel the great circle is a little shorter than the parallel itself
    assert distance_m(60.0, 0.0, 60.0, 0.001) == pytest.approx(degree * 0.001 * 0.5, rel=1e-6)


def test_circles_keep_their_own_radius() -> None:
    lat, lon = 52.0, 13.0
    index = GeofenceIndex([lat, lat, lat], [lon, lon, lon], [50.0, 150.0, 300.0],
                          hysteresis_m=10.0, ids=["small", "medium", "large"])
    at = [destination(lat, lon, 90, d) for d in (55.0, 65.0, 159.0, 200.0, 309.0, 311.0)]
    found = pairs(index, [a[0] for a in at], [a[1] for a in at])
    assert sorted(found) == sorted([
        (0, 0), (0, 1), (0, 2),  # 55 m: within 50+10 of the small one
        (1, 1), (1, 2),  # 65 m: beyond the small one's reach (60 m)
        (2, 1), (2, 2),
        (3, 2),
        (4, 2),
    ])


def test_the_same_ping_twice_and_pings_far_from_everything() -> None:
    index = GeofenceIndex([46.0], [14.0], [100.0])
    inside = destination(46.0, 14.0, 10, 20.0)
    prox = index.query([inside[0], 0.0, inside[0]], [inside[1], 0.0, inside[1]])
    assert prox.ping.tolist() == [0, 2]
    assert prox.fence.tolist() == [0, 0]


# -- polygons --------------------------------------------------------------------------------

@pytest.mark.parametrize(("lat", "lon"), [
    pytest.param(0.0, 30.0, id="equator"),
    pytest.param(48.85, 2.35, id="paris"),
    pytest.param(78.2, 15.6, id="svalbard"),
    pytest.param(-16.5, 179.999, id="antimeridian"),
])
def test_polygon_distance_is_zero_inside_and_metres_to_the_edge_outside(
    lat: float, lon: float
) -> None:
    half = 100.0
    index = GeofenceIndex([lat], [lon], [0.0], [square(lat, lon, half)], hysteresis_m=25.0)
    assert index.is_polygon(0)
    near_corner = destination(*destination(lat, lon, 0, 90.0), 90, 90.0)
    north_10 = destination(lat, lon, 0, half + 10.0)
    east_20 = destination(lat, lon, 90, half + 20.0)
    west_24 = destination(lat, lon, 270, half + 24.0)
    south_30 = destination(lat, lon, 180, half + 30.0)  # beyond reach (0 + 25)
    points = [(lat, lon), near_corner, north_10, east_20, west_24, south_30]
    found = pairs(index, [p[0] for p in points], [p[1] for p in points])
    assert sorted(found) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
    assert found[0, 0] == 0.0
    assert found[1, 0] == 0.0
    assert found[2, 0] == pytest.approx(10.0, abs=0.05)
    assert found[3, 0] == pytest.approx(20.0, abs=0.05)
    assert found[4, 0] == pytest.approx(24.0, abs=0.05)
    # out of reach, distance_to still measures it
    assert index.distance_to(0, *south_30) == pytest.approx(30.0, abs=0.05)
    assert index.distance_to(0, lat, lon) == 0.0


def test_polygon_buffer_widens_the_reach() -> None:
    lat, lon = 45.0, 9.0
    index = GeofenceIndex([lat], [lon], [20.0], [square(lat, lon, 50.0)], hysteresis_m=25.0)
    inside_buffer = destination(lat, lon, 0, 50.0 + 19.0)  # within the 20 m buffer
    in_band = destination(lat, lon, 0, 50.0 + 44.0)  # beyond the buffer, within + hysteresis
    beyond = destination(lat, lon, 0, 50.0 + 46.0)
    found = pairs(index, [inside_buffer[0], in_band[0], beyond[0]],
                  [inside_buffer[1], in_band[1], beyond[1]])
    assert sorted(found) == [(0, 0), (1, 0)]
    assert found[0, 0] == pytest.approx(19.0, abs=0.05)
    assert found[1, 0] == pytest.approx(44.0, abs=0.05)
    assert found[0, 0] <= index.inside_m[0] < found[1, 0]


def test_multipolygon_parts_and_the_gap_between() -> None:
    lat, lon = 50.0, 8.0
    west_part = square(*destination(lat, lon, 270, 300.0), 100.0)
    east_part = square(*destination(lat, lon, 90, 300.0), 100.0)
    shape = MultiPolygon([west_part, east_part])
    index = GeofenceIndex([lat], [destination(lat, lon, 90, 300.0)[1]], [0.0], [shape],
                          hysteresis_m=25.0)
    in_west = destination(lat, lon, 270, 300.0)
    in_east = destination(lat, lon, 90, 300.0)
    gap_near_west = destination(lat, lon, 270, 180.0)  # 20 m east of the west part
    gap_middle = (lat, lon)  # 200 m from both
    found = pairs(index, [in_west[0], in_east[0], gap_near_west[0], gap_middle[0]],
                  [in_west[1], in_east[1], gap_near_west[1], gap_middle[1]])
    assert sorted(found) == [(0, 0), (1, 0), (2, 0)]
    assert found[0, 0] == 0.0 and found[1, 0] == 0.0
    assert found[2, 0] == pytest.approx(20.0, abs=0.1)


def test_polygon_with_a_hole_is_not_inside_in_the_hole() -> None:
    lat, lon = 40.0, -3.7
    outer = square(lat, lon, 200.0)
    hole = square(lat, lon, 100.0)
    shape = Polygon(outer.exterior.coords, [hole.exterior.coords])
    index = GeofenceIndex([lat], [lon], [0.0], [shape], hysteresis_m=25.0)
    assert pairs(index, [lat], [lon]) == {}  # 100 m from the hole's edge: out of reach
    in_hole = destination(lat, lon, 0, 90.0)
    ring = destination(lat, lon, 0, 150.0)
    found = pairs(index, [in_hole[0], ring[0]], [in_hole[1], ring[1]])
    assert found[0, 0] == pytest.approx(10.0, abs=0.05)
    assert found[1, 0] == 0.0


# -- exactly the pairs in reach: brute force on random data ----------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_query_returns_exactly_the_pairs_within_reach(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hubs = [(0.0, 0.0), (46.0, 14.0), (-33.9, 151.2), (69.6, 18.9), (84.0, -60.0),
            (10.0, 179.99), (10.0, -179.99), (89.995, 0.0), (-89.995, 45.0)]
    flat, flon, radius = [], [], []
    for _ in range(600):
        hub = hubs[rng.integers(len(hubs))]
        lat, lon = destination(*hub, rng.uniform(0, 360), rng.uniform(0, 2_000))
        flat.append(lat)
        flon.append(lon)
        radius.append(float(rng.uniform(20, 400)))
    hysteresis = 25.0
    index = GeofenceIndex(flat, flon, radius, hysteresis_m=hysteresis)
    plat, plon = [], []
    for _ in range(1500):
        fence = int(rng.integers(len(flat)))
        lat, lon = destination(flat[fence], flon[fence], rng.uniform(0, 360),
                               rng.uniform(0, 700))
        plat.append(lat)
        plon.append(lon)
    found = pairs(index, plat, plon)
    expected = {}
    for p in range(len(plat)):
        for f in range(len(flat)):
            d = chord_distance_m(plat[p], plon[p], flat[f], flon[f])
            if d <= radius[f] + hysteresis - 1e-6:
                expected[p, f] = d
            elif d <= radius[f] + hysteresis + 1e-6:
                found.pop((p, f), None)  # on the boundary: either answer is right
    assert set(found) == set(expected)
    for key, d in expected.items():
        assert found[key] == pytest.approx(d, abs=1e-3)
    prox = index.query(plat, plon)
    assert (np.diff(prox.ping) >= 0).all()  # grouped by ping, in ping order


def _edge_distance_m(polygon: Polygon, lat: float, lon: float) -> float:
    """Metres from a point outside a small polygon to its boundary, by haversine to points
    every ~0.2 m along the edges (independent of the index's local projection)."""
    best = math.inf
    for (lon1, lat1), (lon2, lat2) in pairwise(polygon.exterior.coords):
        steps = max(2, int(chord_distance_m(lat1, lon1, lat2, lon2) / 0.2))
        t = np.linspace(0.0, 1.0, steps + 1)
        d = haversine_m(lat, lon, lat1 + t * (lat2 - lat1), lon1 + t * (lon2 - lon1))
        best = min(best, float(d.min()))
    return best


@pytest.mark.parametrize("seed", [4, 5])
def test_query_on_polygons_returns_exactly_the_pairs_within_reach(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hubs = [(0.5, 10.0), (48.0, 11.0), (-37.8, 145.0), (70.0, 25.0), (80.0, 20.0)]
    squares, clat, clon, buffers = [], [], [], []
    for _ in range(120):
        centre = destination(*hubs[rng.integers(len(hubs))], rng.uniform(0, 360),
                             rng.uniform(0, 1_500))
        squares.append(square(*centre, float(rng.uniform(20, 100))))
        clat.append(centre[0])
        clon.append(centre[1])
        buffers.append(float(rng.choice([0.0, 5.0, 20.0])))
    hysteresis = 25.0
    index = GeofenceIndex(clat, clon, buffers, squares, hysteresis_m=hysteresis)
    plat, plon = [], []
    for _ in range(200):
        fence = int(rng.integers(len(squares)))
        lat, lon = destination(clat[fence], clon[fence], rng.uniform(0, 360),
                               rng.uniform(0, 200))
        plat.append(lat)
        plon.append(lon)
    found = pairs(index, plat, plon)
    expected = {}
    for p in range(len(plat)):
        for f in range(len(squares)):
            if chord_distance_m(plat[p], plon[p], clat[f], clon[f]) > 600:
                continue  # too far to be in reach of a square of at most 200 m
            if shapely.contains_xy(squares[f], plon[p], plat[p]):
                d = 0.0
            else:
                d = _edge_distance_m(squares[f], plat[p], plon[p])
            reach = buffers[f] + hysteresis
            if abs(d - reach) < 0.3:
                found.pop((p, f), None)  # too close to the boundary to call
            elif d < reach:
                expected[p, f] = d
    assert set(found) == set(expected)
    assert sum(d == 0 for d in expected.values()) > 20  # inside, and
    assert sum(d > 0 for d in expected.values()) > 20  # within reach outside
    for key, d in expected.items():
        assert found[key] == pytest.approx(d, abs=0.3)


def test_query_returns_each_pair_once_for_fences_split_at_the_antimeridian() -> None:
    index = GeofenceIndex([0.0, 0.0], [179.9999, -179.9999], [100.0, 100.0])
    prox = index.query([0.0, 0.0, 0.0], [180.0, -180.0, 179.9995])
    assert sorted(zip(prox.ping.tolist(), prox.fence.tolist(), strict=True)) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


# -- edges -----------------------------------------------------------------------------------

def test_empty_index_and_empty_batch() -> None:
    empty = GeofenceIndex([], [], [])
    assert len(empty) == 0
    assert len(empty.query([1.0], [2.0])) == 0
    index = GeofenceIndex([1.0], [2.0], [100.0])
    for prox in (index.query([], []), empty.query([], [])):
        assert len(prox) == 0
        assert prox.ping.dtype == np.intp and prox.fence.dtype == np.intp
        assert prox.distance_m.dtype == np.float64


def test_ids_store_ids_and_positions() -> None:
    index = GeofenceIndex([1.0, 2.0], [1.0, 2.0], [10.0, 10.0], ids=["a", "b"],
                          store_ids=["s", "s"])
    assert index.ids == ("a", "b")
    assert index.store_ids == ("s", "s")
    assert index.position == {"a": 0, "b": 1}
    default = GeofenceIndex([1.0], [1.0], [10.0])
    assert default.ids == ("0",) and default.store_ids == ("0",)


def test_from_stores_uses_radius_buffer_and_store_ids() -> None:
    from geopush.geo.stores import parse_stores

    text = """{"type": "FeatureCollection", "features": [
      {"type": "Feature", "id": "c", "properties": {"radius_m": 50, "store_id": "s1",
       "timezone": "Europe/Ljubljana"},
       "geometry": {"type": "Point", "coordinates": [14.0, 46.0]}},
      {"type": "Feature", "id": "p", "properties": {"buffer_m": 10, "timezone": "Europe/Ljubljana"},
       "geometry": {"type": "Polygon", "coordinates": [[[14.01, 46.0], [14.011, 46.0],
        [14.011, 46.001], [14.01, 46.001], [14.01, 46.0]]]}}]}"""
    stores, report = parse_stores(text)
    assert stores is not None, report.problems
    index = GeofenceIndex.from_stores(stores, hysteresis_m=25.0)
    assert index.ids == ("c", "p")
    assert index.store_ids == ("s1", "p")
    assert index.inside_m.tolist() == [50.0, 10.0]
    assert not index.is_polygon(0) and index.is_polygon(1)
    lat, lon = destination(46.0005, 14.0105, 0, 0.0)
    found = pairs(index, [lat], [lon])
    assert found == {(0, 1): 0.0}
    assert shapely.contains_xy(stores.geofences[1].polygon, lon, lat)
