"""The plain data the geofence core passes around: pings, events, visits, stays, device state.

Pure: no I/O, no clock. Built for every ping of every batch, so the hot ones (Ping, Event, Visit)
are built fast (see `Ping.__new__` and `new_event`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EventType = Literal["enter", "dwell", "exit"]


Activity = Literal["still", "on_foot", "walking", "running", "on_bicycle", "in_vehicle",
                   "unknown"]
ACTIVITIES: frozenset[str] = frozenset(
    ("still", "on_foot", "walking", "running", "on_bicycle", "in_vehicle", "unknown"))


class _PingDraft:
    __slots__ = ("device_id", "ts", "lat", "lon", "accuracy_m", "speed_mps",  # noqa: RUF023 (as Ping)
                 "heading_deg", "altitude_m", "activity")

    def __init__(self, device_id: str, ts: float, lat: float, lon: float,
                 accuracy_m: float | None = None, speed_mps: float | None = None,
                 heading_deg: float | None = None, altitude_m: float | None = None,
                 activity: Activity | None = None) -> None:
        self.device_id = device_id
        self.ts = ts
        self.lat = lat
        self.lon = lon
        self.accuracy_m = accuracy_m
        self.speed_mps = speed_mps
        self.heading_deg = heading_deg
        self.altitude_m = altitude_m
        self.activity = activity


@dataclass(frozen=True, slots=True, init=False)
class Ping:
    """One position report, immutable.

    Built once per ping received, so it is built fast: `__new__` fills a plain twin with the
    same slots and makes it a Ping (as new_event does for events, below), instead of the frozen
    dataclass __init__ and its object.__setattr__ per field (1.9 µs → 0.5 µs a ping on the
    reference VM). Fields, equality, hash, repr, immutability and dataclasses.replace are the
    dataclass's own (tests/test_transitions.py)."""

    device_id: str
    ts: float  # epoch seconds
    lat: float
    lon: float
    accuracy_m: float | None = None
    speed_mps: float | None = None
    # carried for the rules (`when.activity`) and later use; the tracker reads none of them
    heading_deg: float | None = None  # 0-360, clockwise from true north
    altitude_m: float | None = None
    activity: Activity | None = None

    def __new__(cls, device_id: str, ts: float, lat: float, lon: float,
                accuracy_m: float | None = None, speed_mps: float | None = None,
                heading_deg: float | None = None, altitude_m: float | None = None,
                activity: Activity | None = None) -> Ping:
        draft: Any = _PingDraft(device_id, ts, lat, lon, accuracy_m, speed_mps, heading_deg,
                                altitude_m, activity)
        draft.__class__ = cls
        ping: Ping = draft
        return ping

    def __reduce__(self) -> tuple[type[Ping], tuple[Any, ...]]:
        # copy and pickle rebuild through the constructor (there is no __init__ to skip)
        return Ping, (self.device_id, self.ts, self.lat, self.lon, self.accuracy_m,
                      self.speed_mps, self.heading_deg, self.altitude_m, self.activity)


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


# Event and Visit are frozen dataclasses, whose __init__ sets each field through
# object.__setattr__: ~3 µs an Event on the reference VM, a tenth of a ping near a fence. The
# tracker builds them as a plain twin with the same slots (ordinary stores), then makes it the
# real class: CPython allows that between classes of identical slot layout, and the result is
# an ordinary, frozen Event (tests/test_transitions.py checks it equals the constructor's).


class _EventDraft:
    __slots__ = Event.__slots__

    def __init__(self, device_id: str, geofence_id: str, store_id: str, type: EventType,
                 ts: float, lat: float, lon: float, distance_m: float, speed_mps: float | None,
                 dwell_s: float | None = None, stale: bool = False) -> None:
        self.device_id = device_id
        self.geofence_id = geofence_id
        self.store_id = store_id
        self.type = type
        self.ts = ts
        self.lat = lat
        self.lon = lon
        self.distance_m = distance_m
        self.speed_mps = speed_mps
        self.dwell_s = dwell_s
        self.stale = stale


class _VisitDraft:
    __slots__ = Visit.__slots__

    def __init__(self, device_id: str, store_id: str, geofence_id: str, start: float,
                 end: float) -> None:
        self.device_id = device_id
        self.store_id = store_id
        self.geofence_id = geofence_id
        self.start = start
        self.end = end


def new_event(device_id: str, geofence_id: str, store_id: str, type: EventType, ts: float,
           lat: float, lon: float, distance_m: float, speed_mps: float | None,
           dwell_s: float | None = None, stale: bool = False) -> Event:
    """`Event(...)`, four times faster (see above)."""
    draft: Any = _EventDraft(device_id, geofence_id, store_id, type, ts, lat, lon, distance_m,
                             speed_mps, dwell_s, stale)
    draft.__class__ = Event
    event: Event = draft
    return event


def new_visit(device_id: str, store_id: str, geofence_id: str, start: float, end: float) -> Visit:
    """`Visit(...)`, faster (see new_event)."""
    draft: Any = _VisitDraft(device_id, store_id, geofence_id, start, end)
    draft.__class__ = Visit
    visit: Visit = draft
    return visit


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
    # The ping rate limit's token bucket as one time (GCRA): when the bucket was, or would have
    # been, empty. Its level at ts is min(capacity, (ts - bucket_empty_ts) / interval); None: full
    # (no ping counted yet, or no limit). Ping time, not wall clock (geopush.geo.transitions).
    bucket_empty_ts: float | None = None
    # The tracker's cache of when a timer of these stays may next be due: a lower bound, valid
    # only for the dwell plan it was worked out with (`due_plan`), so a tracker with other
    # rules works it out again. Not part of the state: not compared, not stored.
    due: float | None = field(default=None, compare=False, repr=False)
    due_plan: object = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_ts": self.last_ts,
            "stays": [
                [s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon,
                 s.distance_m, s.speed_mps, s.dwells_fired]
                for s in self.stays.values()
            ],
            "recent": [list(r) for r in self.recent],
            "bucket_empty_ts": self.bucket_empty_ts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceState:
        stays = {}
        for row in data.get("stays", ()):
            stay = Stay(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        list(row[8]))
            stays[stay.geofence_id] = stay
        recent = [(r[0], r[1], r[2]) for r in data.get("recent", ())]
        return cls(data.get("last_ts"), stays, recent, data.get("bucket_empty_ts"))
