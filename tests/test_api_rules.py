"""GET /v1/rules and reloads of rules (contract §3, §6) on the real app: a reload takes stores and
rules together, refuses a set with a bad rule (422, every error at its file:line) and keeps the
previous rules running; a rules-only change reaches the other instances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from geopush.api.appstate import LIVE, SETTINGS
from geopush.app import create_app
from tests.api_support import ADMIN_KEY, DEVICES, INGEST, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DWELL_RULE = """\
id: bakery-dwell
trigger: {on: dwell, dwell: 2m, geofences: {tags: [shop:bakery]}}
message: {title: "Fresh bread", body: "at {{ store.name }}"}
"""


async def _app(aiohttp_client: MakeClient, workdir: Path, rules: dict[str, str],
               storage: dict[str, Any] | None = None, **app: Any) -> Client:
    workdir.mkdir(exist_ok=True)
    folder = workdir / "rules"
    folder.mkdir(exist_ok=True)
    for name, text in rules.items():
        (folder / name).write_text(text)
    settings = settings_for(workdir, **({"storage": storage} if storage else {}))
    return await aiohttp_client(create_app(settings, **app))


def _rules_dir(client: Client) -> Path:
    return Path(client.app[SETTINGS].rules_dir)


async def test_rules_are_shown_to_admins_only_with_where_each_was_written(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await _app(aiohttp_client, tmp_path, {"bakery.yaml": DWELL_RULE})
    assert (await client.get("/v1/rules")).status == 401
    assert (await client.get("/v1/rules", headers=INGEST)).status == 403
    assert (await client.get("/v1/rules", headers=DEVICES)).status == 403

    resp = await client.get("/v1/rules", headers=ADMIN)

    assert resp.status == 200
    body = await resp.json()
    assert body["version"] == client.app[LIVE].geofencing.version
    assert body["errors"] == [] and body["warnings"] == []
    [rule] = body["rules"]
    assert rule["id"] == "bakery-dwell" and rule["where"].endswith("rules/bakery.yaml:1")
    assert rule["trigger"] == {"on": "dwell", "dwell": "2m",
                               "geofences": {"tags": ["shop:bakery"], "ids": []}}
    assert rule["message"]["ttl"] == "30m" and rule["category"] == "marketing"  # defaults


async def test_a_reload_with_a_bad_rule_is_refused_whole_and_the_previous_rules_stay(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await _app(aiohttp_client, tmp_path, {"bakery.yaml": DWELL_RULE})
    before = client.app[LIVE].geofencing
    (_rules_dir(client) / "bakery.yaml").write_text(DWELL_RULE.replace("2m", "soon"))
    (_rules_dir(client) / "other.yaml").write_text("id: other\nmessage: {title: t}\n")

    resp = await client.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "rule_error"
    found = {(d["where"].rsplit("/", 1)[-1], d["field"]) for d in error["details"]}
    assert found == {("bakery.yaml:2", "trigger.dwell"), ("other.yaml:1", "trigger"),
                     ("other.yaml:2", "message.body")}
    assert client.app[LIVE].geofencing is before  # nothing swapped
    shown = await (await client.get("/v1/rules", headers=ADMIN)).json()
    assert [r["id"] for r in shown["rules"]] == ["bakery-dwell"]
    assert len(shown["errors"]) == 3  # what the refused reload said, until one succeeds

    (_rules_dir(client) / "bakery.yaml").write_text(DWELL_RULE.replace("2m", "3m"))
    (_rules_dir(client) / "other.yaml").unlink()
    resp = await client.post("/v1/admin/reload", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["rules"] == 1
    shown = await (await client.get("/v1/rules", headers=ADMIN)).json()
    assert shown["errors"] == [] and shown["rules"][0]["trigger"]["dwell"] == "3m"
    geofence = client.app[LIVE].geofencing.stores.geofences[0]
    assert client.app[LIVE].engine.tracker.dwells(geofence.id) == (180.0,)


async def test_a_rules_only_change_reaches_the_other_instance(
        tmp_path: Path, redis_url: str, aiohttp_client: MakeClient) -> None:
    storage = {"backend": "redis", "redis_url": redis_url}
    a = await _app(aiohttp_client, tmp_path / "a", {}, storage)
    b = await _app(aiohttp_client, tmp_path / "b", {}, storage)
    assert a.app[LIVE].geofencing.version == b.app[LIVE].geofencing.version
    (_rules_dir(a) / "bakery.yaml").write_text(DWELL_RULE)  # a's folder only

    resp = await a.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 200, await resp.text()
    version = (await resp.json())["version"]
    started = time.monotonic()
    while b.app[LIVE].geofencing.version != version:
        assert time.monotonic() - started < 5.0, "not adopted within 5 s"
        await asyncio.sleep(0.05)
    shown = await (await b.get("/v1/rules", headers=ADMIN)).json()
    assert [r["id"] for r in shown["rules"]] == ["bakery-dwell"]
    assert not list(_rules_dir(b).iterdir())  # b runs the published rules, not its folder
    geofence = b.app[LIVE].geofencing.stores.geofences[0]
    assert b.app[LIVE].engine.tracker.dwells(geofence.id) == (120.0,)


async def test_a_dwell_rule_added_by_a_reload_applies_to_stays_entered_after_it(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    """Contract §4: new dwell durations apply to stays entered after a reload."""
    client = await _app(aiohttp_client, tmp_path, {}, timer_interval_s=0.1)
    geofence = client.app[LIVE].geofencing.stores.geofences[0]
    for device_id in ("before", "after"):
        resp = await client.put(f"/v1/devices/{device_id}", headers=DEVICES,
                                json={"consent": {"location": True}})
        assert resp.status == 200

    async def inside(device_id: str) -> list[str]:
        resp = await client.post("/v1/pings", headers=INGEST, json={
            "device_id": device_id, "lat": geofence.lat, "lon": geofence.lon,
            "ts": round(time.time() * 1000)})
        return [e["type"] for e in (await resp.json())["events"]]

    assert await inside("before") == ["enter"]
    await asyncio.sleep(0.05)
    (_rules_dir(client) / "bakery.yaml").write_text(DWELL_RULE.replace("2m", "1s"))
    assert (await client.post("/v1/admin/reload", headers=ADMIN)).status == 200
    await asyncio.sleep(0.05)
    assert await inside("after") == ["enter"]
    assert await inside("before") == []  # still inside: its timers are worked out anew
    await asyncio.sleep(2.0)  # the 1 s dwell is due, the timer loop runs every 0.1 s

    async def dwells(device_id: str) -> list[float]:
        resp = await client.get(f"/v1/devices/{device_id}/export", headers=DEVICES)
        [stay] = (await resp.json())["tracking"]["stays"]
        return list(stay["dwells_fired_s"])

    assert await dwells("after") == [1.0]
    assert await dwells("before") == []  # entered under the rules before: no 1 s dwell
