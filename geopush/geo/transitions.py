"""The transition tracker (contract §5), pure: prior device state + pings → new state + events.

No clock of its own: pings carry their time, and timers (dwell, stale exit) fire when the caller
says what time it is (`fire_due`). Processing a ping first fires every timer due by the ping's
time, so the result never depends on how a device's pings are split into batches.

Events come out in the order things happened: a ping's events at its ts (exits before enters),
a timer's at its due time. Every event's `ts` follows that order except a stale exit's, which
the contract dates at the stay's last confirming ping although it happens stale_after later
(so a dwell that fell due before the stay went stale precedes it with a later `ts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from math import asin, cos, sin, sqrt
from typing import Literal

import numpy as np

from geopush.geo.index import EARTH_RADIUS_M, GeofenceIndex, Proximity
from geopush.geo.model import (
    DeviceState,
    Event,
    Ping,
    Stay,
    Visit,
    new_event,
    new_visit,
)
from geopush.timeutil import format_ts

SPEED_MIN_AGE_S = 5.0  # derived speed: the latest accepted ping 5–120 s older (contract §5)
SPEED_MAX_AGE_S = 120.0
_RECENT_CAP = 256  # bound on remembered pings for pathological ping rates

# SPEED MEMORY. A ping at t takes for its speed the latest accepted ping with t - ts >= 5 s,
# none if that one has t - ts > 120 s (`Tracker._speed` walks `recent` newest first). Pings are
# accepted in ts order, so every later ping has t' >= T, T the newest accepted ts, and float
# subtraction is monotone: t' - ts >= T - ts. Hence, of two remembered pings a before b:
# - if T - b.ts >= 5, then t' - b.ts >= 5 for every later ping, which reaches b (or something
#   newer) before a: a is never taken again;
# - if T - a.ts > 120, then t' - a.ts > 120: were a ever the latest old enough, the answer would
#   be "no speed" with or without it.
# So `recent` keeps, oldest first, only pings with T - ts < 5 s and at most one before them
# (the latest with T - ts >= 5, if at most 120 s old): ~6 entries at 1 Hz instead of 120, and
# the speed is the same as from the whole history (tests/test_transition_properties.py). The
# only approximation is _RECENT_CAP, reached only by more than 256 pings within 5 s. Every
# processed ping is remembered, so the newest entry's time is the state's last_ts, and the
# per-ping trimming reads last_ts rather than the entry (one memory access fewer a ping).


# PING RATE LIMIT (contract §13, limits.device_pings_per_minute). A token bucket of C pings per
# 60 s of ping time, kept as one number per device (GCRA): `bucket_empty_ts`, the time at which
# the bucket was, or would have been, empty, so that its level at ts is
# min(C, (ts - bucket_empty_ts) / interval), interval = 60 / C. A ping is accepted when the level
# is at least one; it then takes one: bucket_empty_ts = max(bucket_empty_ts, ts - 60) + interval.
# Only pings that pass every other check count (out_of_order ones are turned away first, invalid
# and no_consent ones never reach the tracker), and a rate_limited ping changes nothing else, as
# an out_of_order one. Ping time, not wall clock: an offline backlog uploaded at once is spread
# over the hours it was recorded in and passes; pings stamped close together are cut. Pings are
# taken in ts order and the bucket travels with the state, so how a device's pings are split
# into batches (or instances) does not change which are accepted
# (tests/test_transition_properties.py).
# The sums of `interval` drift by float rounding (a ts before 2106 has an ulp of at most
# 4.8e-7 s, so C sums drift by less than C * 2.4e-7 s), which would turn away the C-th ping of a
# burst for C = 9, 11, 14, …; a slack of the pings' own resolution, 1 ms, keeps every burst
# exactly C for C up to the configured bound of 3600 (tests/test_rate_limit.py).
RATE_WINDOW_S = 60.0
_RATE_SLACK_S = 1e-3


@dataclass(slots=True)
class Rejection:
    position: int  # index of the ping in the caller's input
    code: Literal["out_of_order", "rate_limited"]
    message: str


class Step:
    """What one call produced for one device.

    `events`, `visits` and `rejected` are lists made on first use: most devices of a batch
    get none, and three empty lists per device and batch are most of what a quiet ping
    allocates (and what the garbage collector then has to look at)."""

    __slots__ = ("_events", "_rejected", "_visits", "state")

    def __init__(self, state: DeviceState, events: list[Event] | None = None,
                 visits: list[Visit] | None = None, rejected: list[Rejection] | None = None
                 ) -> None:
        self.state = state
        self._events = events
        self._visits = visits
        self._rejected = rejected

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            self._events = []
        return self._events

    @events.setter
    def events(self, value: list[Event]) -> None:
        self._events = value

    @property
    def visits(self) -> list[Visit]:
        if self._visits is None:
            self._visits = []
        return self._visits

    @visits.setter
    def visits(self, value: list[Visit]) -> None:
        self._visits = value

    @property
    def rejected(self) -> list[Rejection]:
        if self._rejected is None:
            self._rejected = []
        return self._rejected

    @rejected.setter
    def rejected(self, value: list[Rejection]) -> None:
        self._rejected = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Step):
            return NotImplemented
        return (self.state, self.events, self.visits, self.rejected) == (
            other.state, other.events, other.visits, other.rejected)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (f"Step(state={self.state!r}, events={self.events!r}, visits={self.visits!r}, "
                f"rejected={self.rejected!r})")


def _step(steps: dict[str, Step], device_id: str, state: DeviceState) -> Step:
    """The device's Step in `steps`, made when it first has something to report."""
    step = steps.get(device_id)
    if step is None:
        step = steps[device_id] = Step(state)
    return step


DwellPlan = Callable[[str], Sequence[float]]
"""Dwell durations (seconds) that matter for a geofence id; from the rules."""


MAX_EARLIER_PLANS = 8  # reloads whose dwell plans open stays may still follow


def _keep_plans(tracker: Tracker, keep: int) -> Tracker:
    """`tracker` with at most `keep` plans behind it: a stay older than them all takes the
    oldest kept. The chain would otherwise grow with every reload and keep every old index
    alive; cutting the link of a tracker that many reloads old changes nothing in use."""
    last = tracker
    for _ in range(keep - 1):
        if last.earlier is None:
            return tracker
        last = last.earlier
    last.earlier = None
    return tracker


def no_dwells(_geofence_id: str) -> Sequence[float]:
    return ()


class _Near:
    """The fences within reach of each ping, as flat parallel lists.

    Pairs of ping i are `fence[offsets[i]:offsets[i + 1]]` (and the same slice of `distance_m`
    and `inside`). Plain lists, not numpy arrays: the tracker reads them one item at a time
    from Python, where a list index costs a fraction of a numpy scalar access."""

    __slots__ = ("distance_m", "fence", "inside", "offsets")

    def __init__(self, offsets: list[int], fence: list[int], distance_m: list[float],
                 inside: list[bool]) -> None:
        self.offsets = offsets
        self.fence = fence
        self.distance_m = distance_m
        self.inside = inside

    @classmethod
    def from_proximity(cls, prox: Proximity, n_pings: int, index: GeofenceIndex) -> _Near:
        # prox.ping is ascending, so each ping's pairs are one contiguous run
        offsets = np.searchsorted(prox.ping, np.arange(n_pings + 1)).tolist()
        inside = (prox.distance_m <= index.inside_m[prox.fence]).tolist()
        return cls(offsets, prox.fence.tolist(), prox.distance_m.tolist(), inside)

    @classmethod
    def from_pairs(cls, near: Sequence[Iterable[tuple[int, float]]], inside_m: list[float]
                   ) -> _Near:
        offsets, fences, dists = [0], [], []
        for pairs in near:
            for fence, dist in pairs:
                fences.append(fence)
                dists.append(dist)
            offsets.append(len(fences))
        return cls(offsets, fences, dists,
                   [d <= inside_m[f] for f, d in zip(fences, dists, strict=True)])


class Tracker:
    """Applies contract §5 with one index and one set of thresholds; immutable, shareable.

    `dwell_plan` is asked once per geofence and the answer cached: build a new Tracker when the
    rules change (a reload builds a new index anyway). New dwell durations apply to stays
    entered after a reload (contract §4): `plan_since` is when this tracker's plan took effect
    (ping time), and `earlier` the tracker whose plan held before, asked for stays entered
    earlier (it asks its own `earlier` in turn)."""

    def __init__(
        self,
        index: GeofenceIndex,
        *,
        max_accuracy_m: float = 100.0,
        stale_after_s: float = 7200.0,
        min_visit_s: float = 300.0,
        dwell_plan: DwellPlan = no_dwells,
        pings_per_minute: int | None = None,
        plan_since: float = -math.inf,
        earlier: Tracker | None = None,
    ) -> None:
        """`pings_per_minute`: the PING RATE LIMIT's C (None or 0: no limit)."""
        self.index = index
        self.pings_per_minute = pings_per_minute or None
        # 0.0: no limit (one falsy local the hot loop tests)
        self._rate_interval = RATE_WINDOW_S / pings_per_minute if pings_per_minute else 0.0
        self.max_accuracy_m = max_accuracy_m
        self.stale_after_s = stale_after_s
        self.min_visit_s = min_visit_s
        self.dwell_plan = dwell_plan
        # Hot-path copies of the index's columns as lists (see _Near for why).
        self._ids: list[str] = list(index.ids)
        self._store_ids: list[str] = list(index.store_ids)
        self._inside_m: list[float] = index.inside_m.tolist()
        self._lat: list[float] = index.lat.tolist()
        self._lon: list[float] = index.lon.tolist()
        self._dwells: dict[str, tuple[float, ...]] = {}
        self.plan_since = plan_since if earlier is not None else -math.inf
        self.earlier = _keep_plans(earlier, MAX_EARLIER_PLANS) if earlier is not None else None

    def stay_dwells(self, geofence_id: str, enter_ts: float) -> tuple[float, ...]:
        """The dwell durations of a stay: those of the plan in effect when it was entered."""
        tracker: Tracker = self
        while enter_ts < tracker.plan_since and tracker.earlier is not None:
            tracker = tracker.earlier
        plan = tracker._dwells.get(geofence_id)
        return plan if plan is not None else tracker.dwells(geofence_id)

    def dwells(self, geofence_id: str) -> tuple[float, ...]:
        """The geofence's dwell durations, ascending, without repeats (a repeat would fire the
        same dwell twice) or non-positive values (a dwell of 0 is just the enter)."""
        plan = self._dwells.get(geofence_id)
        if plan is None:
            plan = tuple(sorted({float(d) for d in self.dwell_plan(geofence_id) if d > 0}))
            self._dwells[geofence_id] = plan
        return plan

    # -- pings ---------------------------------------------------------------------------

    def process(
        self,
        device_id: str,
        state: DeviceState | None,
        pings: Sequence[Ping],
        near: Sequence[Iterable[tuple[int, float]]] | None = None,
        *,
        positions: Sequence[int] | None = None,
    ) -> Step:
        """Apply one device's pings, taken in timestamp order (a stable sort: equal times keep
        their input order). `state` is changed in place and is the returned step's state.

        `near[i]` lists (fence index, distance m) within reach of pings[i], as a batch query of
        the index gives them; without it the pings are looked up here. `positions` are the
        pings' indexes in the caller's input, for rejections."""
        n = len(pings)
        if near is None:
            prox = self.index.query([p.lat for p in pings], [p.lon for p in pings])
            lookup = _Near.from_proximity(prox, n, self.index)
        else:
            lookup = _Near.from_pairs(near, self._inside_m)
        order = sorted(range(n), key=lambda i: pings[i].ts)
        states: dict[str, DeviceState | None] = {device_id: state}
        steps = self._run(pings, order, lookup, states, positions=positions or None,
                          device_id=device_id)
        return steps.get(device_id) or Step(states[device_id] or DeviceState())

    def _run(
        self, pings: Sequence[Ping], order: Iterable[int], near: _Near,
        states: MutableMapping[str, DeviceState | None], *,
        positions: Sequence[int] | None = None, device_id: str | None = None,
    ) -> dict[str, Step]:
        """Apply pings in the given (time) order, each to its device's state in `states`,
        changed in place (a device without one gets a new one there). Returns a Step for each
        device with events, visits or rejections.

        One pass over the batch, shaped for speed: a batch of the service holds about one ping
        per device, so a device costs nothing beyond its state; most pings have no stay and
        nothing near, and that path is a few comparisons and an append. Timers are examined
        only once a ping reaches the state's `due` (a lower bound, as confirming a stay only
        delays its stale exit). `device_id` overrides the pings' own (one device's call)."""
        steps: dict[str, Step] = {}
        offsets = near.offsets
        max_accuracy = self.max_accuracy_m
        min_age, max_age, cap = SPEED_MIN_AGE_S, SPEED_MAX_AGE_S, _RECENT_CAP
        inf = math.inf
        plan = self._dwells  # identifies this tracker's dwell plan (DeviceState.due_plan)
        interval = self._rate_interval
        window = RATE_WINDOW_S
        enough = interval - _RATE_SLACK_S  # ping time that refills one ping
        devices = ([p.device_id for p in pings] if device_id is None
                   else [device_id] * len(pings))
        for i in order:
            ping = pings[i]
            device = devices[i]
            state = states.get(device)
            if state is None:
                state = states[device] = DeviceState()
            ts = ping.ts
            last_ts = state.last_ts
            if last_ts is not None and ts < last_ts:
                step = _step(steps, device, state)
                step.rejected.append(Rejection(
                    positions[i] if positions is not None else i, "out_of_order",
                    # RFC 3339 like every other time geopush shows; the same two times as
                    # before (this ping's and its own device's last), nothing more
                    f"ts {format_ts(ts)} is older than this device's last processed ping "
                    f"({format_ts(last_ts)})",
                ))
                continue
            if interval:
                empty = state.bucket_empty_ts
                if empty is None or ts - empty >= enough:
                    floor = ts - window
                    state.bucket_empty_ts = (empty if empty is not None and empty > floor
                                             else floor) + interval
                else:
                    step = _step(steps, device, state)
                    step.rejected.append(Rejection(
                        positions[i] if positions is not None else i, "rate_limited",
                        f"over this device's limit of {self.pings_per_minute} pings per 60 s "
                        f"of ping time (limits.device_pings_per_minute); its next ping is "
                        f"accepted from ts {format_ts(empty + interval)}",
                    ))
                    continue
            stays = state.stays
            if stays:
                due = state.due
                if due is None or state.due_plan is not plan:
                    due = state.due = self._next_due(stays)
                    state.due_plan = plan
                if ts >= due:
                    self._fire(device, state, steps, ts)
                    state.due = self._next_due(stays) if stays else inf
            lo = offsets[i]
            hi = offsets[i + 1]
            if stays or lo != hi:
                accuracy = ping.accuracy_m
                if accuracy is None or accuracy <= max_accuracy:
                    had_stays = bool(stays)
                    entered = self._move(device, state, steps, ping, near, lo, hi)
                    # with no stay before, `due` is whatever it last was: replace it
                    if entered != inf and (not had_stays
                                           or entered < state.due):  # type: ignore[operator]
                        state.due = entered
                        state.due_plan = plan
            state.last_ts = ts
            # Forget what no later ping can take for its speed (SPEED MEMORY, above).
            recent = state.recent
            entry = (ts, ping.lat, ping.lon)
            # the usual case, pings more than 5 s apart: only the newest remembered ping (the
            # last processed one, at last_ts) and this one can serve, the newest only if young
            if recent and last_ts is not None and ts - last_ts >= min_age:
                if ts - last_ts > max_age:
                    state.recent = [entry]
                elif len(recent) == 2:
                    recent[0] = recent[1]
                    recent[1] = entry
                else:
                    state.recent = [recent[-1], entry]
                continue
            recent.append(entry)
            n = len(recent)
            if n > 1 and (ts - recent[1][0] >= min_age or ts - recent[0][0] > max_age):
                del recent[0]
                while len(recent) > 1 and (ts - recent[1][0] >= min_age
                                           or ts - recent[0][0] > max_age):
                    del recent[0]
            elif n > cap:
                del recent[:-cap]
        return steps

    def _move(self, device_id: str, state: DeviceState, steps: dict[str, Step], ping: Ping,
              near: _Near, lo: int, hi: int) -> float:
        """An accurate ping: end the stays it is beyond reach of, enter or confirm the fences
        it is inside. Returns the earliest due time of the stays it began (inf: none)."""
        ids = self._ids
        fences = near.fence
        inside = near.inside
        stays = state.stays
        ts = ping.ts
        speed: float | None = None
        have_speed = False  # computed once, and only if an event or a stay needs it
        if stays:
            if len(stays) == 1:  # the usual case: is its fence among the few within reach?
                [only] = stays
                k = lo
                while k < hi and ids[fences[k]] != only:
                    k += 1
                ending: Sequence[str] = (only,) if k == hi else ()
            else:
                within_reach = {ids[fences[k]] for k in range(lo, hi)}
                ending = [f for f in stays if f not in within_reach]
            # exits first: moving from one fence into its neighbour reads exit, then enter
            for fid in ending:
                ended = stays.pop(fid)
                if not have_speed:
                    speed, have_speed = self._speed(state, ping), True
                step = _step(steps, device_id, state)
                self._end(device_id, step, ended, ts, ping.lat, ping.lon,
                          self._distance(fid, ping), speed, stale=False)
        entered = math.inf
        for k in range(lo, hi):
            if not inside[k]:
                continue  # the hysteresis band: neither ends nor confirms
            fence = fences[k]
            fid = ids[fence]
            dist = near.distance_m[k]
            if not have_speed:
                speed = ping.speed_mps
                if speed is None:
                    speed = self._speed(state, ping)
                have_speed = True
            stay = stays.get(fid)
            if stay is None:
                store_id = self._store_ids[fence]
                stays[fid] = Stay(fid, store_id, ts, ts, ping.lat, ping.lon, dist, speed)
                step = _step(steps, device_id, state)
                step.events.append(new_event(device_id, fid, store_id, "enter", ts, ping.lat,
                                         ping.lon, dist, speed))
                plan = self._dwells.get(fid) if ts >= self.plan_since else None
                if plan is None:
                    plan = self.stay_dwells(fid, ts)
                first = ts + (plan[0] if plan and plan[0] < self.stale_after_s
                              else self.stale_after_s)
                if first < entered:
                    entered = first
            else:
                stay.confirmed_ts = ts
                stay.lat = ping.lat
                stay.lon = ping.lon
                stay.distance_m = dist
                stay.speed_mps = speed
        return entered

    def _distance(self, geofence_id: str, ping: Ping) -> float:
        """Metres from the ping to a fence it left (so not in the batch lookup)."""
        fence = self.index.position.get(geofence_id)
        if fence is None:  # the fence went away in a reload
            return math.inf
        if self.index.is_polygon(fence):
            return self.index.distance_to(fence, ping.lat, ping.lon)
        return _haversine_m(ping.lat, ping.lon, self._lat[fence], self._lon[fence])

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
            return _haversine_m(lat, lon, ping.lat, ping.lon) / age
        return None

    # -- timers --------------------------------------------------------------------------

    def fire_due(self, device_id: str, state: DeviceState | None, now: float) -> Step:
        """Fire every dwell and stale exit due at or before `now`."""
        if state is None:
            return Step(DeviceState())
        steps: dict[str, Step] = {}
        if state.stays:
            self._fire(device_id, state, steps, now)
            state.due = self._next_due(state.stays)
            state.due_plan = self._dwells
        return steps.get(device_id) or Step(state)

    def next_due(self, state: DeviceState) -> float | None:
        """When `fire_due` next has something to do for this device (None: nothing pending)."""
        if not state.stays:
            return None
        due = self._next_due(state.stays)
        return None if due == math.inf else due

    def _next_due(self, stays: Mapping[str, Stay]) -> float:
        stale_after = self.stale_after_s
        best = math.inf
        plans = self._dwells
        since = self.plan_since
        for fid, stay in stays.items():
            t = stay.confirmed_ts + stale_after
            if t < best:
                best = t
            plan = plans.get(fid) if stay.enter_ts >= since else None
            # ascending: the first not fired is the earliest
            for dwell in plan if plan is not None else self.stay_dwells(fid, stay.enter_ts):
                if dwell not in stay.dwells_fired:
                    t = stay.enter_ts + dwell
                    if t < best:
                        best = t
                    break
        return best

    def _fire(self, device_id: str, state: DeviceState, steps: dict[str, Step], now: float
              ) -> None:
        """Fire the timers due by `now` in due order; at the same time a dwell goes before the
        stale exit (the stay was still open when the dwell fell due)."""
        stale_after = self.stale_after_s
        due: list[tuple[float, int, str, float]] = []
        for fid, pending in state.stays.items():
            t = pending.confirmed_ts + stale_after
            if t <= now:
                due.append((t, _STALE, fid, 0.0))
            for dwell in self.stay_dwells(fid, pending.enter_ts):
                t = pending.enter_ts + dwell
                if t > now:
                    break
                if dwell not in pending.dwells_fired:
                    due.append((t, _DWELL, fid, dwell))
        if not due:
            return
        step = _step(steps, device_id, state)
        due.sort()
        for t, kind, fid, dwell in due:
            stay = state.stays.get(fid)
            if stay is None:  # ended by an earlier timer
                continue
            if kind == _DWELL:
                stay.dwells_fired.append(dwell)
                step.events.append(new_event(device_id, fid, stay.store_id, "dwell", t, stay.lat,
                                         stay.lon, stay.distance_m, stay.speed_mps, dwell_s=dwell))
            else:
                del state.stays[fid]
                self._end(device_id, step, stay, stay.confirmed_ts, stay.lat, stay.lon,
                          stay.distance_m, stay.speed_mps, stale=True)

    def _end(self, device_id: str, step: Step, stay: Stay, ts: float, lat: float, lon: float,
             dist: float, speed: float | None, *, stale: bool) -> None:
        step.events.append(new_event(device_id, stay.geofence_id, stay.store_id, "exit", ts, lat,
                                 lon, dist, speed, stale=stale))
        if ts - stay.enter_ts >= self.min_visit_s:
            step.visits.append(new_visit(device_id, stay.store_id, stay.geofence_id,
                                     stay.enter_ts, ts))


def _haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """`geopush.geo.index.distance_m` (same formula, same radius) without its calls to
    math.radians and min: it runs for most pings near a fence."""
    p1 = lat1 * _RADIANS
    p2 = lat2 * _RADIANS
    a = (sin((p2 - p1) * 0.5) ** 2
         + cos(p1) * cos(p2) * sin((lon2 - lon1) * (_RADIANS * 0.5)) ** 2)
    return _EARTH_DIAMETER_M * asin(sqrt(a if a < 1.0 else 1.0))


_RADIANS = math.pi / 180.0
_EARTH_DIAMETER_M = 2.0 * EARTH_RADIUS_M
_DWELL, _STALE = 0, 1  # timer kinds, in the order they fire when due at the same time


def forget_stays(state: DeviceState) -> DeviceState:
    """Location consent revoked: end every stay and timer without events (contract §5)."""
    return DeviceState(state.last_ts, {}, [], state.bucket_empty_ts)


def process_batch(
    tracker: Tracker, pings: Sequence[Ping], states: MutableMapping[str, DeviceState | None]
) -> dict[str, Step]:
    """One index query for the whole batch, then each device's pings in timestamp order.

    `states` holds the prior state of devices of the batch (missing or None: new) and is
    updated in place: afterwards every device of the batch has its new state there. Returns a
    Step for each device that has events, visits or rejections (whose positions are indexes
    into `pings`)."""
    if not pings:
        return {}
    near = _Near.from_proximity(
        tracker.index.query([p.lat for p in pings], [p.lon for p in pings]), len(pings),
        tracker.index,
    )
    # Batches usually come in time order (then so does each device's share): one vectorised
    # check spares a sort; otherwise a stable sort keeps equal times in input order, as a
    # per-device stable sort would.
    ts = np.fromiter([p.ts for p in pings], dtype=np.float64, count=len(pings))
    in_order = bool((ts[1:] >= ts[:-1]).all())
    order = range(len(pings)) if in_order else np.argsort(ts, kind="stable").tolist()
    return tracker._run(pings, order, near, states)
