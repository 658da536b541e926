"""The weather (contract §3, §8): WMO codes to conditions, ~0.1° cells, Open-Meteo's `current`
forecast of many cells in one request, and the in-process copy decisions read, filled off the
ping path and shared by instances through the state store.

Open-Meteo is a local aiohttp server answering with a real Open-Meteo body
(tests/fixtures/weather/, see its `_meta`); the shared cache is a real MemoryStore or Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
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
        for name, values, limit in (("Latitude", lats, 90), ("Longitude", lons, 180)):
            for value in values:
                if not -limit <= float(value) <= limit:  # Open-Meteo refuses the whole request
                    return web.json_response(
                        {"error": True, "reason": f"{name} must be in range of -{limit} to "
                                                  f"{limit}°. Given: {value}."}, status=400)
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


KEY = "commercial-key-0123456789"


async def test_no_error_message_quotes_the_api_key(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession) -> None:
    """The commercial tier's key travels in the query string; the errors that are logged
    (weather_paused) must not carry it, whether Open-Meteo echoes the query in its reason or
    aiohttp quotes the URL (a redirect loop)."""
    fake.replies.append((400, {}, json.dumps(
        {"error": True, "reason": f"Cannot use apikey={KEY} for this endpoint ({KEY})"})))
    with pytest.raises(OpenMeteoError) as raised:
        await fetch(session, fake.url, [cell_of(*ENSCHEDE)], KEY)
    assert KEY not in str(raised.value) and "apikey=***" in str(raised.value)
    for _ in range(20):
        fake.replies.append((302, {"Location": fake.url + f"?apikey={KEY}"}, ""))
    with pytest.raises(OpenMeteoError) as raised:
        await fetch(session, fake.url, [cell_of(*ENSCHEDE)], KEY)
    assert "TooManyRedirects" in str(raised.value) and KEY not in str(raised.value)


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



@contextlib.asynccontextmanager
async def raw_http(reply: bytes) -> AsyncIterator[str]:
    """A server that reads one request, writes `reply` (nothing, or a broken answer), hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/forecast"
    finally:
        server.close()
        await server.wait_closed()


TRUNCATED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
             + json.dumps(REAL_BODY).encode()[:300])


@pytest.mark.parametrize("reply", [b"", TRUNCATED, b"SSH-2.0-OpenSSH_9.6\r\n\r\n"],
                         ids=["closed-without-answer", "closed-mid-body", "not-http"])
async def test_fetch_turns_a_broken_connection_into_an_open_meteo_error(
        session: aiohttp.ClientSession, reply: bytes) -> None:
    async with raw_http(reply) as url:
        with pytest.raises(OpenMeteoError) as raised:
            await fetch(session, url, [cell_of(*ENSCHEDE)])
    assert raised.value.retry_after_s is None


async def test_fetch_turns_a_refused_connection_into_an_open_meteo_error(
        session: aiohttp.ClientSession) -> None:
    with pytest.raises(OpenMeteoError, match="unreachable"):
        await fetch(session, f"http://127.0.0.1:{_free_port()}/v1/forecast", [cell_of(*ENSCHEDE)])


# -- OpenMeteoWeather: the copy decisions read ----------------------------------------------

class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_meteo_settings(fake: FakeOpenMeteo) -> WeatherSettings:
    return WeatherSettings.model_validate({"provider": "open-meteo", "base_url": fake.url,
                                           "refresh": REFRESH_S})


def cells_of(*points: tuple[float, float]) -> Callable[[], set[str]]:
    return lambda: {cell_of(*p) for p in points}


def centres(*points: tuple[float, float]) -> list[tuple[float, float]]:
    return sorted(cell_centre(cell_of(*p)) for p in points)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[StateStore, StateStore]]:
    """Two instances' state stores over the same state: one MemoryStore (one process), or two
    RedisStores on this run's Redis database."""
    if request.param == "memory":
        memory = MemoryStore()
        await memory.open()
        try:
            yield memory, memory
        finally:
            await memory.close()
        return
    url = request.getfixturevalue("redis_url")
    a, b = RedisStore(url), RedisStore(url)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_refresh_once_preloads_every_store_cell_in_one_request_and_at_reads_no_network(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    fake.set_weather(*PARIS, 12.3, 63)
    fake.set_weather(*SYDNEY, 24.0, 0)
    source = OpenMeteoWeather(open_meteo_settings(fake), stores[0],
                              cells_of(ENSCHEDE, PARIS, SYDNEY), clock=Clock())

    assert await source.refresh_once(session) == 3

    assert len(fake.queries) == 1
    assert sorted(fake.cells_asked()) == centres(ENSCHEDE, PARIS, SYDNEY)
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")
    assert source.at(52.22, 6.89) == Weather(17.7, "partly_cloudy")  # the same cell
    assert source.at(*PARIS) == Weather(12.3, "rain")
    assert source.at(*SYDNEY) == Weather(24.0, "clear")
    assert len(fake.queries) == 1  # at() never asks the network
    assert await source.refresh_once(session) == 0  # all fresh: nothing to ask
    assert len(fake.queries) == 1

    assert source.at(40.4168, -3.7038) is None  # Madrid: no store there, not known yet...
    assert len(fake.queries) == 1
    assert await source.refresh_once(session) == 1  # ...until the next refresh, off the ping path
    assert fake.cells_asked() == [(40.45, -3.75)]
    assert source.at(40.4168, -3.7038) == Weather(17.7, "partly_cloudy")


async def test_a_store_on_the_antimeridian_does_not_spoil_the_request_of_its_neighbours(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession) -> None:
    taveuni = (-16.8, 180.0)  # Fiji: a valid store position on longitude 180
    fake.set_weather(*taveuni, 27.5, 80)
    store = MemoryStore()
    await store.open()
    try:
        source = OpenMeteoWeather(open_meteo_settings(fake), store, cells_of(ENSCHEDE, taveuni),
                                  clock=Clock())
        assert await source.refresh_once(session) == 2
    finally:
        await store.close()
    assert source.at(*taveuni) == Weather(27.5, "showers")
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")


@pytest.mark.parametrize(("n", "sizes"), [(1, [1]), (100, [100]), (101, [100, 1]),
                                          (250, [100, 100, 50])])
async def test_up_to_a_hundred_cells_go_in_one_request(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession, n: int, sizes: list[int]) -> None:
    cells = {f"{500 + i // 40}:{40 + i % 40}" for i in range(n)}  # Western Europe
    store = MemoryStore()
    await store.open()
    try:
        source = OpenMeteoWeather(open_meteo_settings(fake), store, lambda: cells, clock=Clock())
        assert await source.refresh_once(session) == n
    finally:
        await store.close()
    assert [len(q["latitude"].split(",")) for q in fake.queries] == sizes
    assert sorted(c for i in range(len(sizes)) for c in fake.cells_asked(i)) == sorted(
        cell_centre(c) for c in cells)
    assert all(source.at(*cell_centre(c)) == Weather(17.7, "partly_cloudy") for c in cells)


async def test_a_second_instance_takes_the_shared_value_and_asks_only_for_the_rest(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    clock = Clock()
    fake.set_weather(*PARIS, 12.3, 63)
    first = OpenMeteoWeather(open_meteo_settings(fake), stores[0], cells_of(ENSCHEDE, PARIS),
                             clock=clock)
    assert await first.refresh_once(session) == 2
    assert len(fake.queries) == 1

    clock.now += REFRESH_S - 1  # still fresh
    second = OpenMeteoWeather(open_meteo_settings(fake), stores[1], cells_of(ENSCHEDE, PARIS),
                              clock=clock)
    assert await second.refresh_once(session) == 0
    assert len(fake.queries) == 1  # nothing asked: both came from the shared store
    assert second.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")
    assert second.at(*PARIS) == Weather(12.3, "rain")

    third = OpenMeteoWeather(open_meteo_settings(fake), stores[1],
                             cells_of(ENSCHEDE, PARIS, SYDNEY), clock=clock)
    assert await third.refresh_once(session) == 1
    assert len(fake.queries) == 2
    assert fake.cells_asked() == centres(SYDNEY)  # only the cell nobody had
    assert third.at(*PARIS) == Weather(12.3, "rain")


async def test_a_shared_value_older_than_refresh_is_fetched_anew(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    clock = Clock()
    first = OpenMeteoWeather(open_meteo_settings(fake), stores[0], cells_of(ENSCHEDE), clock=clock)
    assert await first.refresh_once(session) == 1
    clock.now += REFRESH_S
    fake.set_weather(*ENSCHEDE, 9.0, 61)
    second = OpenMeteoWeather(open_meteo_settings(fake), stores[1], cells_of(ENSCHEDE), clock=clock)
    assert await second.refresh_once(session) == 1
    assert len(fake.queries) == 2
    assert second.at(*ENSCHEDE) == Weather(9.0, "rain")


async def test_after_refresh_only_cells_looked_up_are_fetched_again(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    clock = Clock()
    fake.set_weather(*PARIS, 12.3, 63)
    source = OpenMeteoWeather(open_meteo_settings(fake), stores[0],
                              cells_of(ENSCHEDE, PARIS, SYDNEY), clock=clock)
    assert await source.refresh_once(session) == 3
    fake.set_weather(*PARIS, 30.5, 95)
    fake.set_weather(*ENSCHEDE, 31.0, 0)

    clock.now = T0 + REFRESH_S - 1
    assert source.at(*PARIS) == Weather(12.3, "rain")
    assert await source.refresh_once(session) == 0  # looked up, but not yet due
    assert len(fake.queries) == 1

    clock.now = T0 + REFRESH_S
    assert await source.refresh_once(session) == 0  # due, but no event looked them up lately
    assert len(fake.queries) == 1

    assert source.at(*PARIS) == Weather(12.3, "rain")
    assert await source.refresh_once(session) == 1
    assert len(fake.queries) == 2
    assert fake.cells_asked() == centres(PARIS)
    assert source.at(*PARIS) == Weather(30.5, "thunderstorm")
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")  # not looked up: not asked


async def test_a_429_pauses_fetching_until_retry_after_and_at_keeps_the_old_value(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    clock = Clock()
    fake.set_weather(*PARIS, 12.3, 63)
    source = OpenMeteoWeather(open_meteo_settings(fake), stores[0], cells_of(ENSCHEDE, PARIS),
                              clock=clock)
    assert await source.refresh_once(session) == 2
    fake.set_weather(*PARIS, 30.5, 95)
    fake.replies.append((429, {"Retry-After": "120"}, json.dumps(ERROR_429)))

    paused_at = clock.now = T0 + REFRESH_S
    assert source.at(*PARIS) == Weather(12.3, "rain")
    assert await source.refresh_once(session) == 0  # answered 429
    assert len(fake.queries) == 2
    assert source.at(*PARIS) == Weather(12.3, "rain")  # the old value, while paused

    clock.now = paused_at + 119
    assert await source.refresh_once(session) == 0
    assert len(fake.queries) == 2  # nothing asked during the pause

    # the cell looked up before the pause is asked once it is over, with no new lookup since
    clock.now = paused_at + 120
    assert await source.refresh_once(session) == 1
    assert len(fake.queries) == 3
    assert fake.cells_asked() == centres(PARIS)
    assert source.at(*PARIS) == Weather(30.5, "thunderstorm")


async def test_failures_in_a_row_double_the_pause_and_a_success_ends_it(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession) -> None:
    clock = Clock()
    store = MemoryStore()
    await store.open()
    try:
        source = OpenMeteoWeather(open_meteo_settings(fake), store, cells_of(ENSCHEDE),
                                  clock=clock)
        fake.replies += [(429, {}, json.dumps(ERROR_429))] * 2
        asked_at: list[float] = []
        for t in range(0, 300):
            clock.now = T0 + t
            before = len(fake.queries)
            await source.refresh_once(session)
            if len(fake.queries) > before:
                asked_at.append(t)
            if source.at(*ENSCHEDE) is not None:
                break
    finally:
        await store.close()
    assert asked_at == [0, 60, 180]  # 429 (60 s), 429 (120 s), answered
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")


async def test_values_older_than_stale_after_read_as_unknown(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore]) -> None:
    clock = Clock()
    source = OpenMeteoWeather(open_meteo_settings(fake), stores[0], cells_of(ENSCHEDE),
                              clock=clock)
    assert await source.refresh_once(session) == 1
    clock.now = T0 + STALE_AFTER_S - 1
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")
    clock.now = T0 + STALE_AFTER_S + 1
    assert source.at(*ENSCHEDE) is None


@pytest.mark.parametrize("raw", [
    b"not json",
    b'["a", "list"]',
    b'{"temperature_c": 20.0, "condition": "clear"}',  # no "at"
    b'{"temperature_c": "hot", "condition": "clear", "at": 1780000000.0}',
    b'{"temperature_c": 20.0, "condition": 3, "at": 1780000000.0}',
])
async def test_a_shared_value_that_is_not_one_is_fetched_and_replaced(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession,
        stores: tuple[StateStore, StateStore], raw: bytes) -> None:
    cell = cell_of(*ENSCHEDE)
    await stores[0].put_weather_cells({cell: raw})
    source = OpenMeteoWeather(open_meteo_settings(fake), stores[1], cells_of(ENSCHEDE),
                              clock=Clock())
    assert await source.refresh_once(session) == 1
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")
    stored = json.loads((await stores[0].weather_cells([cell]))[cell])
    assert stored == {"temperature_c": 17.7, "condition": "partly_cloudy", "at": T0}


async def test_an_unreachable_shared_cache_does_not_stop_the_weather(
        fake: FakeOpenMeteo, session: aiohttp.ClientSession) -> None:
    store = RedisStore(f"redis://127.0.0.1:{_free_port()}/0", connect_timeout_s=0.2,
                       socket_timeout_s=0.2)
    await store.open()
    try:
        source = OpenMeteoWeather(open_meteo_settings(fake), store, cells_of(ENSCHEDE),
                                  clock=Clock())
        assert await source.refresh_once(session) == 1
    finally:
        await store.close()
    assert source.at(*ENSCHEDE) == Weather(17.7, "partly_cloudy")


async def test_the_refresh_job_fetches_once_per_cluster_and_the_others_copy(
        fake: FakeOpenMeteo, stores: tuple[StateStore, StateStore]) -> None:
    """Two instances tick in the same period: the one holding the tick's lease asks Open-Meteo,
    the other copies what it stored; a cell only the second one looked up is fetched by the
    next holder, so the cluster has one Open-Meteo client however many instances run."""
    from geopush.metrics import Metrics
    from geopush.service.jobs import Job, Jobs

    clock = Clock()
    sources = [OpenMeteoWeather(open_meteo_settings(fake), store, cells_of(ENSCHEDE, PARIS),
                                clock=clock, tick_s=60.0) for store in stores]
    runners = [Jobs(store, Metrics(), clock=lambda: clock.now) for store in stores]

    def job(source: OpenMeteoWeather) -> Job:
        async def fetching(start: float) -> None:
            await source.tick(start, fetching=True)

        async def copying(start: float) -> None:
            await source.tick(start, fetching=False)

        return Job("weather_refresh", 60.0, fetching, lease_s=60.0, elsewhere=copying)

    jobs = [job(source) for source in sources]
    try:
        assert await runners[0].run_once(jobs[0], clock.now)
        assert not await runners[1].run_once(jobs[1], clock.now)
        assert len(fake.queries) == 1
        assert sources[1].at(*PARIS) == Weather(17.7, "partly_cloudy")  # copied, not fetched
        assert sources[1].at(*SYDNEY) is None  # only the second instance looked it up
        # the next period: the second instance leaves the cell it missed in the tick's bucket,
        # and in the one after, the holder fetches it (whoever holds the lease)
        for _ in range(2):
            clock.now += 60.0
            ran = [await runners[0].run_once(jobs[0], clock.now),
                   await runners[1].run_once(jobs[1], clock.now)]
            assert ran == [True, False]
        assert len(fake.queries) == 2 and fake.cells_asked() == centres(SYDNEY)
        assert sources[1].at(*SYDNEY) == Weather(17.7, "partly_cloudy")
    finally:
        for source in sources:
            await source.close()


# -- which source -------------------------------------------------------------------------

@pytest.mark.parametrize(("weather", "kind", "expected"), [
    ({"provider": "none"}, WeatherSource, None),
    ({}, WeatherSource, None),  # the default is none
    ({"provider": "static", "static": {"temperature_c": 31, "condition": "clear"}},
     StaticWeather, Weather(31.0, "clear")),
    ({"provider": "static", "static": {"condition": "snow"}}, StaticWeather, Weather(None, "snow")),
    ({"provider": "open-meteo"}, OpenMeteoWeather, None),  # nothing fetched yet
])
async def test_weather_source_picks_the_provider(weather: dict[str, Any], kind: type[WeatherSource],
                                                 expected: Weather | None) -> None:
    source = weather_source(WeatherSettings.model_validate(weather), MemoryStore(), set)
    assert type(source) is kind
    assert source.at(*ENSCHEDE) == expected
    assert source.at(*SYDNEY) == expected  # the same everywhere
    if kind is not OpenMeteoWeather:
        assert source.tick_every() is None  # no refresh job to run
