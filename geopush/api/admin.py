"""Ops endpoints (scope admin): POST /v1/admin/reload swaps in new stores and rules everywhere;
GET /v1/rules shows the rules in effect and what the last reload refused.

The new stores and rules are loaded and indexed off the event loop, validated whole, published to
every instance through the state store, and swapped in with one reference change, so a request in
flight finishes on the set it started with (geopush.service.reloading). On any error the answer
is 422 with every error and the previous stores and rules stay active (contract §2, §3, §6).
"""

from __future__ import annotations

import logging

from aiohttp import web

from geopush.api.appstate import AUTH, LIVE, METRICS, RELOADER
from geopush.api.wire import json_response
from geopush.errors import Problem, RuleLoadError, StoreLoadError
from geopush.logs import fields, log_reload
from geopush.service.active import Geofencing
from geopush.state.base import StateUnavailable
from geopush.timeutil import format_ts

log = logging.getLogger("geopush.api.admin")
routes = web.RouteTableDef()


def install_geofencing(app: web.Application, geofencing: Geofencing) -> None:
    """Make `geofencing` the active set (start-up and reload)."""
    for warning in geofencing.stores.warnings:
        log.warning("stores_warning", extra=fields(where=warning.where, message=warning.message))
    for warning in geofencing.rules.warnings:
        log.warning("rules_warning", extra=fields(where=warning.where, message=warning.message))
    app[LIVE].refused = ()
    app[LIVE].geofencing = geofencing
    metrics = app[METRICS]
    metrics.geofences.set(len(geofencing.stores))
    metrics.stores_loaded_at.set(geofencing.loaded_at)
    log.info("stores_loaded", extra=fields(file=geofencing.stores.source,
                                           geofences=len(geofencing.stores),
                                           rules=len(geofencing.rules),
                                           version=geofencing.version))


@routes.post("/v1/admin/reload")
async def reload(request: web.Request) -> web.Response:
    app = request.app
    who = app[AUTH].check(request, "admin")
    # StoreLoadError (422, every error) and StateUnavailable (503) propagate to the error
    # middleware; in both cases nothing was published or swapped
    try:
        geofencing = await app[RELOADER].reload()
    except (StoreLoadError, RuleLoadError) as exc:
        log_reload(who, errors=max(1, len(exc.details)))
        app[LIVE].refused = tuple(exc.details) or (Problem("reload", exc.message),)
        raise
    log_reload(who, version=geofencing.version, geofences=len(geofencing.stores),
               rules=len(geofencing.rules))
    return json_response({
        "status": "reloaded",
        "version": geofencing.version,
        "geofences": len(geofencing.stores),
        "rules": len(geofencing.rules),
        "loaded_at": format_ts(geofencing.loaded_at),
        "warnings": [w.as_dict() for w in (*geofencing.stores.warnings,
                                           *geofencing.rules.warnings)],
    })


@routes.get("/v1/rules")
async def rules(request: web.Request) -> web.Response:
    """The rules in effect (with where each was written), their warnings, and the errors of the
    last reload this instance refused (cleared by the next one that succeeds)."""
    app = request.app
    app[AUTH].check(request, "admin")
    geofencing = app[LIVE].geofencing
    if geofencing is None:
        raise StateUnavailable("the stores and rules are not loaded yet")
    return json_response({
        "version": geofencing.version,
        "loaded_at": format_ts(geofencing.loaded_at),
        "rules": geofencing.rules.as_json(),
        "warnings": [w.as_dict() for w in geofencing.rules.warnings],
        "errors": [p.as_dict() for p in app[LIVE].refused],
    })
