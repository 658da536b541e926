"""The transition tracker (contract §5), pure: prior device state + pings → new state + events.

No clock of its own: pings carry their time, and timers (dwell, stale exit) fire when the caller
says what time it is (`fire_due`). Processing a ping first fires every timer due by the ping's
time, so the result never depends on how a device's pings are split into batches.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from geopush.geo.index import GeofenceIndex, distance_m

EventType = Literal["enter", "dwell", "exit"]

SPEED_MIN_AGE_S = 5.0  # derived speed: the latest accepted ping 5–120 s older (contract §5)
SPEED_MAX_AGE_S = 120.0
_RECENT_CAP = 256  # bound on remembered pings for pathological ping rates


@dataclass(frozen=True, slots=True)
class Ping:
    device_id: str
    ts: float  # epoch seconds
    lat: float
    lon: float
    accuracy_m: float | None = None
    speed_mps: float | None = None


@dataclass(frozen=True, slots=True)
class Event:
    device_id: str
    geofence_id: str
    store_id: str
    type: EventType
    ts: float
    lat: float  # where the phone was (the stay's last ping for dwell and stale exit)
    lon: float
    distance_m: float  # to the geofence (0 inside a polygon)
    speed_mps: float | None  # None when unknown
    dwell_s: float | None = None  # the dwell duration, for dwell events
    stale: bool = False  # an exit for lack of pings, not a ping outside


@dataclass(frozen=True, slots=True)
class Visit:
    """A stay of at least visits.min_dwell; feeds `when.visits` and attribution."""

    device_id: str
    store_id: str
    geofence_id: str
    start: float
    end: float


@dataclass(slots=True)
class Stay:
    geofence_id: str
    store_id: str
    enter_ts: float
    confirmed_ts: float  # last accurate ping inside; a stale exit is dated here
    lat: float
    lon: float
    distance_m: float
    speed_mps: float | None
    dwells_fired: list[float] = field(default_factory=list)


@dataclass(slots=True)
class DeviceState:
    """Everything the tracker remembers about one device."""

    last_ts: float | None = None
    stays: dict[str, Stay] = field(default_factory=dict)
    # (ts, lat, lon) of accepted pings of the last SPEED_MAX_AGE_S, oldest first, for speed
    recent: list[tuple[float, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_ts": self.last_ts,
            "stays": [
                [s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon,
                 s.distance_m, s.speed_mps, s.dwells_fired]
                for s in self.stays.values()
            ],
            "recent": [list(r) for r in self.recent],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceState:
        stays = {}
        for row in data.get("stays", ()):
            stay = Stay(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        list(row[8]))
            stays[stay.geofence_id] = stay
        recent = [(r[0], r[1], r[2]) for r in data.get("recent", ())]
        return cls(data.get("last_ts"), stays, recent)


@dataclass(slots=True)
class Rejection:
    position: int  # index of the ping in the caller's input
    code: Literal["out_of_order"]
    message: str


@dataclass(slots=True)
class Step:
    """What one call produced for one device."""

    state: DeviceState
    events: list[Event] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


DwellPlan = Callable[[str], Sequence[float]]
"""Dwell durations (seconds) that matter for a geofence id; from the rules."""


def no_dwells(_geofence_id: str) -> Sequence[float]:
    return ()


class Tracker:
    """Applies contract §5 with one index and one set of thresholds; immutable, shareable."""

    def __init__(
        self,
        index: GeofenceIndex,
        *,
        max_accuracy_m: float = 100.0,
        stale_after_s: float = 7200.0,
        min_visit_s: float = 300.0,
        dwell_plan: DwellPlan = no_dwells,
    ) -> None:
        self.index = index
        self.max_accuracy_m = max_accuracy_m
        self.stale_after_s = stale_after_s
        self.min_visit_s = min_visit_s
        self.dwell_plan = dwell_plan

    # -- pings ---------------------------------------------------------------------------

    def process(
        self,
        device_id: str,
        state: DeviceState | None,
        pings: Sequence[Ping],
        near: Sequence[Sequence[tuple[int, float]]] | None = None,
        *,
        positions: Sequence[int] | None = None,
    ) -> Step:
        """Apply one device's pings, taken in timestamp order.

        `near[i]` lists (fence index, distance m) within reach of pings[i], as a batch query of
        the index gives them; without it each ping is looked up alone. `positions` are the
        pings' indexes in the caller's input, for rejections."""
        step = Step(state if state is not None else DeviceState())
        order = sorted(range(len(pings)), key=lambda i: pings[i].ts)
        for i in order:
            ping = pings[i]
            here = near[i] if near is not None else self._near(ping)
            self._apply(device_id, step, ping, here, positions[i] if positions else i)
        step.events.sort(key=lambda e: e.ts)
        return step

    def _near(self, ping: Ping) -> list[tuple[int, float]]:
        prox = self.index.query([ping.lat], [ping.lon])
        return list(zip(prox.fence.tolist(), prox.distance_m.tolist(), strict=True))

    def _apply(
        self, device_id: str, step: Step, ping: Ping, near: Iterable[tuple[int, float]],
        position: int,
    ) -> None:
        state = step.state
        ts = ping.ts
        if state.last_ts is not None and ts < state.last_ts:
            step.rejected.append(Rejection(
                position, "out_of_order",
                f"ts {ts!r} is older than this device's last processed ping ({state.last_ts!r})",
            ))
            return
        if state.stays:
            self._fire(device_id, step, ts)
        accurate = ping.accuracy_m is None or ping.accuracy_m <= self.max_accuracy_m
        if accurate and (state.stays or near):
            self._move(device_id, step, ping, near)
        state.last_ts = ts
        recent = state.recent
        recent.append((ts, ping.lat, ping.lon))
        if recent[0][0] < ts - SPEED_MAX_AGE_S or len(recent) > _RECENT_CAP:
            cut = bisect_right(recent, ts - SPEED_MAX_AGE_S, key=lambda r: r[0])
            del recent[: max(cut, len(recent) - _RECENT_CAP)]

    def _move(
        self, device_id: str, step: Step, ping: Ping, near: Iterable[tuple[int, float]]
    ) -> None:
        index = self.index
        stays = step.state.stays
        inside: dict[str, tuple[int, float]] = {}
        within_reach: set[str] = set()
        for fence, dist in near:
            fid = index.ids[fence]
            within_reach.add(fid)
            if dist <= index.inside_m[fence]:
                inside[fid] = (fence, dist)
        speed: float | None = math.nan  # computed once, only if an event or a stay needs it
        # exits first: moving from one fence into its neighbour reads exit, then enter
        for fid in [f for f in stays if f not in within_reach]:
            stay = stays.pop(fid)
            if speed is not None and math.isnan(speed):
                speed = self._speed(step.state, ping)
            self._end(device_id, step, stay, ping.ts, ping.lat, ping.lon,
                      self._distance(fid, ping), speed, stale=False)
        for fid, (fence, dist) in inside.items():
            if speed is not None and math.isnan(speed):
                speed = self._speed(step.state, ping)
            stay = stays.get(fid)
            if stay is None:
                stays[fid] = Stay(fid, index.store_ids[fence], ping.ts, ping.ts, ping.lat,
                                  ping.lon, dist, speed)
                step.events.append(Event(device_id, fid, index.store_ids[fence], "enter",
                                         ping.ts, ping.lat, ping.lon, dist, speed))
            else:
                stay.confirmed_ts = ping.ts
                stay.lat, stay.lon, stay.distance_m, stay.speed_mps = (
                    ping.lat, ping.lon, dist, speed)

    def _distance(self, geofence_id: str, ping: Ping) -> float:
        fence = self.index.position.get(geofence_id)
        if fence is None:  # the fence went away in a reload
            return math.inf
        if self.index.is_polygon(fence):
            prox = self.index.query([ping.lat], [ping.lon])
            hits = prox.distance_m[prox.fence == fence]
            return float(hits[0]) if len(hits) else float(self.index.reach_m[fence])
        return distance_m(ping.lat, ping.lon, float(self.index.lat[fence]),
                          float(self.index.lon[fence]))

    def _speed(self, state: DeviceState, ping: Ping) -> float | None:
        if ping.speed_mps is not None:
            return ping.speed_mps
        # `recent` does not hold this ping yet: the latest entry ≥ 5 s older is the reference
        for ts, lat, lon in reversed(state.recent):
            age = ping.ts - ts
            if age < SPEED_MIN_AGE_S:
                continue
            if age > SPEED_MAX_AGE_S:
                return None
            return distance_m(lat, lon, ping.lat, ping.lon) / age
        return None

    # -- timers --------------------------------------------------------------------------

    def fire_due(self, device_id: str, state: DeviceState | None, now: float) -> Step:
        """Fire every dwell and stale exit due at or before `now`."""
        step = Step(state if state is not None else DeviceState())
        if step.state.stays:
            self._fire(device_id, step, now)
        return step

    def next_due(self, state: DeviceState) -> float | None:
        """When `fire_due` next has something to do for this device (None: nothing pending)."""
        due = [t for _, t, _, _ in self._timers(state)]
        return min(due) if due else None

    def _timers(self, state: DeviceState) -> list[tuple[int, float, str, float]]:
        """(order, due time, geofence id, dwell seconds or 0 for stale) of every pending timer."""
        timers = []
        for fid, stay in state.stays.items():
            timers.append((1, stay.confirmed_ts + self.stale_after_s, fid, 0.0))
            for dwell in self.dwell_plan(fid):
                if dwell not in stay.dwells_fired:
                    timers.append((0, stay.enter_ts + dwell, fid, dwell))
        return timers

    def _fire(self, device_id: str, step: Step, now: float) -> None:
        state = step.state
        due = sorted(
            ((t, order, fid, dwell) for order, t, fid, dwell in self._timers(state) if t <= now),
        )
        for t, _order, fid, dwell in due:
            stay = state.stays.get(fid)
            if stay is None:  # ended by an earlier timer
                continue
            if dwell:
                stay.dwells_fired.append(dwell)
                step.events.append(Event(device_id, fid, stay.store_id, "dwell", t, stay.lat,
                                         stay.lon, stay.distance_m, stay.speed_mps, dwell_s=dwell))
            else:
                del state.stays[fid]
                self._end(device_id, step, stay, stay.confirmed_ts, stay.lat, stay.lon,
                          stay.distance_m, stay.speed_mps, stale=True)

    def _end(self, device_id: str, step: Step, stay: Stay, ts: float, lat: float, lon: float,
             dist: float, speed: float | None, *, stale: bool) -> None:
        step.events.append(Event(device_id, stay.geofence_id, stay.store_id, "exit", ts, lat,
                                 lon, dist, speed, stale=stale))
        if ts - stay.enter_ts >= self.min_visit_s:
            step.visits.append(Visit(device_id, stay.store_id, stay.geofence_id,
                                     stay.enter_ts, ts))


def forget_stays(state: DeviceState) -> DeviceState:
    """Location consent revoked: end every stay and timer without events (contract §5)."""
    return DeviceState(state.last_ts, {}, [])


def process_batch(
    tracker: Tracker, pings: Sequence[Ping], states: Mapping[str, DeviceState | None]
) -> dict[str, Step]:
    """One index query for the whole batch, then each device's pings in order.

    `states` holds the prior state of every device in the batch (missing or None: new).
    Rejection positions are indexes into `pings`."""
    prox = tracker.index.query([p.lat for p in pings], [p.lon for p in pings])
    near: dict[int, list[tuple[int, float]]] = {}
    for i, fence, dist in zip(prox.ping.tolist(), prox.fence.tolist(), prox.distance_m.tolist(),
                              strict=True):
        near.setdefault(i, []).append((fence, dist))
    groups: dict[str, list[int]] = {}
    for i, ping in enumerate(pings):
        groups.setdefault(ping.device_id, []).append(i)
    steps = {}
    for device_id, positions in groups.items():
        steps[device_id] = tracker.process(
            device_id, states.get(device_id), [pings[i] for i in positions],
            [near.get(i, ()) for i in positions], positions=positions,
        )
    return steps
