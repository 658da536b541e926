"""Properties of the transition tracker on random ping streams (hypothesis).

Fences lie along one meridian: A (circle 100 m) at 0, B (circle 100 m) 220 m south, P (a
160 m square, buffer 10 m) 400 m north; hysteresis 25 m, stale after 1 h. A ping is drawn as
metres north of A's centre, often right at a boundary, with a random accuracy and speed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon

from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex
from geopush.geo.model import DeviceState, Event, Ping, Visit
from geopush.geo.transitions import Step, Tracker, _haversine_m, process_batch

M_PER_DEG = EARTH_RADIUS_M * math.pi / 180
LAT0, LON0 = 46.0, 14.0
STALE_S = 3600.0
HYSTERESIS = 25.0


def _north(m: float) -> float:
    return LAT0 + m / M_PER_DEG


_DLON = 80.0 / (M_PER_DEG * math.cos(math.radians(_north(400))))
SQUARE = Polygon([(LON0 - _DLON, _north(320)), (LON0 + _DLON, _north(320)),
                  (LON0 + _DLON, _north(480)), (LON0 - _DLON, _north(480))])
INDEX = GeofenceIndex([LAT0, _north(-220), _north(400)], [LON0] * 3, [100.0, 100.0, 10.0],
                      [None, None, SQUARE], hysteresis_m=HYSTERESIS, ids=["A", "B", "P"])
PLANS = {"A": (300.0, 900.0), "B": (600.0,), "P": ()}
TRACKER = Tracker(INDEX, stale_after_s=STALE_S, min_visit_s=300.0,
                  dwell_plan=lambda fid: PLANS.get(fid, ()))
# A alone, without dwells, for jitter all around it
QUIET = Tracker(GeofenceIndex([LAT0], [LON0], [100.0], hysteresis_m=HYSTERESIS, ids=["A"]),
                stale_after_s=STALE_S)

SETTINGS = settings(max_examples=150, deadline=None)

# boundaries (radius, radius + hysteresis, buffer, buffer + hysteresis) and a little either side
_EDGES = [0, 99, 101, 124, 126, -99, -101, -124, -126, -240, -320, -344, -346, 300, 311,
          309, 334, 336, 400, 480, 489, 491, 514, 516, 700, -700]
positions = st.one_of(st.sampled_from(_EDGES), st.floats(-700, 700, allow_nan=False))
gaps = st.one_of(st.sampled_from([0.0, 1.0, 5.0, 60.0, 119.0, 120.0, 121.0, 300.0, 900.0,
                                  STALE_S, STALE_S + 1]),
                 st.floats(0, 2 * STALE_S, allow_nan=False))
accuracies = st.sampled_from([None, 5.0, 50.0, 100.0, 150.0])
speeds = st.one_of(st.none(), st.floats(0, 30, allow_nan=False))


@st.composite
def streams(draw: st.DrawFn, device: str = "d1", max_size: int = 25) -> list[Ping]:
    """A device's pings in time order (equal times allowed)."""
    n = draw(st.integers(1, max_size))
    ts = 1_000.0
    pings = []
    for _ in range(n):
        ts += draw(gaps)
        pings.append(Ping(device, ts, _north(draw(positions)), LON0, draw(accuracies),
                          draw(speeds)))
    return pings


@dataclass
class Outcome:
    events: list[Event]
    visits: list[Visit]
    state: DeviceState


def _collect(steps: Sequence[Step], state: DeviceState) -> Outcome:
    return Outcome([e for s in steps for e in s.events], [v for s in steps for v in s.visits],
                   state)


def _at_once(pings: list[Ping], tracker: Tracker = TRACKER) -> Outcome:
    step = tracker.process(pings[0].device_id, None, pings)
    assert step.rejected == []
    return _collect([step], step.state)


def _moment(event: Event) -> float:
    """When the event happened: a stale exit is dated at the last ping but happens later."""
    return event.ts + STALE_S if event.stale else event.ts


def _check_well_formed(events: list[Event], plans: dict[str, tuple[float, ...]]) -> None:
    open_stays: dict[str, tuple[float, set[float]]] = {}
    for event in events:
        fid = event.geofence_id
        if event.type == "enter":
            assert fid not in open_stays, f"second enter of {fid} without an exit"
            open_stays[fid] = (event.ts, set())
        elif event.type == "exit":
            assert fid in open_stays, f"exit of {fid} without an enter"
            assert event.ts >= open_stays[fid][0]
            del open_stays[fid]
        else:
            assert fid in open_stays, f"dwell of {fid} outside a stay"
            enter_ts, fired = open_stays[fid]
            assert event.dwell_s in plans.get(fid, ())
            assert event.dwell_s not in fired, "the same dwell twice in one stay"
            fired.add(event.dwell_s)
            assert event.ts == enter_ts + event.dwell_s


@SETTINGS
@given(streams())
def test_events_are_well_formed_and_in_time_order(pings: list[Ping]) -> None:
    """No exit without an enter, at most one dwell per stay and duration, time order."""
    outcome = _at_once(pings)
    _check_well_formed(outcome.events, PLANS)
    moments = [_moment(e) for e in outcome.events]
    assert moments == sorted(moments)
    plain = [e.ts for e in outcome.events if not e.stale]
    assert plain == sorted(plain)
    for visit in outcome.visits:
        assert visit.end - visit.start >= 300.0


@SETTINGS
@given(
    st.lists(st.tuples(st.floats(100.5, 124.5), st.floats(0, 2 * math.pi),
                       st.floats(0, 600)), min_size=1, max_size=20),
    st.booleans(),
)
def test_jitter_in_the_hysteresis_band_makes_no_events(
    jitter: list[tuple[float, float, float]], entered_first: bool
) -> None:
    """Around A, in every direction, pings between radius and radius + hysteresis neither
    enter, nor exit, nor confirm (as long as the stay is not stale)."""
    ts = 0.0
    pings = [Ping("d1", ts, LAT0, LON0)] if entered_first else []
    for dist, bearing, gap in jitter:
        ts += gap
        if ts >= STALE_S:
            break
        north, east = dist * math.cos(bearing), dist * math.sin(bearing)
        pings.append(Ping("d1", ts, _north(north),
                          LON0 + east / (M_PER_DEG * math.cos(math.radians(LAT0))), None))
    if not pings:
        return
    outcome = _at_once(pings, QUIET)
    assert [(e.type, e.ts) for e in outcome.events] == ([("enter", 0.0)] if entered_first else [])
    if entered_first:
        assert outcome.state.stays["A"].confirmed_ts == 0.0


@st.composite
def splits(draw: st.DrawFn, pings: list[Ping]) -> list[tuple[list[Ping], float | None]]:
    """Cut the stream into batches; before each batch after the first, maybe fire timers at a
    time between the previous batch's last ping and this batch's first."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(pings) - 1)), max_size=6))))
    bounds = [0, *[c for c in cuts if c < len(pings)], len(pings)]
    batches = []
    for lo, hi in pairwise(bounds):
        fire_at = None
        if lo > 0 and draw(st.booleans()):
            fire_at = draw(st.floats(pings[lo - 1].ts, pings[lo].ts))
        batches.append((pings[lo:hi], fire_at))
    return batches


def _batch_step(tracker: Tracker, batch: list[Ping], state: DeviceState | None) -> Step:
    """process_batch for device d1, as a Step even when nothing happened to it."""
    states: dict[str, DeviceState | None] = {"d1": state}
    step = process_batch(tracker, batch, states).get("d1")
    new_state = states["d1"]
    assert new_state is not None  # process_batch leaves every device of the batch a state
    return step if step is not None else Step(new_state)


def _roundtrip(state: DeviceState) -> DeviceState:
    return DeviceState.from_dict(json.loads(json.dumps(state.to_dict())))


@SETTINGS
@given(st.data(), streams(max_size=30))
def test_result_does_not_depend_on_batching(data: st.DataObject, pings: list[Ping]) -> None:
    whole = _at_once(pings)
    batches = data.draw(splits(pings))
    state: DeviceState | None = None
    steps: list[Step] = []
    for batch, fire_at in batches:
        if fire_at is not None:
            steps.append(TRACKER.fire_due("d1", state, fire_at))
            state = steps[-1].state
        if data.draw(st.booleans()):  # through the batch path, or one device's call
            step = _batch_step(TRACKER, batch, state)
        else:
            step = TRACKER.process("d1", state, batch)
        assert step.rejected == []
        steps.append(step)
        # as Redis keeps it (a fresh object), or as the memory store does (the same object,
        # with the tracker's timer cache in it)
        state = _roundtrip(step.state) if data.draw(st.booleans()) else step.state
    assert state is not None
    split = _collect(steps, state)
    assert split.events == whole.events
    assert split.visits == whole.visits
    assert split.state.to_dict() == whole.state.to_dict()
    moments = [_moment(e) for e in split.events]
    assert moments == sorted(moments)


@SETTINGS
@given(st.data(), streams("d1", 15), streams("d2", 15))
def test_devices_in_one_batch_do_not_affect_each_other(
    data: st.DataObject, first: list[Ping], second: list[Ping]
) -> None:
    """Interleaved in any way (not necessarily in time order across devices) and cut into
    batches, each device gets what it gets alone."""
    picks = data.draw(st.permutations([0] * len(first) + [1] * len(second)))
    sources = [iter(first), iter(second)]
    merged = [next(sources[k]) for k in picks]
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(merged)), max_size=4))))
    bounds = [0, *cuts, len(merged)]
    states: dict[str, DeviceState | None] = {}
    events: dict[str, list[Event]] = {"d1": [], "d2": []}
    for lo, hi in pairwise(bounds):
        for device, step in process_batch(TRACKER, merged[lo:hi], states).items():
            assert step.rejected == []
            assert step.state is states[device]
            events[device] += step.events
    for pings in (first, second):
        alone = _at_once(pings)
        device = pings[0].device_id
        assert events[device] == alone.events
        final = states[device]
        assert final is not None and final.to_dict() == alone.state.to_dict()


@SETTINGS
@given(streams(max_size=20), st.floats(0, 3 * STALE_S))
def test_next_due_is_exactly_when_fire_due_first_has_work(pings: list[Ping], later: float
                                                          ) -> None:
    state = _at_once(pings).state
    due = TRACKER.next_due(state)
    now = pings[-1].ts + later
    fired = TRACKER.fire_due("d1", _roundtrip(state), now)
    if due is None or now < due:
        assert fired.events == []
    else:
        assert fired.events and fired.events[0].type in ("dwell", "exit")
        assert fired.events[0].ts == due or fired.events[0].stale


# One big circle around A: every ping lies inside, so each one confirms the stay and leaves
# its derived speed in `stay.speed_mps`.
WIDE = Tracker(GeofenceIndex([LAT0], [LON0], [5_000.0], hysteresis_m=HYSTERESIS, ids=["W"]),
               stale_after_s=1e9)
speed_gaps = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 4.0, 4.999, 5.0, 5.001, 60.0, 119.999,
                                        120.0, 120.001, 200.0]),
                       st.floats(0, 30, allow_nan=False))


def _speed_from_whole_history(before: list[Ping], ping: Ping) -> float | None:
    """Contract §5 read literally: the latest earlier accepted ping that is 5–120 s older."""
    for old in reversed(before):
        age = ping.ts - old.ts
        if age >= 5.0:
            return None if age > 120.0 else _haversine_m(old.lat, old.lon, ping.lat,
                                                         ping.lon) / age
    return None


@SETTINGS
@given(st.lists(st.tuples(speed_gaps, st.floats(-1000, 1000, allow_nan=False)), min_size=1,
                max_size=60),
       st.integers(1, 5), st.floats(1_000.0, 2e9))
def test_short_speed_memory_gives_the_speed_of_the_whole_history(
    steps: list[tuple[float, float]], batch: int, start: float
) -> None:
    """`recent` keeps only a few pings (SPEED MEMORY in transitions.py), yet every ping's
    derived speed is the one the whole history gives, through batches and state round trips."""
    ts = start
    pings = []
    for gap, north in steps:
        ts += gap
        pings.append(Ping("d1", ts, _north(north), LON0))
    state: DeviceState | None = None
    for k in range(0, len(pings), batch):
        for j, ping in enumerate(pings[k:k + batch]):
            # one ping per call, so the stay's speed after it is that ping's
            step = _batch_step(WIDE, [ping], state) if j % 2 else \
                WIDE.process("d1", state, [ping])
            state = step.state
            assert state.stays["W"].speed_mps == _speed_from_whole_history(pings[:k + j], ping)
            assert len(state.recent) <= 1 + sum(1 for p in pings[:k + j + 1]
                                                if ping.ts - p.ts < 5.0)
            # the tracker reads the newest remembered ping's time as last_ts
            assert state.recent[-1][0] == state.last_ts
        assert state is not None
        state = _roundtrip(state)
