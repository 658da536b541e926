"""Open-Meteo's forecast API, `current` conditions of many cells in one request.

https://open-meteo.com/en/docs: several coordinates go comma-separated in `latitude` and
`longitude` and come back as a list (one location: an object). Errors are
`{"error": true, "reason": "..."}` with 400; 429 when a quota is spent (the free tier is for
non-commercial use, about 10,000 calls a day; `weather.api_key` takes the commercial tier, whose
endpoint is `customer-api.open-meteo.com`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from geopush.rules.conditions import Weather
from geopush.weather.cells import cell_centre, condition_of

CELLS_PER_REQUEST = 100  # coordinates in one request's URL (~3 KB)
TIMEOUT_S = 10.0
DEFAULT_RETRY_AFTER_S = 60.0


class OpenMeteoError(Exception):
    """The request failed; `retry_after_s` is set on 429 (a quota was spent)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def fetch(session: aiohttp.ClientSession, base_url: str, cells: Sequence[str],
                api_key: str | None = None) -> dict[str, Weather]:
    """The current weather of each cell (at its centre)."""
    centres = [cell_centre(c) for c in cells]
    params = {"latitude": ",".join(f"{lat:g}" for lat, _ in centres),
              "longitude": ",".join(f"{lon:g}" for _, lon in centres),
              "current": "temperature_2m,weather_code", "timezone": "GMT"}
    if api_key:
        params["apikey"] = api_key
    try:
        return await _fetch(session, base_url, cells, params)
    except OpenMeteoError as exc:
        # aiohttp's errors quote the URL, query string and all, and a 400's reason may echo
        # it: the commercial tier's key must not reach the log
        raise OpenMeteoError(_redacted(str(exc), api_key), exc.retry_after_s) from None


def _redacted(text: str, api_key: str | None) -> str:
    text = _APIKEY_PARAM.sub("apikey=***", text)
    return text.replace(api_key, "***") if api_key else text


_APIKEY_PARAM = re.compile(r"apikey=[^&\s'\"]*")


async def _fetch(session: aiohttp.ClientSession, base_url: str, cells: Sequence[str],
                 params: dict[str, str]) -> dict[str, Weather]:
    try:
        async with session.get(base_url, params=params,
                               timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
            if resp.status == 429:
                raise OpenMeteoError("Open-Meteo answered 429 (quota spent)",
                                     _retry_after(resp.headers.get("Retry-After")))
            try:
                body: Any = await resp.json(content_type=None)
            except ValueError:
                raise OpenMeteoError(f"Open-Meteo answered {resp.status} with a body that is "
                                     "not JSON") from None
            if resp.status != 200:
                reason = body.get("reason") if isinstance(body, dict) else None
                raise OpenMeteoError(f"Open-Meteo answered {resp.status}: {reason or body!r}"[:300])
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OpenMeteoError(f"Open-Meteo unreachable: {type(exc).__name__}: {exc}") from exc
    locations = body if isinstance(body, list) else [body]
    if len(locations) != len(cells):
        raise OpenMeteoError(f"Open-Meteo answered {len(locations)} locations for "
                             f"{len(cells)} asked")
    return {cell: _weather(location) for cell, location in zip(cells, locations, strict=True)}


def _weather(location: Any) -> Weather:
    current = location.get("current") if isinstance(location, dict) else None
    if not isinstance(current, dict):
        return Weather()
    temperature = current.get("temperature_2m")
    code = current.get("weather_code")
    return Weather(float(temperature) if isinstance(temperature, int | float) else None,
                   condition_of(code) if isinstance(code, int) else None)


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds or as an HTTP date; at least a minute (as FCM asks too)."""
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    try:
        return max(DEFAULT_RETRY_AFTER_S, float(value))
    except ValueError:
        pass
    try:
        return max(DEFAULT_RETRY_AFTER_S, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S
