"""Whether a rule's trigger and `when` hold at a moment (contract §3). Pure.

Unknown never holds: unknown weather, opening hours, speed, activity or last visit make the
condition that asks for them false, never true.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from geopush.devices import DeviceProfile
from geopush.geo.model import Event
from geopush.geo.stores import Geofence
from geopush.rules.load import LoadedRule
from geopush.rules.schema import DAYS, Range, When
from geopush.timeutil import zone

STORE_OPEN_AHEAD_S = 15 * 60  # store_open: open at the event and for this much longer


@dataclass(frozen=True, slots=True)
class Weather:
    temperature_c: float | None = None
    condition: str | None = None


@dataclass(frozen=True, slots=True)
class VisitStats:
    """This store's visits that ended before the event."""

    count_90d: int = 0
    last_visit_days: float | None = None  # None: no earlier visit


@dataclass(frozen=True, slots=True)
class Moment:
    """What a rule is judged on: one event and what is known around it."""

    event: Event
    geofence: Geofence
    profile: DeviceProfile
    weather: Weather | None
    visits: VisitStats
    activity: str | None  # of the ping behind the event (a dwell: the stay's last ping)


def local_time(ts: float, timezone: str) -> datetime:
    return datetime.fromtimestamp(ts, zone(timezone))


def clock_of(local: datetime) -> str:
    """HH:MM, as strftime("%H:%M") writes it, at a tenth of its cost (every decision asks)."""
    return f"{local.hour:02d}:{local.minute:02d}"


def in_window(clock: str, start: str, end: str) -> bool:
    """HH:MM within [start, end); start after end wraps midnight."""
    if start <= end:
        return start <= clock < end
    return clock >= start or clock < end


def not_triggered(rule: LoadedRule, event: Event, geofence: Geofence) -> str | None:
    """Why the rule's trigger does not match the event (None: it does)."""
    trigger = rule.rule.trigger
    if trigger.on != event.type:
        return f"trigger.on is {trigger.on}, the event is {event.type}"
    if trigger.on == "dwell" and event.dwell_s != trigger.dwell:
        return f"trigger.dwell is {trigger.dwell:g}s, this dwell is {event.dwell_s or 0:g}s"
    if not rule.selects(geofence):
        return f"trigger.geofences does not select {geofence.id}"
    return None


def holds(when: When, moment: Moment) -> bool:
    """Every condition of `when` holds at the moment."""
    return false_condition(when, moment) is None


def false_condition(when: When, moment: Moment) -> str | None:
    """The first condition of `when` that does not hold, said as a marketer reads it (None:
    all hold). `geopush replay --explain` shows it."""
    event, geofence, profile = moment.event, moment.geofence, moment.profile
    if when.local_time is not None or when.dates is not None:
        local = local_time(event.ts, geofence.timezone)
        if when.local_time is not None:
            day = DAYS[local.weekday()]
            clock = clock_of(local)
            if day not in when.local_time.days or not in_window(
                    clock, when.local_time.start, when.local_time.end):
                return (f"when.local_time: {day} {clock} in {geofence.timezone} is outside "
                        f"{','.join(when.local_time.days)} {when.local_time.start}-"
                        f"{when.local_time.end}")
        if when.dates is not None:
            today = local.date()
            if (when.dates.start is not None and today < when.dates.start) \
                    or (when.dates.end is not None and today > when.dates.end):
                return (f"when.dates: {today} is outside {when.dates.start or '…'} to "
                        f"{when.dates.end or '…'}")
    if when.store_open is not None:
        is_open = geofence.hours.is_open(event.ts, for_at_least_s=STORE_OPEN_AHEAD_S) \
            if geofence.hours is not None else None
        if is_open is None:
            return "when.store_open: the store's opening hours are unknown"
        if is_open != when.store_open:
            return ("when.store_open: the store is " +
                    ("open" if is_open else "closed (or closes within 15 minutes)"))
    if when.weather is not None:
        weather = moment.weather
        if weather is None:
            return "when.weather: the weather is unknown"
        if when.weather.temperature_c is not None \
                and not when.weather.temperature_c.holds(weather.temperature_c):
            return (f"when.weather.temperature_c: {_shown(weather.temperature_c)} °C is not "
                    f"{_range(when.weather.temperature_c)}")
        if when.weather.condition is not None and weather.condition not in when.weather.condition:
            return (f"when.weather.condition: {weather.condition or 'unknown'} is not one of "
                    f"{', '.join(when.weather.condition)}")
    if when.segments is not None:
        segments = set(profile.segments)
        if when.segments.any and not segments.intersection(when.segments.any):
            return f"when.segments.any: the device is in none of {', '.join(when.segments.any)}"
        excluded = segments.intersection(when.segments.none)
        if excluded:
            return f"when.segments.none: the device is in {', '.join(sorted(excluded))}"
    if when.visits is not None:
        stats = moment.visits
        if when.visits.last_visit_days is not None \
                and not when.visits.last_visit_days.holds(stats.last_visit_days):
            last = ("no earlier visit" if stats.last_visit_days is None
                    else f"{stats.last_visit_days:.1f} days")
            return (f"when.visits.last_visit_days: {last} is not "
                    f"{_range(when.visits.last_visit_days)}")
        if when.visits.count_90d is not None and not when.visits.count_90d.holds(stats.count_90d):
            return (f"when.visits.count_90d: {stats.count_90d} is not "
                    f"{_range(when.visits.count_90d)}")
    if when.speed_mps is not None and not when.speed_mps.holds(event.speed_mps):
        return f"when.speed_mps: {_shown(event.speed_mps)} m/s is not {_range(when.speed_mps)}"
    if when.activity is not None and moment.activity not in when.activity:
        return (f"when.activity: {moment.activity or 'unknown'} is not one of "
                f"{', '.join(when.activity)}")
    for key, allowed in when.attributes.items():
        value = profile.attributes.get(key)
        if not _one_of(value, allowed):
            return (f"when.attributes.{key}: {value!r} is not one of "
                    f"{', '.join(repr(a) for a in allowed)}")
    return None


def _shown(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g}"


def _range(bounds: Range) -> str:
    if bounds.min is not None and bounds.max is not None:
        return f"within {bounds.min:g}-{bounds.max:g}"
    if bounds.min is not None:
        return f"at least {bounds.min:g}"
    return f"at most {bounds.max:g}"


def _one_of(value: Any, allowed: list[Any]) -> bool:
    # True == 1 in Python; an attribute `true` must not match a rule's 1, nor the reverse
    return any(value == a and type(value) is type(a) for a in allowed)
