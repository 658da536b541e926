"""Whether a rule's trigger and `when` hold at a moment (contract §3). Pure.

Unknown never holds: unknown weather, opening hours, speed, activity or last visit make the
condition that asks for them false, never true.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from geopush.devices import DeviceProfile
from geopush.geo.model import Event
from geopush.geo.stores import Geofence
from geopush.rules.load import LoadedRule
from geopush.rules.schema import DAYS, When

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


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_time(ts: float, timezone: str) -> datetime:
    return datetime.fromtimestamp(ts, _zone(timezone))


def in_window(clock: str, start: str, end: str) -> bool:
    """HH:MM within [start, end); start after end wraps midnight."""
    if start <= end:
        return start <= clock < end
    return clock >= start or clock < end


def triggered(rule: LoadedRule, event: Event, geofence: Geofence) -> bool:
    trigger = rule.rule.trigger
    if trigger.on != event.type:
        return False
    if trigger.on == "dwell" and event.dwell_s != trigger.dwell:
        return False
    return rule.selects(geofence)


def holds(when: When, moment: Moment) -> bool:
    """Every condition of `when` holds at the moment."""
    event, geofence, profile = moment.event, moment.geofence, moment.profile
    if when.local_time is not None or when.dates is not None:
        local = local_time(event.ts, geofence.timezone)
        if when.local_time is not None:
            day = DAYS[local.weekday()]
            if day not in when.local_time.days or not in_window(
                    local.strftime("%H:%M"), when.local_time.start, when.local_time.end):
                return False
        if when.dates is not None:
            today = local.date()
            if (when.dates.start is not None and today < when.dates.start) \
                    or (when.dates.end is not None and today > when.dates.end):
                return False
    if when.store_open is not None:
        is_open = geofence.hours.is_open(event.ts, for_at_least_s=STORE_OPEN_AHEAD_S) \
            if geofence.hours is not None else None
        if is_open is None or is_open != when.store_open:
            return False
    if when.weather is not None:
        weather = moment.weather
        if weather is None:
            return False
        if when.weather.temperature_c is not None \
                and not when.weather.temperature_c.holds(weather.temperature_c):
            return False
        if when.weather.condition is not None and weather.condition not in when.weather.condition:
            return False
    if when.segments is not None:
        segments = set(profile.segments)
        if when.segments.any and not segments.intersection(when.segments.any):
            return False
        if segments.intersection(when.segments.none):
            return False
    if when.visits is not None:
        stats = moment.visits
        if when.visits.last_visit_days is not None \
                and not when.visits.last_visit_days.holds(stats.last_visit_days):
            return False
        if when.visits.count_90d is not None and not when.visits.count_90d.holds(stats.count_90d):
            return False
    if when.speed_mps is not None and not when.speed_mps.holds(event.speed_mps):
        return False
    if when.activity is not None and moment.activity not in when.activity:
        return False
    return all(_one_of(profile.attributes.get(key), allowed)
               for key, allowed in when.attributes.items())


def _one_of(value: Any, allowed: list[Any]) -> bool:
    # True == 1 in Python; an attribute `true` must not match a rule's 1, nor the reverse
    return any(value == a and type(value) is type(a) for a in allowed)
