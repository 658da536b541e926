"""Real GPS traces against stores placed on them (contract §5), judged as a person watching the
trace on a map would judge them.

Stores are placed from the trace itself (a point on the route, the middle of a stop), never at
hand-typed coordinates. Traces: a 1 Hz city drive in Munich (barefoot, stops at lights) and a
phone trace from Neuchâtel to Lausanne (posmo: accuracy 0–96 m, implausible jumps, a few fixes
out of order). Everything runs through `geopush replay`'s engine with the embedded settings.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from geopush.cli.replay import BadLine, Replay, ReplayResult, read_pings
from geopush.config import VisitSettings, load_settings
from geopush.geo.index import EARTH_RADIUS_M, distance_m, haversine_m
from geopush.geo.model import Event, Ping
from geopush.geo.stores import parse_stores
from geopush.service.active import build_engine

REPO = Path(__file__).parent.parent
TRACES = Path(__file__).parent / "fixtures" / "traces"
MUNICH = TRACES / "barefoot_munich_x0001-001.csv"
POSMO = TRACES / "posmo_switzerland_20190125.csv"


@dataclass(frozen=True)
class Store:
    id: str
    lat: float
    lon: float
    radius_m: float


@cache
def _trace(path: Path) -> tuple[Ping, ...]:
    """The trace's fixes in file order (the order a phone would have sent them)."""
    pings = []
    for _, record in read_pings(path, device_id="phone"):
        assert not isinstance(record, BadLine), record
        pings.append(record)
    return tuple(pings)


def _replay(pings: Iterable[Ping], stores: Sequence[Store], *,
            min_dwell_s: float | None = None) -> ReplayResult:
    features = [{"type": "Feature", "id": s.id, "properties": {"radius_m": s.radius_m},
                 "geometry": {"type": "Point", "coordinates": [s.lon, s.lat]}} for s in stores]
    store_set, report = parse_stores(json.dumps({"type": "FeatureCollection",
                                                 "features": features}))
    assert store_set is not None, report.problems
    settings = load_settings(REPO / "config" / "geopush.yaml")
    if min_dwell_s is not None:
        settings = settings.model_copy(update={"visits": VisitSettings(min_dwell=min_dwell_s)})
    replay = Replay(build_engine(settings, store_set), assume_consent=True)
    return replay.run(enumerate(pings, start=2))


def _of(result: ReplayResult, store_id: str) -> list[Event]:
    return [e for e in result.events if e.geofence_id == store_id]


def _offset(lat: float, lon: float, metres: float, bearing_deg: float) -> tuple[float, float]:
    """The point `metres` away on a bearing (local flat approximation, fine under a km)."""
    north = metres * math.cos(math.radians(bearing_deg))
    east = metres * math.sin(math.radians(bearing_deg))
    return (lat + math.degrees(north / EARTH_RADIUS_M),
            lon + math.degrees(east / (EARTH_RADIUS_M * math.cos(math.radians(lat)))))


def _nearest_m(pings: Sequence[Ping], lat: float, lon: float) -> float:
    lats = np.array([p.lat for p in pings])
    lons = np.array([p.lon for p in pings])
    return float(haversine_m(lats, lons, lat, lon).min())


def _speed(pings: Sequence[Ping], i: int, span: int = 5) -> float:
    a, b = pings[max(i - span, 0)], pings[min(i + span, len(pings) - 1)]
    return distance_m(a.lat, a.lon, b.lat, b.lon) / (b.ts - a.ts)


@dataclass(frozen=True)
class Stop:
    """A stretch where the phone stays within STOP_RADIUS_M of where it stopped."""

    trace: str
    first: int
    last: int
    lat: float  # median of its fixes
    lon: float
    start: float
    end: float

    @property
    def name(self) -> str:
        return f"{self.trace}-stop-at-{self.start - _trace(_TRACE_PATHS[self.trace])[0].ts:.0f}s"


STOP_RADIUS_M = 60.0
STOP_MIN_S = 60.0
_TRACE_PATHS = {"munich": MUNICH, "posmo": POSMO}


@cache
def _stops(trace: str) -> tuple[Stop, ...]:
    pings = _trace(_TRACE_PATHS[trace])
    stops = []
    i = 0
    while i < len(pings):
        j = i
        while (j + 1 < len(pings) and distance_m(pings[i].lat, pings[i].lon, pings[j + 1].lat,
                                                 pings[j + 1].lon) <= STOP_RADIUS_M):
            j += 1
        if pings[j].ts - pings[i].ts >= STOP_MIN_S:
            part = pings[i:j + 1]
            stops.append(Stop(trace, i, j, statistics.median(p.lat for p in part),
                              statistics.median(p.lon for p in part), pings[i].ts, pings[j].ts))
            i = j + 1
        else:
            i += 1
    return tuple(stops)


# -- the Munich drive: passing stores ---------------------------------------------------------


def test_driving_past_a_store_on_the_route_reads_enter_then_exit() -> None:
    pings = _trace(MUNICH)
    # a point on the route in the second half of the drive where the car is moving steadily
    i = next(k for k in range(len(pings) // 2, len(pings))
             if 8.0 <= _speed(pings, k) <= 20.0 and all(
                 4.0 <= _speed(pings, n, 1) <= 25.0 for n in range(k - 10, k + 10)))
    on_route = Store("on-route", pings[i].lat, pings[i].lon, 50.0)
    result = _replay(pings, [on_route])
    events = _of(result, "on-route")
    assert [e.type for e in events] == ["enter", "exit"]
    enter, leave = events
    # the car reaches the 50 m circle a few seconds before the point and leaves it after
    assert pings[i].ts - 15 <= enter.ts <= pings[i].ts <= leave.ts <= pings[i].ts + 15
    assert not leave.stale
    for event in events:
        assert event.speed_mps is not None and 3.0 <= event.speed_mps <= 25.0  # city driving
    assert enter.distance_m <= 50.0 < leave.distance_m
    assert result.visit_count == 0  # a drive-by is not a visit


def test_a_store_500_m_off_the_route_sees_nothing() -> None:
    pings = _trace(MUNICH)
    candidates = (
        _offset(pings[k].lat, pings[k].lon, 500.0, bearing)
        for k in range(0, len(pings), 25) for bearing in range(0, 360, 45)
    )
    lat, lon = next(c for c in candidates if _nearest_m(pings, *c) >= 490.0)
    result = _replay(pings, [Store("off-route", lat, lon, 100.0)])
    assert result.events == []
    assert result.summary()["pings"] == len(pings) and not result.rejected


# -- stays -------------------------------------------------------------------------------------


def _longest_standstill(pings: Sequence[Ping]) -> tuple[int, int]:
    """First and last index of the longest run of fixes less than 1 m/s apart."""
    best = (0, 0)
    i = 0
    while i < len(pings) - 1:
        j = i
        while j + 1 < len(pings) and distance_m(
                pings[j].lat, pings[j].lon, pings[j + 1].lat, pings[j + 1].lon) < 1.0 * (
                pings[j + 1].ts - pings[j].ts):
            j += 1
        if pings[j].ts - pings[i].ts > pings[best[1]].ts - pings[best[0]].ts:
            best = (i, j)
        i = j + 1
    return best


def test_waiting_at_a_light_inside_a_store_is_one_stay_and_a_visit_if_long_enough() -> None:
    pings = _trace(MUNICH)
    first, last = _longest_standstill(pings)
    halted, moving_on = pings[first].ts, pings[last].ts
    assert moving_on - halted >= 60  # the trace's longest wait at a light
    part = pings[first:last + 1]
    store = Store("at-the-light", statistics.median(p.lat for p in part),
                  statistics.median(p.lon for p in part), 30.0)
    result = _replay(pings, [store], min_dwell_s=60.0)
    events = _of(result, "at-the-light")
    assert [e.type for e in events] == ["enter", "exit"]
    enter, leave = events
    # in before the car stops, out after it moves on, and not long after that at city speed
    assert enter.ts <= halted and moving_on <= leave.ts <= moving_on + 30
    assert not leave.stale
    assert [(v.start, v.end) for v in result.visits] == [(enter.ts, leave.ts)]
    # the default visits.min_dwell (5 min) does not count a stop at a light as a visit
    assert _replay(pings, [store]).visit_count == 0


def test_a_phone_that_rests_in_a_store_then_leaves() -> None:
    pings = _trace(POSMO)
    # the posmo stop with the fewest cached fixes (accuracy 0) in the minute around it

    def cached_fixes(stop: Stop) -> int:
        return sum(1 for p in pings if stop.start - 60 <= p.ts <= stop.end + 60
                   and not p.accuracy_m)

    stop = min(_stops("posmo"), key=cached_fixes)
    assert cached_fixes(stop) <= 1 and stop.end - stop.start >= 60
    result = _replay(pings, [Store("rest", stop.lat, stop.lon, 50.0)], min_dwell_s=60.0)
    events = _of(result, "rest")
    assert [e.type for e in events] == ["enter", "exit"]
    assert events[0].ts <= stop.start and events[1].ts >= stop.end
    assert [(v.start, v.end) for v in result.visits] == [(events[0].ts, events[1].ts)]


# -- boundary noise --------------------------------------------------------------------------

# Three posmo stops are not boundary noise but bad fixes, and there a person watching the map
# and contract §5 part ways. At 368-419 s the phone reports cached fixes (accuracy 0) 29-74 m
# off the stop; at 910 s and 1939 s it alternates between fixes of the station and fixes
# 2-15 km down the line (over a kilometre in 5 s). The person sees one stop each. §5 counts a
# fix of accuracy at most geofence.max_accuracy_m as accurate and ends a stay on one accurate
# fix beyond the hysteresis band, so the tracker reads several passes. We keep §5 as written:
# the API promises the exit on the first fix outside, and every filter that would hide these
# (a second fix to confirm an exit, a speed limit on jumps, accuracy 0 taken as bad) would
# delay or drop exits the contract promises. What must hold on these stops is §5 itself.
JUMPY_STOPS = {"posmo-stop-at-342s", "posmo-stop-at-910s", "posmo-stop-at-1939s"}
_ALL_STOPS = [*_stops("munich"), *_stops("posmo")]


def _stores_on_the_edge_of(stop: Stop) -> list[Store]:
    """Stores whose edge runs through the stop: their centre one radius away, all around."""
    return [Store(f"r{radius:.0f}-b{bearing}", *_offset(stop.lat, stop.lon, radius, bearing),
                  radius)
            for radius in (20.0, 40.0, 60.0) for bearing in range(0, 360, 45)]


@pytest.mark.parametrize("stop", [s for s in _ALL_STOPS if s.name not in JUMPY_STOPS],
                         ids=lambda s: s.name)
def test_jitter_near_a_boundary_gives_at_most_one_enter_and_exit_per_pass(stop: Stop) -> None:
    pings = _trace(_TRACE_PATHS[stop.trace])
    stores = _stores_on_the_edge_of(stop)
    result = _replay(pings, stores)
    for store in stores:
        events = _of(result, store.id)
        kinds = [e.type for e in events]
        # the phone passes the stop once: one stay at most, whatever the jitter
        assert kinds in ([], ["enter", "exit"]), (store.id, [(e.type, e.ts - pings[0].ts)
                                                             for e in events])


@pytest.mark.parametrize("stop", [s for s in _ALL_STOPS if s.name in JUMPY_STOPS],
                         ids=lambda s: s.name)
def test_bad_fixes_at_a_stop_end_a_stay_only_as_contract_5_says(stop: Stop) -> None:
    pings = _trace(_TRACE_PATHS[stop.trace])
    accuracy = {(p.ts, p.lat, p.lon): p.accuracy_m for p in pings}
    stores = _stores_on_the_edge_of(stop)
    result = _replay(pings, stores)
    passes = 0
    for store in stores:
        events = [e for e in _of(result, store.id) if e.type != "dwell"]
        kinds = [e.type for e in events]
        assert kinds == ["enter", "exit"] * (len(kinds) // 2), (store.id, kinds)
        passes = max(passes, len(kinds) // 2)
        for event in events:
            if event.stale:
                continue
            # the fix that caused it, which counts as accurate...
            acc = accuracy[event.ts, event.lat, event.lon]
            assert acc is None or acc <= 100.0, (store.id, event)
            # ...and is inside the store for an enter, beyond the hysteresis band for an exit
            away = distance_m(store.lat, store.lon, event.lat, event.lon)
            assert (away <= store.radius_m if event.type == "enter"
                    else away > store.radius_m + 25.0), (store.id, event, away)
    # the bad fixes do read as more than one pass (the person's view is not the contract's)
    assert passes >= 2


def test_the_stops_found_in_the_traces_are_the_ones_a_person_sees() -> None:
    # guards the parametrization above: the stop finder must keep finding these stops
    assert {s.name for s in _ALL_STOPS} >= JUMPY_STOPS
    assert len(_stops("munich")) >= 2 and len(_stops("posmo")) >= 5


# -- out of order ------------------------------------------------------------------------------


def test_posmo_fixes_out_of_order_are_rejected() -> None:
    pings = _trace(POSMO)
    # a fix older than any fix before it is out of order (not only older than the one before)
    latest = list(itertools.accumulate((p.ts for p in pings), max))
    older = sum(1 for k in range(1, len(pings)) if pings[k].ts < latest[k - 1])
    result = _replay(pings, [])
    assert older > 0
    assert result.rejected == {"out_of_order": older}


def _along_the_route(pings: Sequence[Ping], count: int) -> list[Store]:
    step = len(pings) // (count + 1)
    return [Store(f"s{n}", pings[n * step].lat, pings[n * step].lon, 40.0)
            for n in range(1, count + 1)]


def test_late_network_fixes_are_rejected_and_change_no_event() -> None:
    pings = list(_trace(MUNICH))
    stores = _along_the_route(pings, 6)
    # a phone's network fixes arrive late: every 20th fix comes after the next three
    late = set(range(10, len(pings) - 4, 20))
    interleaved: list[Ping] = []
    held: list[tuple[int, Ping]] = []
    for k, ping in enumerate(pings):
        if k in late:
            held.append((k + 3, ping))
            continue
        interleaved.append(ping)
        for due, fix in [h for h in held if h[0] == k]:
            held.remove((due, fix))
            interleaved.append(fix)
    assert len(interleaved) == len(pings) and interleaved != pings

    mixed = _replay(interleaved, stores)
    without = _replay([p for k, p in enumerate(pings) if k not in late], stores)
    assert mixed.rejected == {"out_of_order": len(late)}
    assert [(e.ts, e.geofence_id, e.type) for e in mixed.events] == [
        (e.ts, e.geofence_id, e.type) for e in without.events]
    # and the drive still reads as one pass by each store
    assert Counter((e.geofence_id, e.type) for e in mixed.events) == {
        (s.id, kind): 1 for s in stores for kind in ("enter", "exit")}
