"""Device profiles, consent and erasure (contract §6): /v1/devices/{device_id}.

Every consent change is kept with its time and takes effect at once (the state store ends stays
and timers when location consent goes). DELETE leaves only the erasure record: a keyed hash of
the id, the time and the last consent (proof of consent, GDPR art. 7(1)).

/v1/devices/{device_id}/token issues (POST) and revokes (DELETE) the device's device token
(contract §13, geopush.tokens): the phone's own credential for its pings, in place of a server
key shipped inside the app. Only a server key with the devices scope (the app's backend, after
it authenticated its user) may ask for one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from zoneinfo import available_timezones

from aiohttp import web
from pydantic import ValidationError

from geopush.api.appstate import AUTH, SETTINGS, STATE
from geopush.api.errors import NotFound
from geopush.api.wire import json_response, read_json, type_name
from geopush.delivery.outbox import OutboxEntry, entry_to_json
from geopush.devices import (
    PROFILE_BOUND,
    Consent,
    ConsentChange,
    DeviceProfile,
    DeviceUpdate,
    ErasureRecord,
    erasure_hash,
)
from geopush.errors import InvalidInput, Problem
from geopush.logs import fields, log_device_change, log_device_token, log_erasure
from geopush.pings import DEVICE_ID, DEVICE_ID_EXPECTED
from geopush.state.base import ProfileWrite, StateStore, StateUnavailable, StoredToken
from geopush.timeutil import format_ts
from geopush.tokens import new_nonce

log = logging.getLogger("geopush.api.devices")

routes = web.RouteTableDef()
PATH = "/v1/devices/{device_id}"


def _device_id(request: web.Request) -> str:
    device_id = request.match_info["device_id"]
    if not DEVICE_ID.match(device_id):
        raise InvalidInput(f"device_id = {device_id[:80]!r}: expected {DEVICE_ID_EXPECTED}",
                           [Problem("path", "bad device id", field="device_id",
                                    value=device_id[:200], expected=DEVICE_ID_EXPECTED)])
    return device_id


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


async def _update(request: web.Request) -> DeviceUpdate:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput(f"expected a device object {{push_token, platform, locale, timezone, "
                           f"attributes, segments, consent}}, got {type_name(body)}")
    try:
        # strict: consent must be a JSON boolean, never "yes" or 1
        update = DeviceUpdate.model_validate(body, strict=True)
    except ValidationError as exc:
        problems = [_problem(err) for err in exc.errors()]
        raise InvalidInput(f"invalid device: {problems[0].message}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                           problems) from None
    if update.timezone is not None and update.timezone not in _zones():
        raise InvalidInput(
            f"timezone = {update.timezone!r}: expected an IANA time zone like Europe/Paris",
            [Problem("body", "unknown time zone", field="timezone", value=update.timezone,
                     expected="an IANA time zone name like Europe/Paris")])
    return update


def _problem(err: Mapping[str, Any]) -> Problem:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == PROFILE_BOUND:
        ctx = err["ctx"]
        return Problem("body", f"{key}: {ctx['summary']}: expected {ctx['expected']}",
                       field=key, value=ctx["summary"], expected=ctx["expected"])
    shown = _summary(err.get("input"))
    if err["type"] == "extra_forbidden":
        return Problem("body", f"{key}: unknown field", field=key, value=shown,
                       expected="push_token, platform, locale, timezone, attributes, segments, "
                                "consent {location, marketing}")
    return Problem("body", f"{key} = {shown!r}: {err['msg']}", field=key, value=shown,
                   expected=err["msg"])


def _summary(value: Any) -> Any:
    """The bad value as an error shows it: scalars as they are (long strings cut), objects
    and lists by their size, which says more than the first 200 characters of their repr."""
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if value is None or isinstance(value, int | float | bool):
        return value
    shown = value if isinstance(value, str) else repr(value)
    return shown if len(shown) <= 200 else shown[:199] + "…"


def profile_json(profile: DeviceProfile) -> dict[str, Any]:
    body = profile.model_dump(mode="json")
    for key in ("created_at", "updated_at"):
        body[key] = format_ts(body[key]) if body[key] is not None else None
    return body


def _consent_change(before: DeviceProfile | None, after: DeviceProfile, now: float,
                    source: str) -> ConsentChange | None:
    if before is not None and before.consent == after.consent:
        return None
    return ConsentChange(at=now, location=after.consent.location,
                         marketing=after.consent.marketing, source=source)


async def _cancel_revoked(store: StateStore, before: DeviceProfile | None, after: DeviceProfile,
                          now: float) -> None:
    """A revoked consent cancels the queued pushes it covered (contract §7): marketing
    consent the marketing ones, location consent all. Should this fail, the consent check
    before each attempt still holds them back (geopush.delivery.outbox.plan_attempt)."""
    if before is None:
        return
    category: str | None
    if before.consent.location and not after.consent.location:
        category, reason = None, "location consent was revoked"
    elif before.consent.marketing and not after.consent.marketing:
        category, reason = "marketing", "marketing consent was revoked"
    else:
        return
    try:
        await store.cancel_pushes(after.device_id, category=category, reason=reason, now=now)
    except StateUnavailable as exc:
        log.warning("pushes_not_cancelled", extra=fields(device_id=after.device_id,
                                                         reason=str(exc)))


@routes.put(PATH)
async def put_device(request: web.Request) -> web.Response:
    who = request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    update = await _update(request)
    now = time.time()

    seen: list[DeviceProfile | None] = []  # the profile the written edit read

    def replace(before: DeviceProfile | None) -> ProfileWrite:
        seen[:] = [before]
        profile = DeviceProfile(
            device_id=device_id,
            push_token=update.push_token,
            platform=update.platform,
            locale=update.locale,
            timezone=update.timezone,
            attributes=update.attributes or {},
            segments=update.segments or [],
            # consent is never assumed: a PUT without it means no consent
            consent=update.consent or Consent(),
            created_at=before.created_at if before is not None else now,
            updated_at=now,
        )
        return ProfileWrite(profile, _consent_change(before, profile, now, "PUT"))

    written = await request.app[STATE].update_profile(device_id, replace)
    assert written is not None  # replace always writes
    log_device_change(who, seen[0], written.profile, "PUT")
    await _cancel_revoked(request.app[STATE], seen[0], written.profile, now)
    return json_response(profile_json(written.profile))


@routes.patch(PATH)
async def patch_device(request: web.Request) -> web.Response:
    who = request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    update = await _update(request)
    if "consent" in update.model_fields_set and update.consent is None:
        raise InvalidInput("consent = null: expected {location?, marketing?}",
                           [Problem("body", "consent is null", field="consent",
                                    value=None, expected="{location?, marketing?}")])
    now = time.time()

    seen: list[DeviceProfile | None] = []  # the profile the written edit read

    def patch(before: DeviceProfile | None) -> ProfileWrite:
        seen[:] = [before]
        # runs again on the fresh profile if another write moved the device meanwhile: the
        # fields not given are those stored at the write, never those of an earlier read
        if before is None:
            raise NotFound(f"device {device_id!r} is not registered: PUT it first")
        changes: dict[str, Any] = {"updated_at": now}
        for name in update.model_fields_set:
            value = getattr(update, name)
            if name == "consent":
                assert update.consent is not None
                # only the consents given change: {"marketing": false} keeps location as it was
                value = before.consent.model_copy(update={
                    k: getattr(update.consent, k) for k in update.consent.model_fields_set})
            elif name == "attributes" and value is None:
                value = {}
            elif name == "segments" and value is None:
                value = []
            changes[name] = value
        profile = before.model_copy(update=changes)
        return ProfileWrite(profile, _consent_change(before, profile, now, "PATCH"))

    written = await request.app[STATE].update_profile(device_id, patch)
    assert written is not None  # patch writes or raises
    log_device_change(who, seen[0], written.profile, "PATCH")
    await _cancel_revoked(request.app[STATE], seen[0], written.profile, now)
    return json_response(profile_json(written.profile))


@routes.get(PATH)
async def get_device(request: web.Request) -> web.Response:
    request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    profile = await request.app[STATE].get_profile(device_id)
    if profile is None:
        raise NotFound(f"device {device_id!r} is not registered")
    return json_response(profile_json(profile))


@routes.get(PATH + "/export")
async def export_device(request: web.Request) -> web.Response:
    """Everything stored about the device, for the user's right of access."""
    request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    store = request.app[STATE]
    profile = await store.get_profile(device_id)
    if profile is None:
        raise NotFound(f"device {device_id!r} is not registered")
    history = await store.consent_history(device_id)
    kept = await store.history(device_id)  # visits and pushes, in one read
    visits = kept.visits
    pushes = sorted(kept.pushes, key=lambda p: p.ts)
    decisions = await store.decisions(device_id)
    return json_response({
        "device_id": device_id,
        "profile": profile_json(profile),
        "consent_history": [
            {"at": format_ts(c.at), "location": c.location, "marketing": c.marketing,
             "source": c.source} for c in history
        ],
        "visits": [
            {"store_id": v.store_id, "geofence_id": v.geofence_id, "start": format_ts(v.start),
             "end": format_ts(v.end)} for v in visits
        ],
        "tracking": await _tracking(store, device_id),
        "device_token": _token_json(await store.stored_token(device_id)),
        # what support needs to answer "why did I (not) get it?": every candidate of the
        # latest moments, with the policy step that stopped it
        "decisions": [{**d, "ts": format_ts(d["ts"])} for d in decisions],
        # the pushes and holdouts decided, which caps, gaps and fatigue count
        "pushes": [
            {"push_id": p.push_id, "ts": format_ts(p.ts), "rule_id": p.rule_id,
             "store_id": p.store_id, "category": p.category, "outcome": p.outcome,
             "opened_at": _time(p.opened_at)} for p in pushes
        ],
        # each push's message and how its delivery went (ops test pushes too)
        "outbox": [_outbox_json(e) for e in await store.outbox(device_id)],
    })


_OUTBOX_TIMES = ("created_at", "expires_at", "next_attempt_at", "updated_at", "sent_at")


def _outbox_json(entry: OutboxEntry) -> dict[str, Any]:
    value = entry_to_json(entry)
    for name in _OUTBOX_TIMES:
        value[name] = _time(value[name])
    return value


async def _tracking(store: StateStore, device_id: str) -> dict[str, Any]:
    """The device's tracking record, every field of it: location data, so exported."""
    stored = await store.stored_track(device_id)
    state = stored.state
    return {
        "last_ping": _time(state.last_ts if state is not None else None),
        "stays": [
            {"geofence_id": s.geofence_id, "store_id": s.store_id,
             "entered": format_ts(s.enter_ts), "last_seen": format_ts(s.confirmed_ts),
             "lat": s.lat, "lon": s.lon, "distance_m": s.distance_m, "speed_mps": s.speed_mps,
             "dwells_fired_s": list(s.dwells_fired)}
            for s in (state.stays.values() if state is not None else ())
        ],
        # the last pings of a few seconds, kept to work out speeds
        "recent_pings": [{"ts": format_ts(ts), "lat": lat, "lon": lon}
                         for ts, lat, lon in (state.recent if state is not None else ())],
        "next_due": _time(stored.next_due),
        "timer_due": _time(stored.timer),
        "record_version": stored.writes,
        # the ping rate limit's bucket (limits.device_pings_per_minute): empty at this time,
        # refilled by ping time since
        "rate_bucket_empty_at": _time(state.bucket_empty_ts if state is not None else None),
    }


def _token_json(token: StoredToken | None) -> dict[str, Any] | None:
    """The stored token without its nonce, a credential: when it was issued, and a fingerprint
    of the nonce that says which token is the current one (docs/security.md)."""
    if token is None:
        return None
    return {"issued_at": format_ts(token.issued_at), "fingerprint": token.fingerprint()}


def _time(epoch_s: float | None) -> str | None:
    return format_ts(epoch_s) if epoch_s is not None else None


@routes.post(PATH + "/token")
async def issue_token(request: web.Request) -> web.Response:
    """A new device token; the device's previous one stops working with this answer."""
    auth = request.app[AUTH]
    who = auth.check(request, "devices")
    device_id = _device_id(request)
    nonce = new_nonce()
    token = auth.issue(device_id, nonce)  # 409 before anything is written when tokens are off
    if not await request.app[STATE].set_token(device_id, StoredToken(nonce, time.time())):
        raise NotFound(f"device {device_id!r} is not registered: PUT it before asking for its "
                       "token")
    log_device_token(who, device_id, issued=True)
    # a credential: no cache between the backend and geopush may keep it
    return json_response({"token": token}, headers={"Cache-Control": "no-store"})


@routes.delete(PATH + "/token")
async def revoke_token(request: web.Request) -> web.Response:
    """The device's device token stops working (it has none until the next POST)."""
    who = request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    if not await request.app[STATE].set_token(device_id, None):
        raise NotFound(f"device {device_id!r} is not registered")
    log_device_token(who, device_id, issued=False)
    return web.Response(status=204)


@routes.delete(PATH)
async def delete_device(request: web.Request) -> web.Response:
    who = request.app[AUTH].check(request, "devices")
    device_id = _device_id(request)
    store = request.app[STATE]
    profile = await store.get_profile(device_id)
    record = ErasureRecord(
        device_hash=erasure_hash(device_id, request.app[SETTINGS].logging.pseudonym_key),
        erased_at=time.time(),
        last_consent=profile.consent if profile is not None else None,
    )
    if not await store.erase(device_id, record):
        raise NotFound(f"device {device_id!r} is not registered (nothing to erase)")
    log_erasure(who, device_id)
    return web.Response(status=204)
