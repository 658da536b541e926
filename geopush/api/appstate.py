"""Typed app state (web.AppKey): what the handlers share, opened and closed in `geopush.app`."""

from __future__ import annotations

import weakref

from aiohttp import web

from geopush.api.auth import Authenticator
from geopush.config import Settings
from geopush.delivery.worker import Delivery
from geopush.engine import Engine
from geopush.errors import Problem
from geopush.metrics import Metrics
from geopush.service.active import Geofencing
from geopush.service.ingest import Ingestor
from geopush.service.limits import RequestLimiter
from geopush.service.reloading import Reloader
from geopush.state.base import StateStore
from geopush.weather.source import WeatherSource


class Live:
    """Holder of what a reload may swap while the app runs (app state is frozen after start)."""

    def __init__(self) -> None:
        self.geofencing: Geofencing | None = None
        # the errors of the last reload this instance refused (GET /v1/rules shows them)
        self.refused: tuple[Problem, ...] = ()

    @property
    def engine(self) -> Engine:
        if self.geofencing is None:
            raise RuntimeError("the stores are not loaded yet")
        return self.geofencing.engine


SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", StateStore)
LIVE = web.AppKey("live", Live)
METRICS = web.AppKey("metrics", Metrics)
AUTH = web.AppKey("auth", Authenticator)
INGESTOR = web.AppKey("ingestor", Ingestor)
RELOADER = web.AppKey("reloader", Reloader)
LIMITER = web.AppKey("limiter", RequestLimiter)
WEATHER = web.AppKey("weather", WeatherSource)
DELIVERY = web.AppKey[Delivery]("delivery")
WEBSOCKETS = web.AppKey[weakref.WeakSet[web.WebSocketResponse]]("websockets")
