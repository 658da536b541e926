"""The weather (contract §3, §8): WMO codes to conditions, ~0.1° cells, Open-Meteo's `current`
forecast of many cells in one request, and the in-process copy decisions read, filled off the
ping path and shared by instances through the state store.

Open-Meteo is a local aiohttp server answering with a real Open-Meteo body
(tests/fixtures/weather/, see its `_meta`); the shared cache is a real MemoryStore or Redis.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from geopush.config import WeatherSettings
from geopush.rules.conditions import Weather
from geopush.state.base import StateStore
from geopush.state.memory import MemoryStore
from geopush.state.redis import RedisStore
from geopush.weather import openmeteo
from geopush.weather.cells import cell_centre, cell_of, condition_of
from geopush.weather.openmeteo import OpenMeteoError, fetch
from geopush.weather.source import (
    STALE_AFTER_S,
    OpenMeteoWeather,
    StaticWeather,
    WeatherSource,
    weather_source,
)
from tests.conftest import _free_port

FIXTURE = Path(__file__).parent / "fixtures" / "weather" / "openmeteo_forecast_current_enschede_trimmed.json"
# a real Open-Meteo answer for one location (Enschede, NL): temperature_2m 17.7, weather_code 2
REAL_BODY: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))["body"]
# Open-Meteo's documented error bodies (https://open-meteo.com/en/docs, "Errors"), and the one it
# answers when a quota is spent (as reported by its users)
ERROR_400 = {"error": True, "reason": "Cannot initialize WeatherVariable from invalid String value "
                                      "tempeture_2m for key hourly"}
ERROR_429 = {"error": True, "reason": "Minutely API request limit exceeded. Please try again in one "
                                      "minute."}

T0 = 1_780_000_000.0
REFRESH_S = 900.0  # weather.refresh's default
ENSCHEDE, PARIS, SYDNEY = (52.276, 6.873), (48.8566, 2.3522), (-33.8688, 151.2093)


# -- a fake Open-Meteo ----------------------------------------------------------------------

@dataclass
class FakeOpenMeteo:
    """Answers like Open-Meteo's forecast API: the real body for each asked location (its
    `current` values replaced where a test set them), an object for one location, a list for
    several. `replies` are answered first, in order: (status, headers, body text)."""

    url: str = ""
    queries: list[dict[str, str]] = field(default_factory=list)
    replies: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    current: dict[tuple[float, float], tuple[float, int]] = field(default_factory=dict)
    hang: bool = False  # never answer (until the test ends)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def set_weather(self, lat: float, lon: float, temperature_c: float, code: int) -> None:
        self.current[cell_centre(cell_of(lat, lon))] = (temperature_c, code)

    def cells_asked(self, n: int = -1) -> list[tuple[float, float]]:
        query = self.queries[n]
        return list(zip(map(float, query["latitude"].split(",")),
                        map(float, query["longitude"].split(",")), strict=True))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        if self.hang:
            await self.released.wait()
        if self.replies:
            status, headers, text = self.replies.pop(0)
            return web.Response(status=status, headers=headers, text=text,
                                content_type="application/json")
        lats = request.query["latitude"].split(",")
        lons = request.query["longitude"].split(",")
        bodies = []
        for lat, lon in zip(lats, lons, strict=True):
            body = copy.deepcopy(REAL_BODY)
            body["latitude"], body["longitude"] = float(lat), float(lon)
            if (float(lat), float(lon)) in self.current:
                temperature, code = self.current[float(lat), float(lon)]
                body["current"]["temperature_2m"] = temperature
                body["current"]["weather_code"] = code
            bodies.append(body)
        return web.json_response(bodies[0] if len(bodies) == 1 else bodies)


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeOpenMeteo]:
    om = FakeOpenMeteo()
    app = web.Application()
    app.router.add_get("/v1/forecast", om.handle)
    server = await aiohttp_server(app)
    om.url = str(server.make_url("/v1/forecast"))
    yield om
    om.released.set()  # a hanging request ends before the server closes


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- cells and WMO codes (pure) -------------------------------------------------------------

# contract §3, written out code by code
CONTRACT_CONDITIONS: dict[int, str] = {
    0: "clear", 1: "clear", 2: "partly_cloudy", 3: "cloudy", 45: "fog", 48: "fog",
    **{c: "drizzle" for c in range(51, 58)}, **{c: "rain" for c in range(61, 68)},
    **{c: "snow" for c in (71, 72, 73, 74, 75, 76, 77, 85, 86)},
    **{c: "showers" for c in (80, 81, 82)}, **{c: "thunderstorm" for c in range(95, 100)},
}
# every code Open-Meteo documents (WMO 4677 "WW" subset, https://open-meteo.com/en/docs)
OPEN_METEO_CODES = (0, 1, 2, 3, 45, 48, 51, 53, 55, 56, 57, 61, 63, 65, 66, 67, 71, 73, 75, 77,
                    80, 81, 82, 85, 86, 95, 96, 99)


@pytest.mark.parametrize("code", [*range(-1, 101), 255, None])
def test_condition_of_follows_the_contract_table_and_unknown_codes_are_none(code: int | None) -> None:
    expected = CONTRACT_CONDITIONS.get(code) if code is not None else None
    assert condition_of(code) == expected


def test_every_code_open_meteo_documents_has_a_condition() -> None:
    assert [c for c in OPEN_METEO_CODES if condition_of(c) is None] == []


@pytest.mark.parametrize(("lat", "lon", "cell"), [
    (*ENSCHEDE, "522:68"),
    (*PARIS, "488:23"),
    (*SYDNEY, "-339:1512"),  # floor, not truncation: -338.7 → -339
    (-34.6037, -58.3816, "-347:-584"),  # Buenos Aires: both negative
    (-0.01, -0.01, "-1:-1"),  # just south-west of (0, 0): not the cell north-east of it
    (0.01, 0.01, "0:0"),
    (0.0, 0.0, "0:0"),
])
def test_cell_of_names_the_cell_of_a_point(lat: float, lon: float, cell: str) -> None:
    assert cell_of(lat, lon) == cell


@pytest.mark.parametrize(("lat", "lon"), [
    ENSCHEDE, PARIS, SYDNEY, (-34.6037, -58.3816), (-0.01, -0.01), (0.0, 0.0), (52.3, 6.9),
    (-52.3, -6.9), (64.1466, -21.9426), (-77.846, 166.676), (89.99, 179.99),
    (-89.99, -179.99), (90.0, 180.0), (-90.0, -180.0), (90.0, -180.0), (-90.0, 180.0),
])
def test_a_point_lies_in_the_cell_whose_centre_it_maps_to(lat: float, lon: float) -> None:
    cell = cell_of(lat, lon)
    centre_lat, centre_lon = cell_centre(cell)
    assert cell_of(centre_lat, centre_lon) == cell
    assert abs(lat - centre_lat) <= 0.05 + 1e-9
    assert abs(lon - centre_lon) <= 0.05 + 1e-9
    # Open-Meteo refuses a request with a coordinate out of range, for every cell in it
    assert -90.0 <= centre_lat <= 90.0
    assert -180.0 <= centre_lon <= 180.0


def test_cell_centres_are_the_middle_of_the_cell() -> None:
    assert cell_centre("522:68") == (52.25, 6.85)
    assert cell_centre("-339:1512") == (-33.85, 151.25)
    assert cell_centre("-1:-1") == (-0.05, -0.05)


# -- Open-Meteo: fetch ----------------------------------------------------------------------

async def test_fetch_one_cell_reads_the_real_body(fake: FakeOpenMeteo,
                                                  session: aiohttp.ClientSession) -> None:
    cell = cell_of(*ENSCHEDE)
    assert await fetch(session, fake.url, [cell]) == {cell: Weather(17.7, "partly_cloudy")}
    assert fake.cells_asked() == [(52.25, 6.85)]


@pytest.mark.parametrize("api_key", [None, "", "om-commercial-key"])
async def test_fetch_of_several_cells_is_one_request_and_each_cell_gets_its_own(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession, api_key: str | None) -> None:
    fake.set_weather(*PARIS, 12.3, 63)
    fake.set_weather(*SYDNEY, -1.5, 0)
    cells = [cell_of(*ENSCHEDE), cell_of(*PARIS), cell_of(*SYDNEY)]

    got = await fetch(session, fake.url, cells, api_key)

    assert got == {cells[0]: Weather(17.7, "partly_cloudy"), cells[1]: Weather(12.3, "rain"),
                   cells[2]: Weather(-1.5, "clear")}
    assert len(fake.queries) == 1
    query = fake.queries[0]
    assert query["latitude"] == "52.25,48.85,-33.85"
    assert query["longitude"] == "6.85,2.35,151.25"
    assert query["current"] == "temperature_2m,weather_code"
    assert query.get("apikey") == (api_key or None)


@pytest.mark.parametrize(("current", "expected"), [
    ({"temperature_2m": 21, "weather_code": 95}, Weather(21.0, "thunderstorm")),
    ({"temperature_2m": None, "weather_code": 3}, Weather(None, "cloudy")),
    ({"temperature_2m": 4.5, "weather_code": 19}, Weather(4.5, None)),  # not a contract code
    ({"temperature_2m": 4.5}, Weather(4.5, None)),
    (None, Weather(None, None)),  # no `current` at all: unknown
])
async def test_fetch_reads_missing_or_odd_values_as_unknown(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession, current: dict[str, Any] | None,
        expected: Weather) -> None:
    body = copy.deepcopy(REAL_BODY)
    if current is None:
        del body["current"]
    else:
        body["current"] = {"time": "2026-10-03T12:30", "interval": 900, **current}
    fake.replies.append((200, {}, json.dumps(body)))
    cell = cell_of(*ENSCHEDE)
    assert await fetch(session, fake.url, [cell]) == {cell: expected}


@pytest.mark.parametrize(("status", "headers", "text", "message", "retry_after_s"), [
    (400, {}, json.dumps(ERROR_400), "Cannot initialize WeatherVariable", None),
    (429, {"Retry-After": "120"}, json.dumps(ERROR_429), "429", 120.0),
    (429, {}, json.dumps(ERROR_429), "429", 60.0),  # no Retry-After: a minute
    (429, {"Retry-After": "5"}, "", "429", 60.0),  # at least a minute
    (429, {"Retry-After": "soon"}, "", "429", 60.0),  # unreadable: a minute
    (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, "", "429", 60.0),  # in the past
    (502, {}, "<html><body><h1>502 Bad Gateway</h1></body></html>", "not JSON", None),
    (200, {}, "<html>maintenance</html>", "not JSON", None),
    (500, {}, json.dumps({"error": True}), "500", None),
])
async def test_fetch_turns_failed_answers_into_open_meteo_errors(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession, status: int, headers: dict[str, str],
        text: str, message: str, retry_after_s: float | None) -> None:
    fake.replies.append((status, headers, text))
    with pytest.raises(OpenMeteoError, match=message) as raised:
        await fetch(session, fake.url, [cell_of(*ENSCHEDE)])
    assert raised.value.retry_after_s == retry_after_s


async def test_fetch_reads_an_http_date_retry_after(fake: FakeOpenMeteo,
                                                    session: aiohttp.ClientSession) -> None:
    fake.replies.append((429, {"Retry-After": formatdate(time.time() + 300, usegmt=True)},
                         json.dumps(ERROR_429)))
    with pytest.raises(OpenMeteoError) as raised:
        await fetch(session, fake.url, [cell_of(*ENSCHEDE)])
    assert raised.value.retry_after_s is not None
    assert 290.0 <= raised.value.retry_after_s <= 300.0


async def test_fetch_refuses_an_answer_with_too_few_locations(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession) -> None:
    fake.replies.append((200, {}, json.dumps(REAL_BODY)))  # one object for two cells
    with pytest.raises(OpenMeteoError, match="1 locations for 2 asked"):
        await fetch(session, fake.url, [cell_of(*ENSCHEDE), cell_of(*PARIS)])


async def test_fetch_gives_up_after_timeout_s(fake: FakeOpenMeteo, session: aiohttp.ClientSession,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openmeteo, "TIMEOUT_S", 0.2)
    fake.hang = True
    started = time.monotonic()
    with pytest.raises(OpenMeteoError, match="unreachable"):
        await fetch(session, fake.url, [cell_of(*ENSCHEDE)])
    assert time.monotonic() - started < 2.0


@asynccontextmanager_type := None  # placeholder removed below
