"""Where decisions read the weather: an in-process copy, filled off the ping path.

`OpenMeteoWeather` refreshes the cells of the stores: every cell once at start (preloaded),
then every `weather.refresh` the cells where events looked up the weather lately. The values
go through the state store (`weather_cells`), so instances share them: an instance first takes
what another fetched within `refresh`, and asks Open-Meteo only for the rest. A 429 pauses the
fetching (Retry-After, at least 60 s, doubling while it lasts, at most an hour); meanwhile the
copy keeps serving values up to STALE_AFTER_S old, then says "unknown" (a weather condition is
then false, never true).

Once per cluster: the service runs `tick` as a periodic job (geopush.service.jobs) whose lease
goes to one instance per tick. That one fetches (`fetch=True`): the cells due for it, and those
other instances asked for. The others only copy what is shared (`fetch=False`) and leave the
cells they still miss in a shared bucket of the tick (`add_counts`), which the next holder
reads: one Open-Meteo client for the cluster, whatever the number of instances.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress

import aiohttp
import orjson

from geopush.config import WeatherSettings
from geopush.logs import fields
from geopush.rules.conditions import Weather
from geopush.state.base import StateStore, StateUnavailable
from geopush.weather.cells import cell_of
from geopush.weather.openmeteo import CELLS_PER_REQUEST, OpenMeteoError, fetch

log = logging.getLogger("geopush.weather")

TICK_S = 60.0  # how often the loop looks for cells to refresh (at most `refresh`)
STALE_AFTER_S = 3 * 3600.0  # older values are unknown weather
MAX_PAUSE_S = 3600.0
WANTED_KEPT_S = 3 * TICK_S  # a tick's bucket of cells asked for, read by the next tick


class WeatherSource:
    """No weather (`none`): weather conditions never hold."""

    def at(self, lat: float, lon: float) -> Weather | None:
        return None

    def tick_every(self) -> float | None:
        """The period of the provider's refresh job (None: it has none)."""
        return None

    async def tick(self, period_start: float, *, fetching: bool) -> None:
        """One refresh (geopush.service.jobs); `fetching`: this instance holds the tick's
        lease."""

    async def close(self) -> None:
        pass


class StaticWeather(WeatherSource):
    """The same weather everywhere (`static`, from `weather.static`): tests, demos."""

    def __init__(self, weather: Weather) -> None:
        self.weather = weather

    def at(self, lat: float, lon: float) -> Weather | None:
        return self.weather


class OpenMeteoWeather(WeatherSource):
    def __init__(self, settings: WeatherSettings, store: StateStore,
                 store_cells: Callable[[], Iterable[str]], *,
                 clock: Callable[[], float] = time.time, tick_s: float = TICK_S) -> None:
        """`store_cells`: the cells of the active stores (a reload changes them)."""
        self._base_url = str(settings.base_url)
        self._api_key = settings.api_key
        self._refresh_s = settings.refresh
        self._store = store
        self._store_cells = store_cells
        self._clock = clock
        self._tick_s = min(tick_s, settings.refresh)
        self._copy: dict[str, tuple[Weather, float]] = {}  # cell → (weather, fetched at)
        self._wanted: set[str] = set()  # cells looked up since the last tick
        self._paused_until = 0.0
        self._pause_s = 0.0
        self._client: aiohttp.ClientSession | None = None

    def at(self, lat: float, lon: float) -> Weather | None:
        cell = cell_of(lat, lon)
        self._wanted.add(cell)
        got = self._copy.get(cell)
        if got is None or self._clock() - got[1] > max(STALE_AFTER_S, 4 * self._refresh_s):
            return None
        return got[0]

    async def refresh_once(self, session: aiohttp.ClientSession | None = None, *,
                           fetching: bool = True, period: int | None = None) -> int:
        """Bring due cells up to date; how many were fetched from Open-Meteo. Not
        `fetching`, only from what instances share; the cells still missing are left for the
        instance that fetches, in the bucket of `period`."""
        now = self._clock()
        wanted, self._wanted = self._wanted, set()
        if fetching and period is not None:  # what the other instances asked for lately
            for asked in (period - 1, period):
                with suppress(StateUnavailable):
                    wanted |= set(await self._store.read_counts(_wanted_bucket(asked)))
        due = {c for c in self._store_cells() if c not in self._copy} | wanted
        due = {c for c in due if c not in self._copy or now - self._copy[c][1] >= self._refresh_s}
        if not due:
            return 0
        try:
            shared = await self._store.weather_cells(sorted(due))
        except StateUnavailable:
            shared = {}
        for cell, raw in shared.items():
            decoded = _decode(raw)
            if decoded is not None and now - decoded[1] < self._refresh_s:
                self._copy[cell] = decoded
                due.discard(cell)
        if not due:
            return 0
        if not fetching:
            self._wanted |= due  # until the holder's fetch reaches the shared store
            if period is not None:
                with suppress(StateUnavailable):
                    await self._store.add_counts(_wanted_bucket(period), dict.fromkeys(due, 1),
                                                 WANTED_KEPT_S)
            return 0
        if session is None:
            session = await self._session()
        if now < self._paused_until:
            self._wanted |= due  # asked again once the pause is over
            return 0
        fetched = 0
        cells = sorted(due)
        for start in range(0, len(cells), CELLS_PER_REQUEST):
            chunk = cells[start:start + CELLS_PER_REQUEST]
            try:
                got = await fetch(session, self._base_url, chunk, self._api_key)
            except OpenMeteoError as exc:
                self._pause(exc, now)
                self._wanted |= set(cells[start:])  # asked again after the pause
                break
            self._pause_s = 0.0
            at = self._clock()
            for cell, weather in got.items():
                self._copy[cell] = (weather, at)
            fetched += len(got)
            with suppress(StateUnavailable):
                await self._store.put_weather_cells({c: _encode(w, at) for c, w in got.items()})
        return fetched

    def _pause(self, exc: OpenMeteoError, now: float) -> None:
        wait = exc.retry_after_s if exc.retry_after_s is not None else 60.0
        self._pause_s = min(MAX_PAUSE_S, max(wait, self._pause_s * 2))
        self._paused_until = now + self._pause_s
        log.warning("weather_paused", extra=fields(reason=str(exc), seconds=self._pause_s))

    def tick_every(self) -> float | None:
        return self._tick_s

    async def tick(self, period_start: float, *, fetching: bool) -> None:
        await self.refresh_once(fetching=fetching, period=int(period_start // self._tick_s))

    async def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            self._client = aiohttp.ClientSession()
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _wanted_bucket(period: int) -> str:
    return f"weather_wanted:{period}"


def _encode(weather: Weather, at: float) -> bytes:
    return orjson.dumps({"temperature_c": weather.temperature_c,
                         "condition": weather.condition, "at": at})


def _decode(raw: bytes) -> tuple[Weather, float] | None:
    """A shared value; None if it is not one (e.g. another version's): that cell is fetched."""
    try:
        value = orjson.loads(raw)
        temperature, condition, at = value["temperature_c"], value["condition"], float(value["at"])
    except (ValueError, TypeError, KeyError):
        return None
    if (not isinstance(temperature, int | float | None) or isinstance(temperature, bool)
            or not isinstance(condition, str | None)):
        return None
    return Weather(None if temperature is None else float(temperature), condition), at


def weather_source(settings: WeatherSettings, store: StateStore,
                   store_cells: Callable[[], Iterable[str]]) -> WeatherSource:
    if settings.provider == "static" and settings.static is not None:
        return StaticWeather(Weather(settings.static.temperature_c,
                                     settings.static.condition))
    if settings.provider == "open-meteo":
        return OpenMeteoWeather(settings, store, store_cells)
    return WeatherSource()
