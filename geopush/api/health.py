"""Probes and metrics, open to all (contract §6): /healthz, /readyz, /metrics."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from geopush.api.appstate import LIVE, METRICS, RELOADER, SETTINGS, STATE
from geopush.api.errors import RETRY_AFTER_S, error_response
from geopush.api.wire import json_response
from geopush.metrics import PROMETHEUS_CONTENT_TYPE
from geopush.timeutil import format_ts

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process answers: nothing more (a restart would not fix a Redis outage)."""
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready to take traffic: the state store answers and the stores are loaded."""
    app = request.app
    geofencing = app[LIVE].geofencing
    state_ok = await app[STATE].healthy()
    checks: dict[str, dict[str, Any]] = {
        "state_store": {"ok": state_ok, "backend": app[SETTINGS].storage.backend},
        "stores": {
            "ok": geofencing is not None,
            # the set in use: equal on every instance once a reload has reached them all
            "version": geofencing.version if geofencing is not None else None,
            "published_serial": app[RELOADER].serial,
            "geofences": len(geofencing.stores) if geofencing is not None else 0,
            "loaded_at": format_ts(geofencing.loaded_at) if geofencing is not None else None,
        },
    }
    if state_ok and geofencing is not None:
        return json_response({"status": "ready", "version": geofencing.version,
                              "checks": checks})
    failing = [name for name, check in checks.items() if not check["ok"]]
    message = {"state_store": "the state store is unreachable",
               "stores": "the stores are not loaded"}
    return error_response(
        "not_ready", "; ".join(message[name] for name in failing), 503,
        [{"where": name, "message": message[name], "field": name, "value": checks[name],
          "expected": "ok", "severity": "error"} for name in failing],
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    geofencing = request.app[LIVE].geofencing
    if geofencing is not None:
        registry.geofences.set(len(geofencing.stores))
    return web.Response(body=registry.render(),
                        headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


