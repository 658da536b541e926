"""GET /v1/devices/{id}/export holds every field stored about the device (contract §12),
checked against what the store itself holds: every Redis key of the device and its timer,
or every table of the memory backend.

One deliberate exception: the device token's nonce is a credential (with the secret, it is the
token), so the export holds its issue time and a fingerprint of the nonce instead, and never
the nonce itself (docs/security.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient

from geopush.api.appstate import STATE
from geopush.app import create_app
from geopush.delivery.outbox import OutboxEntry, entry_from_json, entry_to_json
from geopush.devices import ConsentChange, DeviceProfile
from geopush.engine import DeviceOutcome, DeviceSnapshot
from geopush.geo.model import DeviceState, Stay, Visit
from geopush.rules.decide import PushRecord
from geopush.state.base import StoredToken
from geopush.state.codec import decode_push, decode_track, decode_visit
from geopush.state.keys import Keys
from geopush.state.memory import MemoryStore
from geopush.timeutil import parse_ts
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
DEVICE = "alice.phone:1"

# stored field → exported field, where the export's names are older than the store's
RENAMED = {"enter_ts": "entered", "confirmed_ts": "last_seen", "dwells_fired": "dwells_fired_s",
           "last_ts": "last_ping", "recent": "recent_pings"}


@pytest.fixture(params=["memory", "redis"])
async def api_and_redis(request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
              ) -> tuple[Client, str | None]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    # visits of a second, so that driving through a fence on the trace makes one
    rules = tmp_path / "rules"
    rules.mkdir()
    # two rules on the bakery: a push, and a candidate it outranks (a decision record)
    (rules / "bakery.yaml").write_text(
        "rules:\n"
        "  - id: bakery-welcome\n    priority: 10\n"
        "    trigger: {on: enter, geofences: {ids: [bakery-300]}}\n"
        "    message: {title: Welcome, body: 'Fresh bread at {{ store.name }}'}\n"
        "  - id: bakery-second\n"
        "    trigger: {on: enter, geofences: {ids: [bakery-300]}}\n"
        "    message: {title: Hello, body: Again}\n")
    settings = settings_for(tmp_path, backend=request.param, redis_url=redis_url,
                            visits={"min_dwell": "1s"},
                            policy={"quiet_hours": None, "max_event_lag": "1d"})
    return await aiohttp_client(create_app(settings)), redis_url


async def _a_device_with_everything(api: Client) -> None:
    """A profile, consent changes, visits, an open stay with a fired dwell, recent pings, a
    timer, a push decided and opened, and decisions: every kind of record geopush keeps."""
    resp = await api.put(f"/v1/devices/{DEVICE}", headers=DEVICES, json={
        "push_token": "fcm-1", "platform": "android", "locale": "de-DE",
        "timezone": "Europe/Berlin", "attributes": {"tier": "gold", "kids": [1, 2]},
        "segments": ["regular"], "consent": {"location": True, "marketing": False}})
    assert resp.status == 200
    resp = await api.patch(f"/v1/devices/{DEVICE}", headers=DEVICES,
                           json={"consent": {"marketing": True}})
    assert resp.status == 200
    trace = load_trace()
    # through the bakery (a visit), into the pharmacy, and stopped there (an open stay)
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"pings": [ping(DEVICE, p, speed_mps=12.5) for p in trace[250:700]]})
    body = await resp.json()
    assert body["accepted"] == 450, body
    store = api.app[STATE]
    assert await store.visits(DEVICE)
    # no rules (dwell plans) in this app: a fired dwell is recorded through the store itself

    def fire_a_dwell(snapshots: Mapping[str, DeviceSnapshot]) -> dict[str, DeviceOutcome]:
        state = snapshots[DEVICE].state
        assert state is not None and state.stays
        for stay in state.stays.values():
            stay.dwells_fired.append(300.0)
        assert state.last_ts is not None
        return {DEVICE: DeviceOutcome(state, next_due=state.last_ts + 3600.0)}

    await store.track([DEVICE], fire_a_dwell)
    resp = await api.post(f"/v1/devices/{DEVICE}/token", headers=DEVICES)
    assert resp.status == 200
    token = (await resp.json())["token"]
    [push] = (await store.history(DEVICE)).pushes
    resp = await api.post(f"/v1/pushes/{push.push_id}/opened",
                          headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()


async def _export_once_sent(api: Client) -> bytes:
    """The export once the delivery worker has sent the push: compared field by field with
    what the store holds, read after it, the outbox entry must not move in between (it did:
    queued in the export, sent in the store a moment later)."""
    deadline = time.monotonic() + 10.0
    while True:
        resp = await api.get(f"/v1/devices/{DEVICE}/export", headers=DEVICES)
        assert resp.status == 200
        raw = await resp.read()
        if all(e["state"] == "sent" for e in orjson.loads(raw)["outbox"]):
            return raw
        assert time.monotonic() < deadline, "the push was not sent within 10 s"
        await asyncio.sleep(0.02)


def _same_time(exported: Any, stored: float | None) -> bool:
    if stored is None:
        return exported is None
    return isinstance(exported, str) and abs(parse_ts(exported) - stored) <= 0.0005


def _check_profile(profile: DeviceProfile, exported: dict[str, Any]) -> None:
    for name in type(profile).model_fields:
        value = getattr(profile, name)
        if name in ("created_at", "updated_at"):
            assert _same_time(exported[name], value), name
        elif name == "consent":
            assert exported[name] == value.model_dump(), name
        else:
            assert exported[name] == value, name


def _check_consent(trail: list[ConsentChange], exported: list[dict[str, Any]]) -> None:
    assert len(exported) == len(trail)
    for change, out in zip(trail, exported, strict=True):
        for name in type(change).model_fields:
            value = getattr(change, name)
            assert (_same_time(out[name], value) if name == "at" else out[name] == value), name


def _check_visits(visits: list[Visit], exported: list[dict[str, Any]]) -> None:
    assert len(exported) == len(visits)
    for visit, out in zip(visits, exported, strict=True):
        for f in dataclasses.fields(visit):
            value = getattr(visit, f.name)
            if f.name == "device_id":
                assert value == DEVICE  # the export is of this device alone
            elif f.name in ("start", "end"):
                assert _same_time(out[f.name], value), f.name
            else:
                assert out[f.name] == value, f.name


def _check_pushes(pushes: list[PushRecord], exported: list[dict[str, Any]]) -> None:
    assert len(exported) == len(pushes) == 1
    for push, out in zip(sorted(pushes, key=lambda p: p.ts), exported, strict=True):
        for f in dataclasses.fields(push):
            value = getattr(push, f.name)
            if f.name in ("ts", "opened_at"):
                assert _same_time(out[f.name], value), f.name
            else:
                assert out[f.name] == value, f.name
    assert exported[0]["opened_at"] is not None and exported[0]["outcome"] == "push"


def _check_outbox(entries: list[OutboxEntry], exported: list[dict[str, Any]]) -> None:
    assert len(exported) == len(entries) == 1
    for entry, out in zip(entries, exported, strict=True):
        stored = entry_to_json(entry)
        assert set(out) == set(stored)
        for name, value in stored.items():
            if name in ("created_at", "expires_at", "next_attempt_at", "updated_at", "sent_at"):
                assert _same_time(out[name], value), name
            else:
                assert out[name] == value, name
    assert exported[0]["title"] and exported[0]["state"] == "sent"


def _check_decisions(rows: list[dict[str, Any]], exported: list[dict[str, Any]]) -> None:
    assert len(exported) == len(rows) == 2
    for row, out in zip(rows, exported, strict=True):
        assert set(out) == set(row)
        for name, value in row.items():
            assert (_same_time(out[name], value) if name == "ts" else out[name] == value), name
    assert [(d["rule_id"], d["outcome"], d["reason"]) for d in exported] == [
        ("bakery-welcome", "push", None), ("bakery-second", "suppressed", "outranked")]
    assert exported[0]["title"] == "Welcome"
    assert exported[0]["body"] == "Fresh bread at bakery-300"


def _check_token(token: StoredToken, exported: dict[str, Any], raw_export: bytes) -> None:
    assert set(exported) == {"issued_at", "fingerprint"}
    assert _same_time(exported["issued_at"], token.issued_at)
    assert exported["fingerprint"] == hashlib.sha256(token.nonce.encode()).hexdigest()[:16]
    assert token.nonce.encode() not in raw_export  # the credential itself is never exported


def _check_state(state: DeviceState, tracking: dict[str, Any]) -> None:
    stored_fields = {f.name for f in dataclasses.fields(state) if f.compare}
    # a field added to DeviceState fails here until it is exported and checked below
    assert stored_fields == {"last_ts", "stays", "recent", "bucket_empty_ts"}
    assert _same_time(tracking["last_ping"], state.last_ts)
    exported_stays = {s["geofence_id"]: s for s in tracking["stays"]}
    assert exported_stays.keys() == state.stays.keys() and state.stays
    for stay in state.stays.values():
        out = exported_stays[stay.geofence_id]
        for f in dataclasses.fields(Stay):
            value = getattr(stay, f.name)
            key = RENAMED.get(f.name, f.name)
            if f.name in ("enter_ts", "confirmed_ts"):
                assert _same_time(out[key], value), f.name
            else:
                assert out[key] == value, f.name
        assert stay.dwells_fired == [300.0]
    assert _same_time(tracking["rate_bucket_empty_at"], state.bucket_empty_ts)
    assert state.bucket_empty_ts is not None  # the default limit is on
    assert len(tracking["recent_pings"]) == len(state.recent) and state.recent
    for (ts, lat, lon), out in zip(state.recent, tracking["recent_pings"], strict=True):
        assert _same_time(out["ts"], ts) and (out["lat"], out["lon"]) == (lat, lon)


async def _check_redis(url: str, export: dict[str, Any], raw_export: bytes) -> None:
    keys = Keys()
    device_keys = keys.device(DEVICE)
    client = redis.asyncio.Redis.from_url(url)
    try:
        found = sorted([k.decode() async for k in client.scan_iter(
            match=f"geopush:{{d:{DEVICE}}}:*")])
        assert found, "nothing stored?"
        for key in found:
            if key == device_keys.profile:
                raw = await client.get(key)
                _check_profile(DeviceProfile.model_validate_json(raw), export["profile"])
            elif key == device_keys.consent:
                rows = await client.lrange(key, 0, -1)
                _check_consent([ConsentChange.model_validate_json(r) for r in rows],
                               export["consent_history"])
            elif key == device_keys.visits:
                rows = await client.lrange(key, 0, -1)
                _check_visits([decode_visit(DEVICE, r) for r in rows], export["visits"])
            elif key == device_keys.track:
                state, next_due = decode_track(await client.get(key))
                _check_state(state, export["tracking"])
                assert _same_time(export["tracking"]["next_due"], next_due) and next_due
            elif key == device_keys.token:
                value = orjson.loads(await client.get(key))
                _check_token(StoredToken(**value), export["device_token"], raw_export)
            elif key == device_keys.pushes:
                stored = {k.decode(): decode_push(v)
                          for k, v in (await client.hgetall(key)).items()}
                opens = {k.decode(): float(v)
                         for k, v in (await client.hgetall(device_keys.opens)).items()}
                for push_id, push in stored.items():
                    push.opened_at = opens.get(push_id)
                _check_pushes(list(stored.values()), export["pushes"])
            elif key == device_keys.opens:
                assert await client.hlen(key) == 1  # checked with the pushes
            elif key == device_keys.outbox:
                _check_outbox([entry_from_json(orjson.loads(r))
                               for r in await client.hvals(key)], export["outbox"])
            elif key == device_keys.decisions:
                rows = [orjson.loads(r) for r in await client.lrange(key, 0, -1)]
                _check_decisions(rows, export["decisions"])
            elif key == device_keys.version:
                assert export["tracking"]["record_version"] == int(await client.get(key))
            else:
                raise AssertionError(f"{key} is stored about the device: export it")
        assert set(found) == set(device_keys.all())
        timer = await client.zscore(keys.timers, DEVICE)
        assert timer is not None and _same_time(export["tracking"]["timer_due"], timer)
    finally:
        await client.aclose()


def _check_memory(store: MemoryStore, export: dict[str, Any], raw_export: bytes) -> None:
    tables = {name: table for name, table in vars(store).items()
              if isinstance(table, dict) and DEVICE in table}
    # a table added to the memory store fails here until it is exported and checked below
    assert set(tables) == {"_profiles", "_consent", "_tracks", "_visits", "_tokens", "_pushes",
                           "_decisions", "_outbox"}
    _check_outbox(list(store._outbox[DEVICE].values()), export["outbox"])
    _check_pushes(list(store._pushes[DEVICE].values()), export["pushes"])
    _check_decisions(store._decisions[DEVICE], export["decisions"])
    _check_token(store._tokens[DEVICE], export["device_token"], raw_export)
    _check_profile(store._profiles[DEVICE], export["profile"])
    _check_consent(store._consent[DEVICE], export["consent_history"])
    _check_visits(store._visits[DEVICE], export["visits"])
    state, next_due = store._tracks[DEVICE]
    _check_state(state, export["tracking"])
    assert _same_time(export["tracking"]["next_due"], next_due) and next_due
    assert _same_time(export["tracking"]["timer_due"], store._timers.due(DEVICE))
    assert store._timers.due(DEVICE) is not None


async def test_the_export_holds_every_field_the_store_holds(
        api_and_redis: tuple[Client, str | None]) -> None:
    api, redis_url = api_and_redis
    await _a_device_with_everything(api)
    raw_export = await _export_once_sent(api)
    export = orjson.loads(raw_export)
    store = api.app[STATE]
    if isinstance(store, MemoryStore):
        _check_memory(store, export, raw_export)
    else:
        assert redis_url is not None
        await _check_redis(redis_url, export, raw_export)
