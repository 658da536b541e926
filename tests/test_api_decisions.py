"""The service decides (contract §4, §6): a real app on memory and on Redis, a marketer's rule on
the stores of a real GPS trace (the Munich drive), pings over HTTP. A rule pushes once for the
moment; ops see it in Prometheus and in one pseudonymised log line; support sees it in the
export; the policy's reasons (late, no_consent) stop what they should; a dwell on a timer
decides too; the weather rules read comes from the configured provider; apps report opens."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from geopush.config import LoggingSettings
from geopush.logs import make_formatter, pseudonym
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
DEVICE = "ana.phone:7"
BAKERY_ENTER = 298  # the trace point where the drive comes within the bakery's 40 m (out at 304)

WELCOME = """
id: bakery-welcome
trigger: {on: enter, geofences: {ids: [bakery-300]}}
message:
  title: "Hello {{ device.first_name | default('there') }}"
  body: "Fresh bread at {{ store.name }}, {{ distance_m }} m away"
  ttl: 15m
"""


Backend = tuple[str, str | None]  # storage.backend, redis_url
MEMORY: Backend = ("memory", None)


async def _app(aiohttp_client: MakeClient, tmp_path: Path, backend: Backend,
               rules: dict[str, str], **sections: Any) -> Client:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    for name, text in rules.items():
        (folder / name).write_text(text)
    backend_name, redis_url = backend
    policy = {"quiet_hours": None, **sections.pop("policy", {})}
    settings = settings_for(tmp_path, backend=backend_name, redis_url=redis_url, policy=policy,
                            **sections)
    return await aiohttp_client(create_app(settings, timer_interval_s=0.1))


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return ("redis", request.getfixturevalue("redis_url"))
    return MEMORY


async def _register(api: Client, *, marketing: bool = True, token: str | None = "fcm-1") -> None:
    resp = await api.put(f"/v1/devices/{DEVICE}", headers=DEVICES, json={
        "push_token": token, "platform": "android", "attributes": {"first_name": "Ana"},
        "consent": {"location": True, "marketing": marketing}})
    assert resp.status == 200, await resp.text()


def _fresh_trace(at_index: int = BAKERY_ENTER, ago_s: float = 5.0) -> list[Any]:
    """The drive shifted so that point `at_index` was `ago_s` ago."""
    trace = load_trace()
    shift = time.time() - ago_s - trace[at_index].ts
    return [type(p)(p.ts + shift, p.lat, p.lon) for p in trace]


async def _drive(api: Client, trace: list[Any], start: int, end: int) -> dict[str, Any]:
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"pings": [ping(DEVICE, p) for p in trace[start:end]]})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def _export(api: Client) -> dict[str, Any]:
    resp = await api.get(f"/v1/devices/{DEVICE}/export", headers=DEVICES)
    assert resp.status == 200
    export: dict[str, Any] = await resp.json()
    return export


def _decisions(export: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(d["rule_id"], d["outcome"], d["reason"]) for d in export["decisions"]]


async def _metric(api: Client, name: str) -> dict[str, float]:
    text = await (await api.get("/metrics")).text()
    return {labels: float(value) for labels, value in
            re.findall(rf"^{name}(\{{.*?\}})? (\S+)$", text, re.M)}


async def test_a_rule_pushes_once_for_the_moment_and_ops_and_support_see_it(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend,
        caplog: pytest.LogCaptureFixture) -> None:
    api = await _app(aiohttp_client, tmp_path, backend, {"welcome.yaml": WELCOME})
    await _register(api)
    trace = _fresh_trace()
    with caplog.at_level(logging.INFO, logger="geopush.service.decisions"):
        body = await _drive(api, trace, 250, BAKERY_ENTER + 2)
        assert [e["type"] for e in body["events"]] == ["enter"]
        # on through the store and out: an exit no rule wants, no other decision
        body = await _drive(api, trace, BAKERY_ENTER + 2, BAKERY_ENTER + 20)
        assert [e["type"] for e in body["events"]] == ["exit"]
    export = await _export(api)
    assert _decisions(export) == [("bakery-welcome", "push", None)]
    [decision] = export["decisions"]
    assert decision["title"] == "Hello Ana"
    assert re.fullmatch(r"Fresh bread at bakery-300, \d+ m away", decision["body"])
    [push] = export["pushes"]
    assert push["push_id"] == decision["push_id"] and push["outcome"] == "push"
    assert re.fullmatch(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", push["push_id"])
    counted = await _metric(api, "geopush_decisions_total")
    assert counted == {'{outcome="push",reason=""}': 1.0}
    # one log line for the push, the device pseudonymised, no message text
    formatter = make_formatter(LoggingSettings(pseudonym_key="test-pseudonym-key"))
    lines = [formatter.format(r) for r in caplog.records if r.getMessage() == "push_decided"]
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["push_id"] == push["push_id"] and line["rule_id"] == "bakery-welcome"
    assert line["device"] == pseudonym(DEVICE, "test-pseudonym-key")
    assert DEVICE not in lines[0] and "Ana" not in lines[0]


@pytest.mark.parametrize(("profile", "sections", "ago_s", "reason"), [
    ({}, {}, 15 * 60.0, "late"),  # the default max_event_lag is 10 minutes
    ({"marketing": False}, {}, 5.0, "no_consent"),
    ({"token": None}, {}, 5.0, "no_token"),
    ({}, {"policy": {"max_event_lag": "1m"}}, 90.0, "late"),
])
async def test_the_policy_stops_what_it_should_and_says_why(
        aiohttp_client: MakeClient, tmp_path: Path, profile: dict[str, Any],
        sections: dict[str, Any], ago_s: float, reason: str) -> None:
    api = await _app(aiohttp_client, tmp_path, MEMORY,
                     {"welcome.yaml": WELCOME}, **sections)
    await _register(api, **profile)
    await _drive(api, _fresh_trace(ago_s=ago_s), 250, BAKERY_ENTER + 10)
    export = await _export(api)
    assert _decisions(export) == [("bakery-welcome", "suppressed", reason)]
    assert export["pushes"] == []


async def test_a_dwell_fired_by_the_timer_decides(aiohttp_client: MakeClient, tmp_path: Path,
                                                  backend: Backend) -> None:
    """No ping comes after the enter: the 20 s dwell fires on the timer and pushes."""
    rule = WELCOME.replace("id: bakery-welcome", "id: bakery-stay").replace(
        "trigger: {on: enter,", "trigger: {on: dwell, dwell: 20s,")
    api = await _app(aiohttp_client, tmp_path, backend, {"stay.yaml": rule})
    await _register(api)
    trace = _fresh_trace(ago_s=19.0)  # the enter 19 s ago: the dwell falls due in a second
    await _drive(api, trace, 250, BAKERY_ENTER + 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        export = await _export(api)
        if export["decisions"]:
            break
        await asyncio.sleep(0.1)
    assert _decisions(export) == [("bakery-stay", "push", None)]
    assert export["decisions"][0]["event"] == "dwell"


HOT = """
id: hot-bakery
trigger: {on: enter, geofences: {ids: [bakery-300]}}
when: {weather: {temperature_c: {min: 25}, condition: [clear]}}
message: {title: "{{ weather.temperature_c | round | int }} degrees", body: "Ice cream inside"}
"""


@pytest.mark.parametrize(("weather", "pushed"), [
    ({"provider": "static", "static": {"temperature_c": 31, "condition": "clear"}}, True),
    ({"provider": "static", "static": {"temperature_c": 18, "condition": "clear"}}, False),
    ({"provider": "none"}, False),  # unknown weather never makes a weather condition true
])
async def test_weather_rules_read_the_configured_provider(
        aiohttp_client: MakeClient, tmp_path: Path, weather: dict[str, Any],
        pushed: bool) -> None:
    api = await _app(aiohttp_client, tmp_path, MEMORY,
                     {"hot.yaml": HOT}, weather=weather)
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 10)
    export = await _export(api)
    if pushed:
        assert _decisions(export) == [("hot-bakery", "push", None)]
        assert export["decisions"][0]["title"] == "31 degrees"
    else:
        assert export["decisions"] == []  # `when` false: not a candidate, no record


# -- opens -------------------------------------------------------------------------------


async def _pushed(api: Client) -> str:
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 10)
    [push] = (await _export(api))["pushes"]
    push_id: str = push["push_id"]
    return push_id


async def test_the_app_reports_an_open_with_its_device_token(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend) -> None:
    api = await _app(aiohttp_client, tmp_path, backend, {"welcome.yaml": WELCOME})
    push_id = await _pushed(api)
    token = (await (await api.post(f"/v1/devices/{DEVICE}/token", headers=DEVICES)).json())[
        "token"]
    bearer = {"Authorization": f"Bearer {token}"}
    resp = await api.post(f"/v1/pushes/{push_id}/opened", headers=bearer)
    assert resp.status == 200, await resp.text()
    first = (await resp.json())["opened_at"]
    again = await api.post(f"/v1/pushes/{push_id}/opened", headers=bearer)
    assert (await again.json())["opened_at"] == first  # the first open is kept
    [push] = (await _export(api))["pushes"]
    assert push["opened_at"] == first
    assert await _metric(api, "geopush_pushes_opened_total") == {"": 1.0}  # one open, twice
    # a new token revokes this one: its opens are refused too
    await api.post(f"/v1/devices/{DEVICE}/token", headers=DEVICES)
    assert (await api.post(f"/v1/pushes/{push_id}/opened", headers=bearer)).status == 401


HELD_OUT = WELCOME.replace("id: bakery-welcome", "id: bakery-held-out\nholdout: 0.999999")


async def test_a_holdout_cannot_be_opened_it_was_never_sent(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend) -> None:
    api = await _app(aiohttp_client, tmp_path, backend, {"held.yaml": HELD_OUT})
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 10)
    [held] = (await _export(api))["pushes"]
    assert held["outcome"] == "holdout"
    resp = await api.post(f"/v1/pushes/{held['push_id']}/opened", headers=INGEST,
                          json={"device_id": DEVICE})
    assert resp.status == 404
    assert (await _export(api))["pushes"][0]["opened_at"] is None


@pytest.mark.parametrize(("path_id", "body", "status", "names"), [
    (None, {"device_id": DEVICE}, 200, None),
    (None, {"device_id": "someone-else"}, 404, None),  # not that device's push
    ("01KBZ0000000000000000000AB", {"device_id": DEVICE}, 404, None),
    ("not-a-ulid", {"device_id": DEVICE}, 400, "push_id"),
    ("01KBZ0000000000000000000aU", {"device_id": DEVICE}, 400, "push_id"),
    (None, {}, 400, "device_id"),
    (None, {"device_id": "../etc"}, 400, "device_id"),
    (None, [1, 2], 400, "device_id"),
])
async def test_a_backend_reports_an_open_naming_the_device(
        aiohttp_client: MakeClient, tmp_path: Path, path_id: str | None, body: Any,
        status: int, names: str | None) -> None:
    api = await _app(aiohttp_client, tmp_path, MEMORY,
                     {"welcome.yaml": WELCOME})
    push_id = await _pushed(api)
    resp = await api.post(f"/v1/pushes/{path_id or push_id}/opened", headers=INGEST, json=body)
    assert resp.status == status, await resp.text()
    if names is not None:
        error = (await resp.json())["error"]
        assert error["details"][0]["field"] == names
    # the devices key has no `ingest` scope
    resp = await api.post(f"/v1/pushes/{push_id}/opened", headers=DEVICES, json=body)
    assert resp.status == 403


# -- the caps hold under a storm ("done when" of the rules issue) ----------------------------

EITHER = """
id: either-store
trigger: {on: enter, geofences: {ids: [bakery-300, pharmacy-700]}}
message: {title: "Hi", body: "at {{ store.name }}"}
"""
STORM_CAP = 5


@pytest.mark.parametrize("storage", ["memory", "redis", "redis-cluster"])
async def test_200_simultaneous_events_of_one_device_on_two_instances_never_pass_the_caps(
        aiohttp_client: MakeClient, tmp_path: Path, request: pytest.FixtureRequest,
        storage: str) -> None:
    """One phone hops between two stores 200 times; its pings go in bursts of ten at once,
    alternately to two instances sharing Redis (one instance on memory). Caps raised to 5 a
    day, no gap or cooldown: exactly 5 pushes, however the commits interleave."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "either.yaml").write_text(EITHER)
    stored: dict[str, Any] = {"backend": "memory"}
    if storage == "redis":
        stored = {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    elif storage == "redis-cluster":
        stored = {"backend": "redis", "redis_cluster": True,
                  "redis_url": request.getfixturevalue("redis_cluster_url")}
    settings = settings_for(
        tmp_path, storage=stored,
        policy={"quiet_hours": None, "max_event_lag": "1d", "min_gap": 0, "store_cooldown": 0,
                "max_per_device": [{"max": STORM_CAP, "per": "1d"}]})
    first = await aiohttp_client(create_app(settings))
    second = first if storage == "memory" else await aiohttp_client(create_app(settings))
    await _register(first)
    trace = load_trace()
    bakery, pharmacy = trace[300], trace[700]
    base = time.time() - 500

    async def hop(i: int) -> dict[str, Any]:
        where = bakery if i % 2 else pharmacy
        instance = first if i // 2 % 2 else second  # each sees the phone hop, and so do both
        resp = await instance.post("/v1/pings", headers=INGEST, json={
            "device_id": DEVICE, "lat": where.lat, "lon": where.lon,
            "ts": round((base + 2 * i) * 1000)})
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    answers: list[dict[str, Any]] = []
    for burst in range(20):
        answers += await asyncio.gather(*(hop(10 * burst + k) for k in range(10)))
    enters = sum(e["type"] == "enter" for a in answers for e in a["events"])
    export = await _export(first)
    assert len(export["pushes"]) == STORM_CAP
    counted: dict[str, float] = {}
    for instance in {id(first): first, id(second): second}.values():
        for labels, value in (await _metric(instance, "geopush_decisions_total")).items():
            counted[labels] = counted.get(labels, 0.0) + value
    # the cap was what stopped every other enter (the export keeps the latest 100 decisions)
    assert enters > STORM_CAP
    assert counted == {'{outcome="push",reason=""}': STORM_CAP,
                       '{outcome="suppressed",reason="global_cap"}': enters - STORM_CAP}


async def test_every_decision_of_a_bulk_request_is_counted_and_logged(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend,
        caplog: pytest.LogCaptureFixture) -> None:
    """A relay's request of many phones entering at once: its decisions are told of per
    group and a slice at a time (geopush.service.ingest), none lost on the way."""
    api = await _app(aiohttp_client, tmp_path, backend, {"welcome.yaml": WELCOME})
    trace = _fresh_trace()
    phones = [f"bulk-{n}" for n in range(250)]
    for phone in phones:
        resp = await api.put(f"/v1/devices/{phone}", headers=DEVICES, json={
            "push_token": "t", "consent": {"location": True, "marketing": True}})
        assert resp.status == 200
    with caplog.at_level(logging.INFO, logger="geopush.service.decisions"):
        resp = await api.post("/v1/pings", headers=INGEST, json={"pings": [
            ping(phone, p) for p in trace[BAKERY_ENTER - 2:BAKERY_ENTER + 1]
            for phone in phones]})
        assert resp.status == 200
        assert (await resp.json())["accepted"] == 3 * len(phones)
        for _ in range(50):
            counted = await _metric(api, "geopush_decisions_total")
            if counted.get('{outcome="push",reason=""}') == len(phones):
                break
            await asyncio.sleep(0.02)
    assert counted == {'{outcome="push",reason=""}': float(len(phones))}
    assert sum(r.getMessage() == "push_decided" for r in caplog.records) == len(phones)
