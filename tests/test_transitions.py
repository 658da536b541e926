"""The transition tracker, rule by rule of contract §5, as tables of scripts.

A script is a list of pings (`at`: metres north of fence A's centre, `pat`: metres north of the
polygon P's north edge, negative is inside) and timer firings (`Fire(now)`), run one call at a
time through one device's state. Fence A is a circle of 100 m; P a 200 m square with a 10 m
buffer 1.1 km north of A; B a circle of 100 m just south of A. Hysteresis 25 m, max accuracy
100 m, stale after 2 h, visits from 5 min; fence A has dwells of 5 and 15 minutes.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import math
import pickle
from dataclasses import dataclass
from typing import Any

import pytest
from shapely.geometry import Polygon

from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex
from geopush.geo.model import DeviceState, Event, Ping, Visit, new_event, new_visit
from geopush.geo.transitions import Step, Tracker, forget_stays, process_batch

DEV = "phone-1"
A_LAT, A_LON = 46.0, 14.0
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180  # along a meridian
P_LAT, P_LON = 46.01, 14.0  # 1.1 km north of A
# B's centre is 220 m south of A's, so a ping 122 m south of A is in A's hysteresis band and
# inside B
B_LAT = A_LAT - 220 / M_PER_DEG
P_HALF = 100.0
_P_DLON = P_HALF / (M_PER_DEG * math.cos(math.radians(P_LAT)))
SQUARE = Polygon([
    (P_LON - _P_DLON, P_LAT - P_HALF / M_PER_DEG), (P_LON + _P_DLON, P_LAT - P_HALF / M_PER_DEG),
    (P_LON + _P_DLON, P_LAT + P_HALF / M_PER_DEG), (P_LON - _P_DLON, P_LAT + P_HALF / M_PER_DEG),
])
INDEX = GeofenceIndex([A_LAT, P_LAT, B_LAT], [A_LON, P_LON, A_LON], [100.0, 10.0, 100.0],
                      [None, SQUARE, None], hysteresis_m=25.0, ids=["A", "P", "B"],
                      store_ids=["store-a", "store-p", "store-b"])


def plan(geofence_id: str) -> tuple[float, ...]:
    return (300.0, 900.0) if geofence_id == "A" else ()


TRACKER = Tracker(INDEX, max_accuracy_m=100.0, stale_after_s=7200.0, min_visit_s=300.0,
                  dwell_plan=plan)


def at(ts: float, north_m: float, accuracy: float | None = None,
       speed: float | None = None) -> Ping:
    """A ping `north_m` metres north of A's centre (due south when negative)."""
    return Ping(DEV, ts, A_LAT + north_m / M_PER_DEG, A_LON, accuracy, speed)


def pat(ts: float, beyond_edge_m: float, accuracy: float | None = None) -> Ping:
    """A ping on P's north-south axis, `beyond_edge_m` north of its north edge."""
    return Ping(DEV, ts, P_LAT + (P_HALF + beyond_edge_m) / M_PER_DEG, P_LON, accuracy)


@dataclass(frozen=True)
class Fire:
    now: float


Action = Ping | Fire | list[Ping]


@dataclass
class Result:
    events: list[Event]
    steps: list[Step]
    state: DeviceState

    @property
    def brief(self) -> list[tuple[str, str, float]]:
        return [(e.type, e.geofence_id, e.ts) for e in self.events]


def run(script: list[Action], tracker: Tracker = TRACKER,
        state: DeviceState | None = None) -> Result:
    events: list[Event] = []
    steps = []
    for action in script:
        if isinstance(action, Fire):
            step = tracker.fire_due(DEV, state, action.now)
        else:
            step = tracker.process(DEV, state, action if isinstance(action, list) else [action])
        state = step.state
        events += step.events
        steps.append(step)
    assert state is not None
    return Result(events, steps, state)


# -- the table -------------------------------------------------------------------------------

CASES: list[tuple[str, list[Action], list[tuple[str, str, float]]]] = [
    # enter
    ("enter on the first accurate ping inside", [at(0, 50, 20)], [("enter", "A", 0)]),
    ("no accuracy counts as accurate", [at(0, 50)], [("enter", "A", 0)]),
    ("accuracy equal to the maximum enters", [at(0, 50, 100)], [("enter", "A", 0)]),
    ("accuracy above the maximum does not enter", [at(0, 50, 100.5)], []),
    ("an inaccurate ping then an accurate one enters at the accurate one",
     [at(0, 50, 150), at(60, 50, 10)], [("enter", "A", 60)]),
    ("just inside the radius enters", [at(0, 99.9)], [("enter", "A", 0)]),
    ("the hysteresis band does not enter", [at(0, 100.5), at(60, 124)], []),
    ("outside does not enter", [at(0, 500)], []),
    ("a second ping inside does not enter again", [at(0, 50), at(60, 10)], [("enter", "A", 0)]),
    ("polygon: a ping inside enters", [pat(0, -50)], [("enter", "P", 0)]),
    ("polygon: a ping within the buffer enters", [pat(0, 9.5)], [("enter", "P", 0)]),
    ("polygon: beyond the buffer, in the band, does not enter", [pat(0, 10.5)], []),
    # exit
    ("exit on an accurate ping beyond radius + hysteresis",
     [at(0, 50), at(60, 125.5)], [("enter", "A", 0), ("exit", "A", 60)]),
    ("a ping in the hysteresis band does not exit",
     [at(0, 50), at(60, 124.5), at(120, 101)], [("enter", "A", 0)]),
    ("an inaccurate ping far away does not exit",
     [at(0, 50), at(60, 5_000, 500)], [("enter", "A", 0)]),
    ("re-enter after an exit", [at(0, 50), at(60, 600), at(120, 0)],
     [("enter", "A", 0), ("exit", "A", 60), ("enter", "A", 120)]),
    ("polygon: exit beyond buffer + hysteresis",
     [pat(0, -10), pat(60, 35.5)], [("enter", "P", 0), ("exit", "P", 60)]),
    ("polygon: the band (buffer < d <= buffer + hysteresis) does not exit",
     [pat(0, -10), pat(60, 34.5), pat(120, 11)], [("enter", "P", 0)]),
    ("moving from one fence into another: exit, then enter",
     [at(0, 0), Ping(DEV, 60, P_LAT, P_LON)],
     [("enter", "A", 0), ("exit", "A", 60), ("enter", "P", 60)]),
    # stale exit
    ("no stale exit before stale_after", [pat(0, 0), Fire(7199.9)], [("enter", "P", 0)]),
    ("stale exit at stale_after, dated at the last confirming ping",
     [at(0, 50), at(1000, 40), Fire(8200)],
     [("enter", "A", 0), ("dwell", "A", 300), ("dwell", "A", 900), ("exit", "A", 1000)]),
    ("pings in the band do not confirm: the stale exit counts from the last inside ping",
     [at(0, 50), at(3000, 120), Fire(7200)],
     [("enter", "A", 0), ("dwell", "A", 300), ("dwell", "A", 900), ("exit", "A", 0)]),
    ("inaccurate pings do not confirm",
     [at(0, 50), at(3000, 50, 150), Fire(7200)],
     [("enter", "A", 0), ("dwell", "A", 300), ("dwell", "A", 900), ("exit", "A", 0)]),
    ("a stale exit also fires on the next ping, before the ping's own events",
     [pat(0, 0), pat(9000, 0)], [("enter", "P", 0), ("exit", "P", 0), ("enter", "P", 9000)]),
    # dwell
    ("dwell fires on the timer at enter + dwell, with no further ping",
     [at(0, 50), Fire(299), Fire(300)], [("enter", "A", 0), ("dwell", "A", 300)]),
    ("dwell fires once per stay and duration",
     [at(0, 50), Fire(300), Fire(310), at(320, 50), Fire(400)],
     [("enter", "A", 0), ("dwell", "A", 300)]),
    ("each dwell duration fires once", [at(0, 50), Fire(1000), Fire(2000)],
     [("enter", "A", 0), ("dwell", "A", 300), ("dwell", "A", 900)]),
    ("a ping after the due time fires the dwell first",
     [at(0, 50), at(400, 60)], [("enter", "A", 0), ("dwell", "A", 300)]),
    ("a dwell due exactly at an exiting ping fires before the exit",
     [at(0, 50), at(300, 500)], [("enter", "A", 0), ("dwell", "A", 300), ("exit", "A", 300)]),
    ("no dwell after the stay ended", [at(0, 50), at(200, 500), Fire(1000)],
     [("enter", "A", 0), ("exit", "A", 200)]),
    ("a new stay gets its own dwells",
     [at(0, 50), Fire(300), at(400, 500), at(500, 0), Fire(800)],
     [("enter", "A", 0), ("dwell", "A", 300), ("exit", "A", 400), ("enter", "A", 500),
      ("dwell", "A", 800)]),
    ("the dwell is counted from the enter, not from the last ping",
     [at(0, 50), at(250, 50), Fire(310)], [("enter", "A", 0), ("dwell", "A", 300)]),
    ("entering a second fence does not put off the first one's dwell",
     [at(0, 0), at(100, -122), at(400, -122)],  # -122: A's band, inside B
     [("enter", "A", 0), ("enter", "B", 100), ("dwell", "A", 300)]),
    ("... in one call either", [[at(0, 0), at(100, -122), at(400, -122)]],
     [("enter", "A", 0), ("enter", "B", 100), ("dwell", "A", 300)]),
    # out of order and batches
    ("pings of one call are taken in time order", [[at(60, 600), at(0, 50)]],
     [("enter", "A", 0), ("exit", "A", 60)]),
    ("a ping older than the last processed one is not used",
     [at(100, 50), at(50, 500)], [("enter", "A", 100)]),
    ("a ping with the same time as the last one is used", [at(100, 50), at(100, 500)],
     [("enter", "A", 100), ("exit", "A", 100)]),
]


@pytest.mark.parametrize(("script", "expected"), [pytest.param(s, e, id=n) for n, s, e in CASES])
def test_transition_rules(script: list[Action], expected: list[tuple[str, str, float]]) -> None:
    assert run(script).brief == expected


# -- details the table does not show ---------------------------------------------------------

def test_stale_exit_event_and_its_visit() -> None:
    result = run([at(0, 50, speed=1.0), at(400, 30, speed=0.5), Fire(7600)])
    exit_event = result.events[-1]
    assert (exit_event.type, exit_event.ts, exit_event.stale) == ("exit", 400, True)
    assert exit_event.lat == pytest.approx(A_LAT + 30 / M_PER_DEG)
    assert exit_event.distance_m == pytest.approx(30.0, abs=1e-6)
    assert exit_event.speed_mps == 0.5
    visits = result.steps[-1].visits
    assert [(v.geofence_id, v.store_id, v.start, v.end) for v in visits] == [
        ("A", "store-a", 0, 400)]
    assert result.state.stays == {}


def test_stale_and_dwell_due_together_fire_dwell_first() -> None:
    tracker = Tracker(INDEX, stale_after_s=600.0, dwell_plan=lambda f: (600.0, 700.0))
    result = run([at(0, 50), Fire(5000)], tracker)
    assert [(e.type, e.ts, e.dwell_s, e.stale) for e in result.events] == [
        ("enter", 0, None, False), ("dwell", 600, 600.0, False), ("exit", 0, None, True)]


def test_a_dwell_longer_than_the_stay_never_fires() -> None:
    tracker = Tracker(INDEX, stale_after_s=600.0, dwell_plan=lambda f: (900.0,))
    assert run([at(0, 50), Fire(5000)], tracker).brief == [("enter", "A", 0), ("exit", "A", 0)]


def test_repeated_and_non_positive_dwells_in_the_plan_are_ignored() -> None:
    tracker = Tracker(INDEX, dwell_plan=lambda f: (300.0, 300, 0.0, -5.0))
    assert run([at(0, 50), Fire(1000)], tracker).brief == [("enter", "A", 0), ("dwell", "A", 300)]
    assert tracker.dwells("A") == (300.0,)


def test_new_dwell_durations_apply_to_stays_entered_after_a_reload() -> None:
    """Contract §4: a reload at ts 1000 replaces dwell 300 with dwell 600. A stay entered at 900
    keeps 300 (and gets no 600); one entered at 1100 gets 600 only."""
    before = Tracker(INDEX, dwell_plan=lambda f: (300.0,))
    entered_before = run([at(900, 50)], before).state
    after = Tracker(INDEX, dwell_plan=lambda f: (600.0,), plan_since=1000.0, earlier=before)
    old = run([at(1050, 40), Fire(3000)], after, entered_before)
    assert [(e.type, e.ts) for e in old.events] == [("dwell", 1200)]
    new = run([at(1100, 50), Fire(3000)], after)
    assert [(e.type, e.ts) for e in new.events] == [("enter", 1100), ("dwell", 1700)]
    # what the next timer is, is worked out with the same plans
    assert after.next_due(run([at(900, 50)], before).state) == 1200
    assert after.next_due(run([at(1100, 50)], after).state) == 1700


def test_only_the_last_eight_plans_are_kept_behind_a_tracker() -> None:
    tracker = Tracker(INDEX, dwell_plan=lambda f: (100.0,))
    for n in range(1, 20):
        tracker = Tracker(INDEX, dwell_plan=lambda f, n=n: (100.0 + n,), plan_since=1000.0 * n,
                          earlier=tracker)
    depth, link = 0, tracker.earlier
    while link is not None:
        depth, link = depth + 1, link.earlier
    assert depth == 8  # older trackers (and their indexes) can be collected
    # a stay older than every kept plan takes the oldest kept
    assert tracker.stay_dwells("A", 0.0) == (100.0 + 11,)


def test_event_fields() -> None:
    result = run([at(0, 50, 10, speed=1.5), at(100, 20, speed=0.2), Fire(300),
                  at(400, 650, speed=3.0)])
    enter, dwell, exit_event = result.events
    assert enter == Event(DEV, "A", "store-a", "enter", 0, A_LAT + 50 / M_PER_DEG, A_LON,
                          enter.distance_m, 1.5)
    assert enter.distance_m == pytest.approx(50.0, abs=1e-6)
    # a dwell is dated enter + dwell and seen from the stay's last (confirming) ping
    assert (dwell.ts, dwell.dwell_s, dwell.speed_mps) == (300, 300.0, 0.2)
    assert dwell.distance_m == pytest.approx(20.0, abs=1e-6)
    assert dwell.lat == pytest.approx(A_LAT + 20 / M_PER_DEG)
    assert (exit_event.ts, exit_event.stale, exit_event.speed_mps) == (400, False, 3.0)
    assert exit_event.distance_m == pytest.approx(650.0, abs=1e-6)


def test_polygon_exit_distance_is_metres_to_the_edge() -> None:
    result = run([pat(0, -20), pat(60, 80)])
    assert result.events[-1].type == "exit"
    assert result.events[-1].distance_m == pytest.approx(80.0, abs=0.1)
    assert result.events[0].distance_m == 0.0


def test_exit_from_a_fence_that_a_reload_removed() -> None:
    state = run([at(0, 50)]).state
    reloaded = Tracker(GeofenceIndex([P_LAT], [P_LON], [10.0], [SQUARE], ids=["P"]))
    result = run([at(60, 50)], reloaded, state)
    assert result.brief == [("exit", "A", 60)]
    assert result.events[0].distance_m == math.inf


def test_out_of_order_rejection_names_the_times_and_the_position() -> None:
    state = run([at(100, 50)]).state
    step = TRACKER.process(DEV, state, [at(200, 50), at(50, 500), at(40, 0)],
                           positions=[7, 8, 9])
    # taken in time order, 40 and 50 come before 200 and both are older than 100
    assert [(r.position, r.code) for r in step.rejected] == [(9, "out_of_order"),
                                                            (8, "out_of_order")]
    assert step.rejected[0].message == ("ts 1970-01-01T00:00:40Z is older than this device's "
                                        "last processed ping (1970-01-01T00:01:40Z)")
    assert step.events == []
    assert step.state.last_ts == 200


def test_rejected_pings_change_nothing() -> None:
    state = run([at(100, 50)]).state
    before = json.dumps(state.to_dict())
    step = TRACKER.process(DEV, state, [at(50, 500)])
    assert len(step.rejected) == 1
    assert json.dumps(step.state.to_dict()) == before


# -- speed -----------------------------------------------------------------------------------

SPEED_CASES = [
    ("the ping's own speed", [at(0, 500), at(10, 50, speed=2.5)], 2.5),
    ("derived from the latest ping 5-120 s older", [at(0, 500), at(10, 50)], 45.0),
    ("a ping less than 5 s older is skipped", [at(0, 500), at(8, 400), at(10, 50)], 45.0),
    ("exactly 5 s older counts", [at(0, 500), at(5, 450), at(10, 50)], 80.0),
    ("exactly 120 s older counts", [at(0, 530), at(120, 50)], 4.0),
    ("older than 120 s: unknown", [at(0, 500), at(121, 50)], None),
    ("no earlier ping: unknown", [at(0, 50)], None),
    ("an inaccurate accepted ping serves as reference", [at(0, 500, 900), at(10, 50)], 45.0),
    ("a rejected ping does not",
     [at(0, 1000), at(200, 1000), at(150, 500), at(203, 50)], None),
]


@pytest.mark.parametrize(("script", "expected"),
                         [pytest.param(s, e, id=n) for n, s, e in SPEED_CASES])
def test_speed_at_the_event(script: list[Action], expected: float | None) -> None:
    last = run(script).events[-1]
    if expected is None:
        assert last.speed_mps is None
    else:
        assert last.speed_mps == pytest.approx(expected, rel=1e-6)


def test_speed_uses_the_latest_reference_even_across_calls() -> None:
    result = run([at(0, 1000), at(50, 800), at(100, 50)])
    assert result.events[0].speed_mps == pytest.approx(750 / 50, rel=1e-6)


# -- visits ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("script", "expected"), [
    pytest.param([at(0, 50), at(300, 50), at(360, 650)], [(0, 360)], id="long-stay"),
    pytest.param([at(0, 50), at(300, 650)], [(0, 300)], id="exactly-min-visit"),
    pytest.param([at(0, 50), at(299, 650)], [], id="too-short"),
    pytest.param([at(0, 50), at(1000, 50)], [], id="no-visit-while-the-stay-is-open"),
    pytest.param([at(0, 50), at(290, 50), Fire(9000)], [], id="stale-exit-of-a-short-stay"),
    pytest.param([at(0, 50), at(400, 50), Fire(7600)], [(0, 400)], id="stale-exit"),
])
def test_visits(script: list[Action], expected: list[tuple[float, float]]) -> None:
    visits = [v for step in run(script).steps for v in step.visits]
    assert [(v.start, v.end) for v in visits] == expected
    assert all(v.device_id == DEV and v.store_id == "store-a" for v in visits)


# -- state -----------------------------------------------------------------------------------

def test_forget_stays_ends_stays_and_timers_without_events() -> None:
    state = run([at(0, 50), at(10, -122)]).state
    assert set(state.stays) == {"A", "B"}
    forgotten = forget_stays(state)
    assert forgotten.stays == {} and forgotten.recent == []
    assert forgotten.last_ts == 10
    assert TRACKER.next_due(forgotten) is None
    assert TRACKER.fire_due(DEV, forgotten, 100_000).events == []
    assert state.stays  # the original is left alone


def _roundtrip(state: DeviceState) -> DeviceState:
    return DeviceState.from_dict(json.loads(json.dumps(state.to_dict())))


def test_state_round_trips_through_json() -> None:
    state = run([at(0, 50, speed=1.0), at(5, -122), Fire(300), at(310, -110)]).state
    assert set(state.stays) == {"A", "B"}
    assert state.stays["A"].dwells_fired == [300.0]
    copy = _roundtrip(state)
    assert copy == state
    assert copy.to_dict() == state.to_dict()
    # and it behaves the same afterwards
    later: list[Action] = [at(1000, 45), Fire(5000), at(9000, 500)]
    assert run(later, state=copy).brief == run(later, state=_roundtrip(state)).brief
    assert DeviceState.from_dict({}) == DeviceState()
    assert _roundtrip(DeviceState()) == DeviceState()


def test_state_keeps_only_recent_pings_for_speed() -> None:
    """Only what a later ping may take for its speed: the pings of the last 5 s and the
    latest before them (see SPEED MEMORY in geopush/geo/transitions.py)."""
    state = run([at(t, 1000) for t in range(0, 600, 10)]).state
    assert [r[0] for r in state.recent] == [580, 590]
    assert state.last_ts == 590


@pytest.mark.parametrize(("times", "kept"), [
    pytest.param([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10], id="1-hz"),
    pytest.param([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], id="exactly-5-s"),
    pytest.param([0, 0, 0, 7, 7], [0, 7, 7], id="equal-times"),
    pytest.param([0, 120], [0, 120], id="exactly-120-s"),
    pytest.param([0, 121], [121], id="too-old"),
    pytest.param([0, 100, 101, 150], [101, 150], id="gap"),
])
def test_speed_memory(times: list[float], kept: list[float]) -> None:
    state = run([at(t, 1000) for t in times]).state
    assert [r[0] for r in state.recent] == kept


@pytest.mark.parametrize(("script", "due"), [
    pytest.param([], None, id="new-device"),
    pytest.param([at(0, 500)], None, id="no-stay"),
    pytest.param([at(0, 50)], 300.0, id="first-dwell"),
    pytest.param([at(0, 50), Fire(300)], 900.0, id="next-dwell"),
    pytest.param([at(0, 50), Fire(900)], 7200.0, id="stale"),
    pytest.param([at(0, 50), Fire(900), at(1000, 20)], 8200.0, id="stale-after-a-confirm"),
    pytest.param([at(0, 50), at(100, -122), Fire(1000)], 7200.0, id="earliest-of-two"),
    pytest.param([at(0, 50), at(100, -122), Fire(7200)], 7300.0, id="second-of-two"),
    pytest.param([pat(0, 0)], 7200.0, id="polygon-without-dwells"),
    pytest.param([at(0, 50), at(60, 500)], None, id="after-exit"),
])
def test_next_due(script: list[Action], due: float | None) -> None:
    state = run(script).state if script else DeviceState()
    assert TRACKER.next_due(state) == due
    if due is not None:  # and fire_due has something to do then, not before
        assert TRACKER.fire_due(DEV, _roundtrip(state), due - 0.001).events == []
        assert TRACKER.fire_due(DEV, _roundtrip(state), due).events


def test_process_accepts_a_precomputed_lookup() -> None:
    pings = [at(0, 50), at(60, 110), at(120, 600)]
    prox = INDEX.query([p.lat for p in pings], [p.lon for p in pings])
    near: list[list[tuple[int, float]]] = [[] for _ in pings]
    for i, fence, dist in zip(prox.ping.tolist(), prox.fence.tolist(), prox.distance_m.tolist(),
                              strict=True):
        near[i].append((fence, dist))
    with_near = TRACKER.process(DEV, None, pings, near)
    without = TRACKER.process(DEV, None, pings)
    assert with_near.events == without.events
    assert [e.type for e in with_near.events] == ["enter", "exit"]


def test_process_batch_groups_devices_and_reports_batch_positions() -> None:
    other = "phone-2"
    pings = [
        at(100, 50), Ping(other, 10, A_LAT, A_LON), at(200, 500), at(150, 0),
        Ping(other, 5, A_LAT, A_LON),
    ]
    steps = process_batch(TRACKER, pings, {DEV: run([at(120, 500)]).state})
    assert set(steps) == {DEV, other}
    mine = steps[DEV]
    assert [(r.position, r.code) for r in mine.rejected] == [(0, "out_of_order")]
    assert [(e.type, e.ts) for e in mine.events] == [("enter", 150), ("exit", 200)]
    assert [(e.type, e.ts, e.device_id) for e in steps[other].events] == [
        ("enter", 5, other)]
    assert process_batch(TRACKER, [], {}) == {}


def test_process_batch_leaves_every_device_its_state_and_steps_only_where_something_happened(
) -> None:
    known = run([at(0, 500)]).state
    states: dict[str, DeviceState | None] = {DEV: known}
    quiet = Ping("quiet", 10, A_LAT + 5000 / M_PER_DEG, A_LON)  # far from every fence
    steps = process_batch(TRACKER, [at(10, 0), quiet], states)
    assert set(states) == {DEV, "quiet"}
    assert states[DEV] is known and set(known.stays) == {"A"}  # changed in place
    new = states["quiet"]
    assert new is not None and new.last_ts == 10 and not new.stays
    assert set(steps) == {DEV} and steps[DEV].state is known
    assert [e.type for e in steps[DEV].events] == ["enter"]


def test_a_tracker_with_another_dwell_plan_does_not_trust_the_cached_due() -> None:
    state = run([at(0, 0), at(60, 0)]).state  # TRACKER's plan: A's first dwell at 300 s
    sooner = Tracker(INDEX, max_accuracy_m=100.0, stale_after_s=7200.0, min_visit_s=300.0,
                     dwell_plan=lambda fid: (120.0,) if fid == "A" else ())
    step = sooner.process(DEV, state, [at(130, 0)])
    assert [(e.type, e.ts, e.dwell_s) for e in step.events] == [("dwell", 120.0, 120.0)]


def test_a_shared_tracker_keeps_devices_apart() -> None:
    one = TRACKER.process("a", None, [Ping("a", 0, A_LAT, A_LON)])
    two = TRACKER.process("b", None, [Ping("b", 0, A_LAT + 1, A_LON)])
    assert [e.device_id for e in one.events] == ["a"]
    assert two.events == [] and two.state.stays == {}


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def test_to_dict_is_strict_json() -> None:
    state = run([at(0, 50), at(1, -122)]).state
    assert _is_jsonable(state.to_dict())


@pytest.mark.parametrize("extra", [{}, {"dwell_s": 300.0}, {"stale": True}])
def test_fast_event_is_the_frozen_dataclass(extra: dict[str, Any]) -> None:
    fast = new_event("d", "f", "s", "exit", 1.0, 2.0, 3.0, 4.0, None, **extra)
    slow = Event("d", "f", "s", "exit", 1.0, 2.0, 3.0, 4.0, None, **extra)
    assert type(fast) is Event
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert dataclasses.astuple(fast) == dataclasses.astuple(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.ts = 5.0  # type: ignore[misc]


def test_fast_visit_is_the_frozen_dataclass() -> None:
    fast = new_visit("d", "s", "f", 1.0, 400.0)
    assert type(fast) is Visit and fast == Visit("d", "s", "f", 1.0, 400.0)
    assert hash(fast) == hash(Visit("d", "s", "f", 1.0, 400.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.end = 5.0  # type: ignore[misc]


def test_step_lists_are_made_on_first_use() -> None:
    step = Step(DeviceState())
    assert step.events == [] and step.visits == [] and step.rejected == []
    step.events.append(Event("d", "f", "s", "enter", 1.0, 2.0, 3.0, 4.0, None))
    assert len(step.events) == 1 and step.visits == []
    assert Step(DeviceState()) == Step(DeviceState(), [], [], [])
    assert Step(DeviceState()) != step
    assert "events=[]" in repr(Step(DeviceState()))


def test_ping_is_a_frozen_dataclass_built_fast() -> None:
    ping = Ping("d", 1.0, 2.0, 3.0, speed_mps=4.0)
    assert type(ping) is Ping
    assert ping == Ping(device_id="d", ts=1.0, lat=2.0, lon=3.0, accuracy_m=None, speed_mps=4.0)
    assert hash(ping) == hash(Ping("d", 1.0, 2.0, 3.0, None, 4.0))
    assert repr(ping) == ("Ping(device_id='d', ts=1.0, lat=2.0, lon=3.0, accuracy_m=None, "
                          "speed_mps=4.0, heading_deg=None, altitude_m=None, activity=None)")
    walking = Ping("d", 1.0, 2.0, 3.0, None, 4.0, 90.0, 500.0, "walking")
    assert walking != ping and dataclasses.replace(walking, heading_deg=None, altitude_m=None,
                                                   activity=None) == ping
    assert pickle.loads(pickle.dumps(walking)) == walking
    assert [f.name for f in dataclasses.fields(Ping)] == list(Ping.__slots__)
    assert dataclasses.replace(ping, ts=9.0) == Ping("d", 9.0, 2.0, 3.0, None, 4.0)
    assert copy_module.copy(ping) == ping and copy_module.deepcopy(ping) == ping
    assert pickle.loads(pickle.dumps(ping)) == ping
    with pytest.raises(dataclasses.FrozenInstanceError):
        ping.ts = 5.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="lat"):
        Ping("d", 1.0)  # type: ignore[call-arg]
